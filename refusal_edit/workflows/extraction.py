"""The `extract` workflow: resolve and load MODEL, find the direction (core), write the artifacts.

Artifacts, all written atomically into one folder (default `runs/<model>/direction`):
- `direction.safetensors`: the unit `direction` and the raw `mean_diff` with string metadata;
- `candidates.safetensors`: every candidate - float32 `mean_diff`, `harmful_mean` and `harmless_mean`
  [n_positions, n_layers + 1, hidden] (the means actually used: filtered unless the filter was off or
  kept too few) with JSON metadata (position labels, layer count, model); and each half's candidates
  (`directions.halves`: what `tune` cross-fits with);
- `candidates.json`: every candidate's scores; `run.json`: provenance; `scores.png`: the score plot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import refusal_edit.workflows.defaults as defaults
from refusal_edit import __version__
from refusal_edit.checkpoint.atomic import atomic_dir, check_output
from refusal_edit.directions import identity
from refusal_edit.directions.artifacts import save_direction
from refusal_edit.directions.bank import CANDIDATES
from refusal_edit.directions.extract import ExtractResult, ExtractSettings, find_direction, split_prompts
from refusal_edit.directions.halves import halves_tensors, train_halves
from refusal_edit.directions.select import describe_relaxation
from refusal_edit.forward import auto_batch_size, parse_batch_size
from refusal_edit.loading.model import LoadedModel, ModelSource, context_length, load_model
from refusal_edit.prompts import ChatFormat, PromptSet, chat_format
from refusal_edit.prompts.sets import HASH_SPLIT
from refusal_edit.prompts.template import parse_template_kwargs
from refusal_edit.provenance import versions

DIRECTION = "direction.safetensors"


@dataclass
class Extraction:
    """A finished extraction: what was found, where it was written and the provenance written with it."""

    result: ExtractResult
    out: Path
    run: dict[str, Any]

    @property
    def selection(self):
        return self.result.selection

    @property
    def candidates(self):
        return self.result.candidates

    @property
    def refusal_tokens(self):
        return self.result.refusal_tokens

    @property
    def relaxation(self) -> str | None:
        """How the selection filters were relaxed to admit the pick, in words; None when they were not."""
        relaxed = self.selection.details.get("relaxed")
        return describe_relaxation(relaxed) if relaxed else None


def _inputs(source: ModelSource) -> list[Path]:
    """What an output may never be, contain or lie inside: the model folder and the file it came from."""
    return [p for p in (source.hf_dir, source.origin) if p is not None]


def provenance(result: ExtractResult, lm: LoadedModel, fmt: ChatFormat, settings: ExtractSettings) -> dict[str, Any]:
    """`run.json`: model source and hash, prompt sets, chat format, settings, tokens, selection, timings."""
    sel, cands, chosen = result.selection, result.candidates, result.chosen
    return {
        "tool": "refusal-edit",
        "model": lm.source.describe(),
        "dtype": lm.dtype,
        "device": lm.device,
        "placement": lm.placement,
        "load_in": lm.load_in,
        "chat_format": fmt.describe(),
        "prompts": {name: ps.describe() for name, ps in result.prompts.items()},
        "train_filter": {
            "enabled": settings.filter_train,
            "applied": cands.filtered,
            "harmful_kept": cands.harmful.count_kept,
            "harmless_kept": cands.harmless.count_kept,
        },
        "refusal_tokens": result.refusal_tokens.describe(),
        "settings": {k: v for k, v in asdict(settings).items() if k != "selection"},
        "selection_settings": asdict(settings.selection),
        "selection": {
            "method": sel.method,
            "evaluated": sel.evaluated,
            "candidates": len(sel.candidates),
            "seconds": sel.seconds,
            **sel.details,
        },
        "base": sel.base,
        "chosen": {**chosen.to_json(), "position_token": result.position_labels[chosen.position]},
        "timings": result.timings,
        "versions": versions(),
    }


def save_extraction(
    result: ExtractResult,
    lm: LoadedModel,
    fmt: ChatFormat,
    settings: ExtractSettings,
    out: Path,
    force: bool = False,
    replace_any: bool = False,
) -> Extraction:
    """Write every artifact of `result` into `out` at once (nothing is left half-written)."""
    run = provenance(result, lm, fmt, settings)
    chosen, cands, labels = result.chosen, result.candidates, result.position_labels
    metadata = {
        "layer": str(chosen.layer),
        "position": str(chosen.position),
        "position_token": labels[chosen.position],
        "model": lm.source.name,
        "model_sha256": lm.source.sha256 or "",
        identity.IDENTITY_KEY: json.dumps(
            identity.identity(
                lm.source.config(),
                lm.source.name,
                identity.known_weights_sha256(lm.source.hf_dir, lm.source.sha256),
            )
        ),
        "bypass": f"{chosen.bypass:.6f}",
        "induce": f"{chosen.induce:.6f}",
        "kl": f"{chosen.kl:.6f}",
        "refusal_tokens": json.dumps(result.refusal_tokens.strings),
        "system_prompt": run["chat_format"]["system_prompt"],
        "template_kwargs": json.dumps(run["chat_format"]["template_kwargs"]),
        "tool_version": __version__,
    }
    with atomic_dir(Path(out), force=force, inputs=_inputs(lm.source), replace_any=replace_any) as tmp:
        save_direction(tmp / DIRECTION, result.mean_diff, metadata)
        h_train, s_train = result.prompts["harmful_train"].instructions, result.prompts["harmless_train"].instructions
        halves, halves_meta = halves_tensors(train_halves(cands), h_train, s_train)
        save_file(
            {
                "mean_diff": cands.mean_diff.float().contiguous(),
                "harmful_mean": cands.harmful.mean(cands.filtered).float().contiguous(),
                "harmless_mean": cands.harmless.mean(cands.filtered).float().contiguous(),
                **halves,
            },
            str(tmp / CANDIDATES),
            metadata={
                **halves_meta,
                "position_tokens": json.dumps(labels),
                "n_layers": str(cands.n_layers),
                "model": lm.source.name,
                "filtered": json.dumps(cands.filtered),
                "harmful_count": str(cands.harmful.count_kept if cands.filtered else cands.harmful.count_all),
                "harmless_count": str(cands.harmless.count_kept if cands.filtered else cands.harmless.count_all),
                "layout": "[position, layer, hidden]; position p is token -(n_positions - p); layer L is the "
                "residual stream entering layer L (L = n_layers: after the last layer)",
                "tool_version": __version__,
            },
        )
        (tmp / "candidates.json").write_text(
            json.dumps(
                {
                    "position_tokens": labels,
                    "n_layers": cands.n_layers,
                    "method": result.selection.method,
                    "candidates": [c.to_json() for c in result.selection.candidates],
                },
                indent=1,
            )
            + "\n"
        )
        (tmp / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        from refusal_edit.directions.plot import plot_scores

        plot_scores(result.selection, labels, cands.n_layers, tmp / "scores.png", settings.selection)
    return Extraction(result, Path(out), run)


def run_extract(
    lm: LoadedModel,
    fmt: ChatFormat,
    harmful: PromptSet,
    harmless: PromptSet,
    settings: ExtractSettings | None = None,
    out: Path | str = "runs/direction",
    force: bool = False,
    replace_any: bool = False,
) -> Extraction:
    """Find the refusal direction of a loaded model and write its artifacts to `out` (the library's one call).

    `out` is checked before the long part, so a bad output folder fails at once."""
    settings = settings or ExtractSettings()
    check_output(Path(out), force, _inputs(lm.source), replace_any)
    result = find_direction(lm, fmt, harmful, harmless, settings)
    return save_extraction(result, lm, fmt, settings, Path(out), force, replace_any)


@dataclass
class ExtractJob:
    """Everything `extract` resolved before the long part: loaded model, chat format, prompts, settings."""

    source: ModelSource
    lm: LoadedModel
    fmt: ChatFormat
    prompts: dict[str, PromptSet]
    settings: ExtractSettings
    out: Path
    force: bool = False
    replace_any: bool = False

    def describe(self) -> str:
        """One line saying what will run (model, template, system prompt, filters)."""
        fmt, sel = self.fmt.describe(), self.settings.selection
        n_layers = self.lm.model.config.get_text_config().num_hidden_layers
        return (
            f"model {self.source.name} ({self.lm.dtype}, {self.lm.device}); template: {fmt['template']}, "
            f"system prompt: {fmt['system_prompt']!r}; filters: KL <= {sel.kl_threshold}, "
            f"induce >= {sel.induce_threshold}, layers < {sel.max_layer(n_layers)}"
        )

    def split_notes(self) -> list[str]:
        """How each prompt set is divided, one line per set: a user's file is split by a hash, which the
        user must know to evaluate on the held-out part (`FILE@test`) and not on training prompts."""
        lines = []
        for kind, ps in self.prompts.items():
            counts = ", ".join(f"{n} {name}" for name, n in ps.split_counts().items())
            how = HASH_SPLIT if ps.hash_split else "by its split column"
            held_out = f"; evaluate on the held-out part with {ps.source}@test" if ps.hash_split else ""
            lines.append(f"{kind} prompts {ps.source}: {len(ps)} rows split {how}: {counts}{held_out}")
        return lines

    def run(self) -> Extraction:
        result = find_direction(self.lm, self.fmt, self.prompts["harmful"], self.prompts["harmless"], self.settings)
        return save_extraction(result, self.lm, self.fmt, self.settings, self.out, self.force, self.replace_any)


def prepare(
    model: str | Path | ModelSource,
    out: Path | None = None,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    system_prompt: str | None = None,
    template: Path | None = None,
    template_kwargs: Sequence[str] | dict[str, Any] | None = None,
    harmful: str | None = None,
    harmless: str | None = None,
    n_train: int | None = None,
    n_val: int = 32,
    batch_size: int | str = 32,
    exhaustive: bool = False,
    refusal_tokens: list[str] | None = None,
    filter_train: bool = True,
    selection: dict[str, Any] | None = None,
    force: bool = False,
    replace_any: bool = False,
    max_memory: str | dict[Any, Any] | None = None,
    offload_dir: Path | None = None,
    load_in: str | None = None,
) -> ExtractJob:
    """Resolve MODEL, check the output, load prompts and model: every fast failure before the slow part.

    `selection` holds the command line's selection values (None: not given); the recipe's come first;
    `template_kwargs` is a keyword dict or `key=value` items (`prompts.template.parse_template_kwargs`).
    """
    template_kwargs = parse_template_kwargs(template_kwargs)
    source = defaults.resolve_model(model, dtype)
    size = parse_batch_size(batch_size)

    def make_settings(rows: int) -> ExtractSettings:
        return ExtractSettings(
            n_train=n_train,
            n_val=n_val,
            batch_size=rows,
            filter_train=filter_train,
            exhaustive=exhaustive,
            refusal_tokens=refusal_tokens or None,
            selection=defaults.selection_settings(source, rows, selection or {}),
        )

    settings = make_settings(1 if size == "auto" else int(size))
    settings.check()
    target = Path(out) if out is not None else defaults.default_out(source, "direction")
    check_output(target, force, _inputs(source), replace_any)
    prompts = defaults.extraction_prompts(source, harmful, harmless)
    split_prompts(prompts["harmful"], prompts["harmless"], settings)  # empty splits fail before loading
    lm = load_model(source, dtype=dtype, device=device, max_memory=max_memory, offload_dir=offload_dir, load_in=load_in)
    fmt = chat_format(
        lm.tokenizer,
        system=defaults.system_prompt(source, system_prompt),
        template_file=template,
        template_kwargs=template_kwargs,
    )
    fmt.check_context(prompts, context_length(lm))
    if size == "auto":
        texts = fmt.format_all([t for ps in prompts.values() for t in ps.instructions])
        settings = make_settings(auto_batch_size(lm.model, lm.tokenizer, texts, new_tokens=16))  # refusal probe
    return ExtractJob(source, lm, fmt, prompts, settings, target, force, replace_any)


def extract(model: str | Path | ModelSource, out: Path | None = None, **options: Any) -> Extraction:
    """`refusal-edit extract` as one call: `prepare(model, out, **options).run()`."""
    return prepare(model, out, **options).run()
