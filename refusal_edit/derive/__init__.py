"""Architectures outside the table: derived from the model itself, verified exact, cached.

`resolve_spec` is how the layers above the edits (loading, the GGUF view, the workflows) ask for a config's
spec: the table's entry, else one derived for a model type the hand-written table lacks and registered with
`refusal_edit.arch`, whose `get_spec` answers for it from then on (the edits never derive: derivation verifies
a spec with them). A tiny random instance is built from the user's own config (`shrink`), its residual writers are
found numerically (`probe`, `account`, `params`, `build`) and the resulting `ArchSpec` is accepted only if
the edits it drives are exact on that instance (`verify`). A verified spec is cached as JSON under the
cache directory by model type, transformers version and the config's structural fingerprint, so the
derivation runs once per type; a failure is a clear error naming what could not be resolved, before any
real weight is read.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import refusal_edit.arch as arch
from refusal_edit.arch import ArchSpec, TensorRule, WriterSite
from refusal_edit.console import err
from refusal_edit.derive.scales import scale_function
from refusal_edit.errors import RefusalEditError

# What a cached spec has passed; raised when verification gains a check, so that older entries are derived
# again (2: multimodal wrappers verified whole, not only their language model).
CHECKS = 2

__all__ = [
    "DERIVED",
    "cache_path",
    "derived_spec",
    "from_json",
    "known_spec",
    "register",
    "resolve_spec",
    "spec_key",
    "to_json",
]

# Specs derived and verified (or read from the cache) in this process, by `spec_key`: model type, transformers
# version and structure, as on disk. Never by model type alone: a dense and an MoE config of one type, or two
# `layer_types` mixes, have different writers.
DERIVED: dict[str, ArchSpec] = {}


def _config(model_type: str, config: Any) -> Any:
    from transformers import AutoConfig

    try:
        if config is None:
            return AutoConfig.for_model(model_type)
        if isinstance(config, dict):  # a config.json as read: its special floats (inf) still encoded
            from transformers import PretrainedConfig

            data = PretrainedConfig._decode_special_floats({k: v for k, v in config.items() if k != "model_type"})
            return AutoConfig.for_model(model_type, **data)
    except Exception as exc:
        raise RefusalEditError(
            f"unsupported architecture {model_type!r}: transformers cannot read it ({exc})"
        ) from None
    return config


def _flags(text: Any) -> dict[str, Any]:
    """The config's flags, names and layer kinds (bools, strings, lists of them): cheap structure hints."""
    skip = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "name_or_path"}
    keep: dict[str, Any] = {}
    for key, value in sorted(text.to_dict().items()):
        if key in skip:
            continue
        if isinstance(value, (bool, str)) or value is None:
            keep[key] = value
        elif isinstance(value, list) and all(isinstance(v, (str, bool)) for v in value):
            keep[key] = sorted({str(v) for v in value})
    return keep


def _layer_structures(text: Any) -> list[Any]:
    """The model's structure as the derivation sees it, sizes left out: each distinct decoder-layer kind
    (module names and classes, parameter names) and the modules beside the layers, from the shrunk config
    at full depth on the meta device (no memory). Integers decide structure too (an expert count of 0, a
    first dense layer, a per-layer-input width, which layers are MoE), and only the built model says how."""
    import torch

    from refusal_edit.derive.shrink import _num_layers, layer_list, model_class, shrunk

    small = shrunk(text)
    with torch.device("meta"):
        model = model_class(small)._from_config(small)
    name, layers = layer_list(model, _num_layers(small))
    kinds = {
        tuple((n, type(m).__name__) for n, m in layer.named_modules()) + tuple(n for n, _ in layer.named_parameters())
        for layer in layers
    }
    outside = [(n, type(m).__name__) for n, m in model.named_modules() if not n.startswith(name + ".")]
    return [sorted(kinds), outside]


# Config content -> structure fingerprint: building the meta model costs ~0.1-1 s, asked once per config.
_FINGERPRINTS: dict[str, str] = {}


def _fingerprint(config: Any) -> str:
    """What can change a model's structure without changing its type: flags, names, layer kinds, and the
    layer structures themselves (two configs of one type, dense and MoE, never share a spec)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    content = json.dumps([config.model_type, text.to_dict()], sort_keys=True, default=str)
    memo = hashlib.sha256(content.encode()).hexdigest()
    if memo not in _FINGERPRINTS:
        keep: dict[str, Any] = {"model_type": config.model_type, "text": text.model_type, **_flags(text)}
        try:
            keep["structure"] = _layer_structures(text)
        except Exception as exc:  # the derivation itself will say why it cannot build this config
            keep["structure"] = f"unbuilt: {type(exc).__name__}"
        _FINGERPRINTS[memo] = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]
    return _FINGERPRINTS[memo]


def spec_key(config: Any) -> str:
    """What a derived spec is valid for: the model type, the transformers version, the structure fingerprint
    and the checks it passed (the in-process registry's key and the cache file's name)."""
    import transformers

    return f"{config.model_type}-{transformers.__version__}-{_fingerprint(config)}-v{CHECKS}"


def cache_path(config: Any) -> Path:
    from refusal_edit.loading.cache import cache_root

    return cache_root() / "archs" / f"{spec_key(config)}.json"


def register(config: Any, spec: ArchSpec) -> None:
    """`spec` answers for `config` (and for a wrapper's language model, for its text config) in this process:
    here by `spec_key`, and in `refusal_edit.arch.get_spec` for every config of that structure."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    pairs = [(config, spec)]
    if spec.text_model_type is not None and text is not config:
        pairs.append((text, spec.derive(spec.text_model_type, text_model_type=None)))
    for cfg, answer in pairs:
        key = spec_key(cfg)
        DERIVED[key] = answer
        arch.register(cfg.model_type, answer, lambda other, key=key: _key_of(other) == key)


def _key_of(config: Any) -> str | None:
    """The `spec_key` of a config as the edits hold it (a `config.json` dict or a transformers config)."""
    try:
        return spec_key(_config(config["model_type"], config) if isinstance(config, dict) else config)
    except Exception:
        return None


def known_spec(config: Any) -> ArchSpec | None:
    """The derived spec of `config` if this process or the cache has one (never derives: None otherwise)."""
    model_type = getattr(config, "model_type", None)
    if not model_type or model_type not in _decoder_types():
        return None
    try:
        key = spec_key(config)
    except Exception:
        return None
    if key not in DERIVED:
        spec = _read(cache_path(config))
        if spec is None:
            return None
        register(config, spec)
    return DERIVED[key]


def _read(path: Path) -> ArchSpec | None:
    if not path.is_file():
        return None
    try:
        return from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None


def to_json(spec: ArchSpec) -> dict[str, Any]:
    return {
        "model_type": spec.model_type,
        "stock_class": spec.stock_class,
        "tensors": [[r.pattern, r.kind, r.site, r.per_expert, r.module] for r in spec.tensors],
        "layers": spec.layers,
        "sites": [
            [s.name, list(s.modules), s.post_norm, [[m, list(c)] for m, c in s.chains], s.optional] for s in spec.sites
        ],
        "embeddings": list(spec.embeddings),
        "final_norm": spec.final_norm,
        "lm_head": spec.lm_head,
        "norm_offset": spec.norm_offset,
        "embed_scale": spec.embed_scale.__name__,
        "experts_attrs": list(spec.experts_attrs),
        "text_model_type": spec.text_model_type,
        "recurrent": spec.recurrent,
        "notes": spec.notes,
    }


def from_json(data: dict[str, Any]) -> ArchSpec:

    return ArchSpec(
        data["model_type"],
        tuple(TensorRule(p, k, s, bool(e), m) for p, k, s, e, m in data["tensors"]),
        data["stock_class"],
        layers=data["layers"],
        sites=tuple(
            WriterSite(n, tuple(mods), post, tuple((m, tuple(c)) for m, c in chains), bool(opt))
            for n, mods, post, chains, opt in data["sites"]
        ),
        embeddings=tuple(data["embeddings"]),
        final_norm=data["final_norm"],
        lm_head=data["lm_head"],
        norm_offset=float(data["norm_offset"]),
        embed_scale=scale_function(data["embed_scale"]),
        experts_attrs=tuple(data["experts_attrs"]),
        text_model_type=data["text_model_type"],
        recurrent=bool(data["recurrent"]),
        notes=data["notes"],
        derived=True,
    )


def _decoder_types() -> set[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def derive_and_verify(config: Any) -> tuple[ArchSpec, dict[str, float]]:
    """Derive the spec of `config`'s type on a tiny instance and verify it there (no cache, no registry)."""
    import torch

    from refusal_edit.derive.build import derive
    from refusal_edit.derive.verify import verify, verify_wrapper

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and far faster on a shared machine
    try:
        derived = derive(config)
        figures = verify(derived.spec, derived.model, derived.ids)
        if derived.spec.text_model_type is not None:  # a multimodal wrapper: its own names and class
            figures |= verify_wrapper(derived.spec, config)
        return derived.spec, figures
    finally:
        torch.set_num_threads(threads)


def resolve_spec(config: Any) -> ArchSpec:
    """The spec of a config (a `config.json` dict or a transformers config): the table's entry, else the one
    derived and verified for its structure (cached), registered so that `refusal_edit.arch.get_spec` answers
    for it; a clear error when neither exists, before any real weight is read."""
    model_type = arch.model_type_of(config)
    if model_type in arch.VERIFYING or model_type in arch.table():
        return arch.get_spec(model_type, config)
    return derived_spec(model_type, config)


def derived_spec(model_type: str | None, config: Any = None) -> ArchSpec:
    """The verified spec of a model type outside the table (cached), or a clear error."""
    if not model_type:
        raise RefusalEditError("the model config names no model_type")
    if model_type not in _decoder_types():
        raise RefusalEditError(
            f"unsupported architecture {model_type!r}: transformers {_version()} has no causal-LM or image-text "
            "class for it (only decoder language models can be edited)"
        )
    cfg = _config(model_type, config)
    known = known_spec(cfg)
    if known is not None:
        return known
    start = time.perf_counter()
    try:
        spec, _ = derive_and_verify(cfg)
    except RefusalEditError as exc:
        raise RefusalEditError(f"unsupported architecture {model_type!r}: {exc}") from None
    except Exception as exc:  # transformers' own failures on a tiny instance
        raise RefusalEditError(
            f"unsupported architecture {model_type!r}: the derivation failed ({type(exc).__name__}: {exc})"
        ) from None
    register(cfg, spec)
    path = cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(to_json(spec), indent=1))
    tmp.replace(path)
    err.print(
        f"{model_type}: not in the table; residual writers derived and verified on a tiny instance "
        f"({time.perf_counter() - start:.1f} s, cached)",
        markup=False,
        highlight=False,
    )
    return spec


def _version() -> str:
    import transformers

    return transformers.__version__
