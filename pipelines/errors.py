"""The errors a stage raises for people: the CLI prints their message, never a traceback."""

from __future__ import annotations


class StageError(Exception):
    """A problem the user can fix; the CLI prints its message without a traceback."""


class StrictFailure(StageError):
    """``--strict`` was given and inputs were rejected; the work itself is complete and kept."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary
