"""Overhead of channel tracking on a training step (issue 4 targets).

Full SDXL VAE architecture (width 1), 32x32 images, batch 8, AdamW, on CPU by default:
step time with every GroupNorm tracked at every step over step time with tracking off (median of
interleaved pairs, with a bootstrap 95% interval; target <= 1.03), the same at track.interval 10
(pairs of 10-step blocks; target <= 1.01), and a reference row: the original project's ActivityMonitor (a forward hook
taking mean |activation| per channel, one host copy per layer per step, Python lists). Also the
peak memory tracking adds (CUDA: measured; CPU: the size of its buffers).

    python bench/bench_track.py                         # the figures of bench/RESULTS.md (about 20 min)
    python bench/bench_track.py --width 0.25 --pairs 4  # smoke run

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
from pathlib import Path
from types import SimpleNamespace

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=1.0, help="SDXL width multiplier (1 = the real architecture)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pairs", type=int, default=60, help="interleaved step pairs (order alternates: off-on, on-off)")
    p.add_argument("--block-pairs", type=int, default=5, help="interleaved pairs of 10-step blocks (interval 10)")
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


def paired(first: object, second: object, i: int) -> tuple[object, object]:
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


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from vaedyn_cli.config import RunConfig
    from vaedyn_cli.model import build_preset
    from vaedyn_cli.track import Tracker

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
        cfg = RunConfig.model_validate({
            "model": {"width": args.width},
            "track": {"interval": interval, "near_zero": {"enabled": not args.no_near_zero}},
            "log": {"report_to": "none"},
        })
        ctx = SimpleNamespace(cfg=cfg, accelerator=acc, model=model, optimizer=opt, run_dir=run_dir,
                              resume_step=None, train_loader=None)
        return Tracker(ctx)

    step_no = [0]

    def train_step(hook: Tracker | None) -> float:
        step_no[0] += 1
        s = step_no[0]
        sync()
        t0 = time.perf_counter()
        if hook:
            hook.begin_step(s)
        out = model(x).sample
        loss = torch.nn.functional.mse_loss(out, x)
        loss.backward()
        if hook:
            hook.after_backward(s)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hook:
            hook.end_step(s, {"loss": loss.detach(), "rec_loss": loss.detach(), "kl_loss": 0.0, "lr": 1e-6})
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
        for _ in range(args.warmup):
            train_step(None)
            train_step(every)
        log(f"tracked layers: {len(every.probes.layers)}, channels: {every.probes.n_channels}")

        # every step: interleaved pairs
        off_t, on_t, ratios = [], [], []
        for i in range(args.pairs):
            a, b = paired(lambda: train_step(None), lambda: train_step(every), i)
            off_t.append(a)
            on_t.append(b)
            ratios.append(b / a)
            log(f"pair {i}: off {a * 1e3:.1f} ms, tracked {b * 1e3:.1f} ms")
        # reference: ActivityMonitor, interleaved with off
        def monitored_step() -> float:
            mon = ActivityMonitor(model)
            try:
                return train_step(None)
            finally:
                mon.remove()

        mon_ratios = []
        for i in range(args.pairs):
            a, b = paired(lambda: train_step(None), monitored_step, i)
            mon_ratios.append(b / a)
        # interval 10: pairs of 10-step blocks
        block_ratios = []
        for i in range(args.block_pairs):
            a, b = paired(lambda: sum(train_step(None) for _ in range(10)), lambda: sum(train_step(tenth) for _ in range(10)), i)
            block_ratios.append(b / a)
            log(f"block pair {i}: off {a:.2f} s, interval 10 {b:.2f} s")
        every.close()
        tenth.close()

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
        results["weight_stats_ms"] = (costs[True] - costs[False]) * 1e3
        results["gamma_beta_ms"] = costs[False] * 1e3

        # memory: CUDA peak with and without tracking; CPU: the buffers
        buffers = probes._flat.numel() * probes._flat.element_size()
        results["buffer_bytes"] = buffers
        results["scratch_bytes"] = probes.scratch.nbytes  # the CPU probes' and weight passes' work memory
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

    results.update({
        "step_off_ms_median": statistics.median(off_t) * 1e3,
        "step_tracked_ms_median": statistics.median(on_t) * 1e3,
        "ratio_every_step": statistics.median(ratios),
        "ratio_every_step_ci95": median_ci(ratios),
        "ratio_every_step_pairs": [round(r, 4) for r in ratios],
        "ratio_every_step_mean": statistics.fmean(ratios),
        "ratio_interval_10": statistics.median(block_ratios),
        "ratio_interval_10_pairs": [round(r, 4) for r in block_ratios],
        "ratio_interval_10_mean": statistics.fmean(block_ratios),
        "ratio_reference_activity_monitor": statistics.median(mon_ratios),
        "targets": {"ratio_every_step": 1.03, "ratio_interval_10": 1.01},
    })
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
