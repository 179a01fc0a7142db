"""`refusal-edit chat`: talk to a model, or to a base model and its edit side by side.

`Chat` takes loaded objects: speakers, each a loaded model with its chat format and, for a hook edit, the
context that applies the edit while it speaks. Every speaker keeps its own conversation (its own replies), and
every turn is answered by each speaker in order. `open_chat` resolves MODEL (and EDITED, or a direction with
the edit options of orthogonalize), loads, and builds the speakers: the edit as hooks is the in-memory twin of
the written checkpoint, so a user can try it before writing one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import refusal_edit.workflows.defaults as defaults
from refusal_edit.directions.artifacts import DirectionFile
from refusal_edit.edits.spec import DIRECTION_FIELDS, EditSpec
from refusal_edit.errors import RefusalEditError
from refusal_edit.generation import stream
from refusal_edit.loading.model import LoadedModel, load_model
from refusal_edit.paths import read_text
from refusal_edit.prompts import ChatFormat, chat_format
from refusal_edit.prompts.template import parse_template_kwargs
from refusal_edit.workflows.planning import edit_inputs, intervention_of

Edit = Callable[[], AbstractContextManager[Any]]


@dataclass
class Speaker:
    """One side of the chat: a loaded model, its chat format, and the edit applied while it speaks (if any)."""

    label: str
    lm: LoadedModel
    fmt: ChatFormat
    edit: Edit | None = None
    turns: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Reply:
    """A speaker's answer to one message."""

    label: str
    text: str
    tokens: int
    first_token_s: float | None  # from the message to the first generated token (prefill included)
    seconds: float
    first_token_cpu_s: float | None = None  # CPU seconds (all threads) to the first token: what load cannot inflate


def check_generation(max_new_tokens: int, temperature: float) -> None:
    """How replies are generated: at least one token each, greedy (0) or sampled (above 0)."""
    if max_new_tokens < 1:
        raise RefusalEditError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise RefusalEditError(f"`temperature` must be 0 (greedy) or more, got {temperature}")


class Chat:
    """A conversation with one or more speakers; `ask` answers a message with each of them in turn."""

    def __init__(self, speakers: list[Speaker], max_new_tokens: int = 256, temperature: float = 0.0) -> None:
        if not speakers:
            raise RefusalEditError("a chat needs at least one model")
        check_generation(max_new_tokens, temperature)
        self.speakers = speakers
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.default_system = [s.fmt.system for s in speakers]

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.speakers]

    @property
    def system(self) -> str | None:
        """The system prompt in use (None: the chat template's own default)."""
        return self.speakers[0].fmt.system

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        for s in self.speakers:
            s.turns.clear()

    def set_system(self, text: str | None) -> None:
        """A new system prompt, and a new conversation; None goes back to the one the chat started with."""
        for s, default in zip(self.speakers, self.default_system, strict=True):
            s.fmt = replace(s.fmt, system=default if text is None else text)
        self.reset()

    def ask(self, message: str, on_text: Callable[[int, str], None] | None = None) -> list[Reply]:
        """Each speaker's reply to `message`, streamed to `on_text(speaker index, piece)` as it is generated (an
        empty piece first: the speaker starts).

        A turn enters the conversations only once every speaker has answered, so an interrupted turn (Ctrl-C)
        leaves them as they were."""
        replies = []
        for i, s in enumerate(self.speakers):
            text = s.fmt.format_turns([*s.turns, {"role": "user", "content": message}])
            if on_text is not None:
                on_text(i, "")
            with s.edit() if s.edit is not None else nullcontext():
                out = stream(
                    s.lm.model,
                    s.lm.tokenizer,
                    text,
                    (lambda piece, i=i: on_text(i, piece)) if on_text is not None else None,
                    max_new_tokens=self.max_new_tokens,
                    temperature=self.temperature,
                )
            replies.append(
                Reply(s.label, out.text, len(out.token_ids), out.first_token_s, out.seconds, out.first_token_cpu_s)
            )
        for s, r in zip(self.speakers, replies, strict=True):
            s.turns += [{"role": "user", "content": message}, {"role": "assistant", "content": r.text}]
        return replies


def hook_edit(lm: LoadedModel, d: DirectionFile, edit: EditSpec, variant: bool) -> tuple[Edit, str]:
    """The edit orthogonalize would write (`edit` of `d`), applied to `lm` in memory, and its description
    (`variant`: in the spec's words, for a variant or a tune front point)."""
    hooks = intervention_of(d, edit)
    if variant:
        return (lambda: hooks.apply(lm.model)), f"{edit.describe()} (hooks)"
    name = d.path.name if d.path is not None else "direction"
    what = "ablate" if edit.mode == "ablate" else f"add {edit.coeff:+g} x {'unit ' if edit.unit else ''}vector"
    return (lambda: hooks.apply(lm.model)), f"{what} {name} (hooks)"


def one_shot_prompts(prompt: Sequence[str] | None, prompt_file: Path | None) -> list[str]:
    """The prompts to answer and exit: those given, then the non-empty lines of `prompt_file`."""
    prompts = list(prompt or [])
    if prompt_file is not None:
        prompts += [line for line in read_text(prompt_file, "prompt file").splitlines() if line.strip()]
        if not prompts:
            raise RefusalEditError(f"`prompt_file` {prompt_file} has no prompts")
    return prompts


def open_chat(
    model: str | Path,
    edited: str | Path | None = None,
    *,
    direction: str | Path | None = None,
    edit: EditSpec | str | Path | None = None,
    system_prompt: str | None = None,
    template: str | Path | None = None,
    template_kwargs: Sequence[str] | dict[str, Any] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    max_memory: str | dict[Any, Any] | None = None,
    offload_dir: Path | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> Chat:
    """Load MODEL (and EDITED, or MODEL again under a hook edit) and start a chat.

    `edited` is any chat model, whoever made it (it keeps its own chat template); `direction` with `edit` (an
    `EditSpec`, default: the paper's ablation), or a tune front point `edit`, is the edit orthogonalize would
    write, as hooks on MODEL's own weights (nothing is written or loaded twice).
    `system_prompt` defaults to the recipe's, else the chat template's own; `template_kwargs` is a keyword dict
    or `key=value` items."""
    check_generation(max_new_tokens, temperature)
    template_kwargs = parse_template_kwargs(template_kwargs)
    front = isinstance(edit, str | Path)
    hooks = direction is not None or front or (isinstance(edit, EditSpec) and edit.is_variant)
    if edited is not None and hooks:
        raise RefusalEditError("give `edited` or `direction` / `spec` (a hook edit), not both")
    if isinstance(edit, EditSpec) and not hooks:
        given = [f"`{k}`" for k in DIRECTION_FIELDS if getattr(edit, k) != getattr(EditSpec(), k)]
        if given:
            raise RefusalEditError(f"{' and '.join(given)} describe the hook edit of `direction`: give `direction`")
    d, edit, spec_info = edit_inputs(direction, edit) if hooks else (None, None, None)  # fails before loading
    placed = {"dtype": dtype, "device": device, "max_memory": max_memory, "offload_dir": offload_dir}
    base_source = defaults.resolve_model(model, dtype)
    edited_source = defaults.resolve_model(edited, dtype) if edited is not None else None
    system = defaults.system_prompt(base_source, system_prompt)

    def speaker(lm: LoadedModel, label: str, edit: Edit | None = None) -> Speaker:
        fmt = chat_format(lm.tokenizer, system=system, template_file=template, template_kwargs=template_kwargs)
        return Speaker(label, lm, fmt, edit)

    base = load_model(base_source, **placed)
    speakers = [speaker(base, base_source.name)]
    if edited_source is not None:
        speakers.append(speaker(load_model(edited_source, **placed), edited_source.name))
    elif d is not None:
        assert edit is not None
        apply, label = hook_edit(base, d, edit, spec_info is not None)
        speakers.append(speaker(base, label, apply))
    return Chat(speakers, max_new_tokens=max_new_tokens, temperature=temperature)
