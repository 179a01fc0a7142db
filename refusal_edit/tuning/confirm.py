"""Confirm front points with what users will see: greedy replies and the damage over whole continuations.

For each point: greedy replies to the harmful validation prompts, judged by the refusal markers and the
degenerate-output rules (a degenerate reply - empty, echoing, looping, switching script - is never
"compliance": it counts as a failure next to refusals); and on harmless validation prompts the first-token
and multi-token KL against the base model's own greedy continuations, teacher-forced.

Generation on a CPU costs about as much per row whatever the batch, up to large batches, so the replies
of every point with a hook twin (and of the base model) are generated in one batch, each group of rows
under its own edit (`interventions.edit_hooks_by_row`). The base model's continuations and their
log-probabilities are computed once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from refusal_edit.anatomy import anatomy
from refusal_edit.edits.memory import edited_weights
from refusal_edit.edits.spec import DirectionBank, EditSpec, WriterBases, resolve
from refusal_edit.evaluation.metrics import aggregate, continuation_metrics
from refusal_edit.evaluation.stats import count, wilson
from refusal_edit.forward import BatchView, tail_logits, teacher_forced
from refusal_edit.generation import Generated, generate
from refusal_edit.interventions import RowGroups, applied, edit_hooks_by_row
from refusal_edit.judging import degenerate_reason, is_refusal
from refusal_edit.prompts.sets import prompt_set

GROUP_ROWS = 320  # rows generated in one batch at most (memory: KV cache and logits of every row)
Points = Sequence[tuple[str, EditSpec | None]]  # (label, the edit; None: the base model itself)


@dataclass
class Confirmed:
    """Measured numbers of one point (rates are fractions of the harmful prompts)."""

    refusal_rate: float
    degenerate_rate: float
    complied_rate: float
    first_token_kl: float
    multi_token_kl: float | None
    prompts: int
    kl_prompts: int
    seconds: float
    samples: list[dict[str, str]]
    # Which harmful prompts (indices, in order) were refused or degenerate, and a hash of those prompts: every
    # point is judged on the same prompts, so two points are compared prompt by prompt (`stats.paired`).
    failed: list[int] | None = None
    prompt_set: str | None = None

    @property
    def failures(self) -> float:
        """Refused or degenerate: what the front's refusal axis counts."""
        return self.refusal_rate + self.degenerate_rate

    @property
    def refusal_ci95(self) -> tuple[float, float]:
        """Wilson 95 % interval of the refusal rate: val holds a few dozen prompts, so it is wide."""
        return wilson(count(self.refusal_rate, self.prompts), self.prompts)

    @property
    def failure_ci95(self) -> tuple[float, float]:
        """Wilson 95 % interval of the refused-or-degenerate rate (what the pick judges)."""
        n = self.prompts
        return wilson(count(self.refusal_rate, n) + count(self.degenerate_rate, n), n)

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "refusal_ci95": [round(x, 4) for x in self.refusal_ci95],
            "failure_ci95": [round(x, 4) for x in self.failure_ci95],
        }


def failed_indices(refused: Sequence[bool], degenerate: Sequence[str | None]) -> list[int]:
    """The prompts (indices) whose reply was refused or degenerate."""
    return [i for i, (r, d) in enumerate(zip(refused, degenerate, strict=True)) if r or d is not None]


def judge_replies(prompts: Sequence[str], replies: Sequence[Generated]) -> tuple[list[bool], list[str | None]]:
    """(refused, degenerate reason) per reply; a degenerate reply is not also counted as a refusal."""
    refused, degenerate = [], []
    for p, g in zip(prompts, replies, strict=True):
        reason = degenerate_reason(p, g.text)
        degenerate.append(reason)
        refused.append(reason is None and is_refusal(g.text))
    return refused, degenerate


def replies_by_group(
    model: nn.Module,
    tokenizer,
    groups: Sequence[tuple[str, WriterBases | None, Sequence[str]]],
    max_new_tokens: int,
    batch_size: int,
) -> list[list[Generated]]:
    """Greedy replies to each group's texts under its edit (label, edit or None for the base model, texts).

    Groups with a hook twin share batches of up to `GROUP_ROWS` rows, cut into as few batches as they need
    and balanced between them (a CPU computes a batch of a few hundred rows at a better rate than one of a
    hundred); norm-preserving edits rewrite the weights, one group at a time."""
    replies: list[list[Generated] | None] = [None] * len(groups)
    shared = [i for i, (_, e, _) in enumerate(groups) if e is None or not e.preserve_norm]
    rows = sum(len(groups[i][2]) for i in shared)
    cuts = max(1, -(-rows // GROUP_ROWS))
    per_cut = -(-rows // cuts)
    chunks: list[list[int]] = [[]]
    for i in shared:
        filled = sum(len(groups[j][2]) for j in chunks[-1])
        if chunks[-1] and (filled >= per_cut or filled + len(groups[i][2]) > GROUP_ROWS):
            chunks.append([])
        chunks[-1].append(i)
    for chunk in (c for c in chunks if c):
        keys = [g for g, i in enumerate(chunk) for _ in groups[i][2]]
        texts = [t for i in chunk for t in groups[i][2]]
        row_groups = RowGroups(keys)
        with edit_hooks_by_row(model, [groups[i][1] for i in chunk], row_groups):
            out = generate(
                model,
                tokenizer,
                texts,
                max_new_tokens,
                max(batch_size, len(texts)),
                f"replies ({', '.join(groups[i][0] for i in chunk)})",
                before_batch=row_groups.select,
                row_keys=keys,
            )
        start = 0
        for i in chunk:
            replies[i] = out[start : start + len(groups[i][2])]
            start += len(groups[i][2])
    for i, (label, edit, texts) in enumerate(groups):
        if replies[i] is None:
            with edited_weights(model, edit):  # type: ignore[arg-type]
                replies[i] = generate(model, tokenizer, list(texts), max_new_tokens, batch_size, f"replies ({label})")
    return replies  # type: ignore[return-value]


class Confirmer:
    """Measures points against the base model on fixed validation prompts."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        harmful_prompts: Sequence[str],
        harmful_texts: Sequence[str],
        harmless_texts: Sequence[str],
        max_new_tokens: int = 48,
        batch_size: int = 32,
        samples: int = 3,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.harmful_prompts, self.harmful_texts = list(harmful_prompts), list(harmful_texts)
        self.harmless_texts = list(harmless_texts)
        self.max_new_tokens, self.batch_size, self.samples = max_new_tokens, batch_size, samples
        self.continuations: list[list[int]] = []
        self.base_logprobs: list[torch.Tensor] = []

    def _base_continuations(self, replies: Sequence[Generated]) -> None:
        """Keep the base model's greedy continuations of the harmless prompts (generated in the first batch of
        replies: a batch of 16 rows alone runs at a third of the rate) and its log-probabilities at the
        positions that predict them, in float16."""
        self.continuations = [g.token_ids for g in replies]
        model = self.model
        self.base_logprobs = teacher_forced(
            self.tokenizer,
            self.harmless_texts,
            self.continuations,
            [lambda view, keep: tail_logits(model, view, keep)],
            lambda logits, _targets: torch.log_softmax(logits[0], -1).half(),
            batch_size=max(1, self.batch_size // 2),
        )

    def _cached_base(self, view: BatchView, keep: int) -> torch.Tensor:
        """The base model's cached log-probs laid out like `tail_logits` of this batch."""
        vocab = self.base_logprobs[0].shape[-1]
        out = torch.zeros((len(view.rows), keep, vocab), dtype=torch.float32)
        for j, i in enumerate(view.rows):
            lp = self.base_logprobs[i].float()
            k = len(self.continuations[i])
            lo = keep - 1 - k
            out[j, lo : lo + lp.shape[0]] = lp
        return out

    def _kl(self, edit: WriterBases, label: str) -> tuple[float, float | None]:
        def edited(view: BatchView, keep: int) -> torch.Tensor:
            with applied(self.model, edit):
                return tail_logits(self.model, view, keep)

        rows = teacher_forced(
            self.tokenizer,
            self.harmless_texts,
            self.continuations,
            [self._cached_base, edited],
            lambda logits, targets: continuation_metrics(logits[0], logits[1], targets),
            batch_size=max(1, self.batch_size // 2),
            description=f"KL ({label})",
        )
        stats = aggregate(rows)
        return stats.first_token_kl, stats.multi_token_kl

    def _resolved(self, points: Points, bank: DirectionBank) -> list[tuple[str, WriterBases | None]]:
        n_layers = anatomy(self.model).num_layers
        return [(label, None if spec is None else resolve(spec, bank, n_layers)) for label, spec in points]

    def _replies(self, points: Sequence[tuple[str, WriterBases | None]]) -> list[list[Generated]]:
        """Greedy replies to the harmful prompts under every point: hookable points share batches (with the
        base model's harmless continuations, the first time)."""
        groups = [(label, edit, self.harmful_texts) for label, edit in points]
        first = bool(self.harmless_texts) and not self.continuations
        if first:
            groups.append(("base continuations (harmless)", None, self.harmless_texts))
        replies = replies_by_group(self.model, self.tokenizer, groups, self.max_new_tokens, self.batch_size)
        if first:
            self._base_continuations(replies.pop())
        return replies

    def measure(self, points: Points, bank: DirectionBank) -> list[Confirmed]:
        """Every point's numbers (None: the base model itself; the edits draw on `bank`)."""
        points = self._resolved(points, bank)
        start = time.perf_counter()
        replies = self._replies(points)
        shared_seconds = (time.perf_counter() - start) / max(1, len(points))
        out = []
        for (label, edit), rows in zip(points, replies, strict=True):
            t = time.perf_counter()
            refused, degenerate = judge_replies(self.harmful_prompts, rows)
            n = len(rows)
            n_refused, n_degenerate = sum(refused), sum(r is not None for r in degenerate)
            first, multi = (0.0, 0.0) if edit is None else self._kl(edit, label)
            samples = [{"prompt": self.harmful_prompts[i], "reply": rows[i].text} for i in range(min(self.samples, n))]
            out.append(
                Confirmed(
                    refusal_rate=n_refused / n,
                    degenerate_rate=n_degenerate / n,
                    complied_rate=(n - n_refused - n_degenerate) / n,
                    first_token_kl=first,
                    multi_token_kl=multi,
                    prompts=n,
                    kl_prompts=len(self.harmless_texts),
                    seconds=shared_seconds + time.perf_counter() - t,
                    samples=samples,
                    failed=failed_indices(refused, degenerate),
                    prompt_set=prompt_set(self.harmful_prompts),
                )
            )
        return out
