"""What an edited GGUF (or a LoRA adapter GGUF) says about itself: ggml's `general.*` conventions.

ggml's GGUF spec (docs/gguf.md) names a file by `general.basename`, `general.size_label`, `general.finetune`,
`general.version` and its encoding, and records its parents as `general.base_model.count` and
`general.base_model.N.{name, organization, repo_url}`. An edited file is a derivative of its input: it keeps
the base name and size, gets the edit in its fine-tune string (`Instruct-abliterated`), names the input as its
one base model (the input's own parents are its grandparents, not recorded) and adds the edit's tags. The
default file name follows the same convention through gguf-py's `naming_convention`.
"""

from __future__ import annotations

from typing import Any

from gguf import GGUFValueType, LlamaFileType
from gguf.utility import naming_convention

from refusal_edit.gguf.file import GGUFFile

TAGS = ("abliterated", "uncensored", "refusal-edit")
AMPLIFIED_TAGS = ("refusal-amplified", "refusal-edit")
REPLACED = ("general.name", "general.finetune", "general.tags")  # plus every general.base_model.* key


def edit_label(removes_refusal: bool) -> str:
    return "abliterated" if removes_refusal else "refusal-amplified"


def encoding(gguf: GGUFFile) -> str | None:
    """The file's encoding as ggml names it (`Q4_K_M`), from `general.file_type`."""
    value = gguf.value("general.file_type")
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_") if value is not None else None
    except ValueError:
        return None


def derived(
    gguf: GGUFFile | None, base_model: str | None, removes_refusal: bool = True, name: str | None = None
) -> dict[str, Any]:
    """The `general.*` entries of an edit of `gguf` (values: str, or list[str] for tags; `(value, type)` for the
    count). Keys the input has under `REPLACED` and `general.base_model.*` are to be dropped. `gguf` None: an
    edit of the HF model `name` (an adapter for its conversion), which has no `general.*` of its own."""
    label = edit_label(removes_refusal)

    def value(key: str) -> Any:
        return gguf.value(key) if gguf is not None else None

    name = value("general.name") or name or (gguf.path.stem if gguf is not None else "model")
    finetune = value("general.finetune")
    tags = [t for t in (value("general.tags") or []) if isinstance(t, str)]
    added = TAGS if removes_refusal else AMPLIFIED_TAGS
    out: dict[str, Any] = {
        "general.name": f"{name} {label}",
        "general.finetune": f"{finetune}-{label}" if finetune else label,
        "general.tags": [*tags, *(t for t in added if t not in tags)],
        "general.base_model.count": (1, GGUFValueType.UINT32),
        "general.base_model.0.name": name,
    }
    org = value("general.organization")
    if org or base_model:
        out["general.base_model.0.organization"] = org or base_model.split("/")[0]  # type: ignore[union-attr]
    if base_model:
        out["general.base_model.0.repo_url"] = f"https://huggingface.co/{base_model}"
    return out


def replaced(key: str) -> bool:
    """Whether the input's entry `key` gives way to `derived`'s."""
    return key in REPLACED or key.startswith("general.base_model.")


def default_name(gguf: GGUFFile, removes_refusal: bool = True, lora: bool = False) -> str:
    """ggml's `<BaseName>-<SizeLabel>-<FineTune>-<Version>-<Encoding>[-LoRA].gguf` for an edit of `gguf`."""
    label = edit_label(removes_refusal)
    finetune = gguf.value("general.finetune")
    stem = naming_convention(
        gguf.value("general.name") or gguf.path.stem,
        gguf.value("general.basename"),
        f"{finetune}-{label}" if finetune else label,
        gguf.value("general.version"),
        gguf.value("general.size_label"),
        None if lora else encoding(gguf),
        "LoRA" if lora else None,
    )
    return stem + ".gguf"
