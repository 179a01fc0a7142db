"""The edit record (`refusal_edit.json`): what was done to a checkpoint, typed and validated in one place.

The writer (orthogonalize) creates it, `evaluate --record` adds a summary, the model card is rendered
from it and push refuses to publish without a valid one. A record is only ever read through
`EditRecord.load` / `from_json`, so a hand-edited or corrupt file is a one-line error wherever it is
used, never a card that says "layer None, base_model: unknown".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from refusal_edit import __version__
from refusal_edit.checkpoint.atomic import write_text
from refusal_edit.errors import RefusalEditError

RECORD = "refusal_edit.json"
CARD = "README.md"  # the model card beside the record (rendered by `checkpoint.card`)
TOOL = "refusal-edit"
MODES = ("ablate", "add")  # a variant of the ablation or a tuned point is mode ablate, described by `spec`
# What versions before issue #30 wrote for a variant: read as mode ablate (its `spec` says which variant).
LEGACY_VARIANT_MODE = "spec"
FORMATS = ("safetensors", "gguf", "peft", "gguf-lora")  # a checkpoint, a GGUF, or an adapter of one
REQUIRED = ("tool", "tool_version", "mode", "base_model")  # base_model may be null (unknown), never absent
MAX_BYTES = 16 << 20  # a record is a few KB; anything this large is not one
_HEAD = ("tool", "tool_version", "name", "created")  # written first: what a reader looks for
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def hub_model_id(value: str | None) -> str | None:
    """`value` if it is a Hub model id with a namespace (ORG/NAME), else None (local paths, folder names)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or value.count("/") != 1:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def finite(value: Any) -> Any:
    """JSON has no NaN/inf: such floats become null (in nested dicts and lists too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


@dataclass
class EditRecord:
    """One edited checkpoint's record. Unknown keys of a loaded file are kept in `extra` and written back."""

    mode: str  # one of MODES
    base_model: str | None  # the Hub id (ORG/NAME) the edit descends from; None = unknown
    coeff: float = 1.0
    layer: int | None = None  # add: the layer the vector is added at
    site: str | None = None  # add: input | attn
    unit: bool = False
    direction_file: str | None = None
    direction_sha256: str | None = None
    direction_layer: int | None = None
    direction_position: int | None = None
    direction_model: str | None = None
    spec: dict[str, Any] | None = None  # a variant / tuned point of the ablation, as JSON
    format: str = "safetensors"  # one of FORMATS
    template: dict[str, Any] | None = None  # chat template / system prompt the direction was found with
    license: str | None = None  # the parent's licence (its card's `license`, a GGUF's general.license), for the card
    name: str = ""
    source_model: dict[str, Any] = field(default_factory=dict)  # path, name, model_type of the input
    output_dtype: str = "keep"
    edited_tensors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    previous_edit: dict[str, Any] | None = None  # the input's own record (raw JSON) for a re-edit
    evaluation: dict[str, Any] | None = None  # `evaluate --record`: the report's summary
    tool: str = TOOL
    tool_version: str = __version__
    created: str = field(default_factory=_now)
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ building

    def after(self, previous: EditRecord | None) -> EditRecord:
        """This record as a re-edit of a checkpoint whose record is `previous`.

        The original base model is carried through (an explicit `base_model` still wins): an edit of an
        edit descends from the same Hub model, not from the folder it was read from.
        """
        if previous is None:
            return self
        return dataclasses.replace(
            self, base_model=self.base_model or previous.base_model, previous_edit=previous.to_dict()
        )

    def with_evaluation(self, summary: dict[str, Any]) -> EditRecord:
        """A copy that carries `summary` (an evaluation report's headline numbers; NaN/inf become null)."""
        return dataclasses.replace(self, evaluation=finite(dict(summary)))

    @property
    def removes_refusal(self) -> bool:
        """Whether the edit suppresses refusal (ablation, spec variants, negative addition) or amplifies it."""
        return self.mode != "add" or self.coeff < 0

    # ------------------------------------------------------------------------------------------ checking

    def validate(self, where: str = RECORD) -> EditRecord:
        """Raise a one-line error naming the first bad field; return self when the record is sound."""

        def bad(name: str, why: str) -> RefusalEditError:
            return RefusalEditError(f"{where}: {name} {why}, not {getattr(self, name)!r}")

        for f in dataclasses.fields(self):
            if not _accepts(_HINTS[f.name], getattr(self, f.name)):
                raise bad(f.name, f"must be {_describe(_HINTS[f.name])}")
        if self.tool != TOOL:
            raise bad("tool", f"must be {TOOL!r} (this file was not written by refusal-edit)")
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {', '.join(MODES)}")
        if self.base_model is not None and hub_model_id(self.base_model) is None:
            raise bad("base_model", "must be a Hub model id ORG/NAME or null (unknown)")
        if self.format not in FORMATS:
            raise bad("format", f"must be one of {', '.join(FORMATS)}")
        if not math.isfinite(self.coeff):
            raise bad("coeff", "must be finite")
        if self.mode == "add" and self.layer is None:
            raise bad("layer", "must be set for mode add")
        if self.direction_sha256 is not None and not _SHA256.fullmatch(self.direction_sha256):
            raise bad("direction_sha256", "must be 64 lowercase hex digits")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in self.edited_tensors.values()):
            raise bad("edited_tensors", "must map names to counts")
        if not all(isinstance(n, str) for n in self.notes):
            raise bad("notes", "must be a list of strings")
        return self

    # ------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        order = [*_HEAD, *(f.name for f in dataclasses.fields(self) if f.name not in (*_HEAD, "extra"))]
        data = {name: getattr(self, name) for name in order}
        return {**data, **{k: v for k, v in self.extra.items() if k not in data}}

    def to_json(self) -> str:
        """The validated record as JSON text (what is written, or embedded in a GGUF's metadata)."""
        self.validate()
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise RefusalEditError(f"{RECORD}: cannot be written as JSON: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any, where: str = RECORD) -> EditRecord:
        """A validated record from parsed JSON (unknown keys go to `extra`)."""
        if not isinstance(data, dict):
            raise RefusalEditError(f"{where} must hold a JSON object, not {type(data).__name__}")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise RefusalEditError(f"{where} is not an edit record: it lacks {', '.join(missing)}")
        if data.get("mode") == LEGACY_VARIANT_MODE:
            if not data.get("spec"):
                raise RefusalEditError(f"{where}: spec must describe the edit for mode spec, not {data.get('spec')!r}")
            data = {**data, "mode": "ablate"}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names}).validate(where)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = RECORD) -> EditRecord:
        def no_constant(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            data = json.loads(text, parse_constant=no_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RefusalEditError(f"{where} is not valid JSON: {exc}") from None
        return cls.from_dict(data, where)

    # ------------------------------------------------------------------------------------------ files

    @classmethod
    def load(cls, folder: str | Path, required: bool = False) -> EditRecord | None:
        """The record of a checkpoint folder; None when absent unless `required`. Corrupt or invalid: an error."""
        path = Path(folder) / RECORD
        if not path.is_file():
            if required:
                raise RefusalEditError(f"{folder} has no {RECORD} (the record written by refusal-edit orthogonalize)")
            return None
        try:
            if path.stat().st_size > MAX_BYTES:
                raise RefusalEditError(f"{path} is too large to be an edit record")
            text = path.read_bytes()
        except OSError as exc:
            raise RefusalEditError(f"cannot read {path}: {exc.strerror}") from None
        return cls.from_json(text, str(path))

    def save(self, folder: str | Path, card: str | None = None) -> Path:
        """Write `refusal_edit.json` (and, given its text, the model card README.md) into `folder`.

        Each file is replaced atomically: an interrupted run leaves the old file, never half of one. The card
        comes as text (`checkpoint.card.render_card`), so the record needs nothing that describes edits.
        """
        folder = Path(folder)
        write_text(folder / RECORD, self.to_json())
        if card is not None:
            write_text(folder / CARD, card)
        return folder / RECORD


def is_tool_output(folder: str | Path) -> bool:
    """Whether `folder` is an output of this tool: a directory holding a valid edit record."""
    try:
        return Path(folder).is_dir() and EditRecord.load(folder) is not None
    except RefusalEditError:
        return False


_HINTS = get_type_hints(EditRecord)


def _options(hint: Any) -> tuple[Any, ...]:
    return get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)


def _accepts(hint: Any, value: Any) -> bool:
    """isinstance against a field's annotation (X | None, dict[...], list[...]); bools are not numbers."""
    for t in map(lambda t: get_origin(t) or t, _options(hint)):
        if value is None and t is type(None):
            return True
        if isinstance(value, bool) and t in (int, float):
            continue
        if (t is float and isinstance(value, int | float)) or (t is not type(None) and isinstance(value, t)):
            return True
    return False


def _describe(hint: Any) -> str:
    names = {str: "text", int: "an integer", float: "a number", bool: "true or false", dict: "an object"}
    names |= {list: "a list", type(None): "null"}
    return " or ".join(names.get(get_origin(t) or t, str(t)) for t in _options(hint))
