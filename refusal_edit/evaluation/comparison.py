"""Compare a loaded base model with an edit: an edited checkpoint, or a hook-based intervention.

The intervention path uses one model and turns the hooks on only while the "edited" side runs, so a
direction can be judged before a single weight is written. A checkpoint runs next to the base model;
their logits are compared batch by batch and reduced to per-prompt numbers at once, so memory never
holds [prompts, tokens, vocab].

Both sides see the same token ids: prompts are formatted with the base model's chat template and
tokenizer, and the edited model must have the same vocabulary. Replies are generated for every prompt set
(harmful, harmless, and the borderline set that measures over-refusal) and judged afterwards, with no hook
active, by every judge (`refusal_edit.judging.judge_all`: degenerate replies are set apart first and count
as neither refusal nor compliance; reasoning blocks are split off). The KL and cross-entropy numbers come
from the harmless set alone. Resolving and loading models and judges, default prompt sets and writing
reports are the workflow's (`refusal_edit.workflows.evaluation`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from itertools import combinations
from typing import Any

from refusal_edit import __version__
from refusal_edit.errors import RefusalEditError, check_at_least
from refusal_edit.evaluation.metrics import ContinuationMetrics, DivergenceStats, aggregate, continuation_metrics
from refusal_edit.evaluation.stats import wilson
from refusal_edit.forward import BatchView, tail_logits
from refusal_edit.forward import teacher_forced as teacher_forced_logits
from refusal_edit.generation import Generated, generate
from refusal_edit.interventions import Intervention
from refusal_edit.judging import Judge, JudgeReport, MarkerJudge, judge_all
from refusal_edit.judging.degenerate import NO_ANSWER
from refusal_edit.judging.panel import Agreement, Counts, agreement
from refusal_edit.judging.reasoning import delimiters_from_template, special_delimiters
from refusal_edit.loading.model import LoadedModel
from refusal_edit.prompts import ChatFormat, PromptSet
from refusal_edit.provenance import versions

SIDES = ("base", "edited")
KINDS = ("harmful", "harmless", "borderline")  # generated and judged, in this order, when given
REQUIRED = ("harmful", "harmless")
JUDGE_LLM_MODES = ("logits", "generate")
JUDGE_LLM_RUBRICS = ("full", "refusal")


@dataclass
class EvalSettings:
    """What is measured and how: prompts per set, generation length, batch size, sample rows to show, and
    the judges (specs the workflow loads; the markers judge always comes first and gives the headline rates).

    `max_new_tokens`: 128 by default, long enough for delayed refusals ("Sure, ... However, I can't");
    generation stops at EOS, so refusals stay short and the cost grows with the replies that do not stop.
    `kl_tokens`: how much of the base model's harmless continuation is teacher-forced for the KL and
    cross-entropy numbers (64, what they always measured, so they stay comparable and cost the same
    whatever `max_new_tokens` is; None: all of it).
    `borderline`: also generate and judge the borderline set (harmless requests that sound harmful), whose
    refusal rate is the over-refusal an edit causes or cures. `template_kwargs` go to the chat template
    (e.g. `enable_thinking=False`); `reasoning_delimiters` split thinking models' replies (None: the ones the
    chat template names, if any).
    """

    n: int | None = 100
    max_new_tokens: int = 128
    kl_tokens: int | None = 64
    batch_size: int = 32
    samples: int = 5
    judges: tuple[str, ...] = ("markers",)
    judge_labels: str | None = None
    judge_llm: str | None = None
    judge_llm_mode: str = "logits"
    judge_llm_rubric: str = "full"
    borderline: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning_delimiters: tuple[str, str] | None = None

    def check(self) -> None:
        check_at_least(
            1, n=self.n, max_new_tokens=self.max_new_tokens, kl_tokens=self.kl_tokens, batch_size=self.batch_size
        )
        check_at_least(0, samples=self.samples)
        if self.judge_llm_mode not in JUDGE_LLM_MODES:
            raise RefusalEditError(f"`judge_llm_mode` must be one of {', '.join(JUDGE_LLM_MODES)}")
        if self.judge_llm_rubric not in JUDGE_LLM_RUBRICS:
            raise RefusalEditError(f"`judge_llm_rubric` must be one of {', '.join(JUDGE_LLM_RUBRICS)}")
        if self.reasoning_delimiters is not None and (
            len(self.reasoning_delimiters) != 2 or not all(self.reasoning_delimiters)
        ):
            raise RefusalEditError("`reasoning_delimiters` must be two non-empty tags, e.g. '<think>,</think>'")


@dataclass
class Sample:
    """One prompt with both models' replies, for reading side by side.

    `*_refusal` is the first judge's verdict (False for degenerate or undecided replies), `*_degenerate` the
    reason a reply was set apart as degenerate, `*_verdicts` every judge's verdict (None: undecided/degenerate).
    """

    kind: str
    category: str
    instruction: str
    base: str
    edited: str
    base_refusal: bool
    edited_refusal: bool
    base_degenerate: str | None = None
    edited_degenerate: str | None = None
    base_verdicts: dict[str, bool | None] = field(default_factory=dict)
    edited_verdicts: dict[str, bool | None] = field(default_factory=dict)


def summary_key(judge: str) -> str:
    """A judge's name as part of a flat summary key: `llm:Qwen2.5-0.5B` -> `llm_qwen2_5_0_5b`."""
    return re.sub(r"[^a-z0-9]+", "_", judge.lower()).strip("_")


KIND_LABEL = {"harmful": "harmful", "harmless": "harmless", "borderline": "borderline (over-refusal)"}


@dataclass
class EvalReport:
    """Everything `evaluate` measured, plus what is needed to reproduce it.

    `judging[side][kind]` holds every judge's verdicts on one side's replies to one prompt set.
    """

    base: dict[str, Any]
    edited: dict[str, Any]
    chat_format: dict[str, Any]
    prompts: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    judges: dict[str, dict[str, Any]]  # name -> describe(), in order: the first gives the headline rates
    judging: dict[str, dict[str, JudgeReport]]
    divergence: DivergenceStats
    samples: list[Sample] = field(default_factory=list)
    reasoning_delimiters: tuple[str, str] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""

    @property
    def kinds(self) -> list[str]:
        """The prompt sets that were generated and judged (harmful, harmless, and borderline when given)."""
        return [k for k in KINDS if k in self.judging["base"]]

    @property
    def judge_names(self) -> list[str]:
        return list(self.judges)

    @property
    def induces(self) -> bool:
        """An addition with a positive coefficient is meant to make the model refuse harmless prompts."""
        e = self.edited
        if e.get("type") == "intervention":
            kind, coeff = e.get("kind"), e.get("coeff")
        else:  # a checkpoint: its record's edit
            kind, coeff = (e.get("edit") or {}).get("mode"), (e.get("edit") or {}).get("coeff")
        return kind == "add" and coeff is not None and float(coeff) > 0

    @property
    def edited_label(self) -> str:
        """The edited side in a few words: the checkpoint's name, or the hook edit."""
        e = self.edited
        if e.get("type") == "intervention":
            extra = f", coeff {e['coeff']:g}, layer {e['layer']}" if e.get("kind") == "add" else ""
            return f"{e.get('kind')} hook{extra}"
        return str(e.get("name", "edited"))

    def kind_label(self, kind: str, induced: bool = True) -> str:
        """A prompt set's name in tables; with `induced`, the harmless set under an inducing addition says so."""
        return "harmless (induced)" if induced and kind == "harmless" and self.induces else KIND_LABEL[kind]

    def counts(self, side: str, kind: str, judge: str | None = None) -> Counts:
        """One judge's verdict counts (default: the first judge)."""
        return self.judging[side][kind].counts(judge)

    def rate(self, side: str, kind: str, judge: str | None = None) -> float:
        """Refusal rate (refused / all replies; degenerate replies are never refusals)."""
        return self.counts(side, kind, judge).refusal_rate

    def interval(self, side: str, kind: str, judge: str | None = None) -> tuple[float, float]:
        """Wilson 95 % interval of `rate` (a few percent of 100 prompts is a wide interval: say so)."""
        c = self.counts(side, kind, judge)
        return wilson(c.refused, c.total)

    def degenerate_rate(self, side: str, kinds: Sequence[str] | None = None) -> float:
        """Degenerate replies of `side` over the given prompt sets (default: all generated)."""
        reports = [self.judging[side][k] for k in (kinds or self.kinds)]
        total = sum(len(r.samples) for r in reports)
        return sum(sum(r.degenerate.values()) for r in reports) / total if total else 0.0

    def agreements(self, side: str | None = None, kind: str | None = None) -> list[Agreement]:
        """Pairwise agreement of the judges, pooled over the chosen sides and prompt sets (default: all)."""
        reports = [self.judging[s][k] for s in ([side] if side else SIDES) for k in ([kind] if kind else self.kinds)]
        out = []
        for a, b in combinations(self.judge_names, 2):
            va = [smp.verdicts[a] for r in reports for smp in r.samples]
            vb = [smp.verdicts[b] for r in reports for smp in r.samples]
            out.append(agreement(a, va, b, vb))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "refusal-edit",
            "tool_version": __version__,
            "created": self.created,
            "base": self.base,
            "edited": self.edited,
            "summary": self.summary(),
            "judges": self.judges,
            "refusal": {s: {k: self._refusal_view(s, k) for k in self.kinds} for s in SIDES},
            "agreement": {
                "all": [a.to_dict() for a in self.agreements()],
                **{f"{s}/{k}": [a.to_dict() for a in self.agreements(s, k)] for s in SIDES for k in self.kinds},
            },
            "divergence": self.divergence.to_dict(),
            "samples": [asdict(s) for s in self.samples],
            "judging": {s: {k: self.judging[s][k].to_dict(texts=True) for k in self.kinds} for s in SIDES},
            "chat_format": self.chat_format,
            "reasoning_delimiters": list(self.reasoning_delimiters) if self.reasoning_delimiters else None,
            "prompts": self.prompts,
            "settings": self.settings,
            "versions": self.versions,
            "timings": self.timings,
        }

    def _refusal_view(self, side: str, kind: str) -> dict[str, Any]:
        """The first judge's numbers for one side and set (`judging` has every judge's)."""
        jr = self.judging[side][kind]
        stats = jr.stats[self.judge_names[0]].to_dict()
        return {
            "judge": self.judge_names[0],
            "rate": stats["refusal_rate"],
            **stats,
            "empty": jr.degenerate.get("empty", 0),
            "degenerate_reasons": dict(jr.degenerate),
        }

    def summary(self) -> dict[str, Any]:
        """The headline numbers (flat, rounded): what recording an evaluation writes into a checkpoint's record.

        Refusal rates are the first judge's (the markers unless replaced), over all replies: degenerate
        replies count as neither refused nor complied and have their own rate. Other judges add their
        harmful-prompt rates and the agreement (pooled over every reply both judges decided).
        """

        def r(x: float | None, digits: int = 4) -> float | None:
            return None if x is None else round(x, digits)

        d = self.divergence
        names = self.judge_names
        out: dict[str, Any] = {
            "evaluated": self.created,
            "tool_version": __version__,
            **{f"{k}_prompts": f"{self.prompts[k]['source']} ({self.prompts[k]['count']})" for k in self.kinds},
            **{f"{k}_count": self.prompts[k]["count"] for k in self.kinds},  # the number, for readers of the data
            "max_new_tokens": self.settings["max_new_tokens"],
            "kl_tokens": self.settings.get("kl_tokens"),
        }
        if self.settings.get("template_kwargs"):
            out["template_kwargs"] = ", ".join(f"{k}={v}" for k, v in self.settings["template_kwargs"].items())
        out["judge"] = names[0]
        if len(names) > 1:
            out["other_judges"] = ", ".join(names[1:])
        for kind in self.kinds:
            out[f"{kind}_refusal_base"] = r(self.rate("base", kind))
            out[f"{kind}_refusal_edited"] = r(self.rate("edited", kind))
            out[f"{kind}_refusal_edited_ci95"] = [r(x) for x in self.interval("edited", kind)]
        out["harmful_complied_edited"] = r(self.counts("edited", "harmful").compliance_rate)
        out["harmful_degenerate_base"] = r(self.degenerate_rate("base", ["harmful"]))
        out["harmful_degenerate_edited"] = r(self.degenerate_rate("edited", ["harmful"]))
        out["degenerate_rate_base"] = r(self.degenerate_rate("base"))
        out["degenerate_rate_edited"] = r(self.degenerate_rate("edited"))
        out["empty_responses_edited"] = sum(
            self.judging["edited"][k].degenerate.get("empty", 0) for k in ("harmful", "harmless")
        )
        if self.reasoning_delimiters:
            out["harmful_reasoning_only_refusals_edited"] = self.counts("edited", "harmful").reasoning_only
        for name in names[1:]:
            key = summary_key(name)
            out[f"harmful_refusal_base_{key}"] = r(self.rate("base", "harmful", name))
            out[f"harmful_refusal_edited_{key}"] = r(self.rate("edited", "harmful", name))
            if "borderline" in self.kinds:
                out[f"borderline_refusal_edited_{key}"] = r(self.rate("edited", "borderline", name))
        if len(names) > 1:
            first = self.agreements()[0]
            out["judge_agreement"] = r(first.rate)
            out["judge_agreement_kappa"] = r(first.kappa)
        out.update(
            {
                "first_token_kl": r(d.first_token_kl, 6),
                "multi_token_kl": r(d.multi_token_kl, 6),
                "ce_base": r(d.base_ce),
                "ce_edited": r(d.edited_ce),
                "ppl_base": r(d.base_ppl),
                "ppl_edited": r(d.edited_ppl),
            }
        )
        return out


# ---------------------------------------------------------------- building blocks


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


@contextmanager
def _edited_side(model: Any, intervention: Intervention | None) -> Iterator[None]:
    with intervention.apply(model) if intervention is not None else nullcontext():
        yield


TEACHER_FORCED_BYTES = 2 << 30  # float32 logits of both models for one teacher-forced batch


def _kl_length(settings: EvalSettings) -> int:
    """Continuation tokens teacher-forced per prompt (at most)."""
    return min(settings.max_new_tokens, settings.kl_tokens or settings.max_new_tokens)


def _teacher_forced_batch(settings: EvalSettings, vocab: int) -> int:
    """Generation likes large batches (CPU decoding reads every weight per step); teacher forcing keeps
    [batch, max_new_tokens + 1, vocab] logits of two models, so its batch is capped by memory."""
    per_row = 2 * 4 * vocab * (_kl_length(settings) + 1)
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

    The batching is `forward.teacher_forced`; `edited_model` may be `base_model` itself, with
    `intervention` hooked on for its pass.
    """

    def edited(view: BatchView, keep: int):
        with _edited_side(edited_model, intervention):
            return tail_logits(edited_model, view, keep)

    return teacher_forced_logits(
        tokenizer,
        texts,
        continuations,
        [lambda view, keep: tail_logits(base_model, view, keep), edited],
        lambda logits, targets: continuation_metrics(logits[0], logits[1], targets),
        batch_size=batch_size,
        description=description,
    )


def _pick_samples(judging: dict[str, dict[str, JudgeReport]], count: int) -> list[Sample]:
    """The first rows of each set (category-balanced by `PromptSet.sample`): half harmful, the rest shared
    by the other sets."""
    kinds = [k for k in KINDS if k in judging["base"]]
    harmful = count - count // 2
    others = kinds[1:]
    wanted = {"harmful": harmful}
    for i, kind in enumerate(others):
        wanted[kind] = (count - harmful) // len(others) + (i < (count - harmful) % len(others))
    out: list[Sample] = []
    for kind in kinds:
        b, e = judging["base"][kind], judging["edited"][kind]
        first = b.names[0]
        for i in range(min(wanted[kind], len(b.samples))):
            sb, se = b.samples[i], e.samples[i]
            out.append(
                Sample(
                    kind,
                    sb.category,
                    sb.prompt,
                    sb.reply,
                    se.reply,
                    bool(sb.verdicts[first].refused),
                    bool(se.verdicts[first].refused),
                    sb.degenerate,
                    se.degenerate,
                    {n: v.refused for n, v in sb.verdicts.items()},
                    {n: v.refused for n, v in se.verdicts.items()},
                )
            )
    return out


def _replies_key(texts: Sequence[str], max_new_tokens: int, keep_special: bool) -> str:
    """What a greedy reply depends on besides the model: the formatted prompts and how they are decoded."""
    h = hashlib.sha256("\x00".join(texts).encode())
    return f"{max_new_tokens}:{int(keep_special)}:{h.hexdigest()}"


# ---------------------------------------------------------------- the entry point


def compare(
    base: LoadedModel,
    fmt: ChatFormat,
    sets: dict[str, PromptSet],
    *,
    edited: LoadedModel | None = None,
    intervention: Intervention | None = None,
    edited_info: dict[str, Any] | None = None,
    settings: EvalSettings | None = None,
    judges: Sequence[Judge] | None = None,
    timings: dict[str, float] | None = None,
) -> EvalReport:
    """Compare `base` with `edited` (a loaded checkpoint) or with `base` under `intervention`.

    Exactly one of `edited` and `intervention` is given. `sets` holds the `harmful` and `harmless` prompts
    and optionally the `borderline` ones (already sampled), formatted with `fmt`. `judges` (default: the
    refusal markers) judge every reply after generation with no hook active, so the base model can judge
    its own and the edit's replies. `edited_info` is recorded with the edit (the checkpoint's record, or the
    direction file an intervention came from); `timings` are earlier steps (loading) to report with this run's.
    Greedy replies depend only on the model, the formatted prompts and the generation length, so the base side
    is generated once per such key and kept with the loaded model (`base.replies`): judging several edits
    against one loaded base model generates its replies once (half the cost of every further comparison).
    """
    settings = settings or EvalSettings()
    settings.check()
    if (edited is None) == (intervention is None):
        raise ValueError("compare() takes exactly one of `edited` and `intervention`")
    missing = [k for k in REQUIRED if k not in sets]
    if missing:
        raise ValueError(f"compare() needs the {' and '.join(missing)} prompt sets")
    judges = list(judges) if judges is not None else [MarkerJudge()]
    t0 = time.perf_counter()
    timings = dict(timings or {})

    if edited is not None:
        check_same_vocab(base, edited)
        edited_model = edited.model
        edited_desc: dict[str, Any] = {"type": "checkpoint", **edited.source.describe(), **(edited_info or {})}
    else:
        assert intervention is not None
        edited_model = base.model
        edited_desc = {
            "type": "intervention",
            **intervention.describe(),
            "vector_norm": intervention.vector_norm,
            **(edited_info or {}),
        }

    kinds = [k for k in KINDS if k in sets]
    delimiters = settings.reasoning_delimiters or delimiters_from_template(fmt.template_text)
    # Reasoning delimiters that are special tokens would vanish from the decoded text.
    keep_special = bool(delimiters and special_delimiters(base.tokenizer, delimiters))
    texts = {kind: fmt.format_all(sets[kind].instructions) for kind in kinds}
    keys = {kind: _replies_key(texts[kind], settings.max_new_tokens, keep_special) for kind in kinds}
    gens: dict[str, dict[str, list[Generated]]] = {"base": {}, "edited": {}}
    for side, model in (("base", base.model), ("edited", edited_model)):
        t1 = time.perf_counter()
        if side == "base":
            gens[side] = {kind: base.replies[keys[kind]] for kind in kinds if keys[kind] in base.replies}
        todo = [kind for kind in kinds if kind not in gens[side]]
        if todo:
            # Every set of a side in one call, cut into batches by length across the sets: fewer, fuller
            # batches (bench/generation_batches.py: the demo's 3 x 20 prompts in 106 s against 134 s per set).
            with _edited_side(model, intervention if side == "edited" else None):
                replies = generate(
                    model,
                    base.tokenizer,
                    [t for kind in todo for t in texts[kind]],
                    settings.max_new_tokens,
                    settings.batch_size,
                    f"{side}, {', '.join(todo)}",
                    skip_special_tokens=not keep_special,
                )
            for kind in todo:
                gens[side][kind], replies = replies[: len(texts[kind])], replies[len(texts[kind]) :]
                if side == "base":
                    base.replies[keys[kind]] = gens[side][kind]
        timings[f"generate_{side}_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    judging = {
        side: {
            kind: judge_all(
                judges,
                sets[kind].instructions,
                [g.text for g in gens[side][kind]],
                sets[kind].categories,
                reasoning_delimiters=delimiters,
            )
            for kind in kinds
        }
        for side in SIDES
    }
    timings["judge_s"] = time.perf_counter() - t1
    for judge in judges:
        timings[f"judge_{summary_key(judge.name)}_s"] = sum(
            judging[s][k].stats[judge.name].seconds for s in SIDES for k in kinds
        )

    t1 = time.perf_counter()
    rows = teacher_forced(
        base.model,
        edited_model,
        base.tokenizer,
        texts["harmless"],
        [g.token_ids[: _kl_length(settings)] for g in gens["base"]["harmless"]],
        intervention=intervention,
        batch_size=_teacher_forced_batch(settings, len(base.tokenizer)),
    )
    divergence = aggregate(rows)
    timings["teacher_forced_s"] = time.perf_counter() - t1
    timings["total_s"] = timings.get("load_s", 0.0) + time.perf_counter() - t0

    return EvalReport(
        base={**base.source.describe(), "dtype": base.dtype, "device": base.device, "load_in": base.load_in},
        edited=edited_desc,
        chat_format=fmt.describe(),
        prompts={kind: sets[kind].describe() for kind in kinds},
        settings={**asdict(settings), "dtype": base.dtype, "device": base.device},
        judges={j.name: j.describe() for j in judges},
        judging=judging,
        divergence=divergence,
        samples=_pick_samples(judging, settings.samples),
        reasoning_delimiters=delimiters,
        versions=versions(),
        timings={k: round(v, 3) for k, v in timings.items()},
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def _verdict_key(
    judges: Sequence[Judge],
    prompts: list[str],
    replies: list[str],
    categories: list[str],
    delimiters: tuple[str, str] | None,
) -> str:
    """What makes two judgings of a prompt set the same: the judges (as they describe themselves) and the
    exact prompts, replies, categories and reasoning delimiters."""
    h = hashlib.sha256()
    for part in ([(j.name, j.describe()) for j in judges], prompts, replies, categories, delimiters):
        h.update(repr(part).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _saved_reply(row: dict[str, Any], delimiters: tuple[str, str] | None) -> str:
    """The generated reply of a saved sample (reports before `reply` was kept: rebuilt from its parts)."""
    if "reply" in row or not row.get("reasoning"):
        return row.get("reply", row["answer"])
    if delimiters is None:
        raise RefusalEditError("the report keeps reasoning blocks but not their delimiters: it cannot be judged again")
    closed = not str(row.get("degenerate", "")).startswith(NO_ANSWER)
    return delimiters[0] + row["reasoning"] + (delimiters[1] + row["answer"] if closed else "")


def rejudge(
    saved: dict[str, Any],
    judges: Sequence[Judge],
    settings: dict[str, Any] | None = None,
    verdicts: dict[str, JudgeReport] | None = None,
) -> EvalReport:
    """A saved report (`EvalReport.to_dict()`) judged again by `judges` (the first gives the headline rates).

    Nothing is generated or teacher-forced: the replies and the KL numbers are the saved ones, so a new
    judge costs only its verdicts, and every judge sees exactly the replies the first report counted.
    `settings` replaces the judge settings recorded with the report.

    `verdicts`: a dict kept by the caller across calls that judge several reports again (e.g. every edit of
    a benchmark against one base model, whose base replies are the same in every report): a prompt set
    whose replies were judged already by the same judges is taken from it, not judged again - half the
    cost of every further report. Keyed by the judges and the exact prompts, replies and categories.
    """
    t0 = time.perf_counter()
    try:
        sides = saved["judging"]
        kinds = [k for k in KINDS if k in sides["base"]]
        found = saved.get("reasoning_delimiters")
        delim = (str(found[0]), str(found[1])) if found else None
        rows = {s: {k: sides[s][k].get("samples") or [] for k in kinds} for s in SIDES}
        divergence = DivergenceStats(**{f.name: saved["divergence"][f.name] for f in fields(DivergenceStats)})
        count = len(saved.get("samples") or [])
    except (KeyError, TypeError) as exc:
        raise RefusalEditError(f"not an evaluate report (missing {exc})") from None
    if not kinds or any(
        len(rows[s][k]) != sides[s][k]["count"] or any("answer" not in r for r in rows[s][k])
        for s in SIDES
        for k in kinds
    ):
        raise RefusalEditError("the report does not keep every reply with its text: it cannot be judged again")
    cache = verdicts if verdicts is not None else {}
    judging: dict[str, dict[str, JudgeReport]] = {side: {} for side in SIDES}
    for side in SIDES:
        for kind in kinds:
            prompts = [r["prompt"] for r in rows[side][kind]]
            replies = [_saved_reply(r, delim) for r in rows[side][kind]]
            cats = [r["category"] for r in rows[side][kind]]
            key = _verdict_key(judges, prompts, replies, cats, delim)
            if key not in cache:
                cache[key] = judge_all(judges, prompts, replies, cats, reasoning_delimiters=delim)
            judging[side][kind] = cache[key]
    return EvalReport(
        base=saved["base"],
        edited=saved["edited"],
        chat_format=saved["chat_format"],
        prompts=saved["prompts"],
        settings={**saved["settings"], **(settings or {}), "rejudged": saved.get("created")},
        judges={j.name: j.describe() for j in judges},
        judging=judging,
        divergence=divergence,
        samples=_pick_samples(judging, count),
        reasoning_delimiters=delim,
        versions=versions(),
        timings={**saved.get("timings", {}), "rejudge_s": round(time.perf_counter() - t0, 3)},
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
