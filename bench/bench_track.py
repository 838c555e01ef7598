"""Overhead of channel tracking on a training step (issue 4 targets).

Full SDXL VAE architecture (width 1), 32x32 images, batch 8, AdamW, on CPU by default. Four
measurements, in one run:

- every step: step time with every GroupNorm tracked at every step over step time with tracking
  off, median of interleaved pairs (order alternates: off-on, on-off) with a bootstrap 95%
  interval; target <= 1.03.
- interval 10: cycles of ten interleaved pairs of single steps (tracking off; track.interval 10,
  so one tracked step per cycle), each cycle's ratio of summed step times, median over cycles;
  target <= 1.01. Pairing single steps (rather than comparing 10-step blocks run one after
  the other) keeps the machine's drift out of each pair.
- accounted: the same two ratios from what the Tracker itself spends (its calls from the loop and
  its hooks, timed in-process; the CPU time of the store's writer and zarr's I/O threads; see
  tracking_clock.py), measured in the tracked steps above: step / (step - tracking). On a shared machine whose speed changes
  from step to step this is the steadier figure; the pair ratios also include indirect costs.
- a reference row: a hook doing what the original project's ActivityMonitor did (mean |output|
  per channel, one host copy per layer per step, Python lists), interleaved with off steps.

Also the weight statistics' cost (once per track.weight_interval steps) and the memory tracking
adds (CUDA: peak measured; CPU: its buffers and scratch).

    python bench/bench_track.py                         # the figures of bench/RESULTS.md (about 30 min on CPU)
    python bench/bench_track.py --width 0.25 --pairs 4 --cycles 2 --ref-pairs 2  # smoke run

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import tracked_loop
from tracking_clock import TrackingClock


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0, help="SDXL width multiplier (1 = the real architecture)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pairs", type=int, default=80, help="interleaved step pairs, tracking off and at every step")
    p.add_argument("--cycles", type=int, default=20, help="cycles of 10 interleaved step pairs, off and at interval 10")
    p.add_argument("--ref-pairs", type=int, default=30, help="interleaved step pairs, off and the ActivityMonitor hook")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-near-zero", action="store_true", help="leave out the near-zero weight statistics")
    return p.parse_args()


def median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """Bootstrap 95% interval of the median (percentile method)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]]


def paired(first: Callable[[], float], second: Callable[[], float], i: int) -> tuple[float, float]:
    """Run the two thunks in alternating order (pair i even: first, second), so that neither side
    always follows the other; returns their results as (first, second)."""
    if i % 2:
        b = second()
        return first(), b
    a = first()
    return a, second()


class ActivityMonitor:
    """What the original project's tracker did: mean |output| per channel, one host copy per layer."""

    def __init__(self, model: torch.nn.Module):
        self.history: dict[str, list[list[float]]] = {}
        self.handles = [
            m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)
        ]

    def _hook(self, name: str):  # noqa: ANN202
        def hook(_m: torch.nn.Module, _i: tuple, out: torch.Tensor) -> None:
            dims = (0, *range(2, out.ndim))
            self.history.setdefault(name, []).append(out.detach().abs().mean(dim=dims).cpu().tolist())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def r4(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from vaedyn_cli.model import build_preset
    from vaedyn_cli.tracker import Tracker

    dev = torch.device(args.device)
    model = build_preset(args.width, 0).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(args.batch, 3, args.resolution, args.resolution, generator=gen) * 2 - 1).to(dev)
    acc = Accelerator(cpu=dev.type == "cpu")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def make_tracker(interval: int, run_dir: Path) -> Tracker:
        return tracked_loop.make_tracker(model, opt, acc, run_dir, width=args.width, interval=interval,
                                         near_zero=not args.no_near_zero)

    steps: dict[int, int] = {}  # each tracker's own step count (a tracker sees only its own steps)

    def train_step(hook: Tracker | None = None) -> float:
        s = steps[id(hook)] = steps.get(id(hook), 0) + 1
        sync()
        t0 = time.perf_counter()
        tracked_loop.train_step(model, opt, x, hook, s)
        sync()
        return time.perf_counter() - t0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, object] = {
        "device": str(dev), "width": args.width, "resolution": args.resolution, "batch": args.batch,
        "threads": torch.get_num_threads(), "near_zero": not args.no_near_zero,
    }
    with tempfile.TemporaryDirectory() as tmp:
        every = make_tracker(1, Path(tmp) / "every")
        tenth = make_tracker(10, Path(tmp) / "tenth")
        every_clock, tenth_clock = TrackingClock(every), TrackingClock(tenth)
        for _ in range(args.warmup):
            train_step()
            train_step(every)
        for _ in range(10):  # one interval of the interval-10 tracker (its first tracked step)
            train_step(tenth)
        assert every.writer is not None and tenth.writer is not None
        every.writer.flush()  # nothing of the warm-up left to commit
        tenth.writer.flush()
        every_clock.take()
        every_clock.background()
        log(f"tracked layers: {len(every.probes.layers)}, channels: {every.probes.n_channels}")

        # every step: interleaved pairs; the Tracker's own time in each tracked step
        off_t, on_t, ratios, in_step = [], [], [], []
        for i in range(args.pairs):
            a, b = paired(train_step, lambda: train_step(every), i)
            in_step.append(every_clock.take()["in_step"])
            off_t.append(a)
            on_t.append(b)
            ratios.append(b / a)
            log(f"pair {i}: off {a * 1e3:.1f} ms, tracked {b * 1e3:.1f} ms (tracking {in_step[-1] * 1e3:.1f} ms)")
        every.writer.flush()  # the writer commits what it holds: the CPU time for these steps is then complete
        # (conservative: commits come every 60 s of wall time, which holds half as many tracked steps here)
        background_every = every_clock.background() / args.pairs
        accounted = [t / (t - a - background_every) for t, a in zip(on_t, in_step, strict=True)]

        # reference: ActivityMonitor, interleaved with off
        def monitored_step() -> float:
            mon = ActivityMonitor(model)
            try:
                return train_step()
            finally:
                mon.remove()

        mon_ratios = []
        for i in range(args.ref_pairs):
            a, b = paired(train_step, monitored_step, i)
            mon_ratios.append(b / a)
            log(f"reference pair {i}: off {a * 1e3:.1f} ms, ActivityMonitor {b * 1e3:.1f} ms")

        # interval 10: cycles of ten interleaved single-step pairs, one tracked step per cycle
        tenth_clock.take()  # only this phase's time
        tenth_clock.background()
        cycle_ratios, cycle_off, cycle_on, cycle_tracking = [], [], [], []
        for c in range(args.cycles):
            off_s = on_s = 0.0
            for i in range(10):
                a, b = paired(train_step, lambda: train_step(tenth), i)
                off_s += a
                on_s += b
            cycle_tracking.append(tenth_clock.take()["in_step"])
            cycle_off.append(off_s)
            cycle_on.append(on_s)
            cycle_ratios.append(on_s / off_s)
            log(f"cycle {c}: off {off_s:.2f} s, interval 10 {on_s:.2f} s (tracking {cycle_tracking[-1] * 1e3:.1f} ms)")
        tenth.writer.flush()
        background_tenth = tenth_clock.background()

        # the weight statistics (out_weight_norm, near_zero_frac): once per track.weight_interval steps
        probes = every.probes
        costs = {}
        for weights in (True, False):
            times = []
            for _ in range(5):
                sync()
                t0 = time.perf_counter()
                probes.capture_params(weights=weights)
                sync()
                times.append(time.perf_counter() - t0)
            costs[weights] = statistics.median(times)
        weight_s = costs[True] - costs[False]
        weight_interval = every.cfg.track.weight_interval
        every.close()
        tenth.close()

        # memory: CUDA peak with and without tracking; CPU: the buffers
        buffers = probes._flat.numel() * probes._flat.element_size()
        if dev.type == "cuda":
            peaks = {}
            for name, hook in (("off", None), ("tracked", make_tracker(1, Path(tmp) / "mem"))):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                train_step(hook)
                peaks[name] = torch.cuda.max_memory_allocated() - base
                if hook:
                    hook.close()
            results["peak_added_bytes"] = peaks["tracked"] - peaks["off"]

    tracking_tenth = sum(cycle_tracking) + background_tenth
    results.update({
        "targets": {"every_step": 1.03, "interval_10": 1.01},
        "every_step": {
            "ratio": statistics.median(ratios),
            "ratio_ci95": median_ci(ratios),
            "step_off_ms_median": statistics.median(off_t) * 1e3,
            "step_tracked_ms_median": statistics.median(on_t) * 1e3,
            "pairs": r4(ratios),
            "accounted": {
                "ratio": statistics.median(accounted),
                "tracking_in_step_ms_median": statistics.median(in_step) * 1e3,
                "background_ms_per_step": background_every * 1e3,
                "weight_stats_ms_per_step": weight_s / weight_interval * 1e3,
                "ratio_with_weight_stats": statistics.median(
                    t / (t - a - background_every - weight_s / weight_interval) for t, a in zip(on_t, in_step, strict=True)),
            },
        },
        "interval_10": {
            "ratio": statistics.median(cycle_ratios),
            "ratio_ci95": median_ci(cycle_ratios),
            "ratio_of_sums": sum(cycle_on) / sum(cycle_off),
            "cycles": r4(cycle_ratios),
            "accounted": {
                "ratio": sum(cycle_on) / (sum(cycle_on) - tracking_tenth),
                "tracking_ms_per_step": tracking_tenth / (10 * args.cycles) * 1e3,
                "background_ms_total": background_tenth * 1e3,
                "weight_stats_computed": sum(1 for s in range(11, 10 * args.cycles + 11)
                                             if s % 10 == 0 and tenth._weights_due(s)),
            },
        },
        "reference_activity_monitor": {"ratio": statistics.median(mon_ratios), "pairs": r4(mon_ratios)},
        "weight_stats_ms": weight_s * 1e3,
        "gamma_beta_ms": costs[False] * 1e3,
        "buffer_bytes": buffers,
        "scratch_bytes": probes.scratch.nbytes,  # the CPU probes' and weight passes' work memory
    })
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
