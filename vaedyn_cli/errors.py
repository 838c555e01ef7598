"""Errors that the CLI turns into one clear line on stderr and an exit code."""

from __future__ import annotations

from typing import Any


class VaedynError(Exception):
    """Bad usage or bad input: the user can fix it. Exit code 2.

    The message is one line that says what is wrong, where, and how to fix it.
    """

    exit_code = 2


class RuntimeFailure(VaedynError):
    """The input was fine but the work failed (non-finite loss, a crashed worker). Exit code 1."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM

_received: list[int] = []  # the signals caught since `catch_signals`


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same cleanup
    runs (the trace is committed, the run folder's lock released) instead of the process vanishing."""


def catch_signals() -> dict[int, Any]:
    """From now on SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, and both are
    remembered (`interrupted`): an error that a library raises while it is being interrupted (a
    module left half-imported, say) still reads as the interruption. Returns the handlers replaced
    (for `restore_signals`); does nothing outside the main thread."""
    import signal
    import threading

    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}

    def raise_it(signum: int, _frame: Any) -> None:
        _received.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    return {sig: signal.signal(sig, raise_it) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict[int, Any]) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


def interrupted() -> int | None:
    """The signal that interrupted this command, if one did."""
    return _received[-1] if _received else None


def interrupt_line(err: BaseException | None) -> tuple[str, int]:
    """The one line and exit code for an interrupted command: a KeyboardInterrupt's message says how
    to go on (`vaedyn train` says how to resume); 130 for Ctrl-C, 143 for SIGTERM (128 + signal)."""
    import signal

    sig = interrupted() or (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    how = str(err) if isinstance(err, KeyboardInterrupt) and err.args else (
        "nothing was left half-written: run the command again")
    return f"interrupted; {how}", 128 + int(sig)
