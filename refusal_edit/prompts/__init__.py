"""Prompt sets and chat formatting."""

from refusal_edit.prompts.sets import PromptSet, builtin, load_prompts
from refusal_edit.prompts.template import ChatFormat, chat_format

__all__ = ["ChatFormat", "PromptSet", "builtin", "chat_format", "load_prompts"]
