"""Where a tracked step's extra time goes, measured in-process (steadier than a step ratio on a
noisy machine): the Tracker's calls and the probes' parts are timed with perf_counter around them
during tracked training steps (the writer thread's work with thread_time), medians over the steps.

    python bench/profile_track.py             # full SDXL architecture, 32 px, batch 8, 10 steps
    python bench/profile_track.py --width 0.25 --steps 3   # smoke run

Prints JSON on stdout. `hooks` is the time inside the forward hooks (`moments` and `abs_sum` are
the reductions within them; the rest is Python and views); `total` adds the Tracker's calls
outside the forward and the writer thread's CPU time; `ratio_estimate` is the tracked step over
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
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="tracked steps measured (after 3 warm-up steps)")
    args = p.parse_args()

    from accelerate import Accelerator

    from vaedyn_cli import track as track_mod
    from vaedyn_cli.config import RunConfig
    from vaedyn_cli.model import build_preset

    model = build_preset(args.width, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = RunConfig.model_validate({"model": {"width": args.width}, "track": {"interval": 1}, "log": {"report_to": "none"}})
    acc: dict[str, float] = defaultdict(float)

    def timed(name: str, f: Callable[..., Any], clock: Callable[[], float] = time.perf_counter) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = clock()
            try:
                return f(*a, **k)
            finally:
                acc[name] += clock() - t0
        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        ctx = SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True), model=model, optimizer=opt,
                              run_dir=Path(tmp) / "run", resume_step=None, train_loader=None)
        tracker = track_mod.Tracker(ctx)
        probes = tracker.probes
        track_mod._moments = timed("moments", track_mod._moments)
        track_mod._abs_sum = timed("abs_sum", track_mod._abs_sum)
        make_hook = probes._make_norm_hook
        probes._make_norm_hook = lambda i: timed("hooks", make_hook(i))
        probes._act_hook = timed("hooks", probes._act_hook)
        probes._fold = timed("fold", probes._fold)
        for name in ("begin_step", "after_backward", "end_step"):
            setattr(tracker, name, timed(name, getattr(tracker, name)))
        assert tracker.writer is not None
        tracker.writer._add_row = timed("writer_thread", tracker.writer._add_row, time.thread_time)
        track_mod._Snapshot.resolve = timed("writer_thread", track_mod._Snapshot.resolve, time.thread_time)

        per_step: dict[str, list[float]] = defaultdict(list)
        for step in range(1, args.steps + 4):
            acc.clear()
            t0 = time.perf_counter()
            tracker.begin_step(step)
            out = model(x).sample
            loss = torch.nn.functional.mse_loss(out, x)
            loss.backward()
            tracker.after_backward(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker.end_step(step, {"loss": loss.detach(), "rec_loss": loss.detach(), "kl_loss": 0.0, "lr": 1e-6})
            wall = time.perf_counter() - t0
            time.sleep(0.2)  # let the writer thread finish the step
            if step > 3:
                for k, v in acc.items():
                    per_step[k].append(v * 1e3)
                per_step["step_wall"].append(wall * 1e3)
                print(f"step {step}: {wall * 1e3:.0f} ms, hooks {acc['hooks'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
        tracker.close()

    med = {k: round(statistics.median(v), 2) for k, v in per_step.items()}
    med["total"] = round(sum(med.get(k, 0.0) for k in ("begin_step", "hooks", "after_backward", "end_step", "writer_thread")), 2)
    med["ratio_estimate"] = round(med["step_wall"] / (med["step_wall"] - med["total"]), 4)  # tracked / untracked
    print(json.dumps({"device": "cpu", "width": args.width, "resolution": args.resolution, "batch": args.batch,
                      "threads": torch.get_num_threads(), "ms_median": med}, indent=2))


if __name__ == "__main__":
    main()
