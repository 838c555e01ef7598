"""Time a Tracker's own work in-process: its calls from the training loop and its forward hooks
(wall time, perf_counter around each call), and the CPU time of the process's other Python
threads: the store's writer thread and zarr's I/O threads, which do the writer's encoding and
writing while it waits (nothing else runs in the background of a benchmark).

Used by bench_track.py (the accounted ratios) and profile_track.py (the breakdown by part). On a
shared machine whose speed changes from one step to the next, the step ratio of interleaved pairs
scatters by more than tracking costs; what tracking adds to a step is measured far more steadily
this way. It misses indirect costs (caches the reductions evict, the allocator's reaction to the
hooks' memory), which the pair ratios include. Each timed call costs about a microsecond.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# What timed calls read: wall time, or (profile_track --clock cpu) the main thread's CPU time.
CLOCK = time.perf_counter


class TrackingClock:
    """Accumulates, by part, the seconds a Tracker spends in the training thread; `take()` returns
    and clears them. `background()` is kept apart: a commit happens once per
    track.commit_interval_s, so it is read over a whole phase, not per step."""

    CALLS = ("begin_step", "after_backward", "end_step")

    def __init__(self, tracker: Any):
        self.acc: dict[str, float] = defaultdict(float)
        for name in self.CALLS:
            setattr(tracker, name, self.timed(name, getattr(tracker, name)))
        probes = tracker.probes
        make_hook = probes._make_norm_hook  # hooks are made when the probes are armed: wrap the factory
        probes._make_norm_hook = lambda i: self.timed("hooks", make_hook(i))
        probes._act_hook = self.timed("hooks", probes._act_hook)
        self._background_last: dict[int, float] = {}
        self.background()

    def timed(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        acc = self.acc

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = CLOCK()
            try:
                return f(*a, **k)
            finally:
                acc[name] += CLOCK() - t0

        return wrapper

    def background(self) -> float:
        """CPU seconds of the Python threads other than the main one since the last call (a thread
        that ended in between loses what it did since then)."""
        spent = 0.0
        for thread in threading.enumerate():
            if thread is threading.main_thread() or thread.ident is None:
                continue
            try:
                now = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except OSError:  # it has just ended
                continue
            spent += now - self._background_last.get(thread.ident, 0.0)
            self._background_last[thread.ident] = now
        return spent

    def take(self) -> dict[str, float]:
        """Seconds by part since the last call: the timed calls and `in_step`, their sum (all spent
        on the training thread inside the step)."""
        out = dict(self.acc)
        self.acc.clear()
        out["in_step"] = sum(out.get(k, 0.0) for k in (*self.CALLS, "hooks"))
        return out
