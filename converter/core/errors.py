"""Errors a user can act on: each names the file, key or argument and may carry a hint."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class VidportError(Exception):
    """A failure explained in one line, with an optional hint; the CLI prints it without a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UnsafeCheckpointError(VidportError):
    """A pickle asked for code we will not run."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `name`, for 'did you mean' hints."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return found[0] if found else None


def listing(keys: list[str], limit: int = 8) -> str:
    """A short, readable list of keys for error messages."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
