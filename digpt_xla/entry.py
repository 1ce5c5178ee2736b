"""The one wrapper of every command and tool (``digpt``, ``python -m parity``, ``tools/*.py``): a mistake in what
the user handed us is one line and exit 2, a run that stopped itself cleanly one line and exit 1, Ctrl-C before
training one line and 130; never a traceback for any of them. Light to import: ``--help`` never waits for torch."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from .errors import StoppedRun, UserError

log = logging.getLogger("digpt")


def run_entry(
    prog: str,
    main: Callable[[], int],
    more_user_errors: tuple[type[Exception], ...] = (),
    log_level: int = logging.INFO,
) -> int:
    """Run ``main`` (the parsed command) and turn the errors above into their line and exit code. ``prog`` starts
    each line; ``more_user_errors`` are builtins that count as the user's mistake for this entry point (a path given
    on the command line that does not exist)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    threading.excepthook = _thread_failure
    user_errors: tuple[type[Exception], ...] = (UserError, *more_user_errors)
    try:
        return main()
    except user_errors as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except StoppedRun as e:  # not the user's mistake, but a clean stop all the same
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started (inside the loop it checkpoints and stops)
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _thread_failure(args: threading.ExceptHookArgs) -> None:
    """A library's background writer that fails for the disk (TensorBoard's event writer on a full disk) is one
    warning line: the step that next writes reports the error that stops the run."""
    if args.exc_type is not None and issubclass(args.exc_type, OSError):
        name = args.thread.name if args.thread is not None else "a thread"
        log.warning("background writer %s stopped: %s", name, args.exc_value)
        return
    threading.__excepthook__(args)


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line. An error raised in a DataLoader worker arrives wrapped in the worker's
    whole traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), with the original
    message last: that line is the one to show."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        where = lines[0].removeprefix(f"Caught {type(error).__name__} ").rstrip(".")
        original = (
            lines[-1].split(": ", 1)[-1] if lines[-1].split(": ", 1)[0].endswith(type(error).__name__) else lines[-1]
        )
        return f"{original} ({where})"
    return lines[0] if lines else type(error).__name__
