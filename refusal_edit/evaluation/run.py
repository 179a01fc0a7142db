"""Compare a base model with an edit: an edited checkpoint, or a hook-based intervention in memory.

The intervention path loads one model and turns the hooks on only while the "edited" side runs, so a
direction can be judged before a single weight is written. A checkpoint is loaded next to the base
model; its logits are compared batch by batch and reduced to per-prompt numbers at once, so memory never
holds [prompts, tokens, vocab].

Both sides see the same token ids: prompts are formatted with the base model's chat template and
tokenizer, and the edited model must have the same vocabulary.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusal_edit import __version__
from refusal_edit.checkpoint.card import read_record
from refusal_edit.console import track
from refusal_edit.directions.artifacts import DirectionFile
from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.markers import REFUSAL_MARKERS, load_markers
from refusal_edit.evaluation.metrics import (
    ContinuationMetrics,
    DivergenceStats,
    RefusalStats,
    aggregate,
    continuation_metrics,
    refusal_stats,
)
from refusal_edit.forward import model_device
from refusal_edit.generation import Generated, generate
from refusal_edit.interventions import Intervention
from refusal_edit.loading.model import LoadedModel, ModelSource, load_model, resolve_source
from refusal_edit.prompts import ChatFormat, PromptSet, chat_format, load_prompts
from refusal_edit.provenance import versions

SIDES = ("base", "edited")
KINDS = ("harmful", "harmless")


@dataclass
class EvalSettings:
    """What is measured: prompts per side, generation length, batch size, sample rows to show."""

    n: int | None = 100
    max_new_tokens: int = 64
    batch_size: int = 32
    samples: int = 5

    def check(self) -> None:
        if self.n is not None and self.n < 1:
            raise RefusalEditError("--n must be at least 1")
        if self.max_new_tokens < 1:
            raise RefusalEditError("--max-new-tokens must be at least 1")
        if self.batch_size < 1:
            raise RefusalEditError("--batch-size must be at least 1")
        if self.samples < 0:
            raise RefusalEditError("--samples must not be negative")


@dataclass
class Sample:
    """One prompt with both models' responses, for reading side by side."""

    kind: str
    category: str
    instruction: str
    base: str
    edited: str
    base_refusal: bool
    edited_refusal: bool


@dataclass
class EvalReport:
    """Everything `evaluate` measured, plus what is needed to reproduce it."""

    base: dict[str, Any]
    edited: dict[str, Any]
    chat_format: dict[str, Any]
    prompts: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    markers: dict[str, Any]
    refusal: dict[str, dict[str, RefusalStats]]  # refusal[side][kind]
    divergence: DivergenceStats
    samples: list[Sample] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""

    def rate(self, side: str, kind: str) -> float:
        return self.refusal[side][kind].rate

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "refusal-edit",
            "tool_version": __version__,
            "created": self.created,
            "base": self.base,
            "edited": self.edited,
            "summary": self.summary(),
            "refusal": {s: {k: self.refusal[s][k].to_dict() for k in KINDS} for s in SIDES},
            "divergence": self.divergence.to_dict(),
            "samples": [asdict(s) for s in self.samples],
            "chat_format": self.chat_format,
            "prompts": self.prompts,
            "settings": self.settings,
            "markers": self.markers,
            "versions": self.versions,
            "timings": self.timings,
        }

    def summary(self) -> dict[str, Any]:
        """The headline numbers (flat, rounded): what `--record` writes into a checkpoint's record."""

        def r(x: float | None, digits: int = 4) -> float | None:
            return None if x is None else round(x, digits)

        d = self.divergence
        return {
            "evaluated": self.created,
            "tool_version": __version__,
            "harmful_prompts": f"{self.prompts['harmful']['source']} ({self.prompts['harmful']['count']})",
            "harmless_prompts": f"{self.prompts['harmless']['source']} ({self.prompts['harmless']['count']})",
            "max_new_tokens": self.settings["max_new_tokens"],
            "harmful_refusal_base": r(self.rate("base", "harmful")),
            "harmful_refusal_edited": r(self.rate("edited", "harmful")),
            "harmless_refusal_base": r(self.rate("base", "harmless")),
            "harmless_refusal_edited": r(self.rate("edited", "harmless")),
            "empty_responses_edited": self.refusal["edited"]["harmful"].empty
            + self.refusal["edited"]["harmless"].empty,
            "first_token_kl": r(d.first_token_kl, 6),
            "multi_token_kl": r(d.multi_token_kl, 6),
            "ce_base": r(d.base_ce),
            "ce_edited": r(d.edited_ce),
            "ppl_base": r(d.base_ppl),
            "ppl_edited": r(d.edited_ppl),
        }


# ---------------------------------------------------------------- building blocks


def intervention_from_direction(
    direction: DirectionFile,
    kind: str = "ablate",
    coeff: float = 1.0,
    layer: int | None = None,
    site: str = "input",
    unit: bool = False,
) -> Intervention:
    """The hook twin of `orthogonalize`: ablate the unit direction, or add `coeff * mean_diff` at its layer."""
    vector, at = direction.edit_vector(kind, coeff, layer, unit, "--intervention")
    if kind == "ablate":
        return Intervention("ablate", vector)
    return Intervention("add", vector, layer=at, coeff=coeff, site=site)


def _vocab_size(model: Any) -> int:
    emb = model.get_output_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_same_vocab(base: LoadedModel, edited: LoadedModel) -> None:
    """Token-level comparisons need identical vocabularies (same ids for the same strings)."""
    a, b = base.tokenizer, edited.tokenizer
    if len(a) != len(b) or a.get_vocab() != b.get_vocab():
        diff = set(a.get_vocab().items()) ^ set(b.get_vocab().items())
        example = ", ".join(sorted({repr(t) for t, _ in diff})[:3])
        raise RefusalEditError(
            f"tokenizers differ: base has {len(a)} tokens, edited has {len(b)} "
            f"({len(diff)} differing entries, e.g. {example}); the edited model must share the base vocabulary"
        )
    vb, ve = _vocab_size(base.model), _vocab_size(edited.model)
    if vb != ve:
        raise RefusalEditError(f"the models' output vocabularies differ ({vb} vs {ve} logits)")


def _default_prompts(kind: str, source: ModelSource) -> PromptSet:
    """The test split of the recipe's (or the built-in) set: never the rows extraction trained or selected on."""
    spec = getattr(source.recipe, kind) if source.recipe is not None else f"builtin:{kind}"
    return load_prompts(spec).split("test")


def _prompts(kind: str, given: str | PromptSet | None, source: ModelSource, n: int | None) -> PromptSet:
    if given is None:
        ps = _default_prompts(kind, source)
    elif isinstance(given, PromptSet):
        ps = given
    else:
        ps = load_prompts(str(given))
    if len(ps) == 0:
        raise RefusalEditError(f"the {kind} prompt set {ps.source!r} is empty")
    return ps.sample(n)


def _markers(markers: str | Path | Sequence[str] | None) -> tuple[tuple[str, ...], str]:
    if markers is None:
        return REFUSAL_MARKERS, "builtin"
    if isinstance(markers, str | Path):
        return load_markers(markers), str(markers)
    values = tuple(m for m in markers if m.strip())
    if not values:
        raise RefusalEditError("the refusal marker list is empty")
    return values, "custom"


@contextmanager
def _edited_side(model: Any, intervention: Intervention | None) -> Iterator[None]:
    with intervention.apply(model) if intervention is not None else nullcontext():
        yield


@torch.inference_mode()
def _tail_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions of left-padded rows (position ids from the mask)."""
    device = model_device(model)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep)
    return out.logits[:, -keep:, :].float()


TEACHER_FORCED_BYTES = 2 << 30  # float32 logits of both models for one teacher-forced batch


def _teacher_forced_batch(settings: EvalSettings, vocab: int) -> int:
    """Generation likes large batches (CPU decoding reads every weight per step); teacher forcing keeps
    [batch, max_new_tokens + 1, vocab] logits of two models, so its batch is capped by memory."""
    per_row = 2 * 4 * vocab * (settings.max_new_tokens + 1)
    return max(1, min(settings.batch_size, TEACHER_FORCED_BYTES // per_row))


def teacher_forced(
    base_model: Any,
    edited_model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    continuations: Sequence[Sequence[int]],
    intervention: Intervention | None = None,
    batch_size: int = 16,
    description: str | None = "comparing logits",
) -> list[ContinuationMetrics]:
    """Per-prompt first-token KL, multi-token KL and cross-entropies (see `metrics`), in the original order.

    Each row is `prompt + continuation`, left-padded, so every row ends at the last column: the positions
    that predict the continuation are the last k+1 columns but one, and only `max k + 1` columns of logits
    are kept. `edited_model` may be `base_model` itself, with `intervention` hooked on for its pass.
    """
    if len(texts) != len(continuations):
        raise ValueError("one continuation per prompt")
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[ContinuationMetrics | None] = [None] * len(seqs)
    for rows in batches if description is None else track(batches, description):
        width = max(len(seqs[i]) for i in rows)
        keep = max(len(continuations[i]) for i in rows) + 1
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, width - len(seqs[i]) :] = torch.tensor(seqs[i], dtype=torch.long)
            mask[j, width - len(seqs[i]) :] = 1
        base_logits = _tail_logits(base_model, ids, mask, keep)
        with _edited_side(edited_model, intervention):
            edited_logits = _tail_logits(edited_model, ids, mask, keep).to(base_logits.device)
        for j, i in enumerate(rows):
            k = len(continuations[i])
            lo = keep - 1 - k
            sl = slice(lo, lo + max(k, 1))
            targets = torch.tensor(list(continuations[i]), dtype=torch.long)
            out[i] = continuation_metrics(base_logits[j, sl], edited_logits[j, sl], targets)
        del base_logits, edited_logits
    return out  # type: ignore[return-value]


def _pick_samples(
    sets: dict[str, PromptSet], gens: dict[str, dict[str, list[Generated]]], stats: dict, count: int
) -> list[Sample]:
    """The first rows of each set (category-balanced by `PromptSet.sample`): more harmful than harmless."""
    wanted = {"harmful": count - count // 2, "harmless": count // 2}
    out: list[Sample] = []
    for kind in KINDS:
        ps = sets[kind]
        for i in range(min(wanted[kind], len(ps))):
            out.append(
                Sample(
                    kind,
                    ps.categories[i],
                    ps.instructions[i],
                    gens["base"][kind][i].text,
                    gens["edited"][kind][i].text,
                    stats["base"][kind].flags[i],
                    stats["edited"][kind].flags[i],
                )
            )
    return out


def _edited_record(hf_dir: Path) -> dict[str, Any] | None:
    try:
        rec = read_record(hf_dir)
    except RefusalEditError:
        return None
    if rec is None:
        return None
    keys = ("mode", "coeff", "layer", "site", "direction_sha256", "direction_layer", "base_model")
    return {k: rec.get(k) for k in keys}


# ---------------------------------------------------------------- the entry point


def evaluate(
    base: str | ModelSource | LoadedModel,
    edited: str | Path | ModelSource | LoadedModel | None = None,
    *,
    intervention: Intervention | None = None,
    edited_info: dict[str, Any] | None = None,
    harmful: str | PromptSet | None = None,
    harmless: str | PromptSet | None = None,
    settings: EvalSettings | None = None,
    markers: str | Path | Sequence[str] | None = None,
    system_prompt: str | None = None,
    template: str | Path | None = None,
    dtype: str = "auto",
    device: str = "cpu",
) -> EvalReport:
    """Compare `base` with `edited` (a checkpoint) or with `base` under `intervention`.

    Exactly one of `edited` and `intervention` is given. Prompts default to the test split of the
    built-in sets (or of the recipe's sets when `base` is a recipe); `system_prompt` defaults to the
    recipe's, else the chat template's own. `edited_info` is recorded with the intervention (e.g. the
    direction file it came from). Errors that the user can fix raise `RefusalEditError`.
    """
    settings = settings or EvalSettings()
    settings.check()
    if (edited is None) == (intervention is None):
        raise RefusalEditError(
            "give either an EDITED checkpoint or a --direction to apply in memory"
            if edited is None
            else "give either an EDITED checkpoint or a --direction, not both"
        )
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    marker_list, marker_source = _markers(markers)

    base_source = base.source if isinstance(base, LoadedModel) else base
    if not isinstance(base_source, ModelSource):
        base_source = resolve_source(str(base_source), dtype)
    sets = {
        "harmful": _prompts("harmful", harmful, base_source, settings.n),
        "harmless": _prompts("harmless", harmless, base_source, settings.n),
    }
    base_lm = base if isinstance(base, LoadedModel) else load_model(base_source, dtype=dtype, device=device)
    recipe = base_source.recipe
    system = system_prompt if system_prompt is not None else (recipe.system_prompt if recipe else None)
    fmt: ChatFormat = chat_format(base_lm.tokenizer, system=system, template_file=template)

    if edited is not None:
        if isinstance(edited, LoadedModel):
            edited_lm = edited
        else:
            src = edited if isinstance(edited, ModelSource) else resolve_source(str(edited), dtype)
            edited_lm = load_model(src, dtype=dtype, device=device)
        check_same_vocab(base_lm, edited_lm)
        edited_model = edited_lm.model
        edited_desc: dict[str, Any] = {
            "type": "checkpoint",
            **edited_lm.source.describe(),
            "edit": _edited_record(edited_lm.source.hf_dir),
        }
    else:
        assert intervention is not None
        edited_model = base_lm.model
        edited_desc = {
            "type": "intervention",
            **intervention.describe(),
            "vector_norm": float(intervention.direction.float().norm() * abs(intervention.coeff)),
            **(edited_info or {}),
        }
    timings["load_s"] = time.perf_counter() - t0

    texts = {kind: fmt.format_all(sets[kind].instructions) for kind in KINDS}
    gens: dict[str, dict[str, list[Generated]]] = {"base": {}, "edited": {}}
    t1 = time.perf_counter()
    for kind in KINDS:
        gens["base"][kind] = generate(
            base_lm.model,
            base_lm.tokenizer,
            texts[kind],
            settings.max_new_tokens,
            settings.batch_size,
            f"base, {kind}",
        )
    timings["generate_base_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    with _edited_side(edited_model, intervention):
        for kind in KINDS:
            gens["edited"][kind] = generate(
                edited_model,
                base_lm.tokenizer,
                texts[kind],
                settings.max_new_tokens,
                settings.batch_size,
                f"edited, {kind}",
            )
    timings["generate_edited_s"] = time.perf_counter() - t1

    stats = {
        side: {
            kind: refusal_stats([g.text for g in gens[side][kind]], sets[kind].categories, marker_list)
            for kind in KINDS
        }
        for side in SIDES
    }

    t1 = time.perf_counter()
    rows = teacher_forced(
        base_lm.model,
        edited_model,
        base_lm.tokenizer,
        texts["harmless"],
        [g.token_ids for g in gens["base"]["harmless"]],
        intervention=intervention,
        batch_size=_teacher_forced_batch(settings, len(base_lm.tokenizer)),
    )
    divergence = aggregate(rows)
    timings["teacher_forced_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0

    return EvalReport(
        base={**base_lm.source.describe(), "dtype": base_lm.dtype, "device": base_lm.device},
        edited=edited_desc,
        chat_format=fmt.describe(),
        prompts={kind: sets[kind].describe() for kind in KINDS},
        settings={**asdict(settings), "dtype": base_lm.dtype, "device": base_lm.device},
        markers={"source": marker_source, "count": len(marker_list), "markers": list(marker_list)},
        refusal=stats,
        divergence=divergence,
        samples=_pick_samples(sets, gens, stats, settings.samples),
        versions=versions(),
        timings={k: round(v, 3) for k, v in timings.items()},
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
