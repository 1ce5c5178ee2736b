"""The one root of the errors that mean a mistake in what a user handed us (a config value, a checkpoint, a data
URL, a run directory, a backend that cannot run here): every command prints such an error as one line and exits 2,
without a traceback. Each concern's error class derives from ``UserError`` and from the builtin it refines."""


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2."""


class StoppedRun(RuntimeError):
    """A run that stopped itself for a reason that is not the user's mistake (a non-finite loss), keeping what it
    had: one line and exit code 1."""
