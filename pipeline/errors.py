"""The one exception type for a user's mistake.

The CLI turns a `UserError` into a single line on stderr and a non-zero exit; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in input data, parameters or paths that the user can fix."""

    def __init__(self, message: str, *, path: object | None = None, row: int | None = None,
                 column: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
