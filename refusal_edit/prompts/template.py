"""Chat formatting through the tokenizer's own template, and the post-instruction positions it implies.

The post-instruction tokens (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`) are found by formatting a
sentinel instruction and taking the template tokens after it, so any chat model works without a
hand-written class per model family.

Template keyword arguments (`template_kwargs`, e.g. `enable_thinking=False` for Qwen3) are passed to
every `apply_chat_template` call and recorded in `describe()`, so a report says how prompts were built.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit.errors import RefusalEditError
from refusal_edit.paths import read_text

SENTINEL = "QXZV sentinel instruction QXZV"


@dataclass
class ChatFormat:
    """How instructions are turned into model input: template, system prompt, post-instruction tokens."""

    tokenizer: Any
    system: str | None = None
    template: str | None = None  # a user-supplied Jinja template; None = the tokenizer's own
    template_source: str = "tokenizer"
    post_ids: list[int] = field(default_factory=list)
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def messages(self, instruction: str) -> list[dict[str, str]]:
        return self.conversation([{"role": "user", "content": instruction}])

    def conversation(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        """`turns` (user and assistant messages) after the system message, if one is set."""
        return ([] if self.system is None else [{"role": "system", "content": self.system}]) + list(turns)

    def format(self, instruction: str) -> str:
        return self.format_turns([{"role": "user", "content": instruction}])

    def format_turns(self, turns: list[dict[str, str]]) -> str:
        """A whole conversation as model input, ready for the assistant's next reply (chat)."""
        try:
            return self.tokenizer.apply_chat_template(
                self.conversation(turns),
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=True,
                **self.template_kwargs,
            )
        except Exception as exc:  # jinja raises for unsupported roles, missing variables, ...
            raise RefusalEditError(f"the chat template failed to format a prompt: {exc}") from exc

    def format_all(self, instructions: list[str]) -> list[str]:
        return [self.format(i) for i in instructions]

    def check_context(self, sets: Mapping[str, Any], context: int | None) -> None:
        """Refuse prompt sets (name -> PromptSet) that do not fit the model: a prompt longer than `context`
        tokens with the chat template has positions the model was never given (learned position embeddings
        fail outright), and a prompt of no tokens means an incomplete tokenizer. Refused, never truncated: a
        truncated prompt loses its end, where the refusal direction is read."""
        for name, ps in sets.items():
            for i, text in enumerate(ps.instructions):
                n = len(self.tokenizer(self.format(text), add_special_tokens=False)["input_ids"])
                if n == 0:
                    raise RefusalEditError(f"the tokenizer turns {name} prompt {i + 1} into no tokens: is it complete?")
                if context and n > context:
                    raise RefusalEditError(
                        f"{name} prompt {i + 1} of {ps.source} is {n} tokens with the chat template, more than the "
                        f"model's context of {context} tokens: refused, not truncated; shorten or remove it"
                    )

    @property
    def n_positions(self) -> int:
        return len(self.post_ids)

    def position_labels(self) -> list[str]:
        """Readable labels of the post-instruction tokens, from -n to -1."""
        return [self.tokenizer.decode([t]) for t in self.post_ids]

    @property
    def template_text(self) -> str:
        """The Jinja source in use (the user's file or the tokenizer's own)."""
        text = self.template or self.tokenizer.chat_template or ""
        return text if isinstance(text, str) else json.dumps(text, sort_keys=True)

    def describe(self) -> dict[str, Any]:
        return {
            "template": self.template_source,
            "template_sha256": hashlib.sha256(self.template_text.encode()).hexdigest(),
            "template_kwargs": dict(self.template_kwargs),
            "system_prompt": self.system if self.system is not None else "(model default)",
            "post_instruction_tokens": self.position_labels(),
            "example": self.format("<instruction>"),
        }


# Reserved by `ChatFormat.format` itself: a template keyword argument may not override them.
RESERVED_TEMPLATE_KWARGS = ("conversation", "chat_template", "tokenize", "add_generation_prompt", "messages")


def parse_template_value(text: str) -> Any:
    """A template keyword value from text: JSON (`true`, `3`, `"x"`, `[1]`), `True` / `False` / `None`, else text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


_ITEM_SEP = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")  # commas that start another NAME=, not those inside values


def parse_template_kwargs(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`["enable_thinking=false", "reasoning_effort=low"]` (or `"a=1,b=[2, 3]"` items) -> a keyword dict.

    Values are read by `parse_template_value`; a mapping is taken as is (after the name checks).
    """
    if items is None:
        return {}
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            for part in (p for p in _ITEM_SEP.split(str(item)) if p.strip()):
                name, sep, value = part.partition("=")
                if not sep or not name.strip():
                    raise RefusalEditError(
                        f"template keyword {part!r}: expected NAME=VALUE, e.g. enable_thinking=false"
                    )
                pairs.append((name.strip(), parse_template_value(value)))
    out: dict[str, Any] = {}
    for name, value in pairs:
        if not name.isidentifier():
            raise RefusalEditError(f"template keyword {name!r} is not a valid name")
        if name in RESERVED_TEMPLATE_KWARGS:
            raise RefusalEditError(f"template keyword {name!r} is set by refusal-edit itself and cannot be given")
        out[name] = value
    return out


def chat_format(
    tokenizer: Any,
    system: str | None = None,
    template_file: str | Path | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> ChatFormat:
    """Build the chat format; a model without a chat template and no `template_file` is a clear error.

    `template_kwargs` are extra variables for the template (e.g. `{"enable_thinking": False}`).
    """
    template = None
    source = "tokenizer"
    if template_file is not None:
        template = read_text(template_file, "template file")
        source = f"file:{Path(template_file).name}"
    elif not getattr(tokenizer, "chat_template", None):
        raise RefusalEditError("the model has no chat template; pass `template_file` FILE with a Jinja chat template")
    kwargs = parse_template_kwargs(template_kwargs)
    fmt = ChatFormat(tokenizer, system=system, template=template, template_source=source, template_kwargs=kwargs)
    text = fmt.format(SENTINEL)
    at = text.rfind(SENTINEL)
    if at < 0:
        raise RefusalEditError("the chat template does not include the user's message")
    end = at + len(SENTINEL)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    post = [t for t, (start, stop) in zip(ids, offsets, strict=True) if start >= end and stop > start]
    if not post:
        # Templates that end right after the instruction still have one position: its last token.
        post = ids[-1:]
    fmt.post_ids = post
    return fmt
