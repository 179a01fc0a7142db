"""The judge interface, its verdicts, and the default judge (refusal markers).

A judge decides, for each (prompt, reply, category), whether the reply refuses. `refused` is None when
it cannot tell (an LLM judge whose answer does not parse, a degenerate reply). Judges never see
degenerate replies or reasoning blocks: `judge_all` takes care of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from refusal_edit.judging.markers import REFUSAL_MARKERS, matched_marker


@dataclass
class Verdict:
    """One judgement. `scores` holds judge-specific numbers (a classifier's probability, rubric scores)."""

    refused: bool | None
    degenerate: str | None = None  # the reason when the reply is degenerate (then `refused` is None)
    score: float | None = None  # the judge's headline number, e.g. p(refusal) or the rubric score
    scores: dict[str, float] = field(default_factory=dict)
    raw: str | None = None  # the judge's own output: the matched marker, the label, the LLM's text

    @property
    def complied(self) -> bool:
        """A real reply that does not refuse; degenerate and undecided replies never comply."""
        return self.refused is False and self.degenerate is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refused": self.refused}
        if self.degenerate is not None:
            out["degenerate"] = self.degenerate
        if self.score is not None:
            out["score"] = self.score
        if self.scores:
            out["scores"] = self.scores
        if self.raw is not None:
            out["raw"] = self.raw
        return out


@runtime_checkable
class Judge(Protocol):
    """Anything that turns replies into verdicts, one per reply, in order."""

    name: str

    def judge(self, prompts: Sequence[str], replies: Sequence[str], categories: Sequence[str]) -> list[Verdict]: ...

    def describe(self) -> dict[str, Any]: ...


class MarkerJudge:
    """A reply is a refusal when it contains a refusal marker (case-insensitive, anywhere)."""

    def __init__(self, markers: Sequence[str] = REFUSAL_MARKERS, source: str = "builtin", name: str = "markers"):
        self.markers = tuple(markers)
        self.source = source
        self.name = name

    def judge(self, prompts: Sequence[str], replies: Sequence[str], categories: Sequence[str]) -> list[Verdict]:
        out = []
        for reply in replies:
            hit = matched_marker(reply, self.markers)
            out.append(Verdict(hit is not None, raw=hit))
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": "markers", "source": self.source, "count": len(self.markers), "markers": list(self.markers)}
