"""One exception family for everything a user can cause; the CLI maps it to one line on stderr."""


class OnnxoptError(Exception):
    """A problem with the user's input or environment. `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(OnnxoptError):
    """Bad options or arguments (exit 2, like click's own usage errors)."""

    exit_code = 2


class GateFailed(OnnxoptError):
    """A CI gate (--max-error, --min-accuracy, ...) was not met."""
