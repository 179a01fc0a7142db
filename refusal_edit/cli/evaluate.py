"""`refusal-edit evaluate` (placeholder until the evaluation module lands)."""

from __future__ import annotations

from refusal_edit.cli.app import app
from refusal_edit.errors import RefusalEditError


@app.command()
def evaluate() -> None:
    """Compare a base model with an edit (not yet available)."""
    raise RefusalEditError("evaluate is not implemented yet")
