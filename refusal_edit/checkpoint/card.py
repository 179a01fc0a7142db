"""The model card (README.md) of an edited checkpoint, rendered from its edit record, and its checks.

The card states plainly what the edit does to the model's safety behaviour; its YAML metadata is what
the Hub indexes (`base_model`, `base_model_relation`, tags). Metadata is written and parsed with
huggingface_hub's `ModelCardData` / `ModelCard`.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from refusal_edit.arch import ARCHITECTURES
from refusal_edit.checkpoint.record import CARD, RECORD, EditRecord, hub_model_id
from refusal_edit.errors import RefusalEditError

__all__ = ["CARD", "RECORD", "card_metadata", "render_card", "validate_card"]


ADAPTERS = ("peft", "gguf-lora")  # record formats that hold an adapter of the base model, not a model
LIBRARIES = {"peft": "peft", "gguf": "gguf", "gguf-lora": "gguf"}  # the Hub's library_name per format


def effect_tag(r: EditRecord) -> str:
    """The tag that says what the edit does to safety behaviour (required on a card)."""
    return "abliterated" if r.removes_refusal else "refusal-amplified"


def card_tags(r: EditRecord) -> list[str]:
    """The tool, what the edit does (`abliterated` with the Hub's usual `uncensored`), and `lora` for adapters."""
    tags = [r.tool, effect_tag(r), *(["uncensored"] if r.removes_refusal else [])]
    return tags + (["lora"] if r.format in ADAPTERS else [])


def pipeline_tag(r: EditRecord) -> str:
    """From the model class: a multimodal wrapper (a `text_config` inside) is image-text-to-text."""
    spec = ARCHITECTURES.get(str(r.source_model.get("model_type")))
    return "image-text-to-text" if spec is not None and spec.text_model_type else "text-generation"


def _card_data(r: EditRecord) -> Any:
    from huggingface_hub import ModelCardData

    relation = "adapter" if r.format in ADAPTERS else "finetune"
    return ModelCardData(
        base_model=r.base_model,
        base_model_relation=relation if r.base_model else None,
        library_name=LIBRARIES.get(r.format, "transformers"),
        license=r.license,
        pipeline_tag=pipeline_tag(r),
        tags=card_tags(r),
    )


def card_metadata(record: EditRecord) -> dict[str, Any]:
    """The YAML metadata of the card; no `base_model` when the record does not know it."""
    return _card_data(record).to_dict()


def _effect(r: EditRecord) -> str:
    if r.mode == "ablate":
        where = (
            "the matrices that write into the residual stream, as the spec below describes"
            if r.spec
            else "every matrix that writes into the residual stream"
        )
        return (
            f"**Safety warning.** The refusal direction was removed from {where}. This model is designed to "
            "stop refusing: it will follow harmful requests that the base model declines. Its other behaviour is "
            "close to, but not exactly, the base model's."
        )
    if r.coeff < 0:
        return (
            f"**Safety warning.** {-r.coeff:g} x the refusal vector is subtracted from the residual stream at "
            f"layer {r.layer}. This suppresses refusals: the model will follow harmful requests that the base "
            "model declines."
        )
    return (
        f"{r.coeff:g} x the refusal vector is added to the residual stream at layer {r.layer}. This amplifies "
        "refusal: the model refuses more, including many harmless requests."
    )


def _spec_lines(spec: dict[str, Any], variant: str | None) -> list[str]:
    """The edit variant in words (`variant`; its JSON without them), and the numbers `tune` confirmed for it."""
    edit = spec.get("edit")
    lines = [f"- edit variant: {variant or json.dumps(edit, sort_keys=True)}"]
    if spec.get("front"):
        lines.append(f"- chosen from a `refusal-edit tune` front: point `{spec.get('point')}`")
    confirmed = spec.get("confirmed")
    if isinstance(confirmed, dict):
        lines.append(
            "- confirmed by tune on {p} harmful validation prompts: {r:.0%} refused, {d:.0%} degenerate; "
            "first-token KL {f:.4f}, multi-token KL {m} (nats, {k} harmless prompts)".format(
                p=confirmed.get("prompts"),
                r=confirmed.get("refusal_rate", 0.0),
                d=confirmed.get("degenerate_rate", 0.0),
                f=confirmed.get("first_token_kl", 0.0),
                m="-" if confirmed.get("multi_token_kl") is None else f"{confirmed['multi_token_kl']:.4f}",
                k=confirmed.get("kl_prompts", "?"),
            )
        )
    lines.append(f"- spec: `{json.dumps(edit, sort_keys=True)}`")
    return lines


def _usage(r: EditRecord) -> list[str]:
    """How the output is loaded, for adapters (the base model is needed beside it)."""
    base = r.base_model or "BASE_MODEL"
    if r.format == "peft":
        return [
            "## How to use",
            "",
            "A PEFT LoRA adapter: load the base model, then the adapter (`merge_and_unload()` bakes it in).",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "THIS_REPO")',
            "```",
            "",
        ]
    if r.format == "gguf-lora":
        return [
            "## How to use",
            "",
            f"A llama.cpp LoRA adapter for the GGUF of `{base}` it was made from: `llama-cli -m BASE.gguf --lora "
            "ADAPTER.gguf` (llama-cpp-python: `lora_path=`; Ollama: `ADAPTER`).",
            "",
        ]
    return []


def render_card(r: EditRecord, variant: str | None = None) -> str:
    """The card of a record; `variant` is the edit variant in words (`edits.spec.describe_variant`), given by
    the caller so that the checkpoint layer needs nothing that describes edits."""
    meta = _card_data(r).to_yaml()
    base = f"`{r.base_model}`" if r.base_model else "a base model that was not recorded"
    lines = [
        "---",
        meta,
        "---",
        "",
        f"# {r.name or 'Refusal-edited model'}",
        "",
        f"Edited from {base} with [refusal-edit](https://github.com/refusal-edit/refusal-edit) {r.tool_version}.",
        "",
        _effect(r),
        "",
        "Intended for interpretability and safety research (e.g. studying how refusal is represented). "
        "Do not deploy it where its outputs can cause harm.",
        "",
        *_usage(r),
        "## What was done",
        "",
        f"- mode: `{r.mode}`" + (f", coefficient {r.coeff}" if r.mode == "add" else ""),
        f"- direction: layer {r.direction_layer}, position {r.direction_position}, "
        f"sha256 `{(r.direction_sha256 or '')[:16]}...`",
    ]
    if r.spec:
        lines += _spec_lines(r.spec, variant)
    lines += [f"- {note}" for note in r.notes]
    if r.evaluation:
        lines += ["", "## Measured", ""] + [f"- {key}: {value}" for key, value in r.evaluation.items()]
    else:
        lines += ["", "No evaluation has been recorded for this checkpoint (`refusal-edit evaluate` measures it)."]
    lines += ["", f"The full record of the edit is in `{RECORD}`.", ""]
    return "\n".join(lines)


def validate_card(text: str, record: EditRecord) -> dict[str, Any]:
    """Parse a card's YAML metadata and require what the Hub indexes for an edited model.

    `base_model` links the edit to its parent, and the edit's tag (`abliterated` / `refusal-amplified`)
    is how the Hub labels what the model does to safety behaviour: a card without them is refused.
    """
    from huggingface_hub import ModelCard

    try:
        meta = ModelCard(text.removeprefix("\ufeff"), ignore_metadata_errors=False).data.to_dict()
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 2})" if where is not None else ""
        raise RefusalEditError(f"{CARD} metadata is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except ValueError as exc:
        raise RefusalEditError(f"{CARD} metadata is not a YAML mapping: {exc}") from None
    if not meta:
        raise RefusalEditError(
            f"{CARD} has no YAML metadata block (--- ... --- at the top); delete it to have one generated from {RECORD}"
        )
    expected = {"base_model": None, "base_model_relation": None, **card_metadata(record)}
    expected.pop("license", None)  # the parent's, carried when known; a card of the user's own may state another
    missing = [k for k in expected if meta.get(k) in (None, "", [])]
    if missing:
        raise RefusalEditError(f"{CARD} metadata lacks {', '.join(missing)} (expected e.g. {missing[0]}: ...)")
    bases = meta["base_model"] if isinstance(meta["base_model"], list) else [meta["base_model"]]
    for base in bases:
        if hub_model_id(base) is None:
            raise RefusalEditError(
                f"{CARD} metadata: base_model {base!r} is not a Hub model id (ORG/NAME); fix it in {CARD} "
                "or re-run orthogonalize with the base model's Hub id"
            )
    tags = meta["tags"]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RefusalEditError(f"{CARD} metadata: tags must be a list of strings")
    lacking = [t for t in (record.tool, effect_tag(record)) if t not in tags]
    if lacking:
        raise RefusalEditError(f"{CARD} metadata: tags must include {', '.join(lacking)} (what this edit does)")
    return meta
