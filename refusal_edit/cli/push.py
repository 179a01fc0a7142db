"""`refusal-edit push` (placeholder until the hub module lands)."""

from __future__ import annotations

from refusal_edit.cli.app import app
from refusal_edit.errors import RefusalEditError


@app.command()
def push() -> None:
    """Publish an edited checkpoint to the Hub (not yet available)."""
    raise RefusalEditError("push is not implemented yet")
