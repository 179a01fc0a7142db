"""One exception type for every user-facing failure.

The CLI turns a `RefusalEditError` into a single red line and exit code 1; anything else is a bug
and keeps its traceback.
"""


class RefusalEditError(Exception):
    """A failure caused by the user's input or environment, with a one-line explanation."""


def check_at_least(low: int, **values: int | None) -> None:
    """Settings checks in one form: the first named value below `low` is an error (None: not given)."""
    for name, value in values.items():
        if value is not None and value < low:
            raise RefusalEditError(f"`{name}` must be at least {low}, got {value}")
