"""What a MODEL argument resolves to, and every default that follows from it - each rule once.

A recipe brings a system prompt, prompt sets, selection thresholds, a conversion dtype and the Hub id of
its base model; a Hub id is its own base model; an edited checkpoint carries the base model of the edit
it came from. Commands ask here instead of re-deriving any of it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_edit import loading
from refusal_edit.checkpoint.layout import read_config
from refusal_edit.checkpoint.record import EditRecord, hub_model_id
from refusal_edit.derive import resolve_spec
from refusal_edit.directions import identity
from refusal_edit.directions.select import SelectionSettings
from refusal_edit.errors import RefusalEditError
from refusal_edit.loading import fetch as recipe_fetch  # modules, not names: tests stand in for their functions
from refusal_edit.loading import gguf as gguf_input
from refusal_edit.loading.model import ModelSource, conversion_dtype
from refusal_edit.prompts import PromptSet, load_prompts
from refusal_edit.recipes import Recipe, load_recipe

RUNS = Path("runs")
KINDS = ("harmful", "harmless")
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


def expand(spec: str) -> str:
    """`~` expanded in a path-like spec (model paths, prompt files); `builtin:` / `hf:` specs as given."""
    if spec.startswith(("builtin:", "hf:")):
        return spec
    return os.path.expanduser(spec)


def resolve_model(spec: str | Path | ModelSource, dtype: str = "auto") -> ModelSource:
    """A MODEL argument (directory, .gguf file, recipe name or .toml, Hub id) as a local HF directory.

    Its config.json is checked here, once for every command: a malformed one (a list, a `text_config` that is
    not an object, ...) is one clear line before any default rule or library reads it; an architecture outside
    the table is derived here (before the edits, which only read the table and what derivation registered)."""
    if isinstance(spec, ModelSource):
        return spec
    source = loading.resolve_source(expand(str(spec)), dtype)
    resolve_spec(read_config(source.hf_dir))
    return source


@dataclass
class Fetched:
    """A recipe's model, downloaded, verified and converted: the GGUF file, its HF directory, its sha256."""

    recipe: Recipe
    path: Path
    hf_dir: Path
    sha256: str


def fetch(spec: str, force: bool = False) -> Fetched:
    """Download a recipe's model (`force`: again, even if a verified copy is cached) and convert it once."""
    recipe = load_recipe(expand(spec))
    path = recipe_fetch.fetch_recipe(recipe, force=force)
    hf_dir, sha = gguf_input.convert_gguf(path, conversion_dtype("auto", recipe))
    return Fetched(recipe, path, Path(hf_dir), sha)


def system_prompt(source: ModelSource, given: str | None) -> str | None:
    """The system prompt: the one given, else the recipe's, else None (the chat template's own default)."""
    if given is not None:
        return given
    return source.recipe.system_prompt if source.recipe is not None else None


def prompt_spec(source: ModelSource, kind: str, given: str | None) -> str:
    """Where the `kind` prompts come from: the given spec, else the recipe's, else the built-in set."""
    if given:
        return expand(given)
    return getattr(source.recipe, kind) if source.recipe is not None else f"builtin:{kind}"


def extraction_prompts(source: ModelSource, harmful: str | None, harmless: str | None) -> dict[str, PromptSet]:
    """The harmful and harmless sets extraction splits into train and val."""
    return {
        "harmful": load_prompts(prompt_spec(source, "harmful", harmful)),
        "harmless": load_prompts(prompt_spec(source, "harmless", harmless)),
    }


def evaluation_prompts(source: ModelSource, kind: str, given: str | PromptSet | None, n: int | None) -> PromptSet:
    """Evaluation prompts: a given set or file as it is, else the test split of the recipe's (or the
    built-in) set - never the rows extraction trained or selected on; the first `n`, category-balanced."""
    if isinstance(given, PromptSet):
        ps = given
    elif given:
        ps = load_prompts(expand(given))
    else:
        ps = load_prompts(prompt_spec(source, kind, None)).split("test")
    if len(ps) == 0:
        raise RefusalEditError(f"the {kind} prompt set {ps.source!r} is empty")
    return ps.sample(n)


def selection_settings(source: ModelSource, batch_size: int, given: dict[str, Any]) -> SelectionSettings:
    """Built-in defaults (the paper's), then the recipe's overrides, then the values given (None: not given)."""
    return SelectionSettings.merged(
        {"batch_size": batch_size}, source.recipe.select if source.recipe is not None else None, given
    )


def base_model(source: ModelSource, given: str | None = None) -> str | None:
    """The Hub id of the model an edit of `source` derives from, or None when nobody can know it.

    The id given; a recipe's `base_model`; a Hub id itself, or a Hugging Face cache snapshot of one. Never
    a local folder name. A checkpoint this tool edited before carries the base model of that edit through
    `EditRecord.after` (the record's own rule), so re-editing keeps the original.
    """
    if given:
        if hub_model_id(given) is None:
            raise RefusalEditError(f"`base_model` must be a Hub model id ORG/NAME, got {given!r}")
        return given
    if source.recipe is not None:
        return hub_model_id(source.recipe.source.get("base_model"))
    if source.kind == "hub":
        return source.spec
    match = _HF_CACHE_SNAPSHOT.search(str(Path(source.hf_dir).resolve()))
    return hub_model_id(f"{match[1]}/{match[2]}") if match else None


def check_direction(direction: Any, source: ModelSource, allow_foreign: bool = False) -> str | None:
    """A direction file (`DirectionFile`) applied to MODEL `source` must come from it (`directions.identity`):
    an error naming both otherwise, unless `allow_foreign`; returns the note to keep (an unknown source, or a
    foreign direction allowed on purpose), None when they match."""
    try:
        edited = EditRecord.load(source.hf_dir) is not None
    except RefusalEditError:
        edited = False
    weights = identity.known_weights_sha256(source.hf_dir, source.sha256)
    target = identity.identity(source.config(), source.name, weights)
    what = f"the direction {direction.path.name if direction.path else ''}".rstrip()
    return identity.check(direction.source_model, target, what, edited=edited, allow=allow_foreign)


def folder_name(name: str) -> str:
    """A model or edit name as one folder name (`org/name` -> `org--name`)."""
    return name.replace("/", "--").replace("\\", "--")


def default_out(source: ModelSource, leaf: str) -> Path:
    """`runs/<model>/<leaf>`: each command writes its own subfolder, so none replaces another's output."""
    return RUNS / folder_name(source.name) / folder_name(leaf)
