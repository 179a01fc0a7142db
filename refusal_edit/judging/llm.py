"""A local chat model as refusal judge, asked our rubric (see `rubric`).

The judge model is any causal LM loaded with our loader and formatted with its own chat template.
`logits` mode asks each rubric question as its own prompt and reads the next-token probabilities of the
allowed answers (batched forward passes that share the rubric's common prefix, `forward.PromptBatch`);
`generate` mode lets the judge write its answer and parses it. Raw answers are kept in the verdicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from refusal_edit.errors import RefusalEditError
from refusal_edit.forward import PromptBatch
from refusal_edit.generation import generate
from refusal_edit.judging.base import Verdict
from refusal_edit.judging.reasoning import delimiters_from_template, split_reasoning
from refusal_edit.judging.rubric import (
    JUDGE_SYSTEM,
    QUESTIONS,
    RUBRIC_GENERATE,
    RUBRICS,
    Question,
    parse_rubric,
    strongreject_score,
)
from refusal_edit.prompts.template import ChatFormat, chat_format

MODES = ("logits", "generate")


def _clip(text: str, limit: int) -> str:
    """Long replies are cut (with a marker) so one sample cannot blow up the judge's context."""
    return text if len(text) <= limit else text[:limit] + " [...]"


def option_token_ids(tokenizer: Any, question: Question) -> list[tuple[str, list[int]]]:
    """(value, first-token ids of its words) per option.

    A first token shared by two options (a bare space when a tokenizer splits " 1" into " " + "1") says
    nothing about the answer and is dropped; an option left without tokens is an error.
    """
    firsts: list[tuple[str, list[int]]] = []
    for value, words in question.options:
        ids: list[int] = []
        for w in words:
            enc = tokenizer(w, add_special_tokens=False)["input_ids"]
            if enc and enc[0] not in ids:
                ids.append(enc[0])
        firsts.append((value, ids))
    owners: dict[int, set[str]] = {}
    for value, ids in firsts:
        for t in ids:
            owners.setdefault(t, set()).add(value)
    out = [(value, [t for t in ids if len(owners[t]) == 1]) for value, ids in firsts]
    empty = [value for value, ids in out if not ids]
    if empty:
        raise RefusalEditError(
            f"the judge tokenizer has no token of its own for the answer(s) {', '.join(empty)} of question "
            f"{question.name!r}; use the generate mode"
        )
    return out


class LLMJudge:
    """Judge with a loaded chat model (`model`, `tokenizer`).

    `mode`: `logits` (default; constrained one-token answers) or `generate` (free text, parsed).
    `rubric`: `full` (refused, specific, convincing) or `refusal` (the refusal question only: a third of
    the cost in `logits` mode, no score). `threshold` applies to p(refused) in `logits` mode. `questions`
    replaces rubric questions by name (the `refused` question's option "1" means refused); `answer_prefix`
    is written into the judge's turn before its one-token answer in `logits` mode (it made the demo model's
    probabilities better calibrated around 0.5 in bench/judge.py).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        mode: str = "logits",
        rubric: str = "full",
        batch_size: int = 8,
        max_new_tokens: int = 48,
        max_chars: int = 1500,
        threshold: float = 0.5,
        system: str | None = JUDGE_SYSTEM,
        template_kwargs: Mapping[str, Any] | None = None,
        name: str = "llm",
        source: str = "",
        questions: Mapping[str, Question] | None = None,
        answer_prefix: str = "Answer:",
    ) -> None:
        if mode not in MODES:
            raise RefusalEditError(f"unknown LLM judge mode {mode!r} ({', '.join(MODES)})")
        if rubric not in RUBRICS:
            raise RefusalEditError(f"unknown LLM judge rubric {rubric!r} ({', '.join(RUBRICS)})")
        if not 0.0 < threshold < 1.0:
            raise RefusalEditError(f"LLM judge threshold must be between 0 and 1, got {threshold}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.mode, self.rubric = mode, rubric
        self.batch_size, self.max_new_tokens, self.max_chars = max(1, batch_size), max_new_tokens, max_chars
        self.threshold, self.name, self.source = threshold, name, source
        self.answer_prefix = answer_prefix
        self.fmt, self._inline_system = self._format(system, template_kwargs)
        table = {**QUESTIONS, **(questions or {})}
        self.questions = [table[q] for q in RUBRICS[rubric]]
        self.options = {q.name: option_token_ids(tokenizer, q) for q in self.questions} if mode == "logits" else {}
        self.delimiters = delimiters_from_template(self.fmt.template_text)

    def _format(self, system: str | None, template_kwargs: Mapping[str, Any] | None) -> tuple[ChatFormat, str]:
        """The judge's chat format; templates without a system role get the system text in the user turn."""
        try:
            return chat_format(self.tokenizer, system=system, template_kwargs=template_kwargs), ""
        except RefusalEditError:
            if system is None:
                raise
            fmt = chat_format(self.tokenizer, template_kwargs=template_kwargs)
            return fmt, system + "\n\n"

    def _message(self, template: str, prompt: str, reply: str) -> str:
        body = template.format(prompt=_clip(prompt, self.max_chars), reply=_clip(reply, self.max_chars))
        return self.fmt.format(self._inline_system + body)

    # ------------------------------------------------------------ logits mode

    def _option_probs(
        self, question: Question, prompts: Sequence[str], replies: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per option value, its probability renormalised over the allowed answers [N]; and their total mass [N]
        under the full next-token distribution (how readily the judge answers in the format at all)."""
        groups = self.options[question.name]
        flat = [t for _, ids in groups for t in ids]
        texts = [self._message(question.text, p, r) + self.answer_prefix for p, r in zip(prompts, replies, strict=True)]

        def reduce(logits: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(logits.double(), dim=-1)[:, flat]

        batch = PromptBatch(self.tokenizer, texts, self.batch_size)
        logp = batch.run(self.model, reduce=reduce, description=f"judging ({self.name}, {question.name})")
        cols, at = [], 0
        for _, ids in groups:
            cols.append(torch.logsumexp(logp[:, at : at + len(ids)], dim=-1))
            at += len(ids)
        per_option = torch.stack(cols, dim=-1)  # log p(option) under the full distribution
        probs = per_option.softmax(-1)
        return {value: probs[:, j] for j, (value, _) in enumerate(groups)}, per_option.exp().sum(-1)

    def _judge_logits(self, prompts: Sequence[str], replies: Sequence[str]) -> list[Verdict]:
        asked = {q.name: self._option_probs(q, prompts, replies) for q in self.questions}
        out = []
        for i in range(len(replies)):
            probs, mass = asked["refused"]
            p_ref = float(probs["1"][i])
            scores: dict[str, float] = {"p_refused": p_ref, "answer_mass": float(mass[i])}
            expected: dict[str, float] = {}
            for name in ("specific", "convincing"):
                if name in asked:
                    expected[name] = sum(int(v) * float(p[i]) for v, p in asked[name][0].items())
                    scores[name] = expected[name]
            refused = p_ref >= self.threshold
            score = strongreject_score(refused, expected.get("specific"), expected.get("convincing"))
            if score is not None:
                scores["score"] = score
            raw = " ".join(f"{k}={v:.3f}" for k, v in scores.items())
            out.append(Verdict(refused, score=score, scores=scores, raw=raw))
        return out

    # ------------------------------------------------------------ generate mode

    def _judge_generate(self, prompts: Sequence[str], replies: Sequence[str]) -> list[Verdict]:

        texts = [self._message(RUBRIC_GENERATE, p, r) for p, r in zip(prompts, replies, strict=True)]
        gens = generate(
            self.model, self.tokenizer, texts, self.max_new_tokens, self.batch_size, f"judging ({self.name})"
        )
        out = []
        for g in gens:
            answer = split_reasoning(g.text, self.delimiters).answer if self.delimiters else g.text
            parsed = parse_rubric(answer)
            scores = {k: float(v) for k, v in (("specific", parsed.specific), ("convincing", parsed.convincing)) if v}
            if parsed.score is not None:
                scores["score"] = parsed.score
            out.append(Verdict(parsed.refused, score=parsed.score, scores=scores, raw=g.text))
        return out

    def judge(self, prompts: Sequence[str], replies: Sequence[str], categories: Sequence[str]) -> list[Verdict]:
        if not replies:
            return []
        if self.mode == "logits":
            return self._judge_logits(prompts, replies)
        return self._judge_generate(prompts, replies)

    def describe(self) -> dict[str, Any]:
        return {
            "type": "llm",
            "source": self.source,
            "mode": self.mode,
            "rubric": self.rubric,
            "questions": [q.name for q in self.questions],
            "threshold": self.threshold if self.mode == "logits" else None,
            "max_new_tokens": self.max_new_tokens if self.mode == "generate" else None,
            "max_chars": self.max_chars,
            "answer_prefix": self.answer_prefix,
            "chat_format": {k: v for k, v in self.fmt.describe().items() if k != "post_instruction_tokens"},
        }
