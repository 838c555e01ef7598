"""Where a tracked step's extra time goes, measured in-process (steadier than a step ratio on a
noisy machine): the Tracker's calls, its hooks and the probes' parts within them are timed with
perf_counter during tracked training steps, the store's writer and zarr's I/O threads by their
CPU time (tracking_clock.py); medians over the steps. A store commit (every
track.commit_interval_s, 60 s) seldom falls into this short run: bench_track.py accounts for it.

    python bench/profile_track.py             # full SDXL architecture, 32 px, batch 8, 10 steps
    python bench/profile_track.py --width 0.25 --steps 3   # smoke run
    python bench/profile_track.py --pooling interval --interval 10 --steps 20   # track.pooling interval

With `--pooling interval` every step's forwards are measured (and folded), and one step in
`--interval` also copies the sums to the host and writes them: the medians are over all measured
steps (the tracked ones are also reported apart, `tracked_in_step`).

Prints JSON on stdout. `hooks` is the time inside the forward hooks (`moments` and `abs_sum` are
the reductions within them; the rest is Python and views); `total` adds the Tracker's calls
outside the forward and the background threads' CPU time; `ratio_estimate` is the tracked step over
the same step less that total. Timers add a few microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import tracked_loop
from tracking_clock import TrackingClock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps measured (after 3 warm-up steps)")
    p.add_argument("--pooling", choices=("step", "interval"), default="step", help="track.pooling")
    p.add_argument("--interval", type=int, default=1, help="track.interval (with --pooling interval, e.g. 10)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the main thread's CPU time instead of wall time (steadier on a loaded machine; "
                   "run with OMP_NUM_THREADS=1 so that the compute is all on the main thread)")
    args = p.parse_args()
    if args.clock == "cpu":
        import tracking_clock

        tracking_clock.CLOCK = time.thread_time
    clock_fn = time.thread_time if args.clock == "cpu" else time.perf_counter

    from accelerate import Accelerator

    from vaedyn_cli import probes as probes_mod
    from vaedyn_cli.model import build_preset

    model = build_preset(args.width, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        tracker = tracked_loop.make_tracker(model, opt, Accelerator(cpu=True), Path(tmp) / "run", width=args.width,
                                            interval=args.interval, pooling=args.pooling)
        clock = TrackingClock(tracker)  # the Tracker's calls, its hooks and the store's threads
        # and, within them, the reductions and the fold
        probes_mod.moments = clock.timed("moments", probes_mod.moments)
        probes_mod.abs_sum = clock.timed("abs_sum", probes_mod.abs_sum)
        tracker.probes._fold = clock.timed("fold", tracker.probes._fold)

        per_step: dict[str, list[float]] = defaultdict(list)
        tracked_in_step: list[float] = []
        measured = range(1, args.steps + 4) if args.pooling == "interval" else \
            [args.interval * k for k in range(1, args.steps + 4)]
        for step in measured:
            t0 = clock_fn()
            tracked_loop.train_step(model, opt, x, tracker, step)
            wall = clock_fn() - t0
            time.sleep(0.2)  # let the writer thread finish the step
            parts = {**clock.take(), "background": clock.background()}
            if step > measured[2]:
                for k, v in parts.items():
                    per_step[k].append(v * 1e3)
                if step % args.interval == 0:
                    tracked_in_step.append(parts.get("in_step", 0.0) * 1e3)
                per_step["step_wall"].append(wall * 1e3)
                hooks_ms = parts.get("hooks", 0.0) * 1e3
                print(f"step {step}: {wall * 1e3:.0f} ms, hooks {hooks_ms:.1f} ms", file=sys.stderr, flush=True)
        tracker.close()

    med = {k: round(statistics.median(v), 2) for k, v in per_step.items()}
    med["total"] = round(med["in_step"] + med["background"], 2)
    med["ratio_estimate"] = round(med["step_wall"] / (med["step_wall"] - med["total"]), 4)  # tracked / untracked
    if args.pooling == "interval" and tracked_in_step:
        med["tracked_in_step"] = round(statistics.median(tracked_in_step), 2)
    print(json.dumps({"device": "cpu", "width": args.width, "resolution": args.resolution, "batch": args.batch,
                      "threads": torch.get_num_threads(), "pooling": args.pooling, "interval": args.interval,
                      "clock": args.clock,
                      "ms_median": med}, indent=2))


if __name__ == "__main__":
    main()
