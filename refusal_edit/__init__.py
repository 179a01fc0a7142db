"""refusal-edit: find the refusal direction of a chat model and turn it into an exact checkpoint edit.

The public API (docs/python-api.md) is the names in `__all__`; they are imported on first use,
so `import refusal_edit` (and the command line) stays fast. Everything else is reachable through its
module: `refusal_edit.workflows` (what each command does), `refusal_edit.directions`,
`refusal_edit.edits`, `refusal_edit.evaluation`, `refusal_edit.judging`, `refusal_edit.hub`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "resolve_model": "refusal_edit.workflows.defaults",
    "load_model": "refusal_edit.loading.model",
    "chat_format": "refusal_edit.prompts",
    "builtin": "refusal_edit.prompts",
    "load_prompts": "refusal_edit.prompts",
    "ExtractSettings": "refusal_edit.directions.extract",
    "find_direction": "refusal_edit.directions.extract",
    "run_extract": "refusal_edit.workflows.extraction",
    "load_direction": "refusal_edit.directions.artifacts",
    "ablation": "refusal_edit.interventions",
    "addition": "refusal_edit.interventions",
    "EditSpec": "refusal_edit.edits.spec",
    "orthogonalize": "refusal_edit.workflows.editing",
    "evaluate": "refusal_edit.workflows.evaluation",
    "EvalSettings": "refusal_edit.evaluation.comparison",
    "RefusalEditError": "refusal_edit.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'refusal_edit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
