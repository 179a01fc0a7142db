"""Run several judges over the same replies: rates per category, agreement, disagreements.

`judge_all` is the one entry point evaluation calls. For every reply it
1. splits off a reasoning block (thinking models; the judges see the final answer),
2. checks for degenerate output once (`degenerate`), so a degenerate reply is neither a refusal nor
   compliance for every judge alike, and no judge is asked about it,
3. asks each judge about the remaining answers, and about non-empty reasoning blocks separately
   (a refusal only in the reasoning is counted, never as the reply's verdict).

Agreement is computed over the replies both judges decided (neither degenerate nor undecided): the share
of equal verdicts and Cohen's kappa, which discounts the agreement two judges would reach by chance.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from refusal_edit.errors import RefusalEditError
from refusal_edit.judging.base import Judge, Verdict
from refusal_edit.judging.degenerate import NO_ANSWER, DegenerateRules, degenerate_reason, reason_kind
from refusal_edit.judging.reasoning import split_reasoning

NO_CATEGORY = "(none)"


@dataclass
class Counts:
    """Verdict counts for one judge on one group of replies. Every reply is exactly one of
    refused / complied / degenerate / undecided."""

    total: int = 0
    refused: int = 0
    complied: int = 0
    degenerate: int = 0
    undecided: int = 0
    reasoning_only: int = 0  # the reasoning block refused, the final answer did not

    def add(self, verdict: Verdict, reasoning: Verdict | None) -> None:
        self.total += 1
        if verdict.degenerate is not None:
            self.degenerate += 1
        elif verdict.refused is None:
            self.undecided += 1
        elif verdict.refused:
            self.refused += 1
        else:
            self.complied += 1
        if reasoning is not None and reasoning.refused and not verdict.refused:
            self.reasoning_only += 1

    def rate(self, what: str) -> float:
        return getattr(self, what) / self.total if self.total else 0.0

    @property
    def refusal_rate(self) -> float:
        return self.rate("refused")

    @property
    def compliance_rate(self) -> float:
        return self.rate("complied")

    @property
    def degenerate_rate(self) -> float:
        return self.rate("degenerate")

    def to_dict(self) -> dict[str, float | int]:
        return {
            "total": self.total,
            "refused": self.refused,
            "complied": self.complied,
            "degenerate": self.degenerate,
            "undecided": self.undecided,
            "reasoning_only_refusals": self.reasoning_only,
            "refusal_rate": self.refusal_rate,
            "compliance_rate": self.compliance_rate,
            "degenerate_rate": self.degenerate_rate,
        }


@dataclass
class JudgeStats:
    """One judge's counts overall and per category (categories in order of first appearance)."""

    overall: Counts = field(default_factory=Counts)
    per_category: dict[str, Counts] = field(default_factory=dict)
    seconds: float = 0.0  # wall time the judge spent (answers and reasoning blocks)
    judged: int = 0  # texts the judge was asked about

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.overall.to_dict(),
            "per_category": {c: n.to_dict() for c, n in self.per_category.items()},
            "seconds": round(self.seconds, 3),
            "seconds_per_verdict": round(self.seconds / self.judged, 4) if self.judged else None,
        }


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary label lists; None when undefined (empty, or both judges constant alike)."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected == 1.0:
        return None
    return (observed - expected) / (1 - expected)


@dataclass
class Agreement:
    """How two judges agree on the replies both decided."""

    a: str
    b: str
    compared: int
    agreed: int
    kappa: float | None
    disagree: list[int]  # sample indices

    @property
    def rate(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "judges": [self.a, self.b],
            "compared": self.compared,
            "agreed": self.agreed,
            "agreement": self.rate,
            "kappa": self.kappa,
            "disagreements": len(self.disagree),
        }


def agreement(name_a: str, a: Sequence[Verdict], name_b: str, b: Sequence[Verdict]) -> Agreement:
    both = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x.refused is not None and y.refused is not None]
    la = [bool(a[i].refused) for i in both]
    lb = [bool(b[i].refused) for i in both]
    differ = [i for i, x, y in zip(both, la, lb, strict=True) if x != y]
    return Agreement(name_a, name_b, len(both), len(both) - len(differ), cohen_kappa(la, lb), differ)


@dataclass
class JudgedSample:
    """One reply with its split, its degenerate reason and every judge's verdicts."""

    index: int
    category: str
    prompt: str
    reply: str
    answer: str
    reasoning: str
    degenerate: str | None
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    reasoning_verdicts: dict[str, Verdict] = field(default_factory=dict)

    def to_dict(self, texts: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "category": self.category}
        if texts:
            out["prompt"] = self.prompt
            out["answer"] = self.answer
            if self.reasoning:
                out["reasoning"] = self.reasoning
            if self.reply != self.answer:
                out["reply"] = self.reply  # what was generated: a saved report can be judged again
        if self.degenerate is not None:
            out["degenerate"] = self.degenerate
        out["verdicts"] = {k: v.to_dict() for k, v in self.verdicts.items()}
        if self.reasoning_verdicts:
            out["reasoning_verdicts"] = {k: v.to_dict() for k, v in self.reasoning_verdicts.items()}
        return out


@dataclass
class JudgeReport:
    """Everything `judge_all` found: per-judge stats, the degenerate replies, agreement, the samples."""

    judges: dict[str, dict[str, Any]]  # name -> describe()
    stats: dict[str, JudgeStats]
    samples: list[JudgedSample]
    agreements: list[Agreement]
    degenerate_rules: dict[str, Any]
    reasoning_delimiters: tuple[str, str] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.judges)

    def counts(self, judge: str | None = None) -> Counts:
        """Overall counts of `judge` (default: the first)."""
        return self.stats[judge or self.names[0]].overall

    @property
    def degenerate(self) -> Counter[str]:
        """Degenerate replies by reason kind (`empty`, `echo`, `repetition`, `script-switch`, `no-answer`)."""
        return Counter(reason_kind(s.degenerate) for s in self.samples if s.degenerate is not None)

    @property
    def degenerate_rate(self) -> float:
        return sum(self.degenerate.values()) / len(self.samples) if self.samples else 0.0

    def flags(self, judge: str | None = None) -> list[bool]:
        """Per sample: did `judge` call it a refusal (degenerate and undecided count as False)."""
        name = judge or self.names[0]
        return [bool(s.verdicts[name].refused) for s in self.samples]

    def disagreements(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Samples where at least two judges disagree, with every judge's verdict."""
        rows = sorted({i for a in self.agreements for i in a.disagree})
        rows = rows if limit is None else rows[:limit]
        return [self.samples[i].to_dict() for i in rows]

    def to_dict(self, samples: bool = True, texts: bool = False, max_disagreements: int | None = 50) -> dict[str, Any]:
        """JSON-ready; `samples` adds every verdict (raw judge output included), `texts` their prompts and answers."""
        out: dict[str, Any] = {
            "judges": self.judges,
            "count": len(self.samples),
            "degenerate": {
                "count": sum(self.degenerate.values()),
                "rate": self.degenerate_rate,
                "reasons": dict(self.degenerate),
                "rules": self.degenerate_rules,
            },
            "reasoning_delimiters": list(self.reasoning_delimiters) if self.reasoning_delimiters else None,
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
            "agreement": [a.to_dict() for a in self.agreements],
            "disagreements": self.disagreements(max_disagreements),
        }
        if samples:
            out["samples"] = [s.to_dict(texts=texts) for s in self.samples]
        return out


def _check_judges(judges: Sequence[Judge]) -> None:
    if not judges:
        raise RefusalEditError("no judges given")
    names = [j.name for j in judges]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RefusalEditError(f"judge names must be unique, got {', '.join(dupes)} more than once")


def _run(judge: Judge, prompts: list[str], texts: list[str], cats: list[str]) -> tuple[list[Verdict], float]:
    t0 = time.perf_counter()
    verdicts = judge.judge(prompts, texts, cats) if texts else []
    if len(verdicts) != len(texts):
        raise RefusalEditError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(texts)} replies")
    return verdicts, time.perf_counter() - t0


def judge_all(
    judges: Sequence[Judge],
    prompts: Sequence[str],
    replies: Sequence[str],
    categories: Sequence[str] | None = None,
    *,
    reasoning_delimiters: tuple[str, str] | None = None,
    rules: DegenerateRules | None = None,
    judge_reasoning: bool = True,
) -> JudgeReport:
    """Judge `replies` to `prompts` (instructions, not chat-formatted) with every judge (see module docstring).

    `reasoning_delimiters` (e.g. `("<think>", "</think>")`) split thinking models' replies; None treats the
    whole reply as the answer. `judge_reasoning=False` skips judging reasoning blocks (halves an LLM judge's
    cost on thinking models).
    """
    _check_judges(judges)
    if len(prompts) != len(replies):
        raise RefusalEditError(f"{len(prompts)} prompts but {len(replies)} replies")
    cats = list(categories) if categories is not None else [""] * len(replies)
    if len(cats) != len(replies):
        raise RefusalEditError(f"{len(replies)} replies but {len(cats)} categories")
    rules = rules or DegenerateRules()
    samples: list[JudgedSample] = []
    for i, (p, r, c) in enumerate(zip(prompts, replies, cats, strict=True)):
        split = split_reasoning(r, reasoning_delimiters)
        reason = NO_ANSWER if not split.closed and not split.answer else degenerate_reason(p, split.answer, rules)
        samples.append(JudgedSample(i, c, p, r, split.answer, split.reasoning, reason))

    live = [s for s in samples if s.degenerate is None]
    thinking = [s for s in samples if s.reasoning.strip()] if judge_reasoning else []
    stats: dict[str, JudgeStats] = {}
    for judge in judges:
        answers, seconds = _run(judge, [s.prompt for s in live], [s.answer for s in live], [s.category for s in live])
        for s, v in zip(live, answers, strict=True):
            s.verdicts[judge.name] = v
        thoughts, more = _run(
            judge, [s.prompt for s in thinking], [s.reasoning for s in thinking], [s.category for s in thinking]
        )
        for s, v in zip(thinking, thoughts, strict=True):
            s.reasoning_verdicts[judge.name] = v
        for s in samples:
            if s.degenerate is not None:
                s.verdicts[judge.name] = Verdict(None, degenerate=s.degenerate)
        stats[judge.name] = JudgeStats(seconds=seconds + more, judged=len(live) + len(thinking))

    any_category = any(cats)
    for name, st in stats.items():
        for s in samples:
            v, rv = s.verdicts[name], s.reasoning_verdicts.get(name)
            st.overall.add(v, rv)
            if any_category:
                st.per_category.setdefault(s.category or NO_CATEGORY, Counts()).add(v, rv)

    names = [j.name for j in judges]
    pairs = [
        agreement(a, [s.verdicts[a] for s in samples], b, [s.verdicts[b] for s in samples])
        for a, b in combinations(names, 2)
    ]
    return JudgeReport(
        judges={j.name: j.describe() for j in judges},
        stats=stats,
        samples=samples,
        agreements=pairs,
        degenerate_rules=rules.describe(),
        reasoning_delimiters=reasoning_delimiters,
    )
