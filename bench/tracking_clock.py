"""Time a Tracker's own work in-process: its calls from the training loop and its forward hooks
(wall time, perf_counter around each call), and its store writer thread (that thread's CPU time).

Used by bench_track.py (the accounted ratios) and profile_track.py (the breakdown by part). On a
shared machine whose speed changes from one step to the next, the step ratio of interleaved pairs
scatters by more than tracking costs; what tracking adds to a step is measured far more steadily
this way. It misses indirect costs (caches the reductions evict, the allocator's reaction to the
hooks' memory), which the pair ratios include. Each timed call costs about a microsecond.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any


class TrackingClock:
    """Accumulates, by part, the seconds a Tracker spends; `take()` returns and clears them."""

    CALLS = ("begin_step", "after_backward", "end_step")

    def __init__(self, tracker: Any):
        self.acc: dict[str, float] = defaultdict(float)
        for name in self.CALLS:
            setattr(tracker, name, self.timed(name, getattr(tracker, name)))
        probes = tracker.probes
        make_hook = probes._make_norm_hook  # hooks are made when the probes are armed: wrap the factory
        probes._make_norm_hook = lambda i: self.timed("hooks", make_hook(i))
        probes._act_hook = self.timed("hooks", probes._act_hook)
        writer = tracker.writer
        self._writer_clock = time.pthread_getcpuclockid(writer._thread.ident) if writer is not None else None
        self._writer_last = self._writer_cpu()

    def timed(self, name: str, f: Callable[..., Any], clock: Callable[[], float] = time.perf_counter) -> Callable[..., Any]:
        acc = self.acc

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = clock()
            try:
                return f(*a, **k)
            finally:
                acc[name] += clock() - t0

        return wrapper

    def _writer_cpu(self) -> float:
        if self._writer_clock is None:
            return 0.0
        try:
            return time.clock_gettime(self._writer_clock)
        except OSError:  # the thread has ended
            return self._writer_last

    def take(self) -> dict[str, float]:
        """Seconds by part since the last call: the timed calls, `in_step` (their sum, all spent on
        the training thread inside the step) and `writer_thread` (CPU time of the store's thread)."""
        out = dict(self.acc)
        self.acc.clear()
        out["in_step"] = sum(out.get(k, 0.0) for k in (*self.CALLS, "hooks"))
        now = self._writer_cpu()
        out["writer_thread"], self._writer_last = now - self._writer_last, now
        return out
