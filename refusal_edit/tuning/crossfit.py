"""Cross-fitted confirmation: judge edits on harmful prompts none of their directions was fitted to.

Why: every direction an edit draws on (the selected one, each layer's own candidate) is a difference in means
over the train prompts, so judging edits there flatters the ones with more fitted directions (on the demo
model the per-layer bridge "tied" the paper's edit on train and lost on test; cross-fitted, the order agreed
with the test split's), and `tune`'s val prompts are the ones its search scored. So the train prompts are
split in two halves (alternate prompts); each half's candidates (difference in means, filtered as `extract`
filtered them, the selected one at the direction's position and layer) make every edit, which is judged on
the other half's harmful prompts; counts are pooled over the halves. Every judged prompt is judged once, by
edits whose directions never saw it - on more prompts than `tune`'s val split holds, so that a few percent
of refusals can be told apart. Where fewer are judged (`judged`), each half judges the prompts the base model
refuses most by its first-token refusal score (computed anyway, by the other half's candidates): a prompt the
base model answers says little about an edit's refusals, and every prompt costs a generation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from refusal_edit.anatomy import anatomy
from refusal_edit.console import err
from refusal_edit.directions.candidates import generate_candidates
from refusal_edit.directions.halves import Half, train_halves
from refusal_edit.edits.spec import DirectionBank, EditSpec, resolve
from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.stats import count, wilson
from refusal_edit.prompts.template import ChatFormat
from refusal_edit.tuning.confirm import failed_indices, judge_replies, prompt_set, replies_by_group

T = TypeVar("T")


def halves(items: Sequence[T]) -> list[tuple[list[T], list[T]]]:
    """Two folds of alternate items, as (fitted on, judged on): every item is judged exactly once."""
    return [(list(items[f::2]), list(items[1 - f :: 2])) for f in (0, 1)]


def pooled(folds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The folds' numbers (rates of `prompts` prompts, as `Confirmed.to_json()` has them) as one point: counts
    summed over every judged prompt with their Wilson 95 % intervals; KLs (measured on the same harmless
    prompts in each fold), when the folds have them, averaged."""
    n = sum(f["prompts"] for f in folds)
    refused = sum(count(f["refusal_rate"], f["prompts"]) for f in folds)
    degenerate = sum(count(f["degenerate_rate"], f["prompts"]) for f in folds)
    out = {
        "refusal_rate": refused / n,
        "degenerate_rate": degenerate / n,
        "complied_rate": (n - refused - degenerate) / n,
        "prompts": n,
        "refused": refused,
        "degenerate": degenerate,
        "refusal_ci95": [round(x, 4) for x in wilson(refused, n)],
        "failure_ci95": [round(x, 4) for x in wilson(refused + degenerate, n)],
        "seconds": sum(f["seconds"] for f in folds),
    }
    if all(f.get("failed") is not None for f in folds):  # per prompt: each fold's indices after the folds before it
        offsets = [sum(f["prompts"] for f in folds[:k]) for k in range(len(folds))]
        out["failed"] = [o + i for o, f in zip(offsets, folds, strict=True) for i in f["failed"]]
        out["prompt_set"] = "+".join(str(f.get("prompt_set")) for f in folds)
    if all("first_token_kl" in f for f in folds):
        mt = [f["multi_token_kl"] for f in folds]
        out["first_token_kl"] = sum(f["first_token_kl"] for f in folds) / len(folds)
        out["multi_token_kl"] = None if None in mt else sum(mt) / len(mt)
    return out | {"folds": list(folds)}


@dataclass
class Fold:
    """One half's bank (its candidates, made from the other prompts) and the harmful prompts it judges, the
    ones the base model refuses most (first-token refusal score) first."""

    bank: DirectionBank
    judged: list[str]
    fitted: tuple[int, int]  # harmful, harmless prompts the candidates' means kept


def fold_banks(
    model,
    tokenizer,
    fmt: ChatFormat,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    position: int | None,
    layer: int | None,
    batch_size: int = 16,
    filter_train: bool = True,
    kept: Sequence[Half] | None = None,
) -> list[Fold]:
    """The two folds of `harmful` / `harmless` (the train prompts the direction came from). `kept`: the halves'
    candidates `extract` kept for these prompts (`directions.halves.load_halves`); else one pass over the
    prompts makes them."""
    if position is None or layer is None:
        raise RefusalEditError("cross-fitting needs the direction's position and layer (an extract run's direction)")
    if kept is None:
        cands = generate_candidates(
            model, tokenizer, fmt, harmful, harmless, refusal_ids, batch_size=batch_size, filter_train=filter_train
        )
        kept = train_halves(cands)
    folds = []
    for k, (_, held) in enumerate(halves(harmful)):
        scores = kept[1 - k].scores.tolist()  # the base model's, on the prompts this fold judges
        order = sorted(range(len(held)), key=lambda i: -scores[i])
        folds.append(Fold(kept[k].bank(position, layer), [held[i] for i in order], kept[k].kept))
    return folds


class CrossFit:
    """Refused and degenerate replies of edit specs on the folds' held-out harmful prompts (`judged` of them at
    most, split evenly between the folds), pooled. Both folds' replies are generated in the same batches, each
    group of rows under its own fold's edit (`confirm.replies_by_group`)."""

    def __init__(
        self,
        model,
        tokenizer,
        fmt: ChatFormat,
        folds: Sequence[Fold],
        max_new_tokens: int = 48,
        batch_size: int = 32,
        judged: int | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.folds = list(folds)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        per_fold = None if judged is None else max(1, judged // len(self.folds))
        self.judged = [f.judged[:per_fold] for f in self.folds]
        self.texts = [fmt.format_all(prompts) for prompts in self.judged]

    @property
    def prompts(self) -> int:
        return sum(len(p) for p in self.judged)

    def measure(self, points: Sequence[tuple[str, EditSpec]]) -> list[dict[str, Any]]:
        """Every point's pooled numbers (`pooled`), its edits made from each fold's bank."""
        n_layers = anatomy(self.model).num_layers
        groups = [
            (f"{label}, half {k + 1}", resolve(spec, fold.bank, n_layers), texts)
            for k, (fold, texts) in enumerate(zip(self.folds, self.texts, strict=True))
            for label, spec in points
        ]
        start = time.perf_counter()
        replies = replies_by_group(self.model, self.tokenizer, groups, self.max_new_tokens, self.batch_size)
        seconds = (time.perf_counter() - start) / max(1, len(groups))
        per_point: list[list[dict[str, Any]]] = [[] for _ in points]
        for g, rows in enumerate(replies):
            k, j = divmod(g, len(points))
            prompts = self.judged[k]
            refused, degenerate = judge_replies(prompts, rows)
            n = len(prompts)
            per_point[j].append(
                {
                    "prompts": n,
                    "refusal_rate": sum(refused) / n,
                    "degenerate_rate": sum(r is not None for r in degenerate) / n,
                    "seconds": seconds,
                    "failed": failed_indices(refused, degenerate),
                    "prompt_set": prompt_set(prompts),
                }
            )
        err.print(f"cross-fitted: {len(points)} point(s) judged on {self.prompts} held-out harmful prompts")
        return [pooled(f) for f in per_point]
