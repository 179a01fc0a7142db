"""Replies of thinking models: split the reasoning block from the final answer.

Judges see the final answer only (a model that reasons "I must not help" and then helps has complied);
refusals that appear only in the reasoning are reported separately. The block's delimiters come from the
chat template (`delimiters_from_template`) or are given explicitly.

Generation must keep the delimiters in the decoded text: `<think>` is an ordinary added token in the
models we know (decoded even with `skip_special_tokens=True`), but a template whose delimiters are
special tokens needs decoding without skipping them; `special_delimiters` tells which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refusal_edit.errors import RefusalEditError

# Known reasoning-block delimiters, most specific first. Only used to recognise a template's own pair.
KNOWN_DELIMITERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<reasoning>", "</reasoning>"),
    ("[THINK]", "[/THINK]"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
)


@dataclass(frozen=True)
class Split:
    """A reply cut into its reasoning block ("" if none) and its final answer.

    `closed` is False when a block was opened but never closed: the whole reply is reasoning and there is
    no final answer (usually the token budget ran out).
    """

    reasoning: str
    answer: str
    closed: bool = True

    @property
    def has_reasoning(self) -> bool:
        return bool(self.reasoning.strip())


def split_reasoning(reply: str, delimiters: tuple[str, str] | None) -> Split:
    """Split `reply` at the reasoning delimiters `(open, close)`; without delimiters the reply is the answer.

    Handles the three shapes seen in practice: `<think>...</think>answer`; `...</think>answer` when the
    template already put the opening tag into the generation prompt; and `<think>...` cut off before its
    closing tag (no answer). Text before an opening tag is kept as part of the answer.
    """
    if delimiters is None:
        return Split("", reply.strip())
    open_, close = delimiters
    if not open_ or not close:
        raise RefusalEditError("reasoning delimiters must be two non-empty strings")
    start, first_close = reply.find(open_), reply.find(close)
    if first_close >= 0 and (start < 0 or first_close < start):  # opening tag was in the prompt
        return Split(reply[:first_close].strip(), reply[first_close + len(close) :].strip())
    if start < 0:
        return Split("", reply.strip())
    end = reply.find(close, start + len(open_))
    if end < 0:
        return Split(reply[start + len(open_) :].strip(), reply[:start].strip(), closed=False)
    answer = (reply[:start] + reply[end + len(close) :]).strip()
    return Split(reply[start + len(open_) : end].strip(), answer)


def delimiters_from_template(template: str | None) -> tuple[str, str] | None:
    """The reasoning delimiters a chat template mentions (both tags present), or None."""
    if not template:
        return None
    return next(((a, b) for a, b in KNOWN_DELIMITERS if a in template and b in template), None)


def parse_delimiters(value: str) -> tuple[str, str]:
    """`"<think>,</think>"` (or separated by whitespace) -> `("<think>", "</think>")`."""
    parts = [p for p in value.replace(",", " ").split() if p]
    if len(parts) != 2:
        raise RefusalEditError(f"reasoning delimiters {value!r}: expected two tags, e.g. '<think>,</think>'")
    return parts[0], parts[1]


def special_delimiters(tokenizer: Any, delimiters: tuple[str, str]) -> list[str]:
    """The delimiters that are special tokens: decoding with `skip_special_tokens=True` would drop them."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    return [d for d in delimiters if d in specials]
