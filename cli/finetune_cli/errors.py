"""The CLI's one error type: what went wrong and what to do about it (pure)."""

from __future__ import annotations


class CliError(Exception):
    """Printed as 'error: <message>' plus 'hint: <hint>'; the process exits with `code`."""

    def __init__(
        self, message: str, *, hint: str | None = None, details: list[str] | None = None, code: int = 1
    ):
        super().__init__(message)
        self.hint = hint
        self.details = details or []
        self.code = code
