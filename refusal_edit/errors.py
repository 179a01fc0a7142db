"""One exception type for every user-facing failure.

The CLI turns a `RefusalEditError` into a single red line and exit code 1; anything else is a bug
and keeps its traceback.
"""


class RefusalEditError(Exception):
    """A failure caused by the user's input or environment, with a one-line explanation."""
