"""refusal-edit: find the refusal direction of a chat model and turn it into an exact checkpoint edit.

The library is usable without the CLI: see `refusal_edit.loading`, `refusal_edit.directions`,
`refusal_edit.edits`, `refusal_edit.evaluation` and `refusal_edit.hub`.
"""

__version__ = "0.1.0"
