"""Chat formatting through the tokenizer's own template, and the post-instruction positions it implies.

The post-instruction tokens (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`) are found by formatting a
sentinel instruction and taking the template tokens after it, so any chat model works without a
hand-written class per model family.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_edit.errors import RefusalEditError

SENTINEL = "QXZV sentinel instruction QXZV"


@dataclass
class ChatFormat:
    """How instructions are turned into model input: template, system prompt, post-instruction tokens."""

    tokenizer: Any
    system: str | None = None
    template: str | None = None  # a user-supplied Jinja template; None = the tokenizer's own
    template_source: str = "tokenizer"
    post_ids: list[int] = field(default_factory=list)

    def messages(self, instruction: str) -> list[dict[str, str]]:
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*msgs, {"role": "user", "content": instruction}]

    def format(self, instruction: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                self.messages(instruction),
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # jinja raises for unsupported roles, missing variables, ...
            raise RefusalEditError(f"the chat template failed to format a prompt: {exc}") from exc

    def format_all(self, instructions: list[str]) -> list[str]:
        return [self.format(i) for i in instructions]

    @property
    def n_positions(self) -> int:
        return len(self.post_ids)

    def position_labels(self) -> list[str]:
        """Readable labels of the post-instruction tokens, from -n to -1."""
        return [self.tokenizer.decode([t]) for t in self.post_ids]

    def describe(self) -> dict[str, Any]:
        text = self.template or self.tokenizer.chat_template or ""
        return {
            "template": self.template_source,
            "template_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "system_prompt": self.system if self.system is not None else "(model default)",
            "post_instruction_tokens": self.position_labels(),
            "example": self.format("<instruction>"),
        }


def chat_format(tokenizer: Any, system: str | None = None, template_file: str | Path | None = None) -> ChatFormat:
    """Build the chat format; a model without a chat template and no `template_file` is a clear error."""
    template = None
    source = "tokenizer"
    if template_file is not None:
        path = Path(template_file)
        if not path.is_file():
            raise RefusalEditError(f"template file not found: {path}")
        template = path.read_text()
        source = f"file:{path.name}"
    elif not getattr(tokenizer, "chat_template", None):
        raise RefusalEditError("the model has no chat template; pass --template FILE with a Jinja chat template")
    fmt = ChatFormat(tokenizer, system=system, template=template, template_source=source)
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
