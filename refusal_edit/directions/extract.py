"""The `extract` pipeline: refusal tokens -> candidates -> selection, on a loaded model.

Writing the artifacts (direction, candidates, provenance, plot) is the workflow's:
`refusal_edit.workflows.extraction`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from refusal_edit.console import console
from refusal_edit.directions.candidates import CandidateSet, generate_candidates
from refusal_edit.directions.refusal_tokens import RefusalTokens, derive_refusal_tokens, user_refusal_tokens
from refusal_edit.directions.select import (
    Candidate,
    Scorer,
    Selection,
    SelectionSettings,
    select_exhaustive,
    select_fast,
)
from refusal_edit.errors import RefusalEditError, check_at_least
from refusal_edit.loading.model import LoadedModel
from refusal_edit.prompts.sets import HASH_SPLIT, PromptSet
from refusal_edit.prompts.template import ChatFormat


@dataclass
class ExtractSettings:
    n_train: int | None = None  # None: every training prompt
    n_val: int = 32
    batch_size: int = 32
    filter_train: bool = True
    exhaustive: bool = False
    refusal_tokens: list[str] | None = None  # user override, e.g. ["I", "As"]
    refusal_probe: int = 32  # prompts per side generated to derive refusal tokens
    selection: SelectionSettings = field(default_factory=SelectionSettings)

    def check(self) -> None:
        check_at_least(
            1, n_train=self.n_train, n_val=self.n_val, batch_size=self.batch_size, refusal_probe=self.refusal_probe
        )
        self.selection.check()


@dataclass
class ExtractResult:
    """What the pipeline found: the selection (with every candidate's scores), the refusal tokens, the
    candidate means, the prompt splits it used and how long each step took. Writing it is the workflow's
    (`refusal_edit.workflows.extraction.save_extraction`)."""

    selection: Selection
    refusal_tokens: RefusalTokens
    candidates: CandidateSet
    prompts: dict[str, PromptSet]  # harmful_train, harmless_train, harmful_val, harmless_val
    position_labels: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def chosen(self) -> Candidate:
        return self.selection.chosen

    @property
    def mean_diff(self):
        """The chosen candidate's raw difference-in-means vector (float32 [hidden])."""
        return self.candidates.vector(self.chosen.position, self.chosen.layer)


def _split(ps: PromptSet, name: str, n: int | None) -> PromptSet:
    part = ps.split(name).sample(n)
    if len(part) == 0:
        how = f"split {HASH_SPLIT}" if ps.hash_split else "split by its split column"
        raise RefusalEditError(
            f"{ps.source}: the {name} split is empty ({len(ps)} rows, {how}): give more prompts, or a split column"
        )
    return part


def split_prompts(
    harmful: PromptSet, harmless: PromptSet, settings: ExtractSettings
) -> tuple[PromptSet, PromptSet, PromptSet, PromptSet]:
    """(harmful train, harmless train, harmful val, harmless val) as extraction uses them; an empty split is
    an error (a workflow calls this before loading the model, so a too-small file fails at once)."""
    return (
        _split(harmful, "train", settings.n_train),
        _split(harmless, "train", settings.n_train),
        _split(harmful, "val", settings.n_val),
        _split(harmless, "val", settings.n_val),
    )


def find_direction(
    lm: LoadedModel,
    fmt: ChatFormat,
    harmful: PromptSet,
    harmless: PromptSet,
    settings: ExtractSettings | None = None,
) -> ExtractResult:
    """Find and select the refusal direction of `lm` from the train and val splits of the prompt sets."""
    settings = settings or ExtractSettings()
    settings.check()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    h_train, s_train, h_val, s_val = split_prompts(harmful, harmless, settings)
    model, tok = lm.model, lm.tokenizer

    if settings.refusal_tokens:
        tokens = user_refusal_tokens(tok, settings.refusal_tokens)
    else:
        n = settings.refusal_probe
        tokens = derive_refusal_tokens(
            model,
            tok,
            fmt,
            h_train.sample(n).instructions,
            s_train.sample(n).instructions,
            batch_size=settings.batch_size,
        )
    timings["refusal_tokens"] = time.perf_counter() - t
    console.print(f"refusal tokens ({tokens.source}): {', '.join(repr(s) for s in tokens.strings)}")

    t = time.perf_counter()
    cands = generate_candidates(
        model,
        tok,
        fmt,
        h_train.instructions,
        s_train.instructions,
        tokens.ids,
        batch_size=settings.batch_size,
        filter_train=settings.filter_train,
    )
    timings["candidates"] = time.perf_counter() - t

    t = time.perf_counter()
    h_texts, s_texts = fmt.format_all(h_val.instructions), fmt.format_all(s_val.instructions)
    scorer = Scorer(
        model,
        tok,
        h_texts,
        s_texts,
        tokens.ids,
        cands,
        batch_size=settings.selection.batch_size,
        share_prefix=not settings.exhaustive,
    )
    if settings.exhaustive:
        selection = select_exhaustive(scorer, settings.selection)
    else:
        selection = select_fast(scorer, settings.selection, tok, h_texts)
    timings["selection"] = time.perf_counter() - t
    prompts = {"harmful_train": h_train, "harmless_train": s_train, "harmful_val": h_val, "harmless_val": s_val}
    return ExtractResult(selection, tokens, cands, prompts, fmt.position_labels(), timings)
