"""One exception family for everything a user can cause; the CLI maps it to one line on stderr."""
from __future__ import annotations


class OnnxoptError(Exception):
    """A problem with the user's input or environment. `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(OnnxoptError):
    """Bad options or arguments (exit 2, like click's own usage errors)."""

    exit_code = 2


class GateFailed(OnnxoptError):
    """A CI gate (--max-error, --strict, --max-drop, ...) was not met. `report` is the run's report so far,
    so a caller (the CLI) can still show what was measured."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
