"""Refusal tokens derived from the model itself.

The paper hard-codes, per model family, the first tokens of a refusal ("I", "As"). We generate the
model's own greedy replies to harmful and harmless training prompts, keep the replies that the refusal
markers flag, and take the first tokens that start refusals clearly more often than they start
ordinary answers. The evidence (counts) is recorded with the direction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_edit.generation import generate
from refusal_edit.judging.markers import REFUSAL_MARKERS, is_refusal
from refusal_edit.prompts.template import ChatFormat

FALLBACK_STARTS = ("I", "As", "Sorry", "I'm", "I cannot")


@dataclass
class RefusalTokens:
    ids: list[int]
    strings: list[str]
    source: str  # derived | fallback | user
    evidence: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"ids": self.ids, "strings": self.strings, "source": self.source, "evidence": self.evidence}


def first_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for w in words:
        enc = tokenizer(w, add_special_tokens=False)["input_ids"]
        if enc and enc[0] not in ids:
            ids.append(enc[0])
    return ids


def user_refusal_tokens(tokenizer, words: Sequence[str]) -> RefusalTokens:
    ids = first_token_ids(tokenizer, words)
    return RefusalTokens(ids, [tokenizer.decode([i]) for i in ids], "user")


def derive_refusal_tokens(
    model,
    tokenizer,
    fmt: ChatFormat,
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_new_tokens: int = 12,
    batch_size: int = 32,
    markers: Sequence[str] = REFUSAL_MARKERS,
    min_share: float = 0.1,
) -> RefusalTokens:
    """First tokens of the model's refusals that rarely start its answers to harmless prompts."""
    gens = generate(
        model,
        tokenizer,
        fmt.format_all([*harmful, *harmless]),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        description="refusal tokens",
    )
    harmful_gens, harmless_gens = gens[: len(harmful)], gens[len(harmful) :]
    refusals = [g for g in harmful_gens if g.token_ids and is_refusal(g.text, markers)]
    answers = [g for g in harmless_gens if g.token_ids and not is_refusal(g.text, markers)]
    starts = Counter(g.token_ids[0] for g in refusals)
    answer_starts = Counter(g.token_ids[0] for g in answers)
    chosen = [
        t
        for t, c in starts.most_common()
        if c >= max(1, min_share * len(refusals)) and c / len(refusals) > 2 * answer_starts[t] / max(1, len(answers))
    ]
    evidence = {
        "harmful_prompts": len(harmful),
        "harmful_refused": len(refusals),
        "harmless_prompts": len(harmless),
        "harmless_answered": len(answers),
        "refusal_starts": {tokenizer.decode([t]): c for t, c in starts.most_common(10)},
        "answer_starts": {tokenizer.decode([t]): c for t, c in answer_starts.most_common(10)},
    }
    if chosen:
        return RefusalTokens(chosen, [tokenizer.decode([t]) for t in chosen], "derived", evidence)
    ids = first_token_ids(tokenizer, FALLBACK_STARTS)
    evidence["note"] = "the model refused too rarely to derive tokens; using common refusal starts"
    return RefusalTokens(ids, [tokenizer.decode([i]) for i in ids], "fallback", evidence)
