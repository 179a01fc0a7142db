"""The `extract` pipeline: refusal tokens -> candidates -> selection -> artifacts with full provenance."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit import __version__
from refusal_edit.checkpoint.atomic import atomic_dir
from refusal_edit.console import console
from refusal_edit.directions.artifacts import save_direction
from refusal_edit.directions.candidates import CandidateSet, generate_candidates
from refusal_edit.directions.refusal_tokens import RefusalTokens, derive_refusal_tokens, user_refusal_tokens
from refusal_edit.directions.select import Scorer, Selection, SelectionSettings, select_exhaustive, select_fast
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading.model import LoadedModel
from refusal_edit.prompts.sets import PromptSet
from refusal_edit.prompts.template import ChatFormat
from refusal_edit.provenance import versions


@dataclass
class ExtractSettings:
    n_train: int | None = None  # None: every training prompt
    n_val: int = 32
    batch_size: int = 16
    filter_train: bool = True
    exhaustive: bool = False
    refusal_tokens: list[str] | None = None  # user override, e.g. ["I", "As"]
    refusal_probe: int = 32  # prompts per side generated to derive refusal tokens
    selection: SelectionSettings = field(default_factory=SelectionSettings)


@dataclass
class ExtractResult:
    out: Path
    selection: Selection
    refusal_tokens: RefusalTokens
    candidates: CandidateSet
    run: dict[str, Any]


def _split(ps: PromptSet, name: str, n: int | None) -> PromptSet:
    part = ps.split(name).sample(n)
    if len(part) == 0:
        raise RefusalEditError(f"{ps.source}: the {name} split is empty")
    return part


def run_extract(
    lm: LoadedModel,
    fmt: ChatFormat,
    harmful: PromptSet,
    harmless: PromptSet,
    settings: ExtractSettings,
    out: Path,
    force: bool = False,
) -> ExtractResult:
    """Find and select the refusal direction of `lm`; write the artifacts to `out` atomically."""
    if Path(out).exists() and not force:
        raise RefusalEditError(f"output exists: {out} (pass --force to replace it)")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    h_train, s_train = _split(harmful, "train", settings.n_train), _split(harmless, "train", settings.n_train)
    h_val, s_val = _split(harmful, "val", settings.n_val), _split(harmless, "val", settings.n_val)
    model, tok = lm.model, lm.tokenizer

    if settings.refusal_tokens:
        tokens = user_refusal_tokens(tok, settings.refusal_tokens)
    else:
        n = settings.refusal_probe
        tokens = derive_refusal_tokens(
            model,
            tok,
            fmt,
            h_train.sample(n).instructions,
            s_train.sample(n).instructions,
            batch_size=settings.batch_size,
        )
    timings["refusal_tokens"] = time.perf_counter() - t
    console.print(f"refusal tokens ({tokens.source}): {', '.join(repr(s) for s in tokens.strings)}")

    t = time.perf_counter()
    cands = generate_candidates(
        model,
        tok,
        fmt,
        h_train.instructions,
        s_train.instructions,
        tokens.ids,
        batch_size=settings.batch_size,
        filter_train=settings.filter_train,
    )
    timings["candidates"] = time.perf_counter() - t

    t = time.perf_counter()
    h_texts, s_texts = fmt.format_all(h_val.instructions), fmt.format_all(s_val.instructions)
    scorer = Scorer(
        model,
        tok,
        h_texts,
        s_texts,
        tokens.ids,
        cands,
        batch_size=settings.selection.batch_size,
        share_prefix=not settings.exhaustive,
    )
    if settings.exhaustive:
        selection = select_exhaustive(scorer, settings.selection)
    else:
        selection = select_fast(scorer, settings.selection, tok, h_texts)
    timings["selection"] = time.perf_counter() - t

    chosen = selection.chosen
    labels = fmt.position_labels()
    run = {
        "tool": "refusal-edit",
        "model": lm.source.describe(),
        "dtype": lm.dtype,
        "device": lm.device,
        "chat_format": fmt.describe(),
        "prompts": {
            "harmful_train": h_train.describe(),
            "harmless_train": s_train.describe(),
            "harmful_val": h_val.describe(),
            "harmless_val": s_val.describe(),
        },
        "train_filter": {
            "enabled": settings.filter_train,
            "applied": cands.filtered,
            "harmful_kept": cands.harmful.count_kept,
            "harmless_kept": cands.harmless.count_kept,
        },
        "refusal_tokens": tokens.describe(),
        "settings": {k: v for k, v in asdict(settings).items() if k != "selection"},
        "selection_settings": asdict(settings.selection),
        "selection": {
            "method": selection.method,
            "evaluated": selection.evaluated,
            "candidates": len(selection.candidates),
            "seconds": selection.seconds,
            **selection.details,
        },
        "base": selection.base,
        "chosen": {**chosen.to_json(), "position_token": labels[chosen.position]},
        "timings": timings,
        "versions": versions(),
    }
    metadata = {
        "layer": str(chosen.layer),
        "position": str(chosen.position),
        "position_token": labels[chosen.position],
        "model": lm.source.name,
        "model_sha256": lm.source.sha256 or "",
        "bypass": f"{chosen.bypass:.6f}",
        "induce": f"{chosen.induce:.6f}",
        "kl": f"{chosen.kl:.6f}",
        "refusal_tokens": json.dumps(tokens.strings),
        "system_prompt": run["chat_format"]["system_prompt"],
        "tool_version": __version__,
    }
    with atomic_dir(Path(out), force=force) as tmp:
        save_direction(tmp / "direction.safetensors", cands.vector(chosen.position, chosen.layer), metadata)
        (tmp / "candidates.json").write_text(
            json.dumps(
                {
                    "position_tokens": labels,
                    "n_layers": cands.n_layers,
                    "method": selection.method,
                    "candidates": [c.to_json() for c in selection.candidates],
                },
                indent=1,
            )
            + "\n"
        )
        (tmp / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        from refusal_edit.directions.plot import plot_scores

        plot_scores(selection, labels, cands.n_layers, tmp / "scores.png", settings.selection)
    return ExtractResult(Path(out), selection, tokens, cands, run)
