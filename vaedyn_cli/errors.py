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
SETTLE_TIMEOUT_S = 5.0  # the longest a signal waits for the store I/O in flight (`settle_store_io`)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same cleanup
    runs (the trace is committed, the run folder's lock released) instead of the process vanishing."""


def catch_signals() -> dict[int, Any]:
    """From now on SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, and both are
    remembered (`interrupted`): an error that a library raises while it is being interrupted (a
    module left half-imported, say) still reads as the interruption. The first signal is raised
    only once the store I/O in flight has finished (`settle_store_io`); a second one at once.
    Returns the handlers replaced (for `restore_signals`); does nothing outside the main thread."""
    import signal
    import threading

    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}

    def raise_it(signum: int, _frame: Any) -> None:
        first = not _received
        _received.append(signum)
        if first:
            settle_store_io(SETTLE_TIMEOUT_S)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    return {sig: signal.signal(sig, raise_it) for sig in (signal.SIGINT, signal.SIGTERM)}


def settle_store_io(timeout: float) -> None:
    """Wait (at most `timeout` seconds) until the zarr reads and writes in flight have finished.

    zarr runs every store operation as a task on its own event-loop thread while the calling thread
    waits. A signal raised in the waiting thread leaves the task running: it would go on writing
    while the cleanup removes a half-written folder (and recreate files in it), and at exit zarr
    stops its loop with the task still pending ("Task was destroyed but it is pending!" on stderr,
    after the interrupted line). Called before the signal is raised, so the exception comes between
    store operations, never inside one. Does nothing when zarr was never imported or its loop is
    not running."""
    import asyncio
    import concurrent.futures
    import sys

    try:
        loop = sys.modules["zarr.core.sync"].loop[0]  # zarr's own loop ([None] until first used)
    except (KeyError, AttributeError, IndexError, TypeError):
        return
    if not isinstance(loop, asyncio.AbstractEventLoop) or loop.is_closed() or not loop.is_running():
        return

    async def others_done() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    future = asyncio.run_coroutine_threadsafe(others_done(), loop)
    try:
        future.result(timeout + 1.0)
    except (concurrent.futures.TimeoutError, RuntimeError):  # a loop closing under us: nothing to wait for
        future.cancel()


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
