"""Workflows: what each command does, between the command line and the core.

A workflow resolves what the user named (a MODEL argument, prompt sources, an output folder), applies the
default rules that follow from it (a recipe's system prompt, prompt sets and selection thresholds, the base
model named in a model card, default output folders) - each rule in one place, `defaults` - loads models,
calls the core (which takes loaded objects and parameters and returns data) and writes the results
atomically. `cli/` only declares options and renders what these functions return.
"""

from refusal_edit.workflows.defaults import resolve_model
from refusal_edit.workflows.editing import orthogonalize
from refusal_edit.workflows.evaluation import evaluate, record_evaluation, save_report
from refusal_edit.workflows.extraction import extract, run_extract, save_extraction

__all__ = [
    "evaluate",
    "extract",
    "orthogonalize",
    "record_evaluation",
    "resolve_model",
    "run_extract",
    "save_extraction",
    "save_report",
]
