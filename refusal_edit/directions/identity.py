"""Which model a direction was found in, and whether the model being edited is that one.

A direction from another model is noise that happens to have the right length when the hidden sizes
match, and an edit by it is silently wrong. Extract writes the source model's identity into the direction
file (`source_model` metadata): model type, hidden size, layer count, the architecture-defining config
values and their hash, and the weights' sha256 where it is known without reading the weights (the GGUF a
recipe fetched, the Hub's LFS ids of a cache snapshot). Edits compare it with the target's: a difference
is an error naming both, unless the user allows a foreign direction on purpose. Config values are
compared key by key where both sides have them (a GGUF file's derived config names fewer keys than the
converted folder's); the weights only where both are known and the target is unedited (an edited model's
weights differ from its base's by design). Direction files from before identities load as before: their
source is "unknown" and nothing is compared.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from refusal_edit.checkpoint.layout import SHAPE_KEYS
from refusal_edit.errors import RefusalEditError

IDENTITY_KEY = "source_model"
ARCH_KEYS = SHAPE_KEYS  # compared in the text config of a multimodal wrapper
_BLOB = re.compile(r"/blobs/([0-9a-f]{64})$")


def _text(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def identity(config: dict[str, Any], name: str | None = None, weights_sha256: str | None = None) -> dict[str, Any]:
    """The identity of a model with `config` (a config.json dict, HF keys)."""
    text = _text(config)
    arch = {k: text[k] for k in ARCH_KEYS if isinstance(text.get(k), int) and not isinstance(text.get(k), bool)}
    arch["model_type"] = config.get("model_type")
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()
    return {
        "name": name,
        "model_type": arch["model_type"],
        "hidden_size": arch.get("hidden_size"),
        "num_layers": arch.get("num_hidden_layers"),
        "config": arch,
        "config_sha256": digest,
        "weights_sha256": weights_sha256 or None,
    }


def known_weights_sha256(hf_dir: Path | None, sha256: str | None = None) -> str | None:
    """The weights' hash when it costs nothing: the given one (a GGUF's, hashed when it was converted), else
    the Hub's LFS ids of a cache snapshot's safetensors files (their blob names), combined; else None."""
    if sha256:
        return sha256
    if hf_dir is None:
        return None
    blobs = []
    for p in sorted(Path(hf_dir).glob("*.safetensors")):
        match = _BLOB.search(str(p.resolve())) if p.is_symlink() else None
        if match is None:
            return None
        blobs.append(f"{p.name}:{match[1]}")
    return hashlib.sha256("\n".join(blobs).encode()).hexdigest() if blobs else None


def describe(ident: dict[str, Any] | None) -> str:
    """`name (model_type, hidden H, L layers)` for messages."""
    if not ident:
        return "an unknown model"
    return (
        f"{ident.get('name') or 'an unnamed model'} ({ident.get('model_type')}, hidden {ident.get('hidden_size')}, "
        f"{ident.get('num_layers')} layers)"
    )


def read(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The identity a direction file's metadata records, None for files written before identities."""
    raw = metadata.get(IDENTITY_KEY)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise RefusalEditError(f"metadata {IDENTITY_KEY} is not valid JSON") from None
    if not isinstance(value, dict):
        raise RefusalEditError(f"metadata {IDENTITY_KEY} is not a JSON object")
    return value


def mismatch(recorded: dict[str, Any], target: dict[str, Any], edited: bool = False) -> str | None:
    """How `target` differs from the model a direction was found in (`recorded`), or None if it is that model."""
    if recorded.get("model_type") not in (None, target.get("model_type")):
        return "model type"
    ours, theirs = recorded.get("config") or {}, target.get("config") or {}
    for key in ARCH_KEYS:
        if key in ours and key in theirs and ours[key] != theirs[key]:
            return key.replace("num_hidden_layers", "layer count").replace("_", " ")
    weights = recorded.get("weights_sha256"), target.get("weights_sha256")
    if not edited and None not in weights and weights[0] != weights[1]:
        return "weights (sha256)"
    return None


def check(
    recorded: dict[str, Any] | None, target: dict[str, Any], what: str, *, edited: bool = False, allow: bool = False
) -> str | None:
    """A one-line error if `what` (a direction or spec) comes from another model than `target`; with `allow`,
    the note to record instead. None when they match. An unknown source gives a note, never an error."""
    if recorded is None:
        return f"{what} does not record its source model (written by an older version): not checked"
    differs = mismatch(recorded, target, edited)
    if differs is None:
        return None
    text = (
        f"{what} was extracted from {describe(recorded)}, not from the model being edited, {describe(target)}: "
        f"they differ in {differs}"
    )
    if not allow:
        raise RefusalEditError(f"{text}; pass `allow_foreign_direction` to apply it anyway")
    return f"foreign direction applied on purpose: {text}"
