"""Benchmark of `vaedyn classify`: a synthetic trace of STEPS x 19,840 channels (every GroupNorm
channel of the SDXL VAE) classified out of core, against loading the whole trace with xarray and
classifying it in memory.

Targets (issue 5): 10,000 steps classify in <= 10 s on a 2-core machine with peak memory <= 1 GB;
twice the steps take <= 2.1x the time.

    .venv/bin/python bench/bench_classify.py                 # the real figures (10k and 20k steps)
    .venv/bin/python bench/bench_classify.py --steps 500     # a smoke run

The store is written by vaedyn's TraceWriter (chunks of 64 steps x 4096 channels, Blosc-zstd),
under bench/out/ (git-ignored), and deleted afterwards unless --keep.
Each measurement runs in a fresh subprocess; memory is its peak RSS (VmHWM of /proc, the
whole process: interpreter, numpy, xarray, zarr) and the increase of that peak over the RSS
just before classifying (after imports and opening the store).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def layout() -> tuple[list[tuple[str, int, str, bool]], dict]:
    """(layer, channels, part, has_activation) of every GroupNorm of the SDXL VAE, and its config."""
    from vaedyn_cli.anatomy import groupnorm_layers
    from vaedyn_cli.model import build_preset, sdxl_config

    layers = [(name, norm.num_channels, name.split(".")[0], not name.endswith("attentions.0.group_norm"))
              for name, norm in groupnorm_layers(build_preset(1.0))]
    return layers, sdxl_config(1.0)


def generate(path: Path, n_steps: int, seed: int = 0) -> Path:
    """A trace store written by vaedyn's own TraceWriter (its codec, chunks and commits), with
    realistic dynamics: most channels active, some die, revive, flicker, are born dormant or dead;
    5% step-to-step noise. Steps are 0, 10, 20, ..."""
    from vaedyn_cli import store

    layers, model_cfg = layout()
    chans = store.ChannelLayout.from_layers(layers)
    n = chans.n_channels
    has_act = np.array(chans.has_activation)
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 0.3, n).astype(np.float32)
    kind = rng.choice(6, n, p=[0.84, 0.08, 0.03, 0.02, 0.02, 0.01])  # active died revived born flicker dead
    change = rng.integers(0, n_steps, n)
    period = rng.integers(2, 40, n)
    if path.exists():
        shutil.rmtree(path)
    attrs = store.store_attrs("track", "bench", json.dumps({"classify": {}}), json.dumps(model_cfg))
    block = 64
    with store.TraceWriter(path, chans, attrs, mode="w", chunk_steps=block, queue_size=2 * block) as writer:
        for a in range(0, n_steps, block):
            t = np.arange(a, min(n_steps, a + block))[:, None]
            scale = np.ones((len(t), n), np.float32)
            scale[:, kind == 1] = np.where(t >= change[kind == 1], 0.01, 1.0)
            scale[:, kind == 2] = np.where(t < change[kind == 2], 0.01, 1.0)
            scale[:, kind == 3] = 0.01
            scale[:, kind == 4] = np.where((t // period[kind == 4]) % 2 == 1, 0.01, 1.0)
            scale[:, kind == 5] = 0.0
            act = base * scale * (1.0 + 0.05 * rng.standard_normal((len(t), n), dtype=np.float32))
            for i, step in enumerate(t[:, 0].tolist()):
                writer.append(store.TraceRecord(10 * step, {
                    "act_std": np.where(has_act, act[i], np.nan), "std": 1.5 * act[i], "mean": np.zeros(n),
                    "in_std": base, "gn_weight": base, "out_weight_norm": base,
                }))
    return path


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak RSS of this process. VmHWM, not getrusage's ru_maxrss: on Linux a fork+exec'd child's
    ru_maxrss starts at its parent's peak (here the generator's, which built the full-size model)."""
    peak = _status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    return _status_mb("VmRSS")


def measure(path: str, mode: str) -> dict:
    """One measurement inside this (fresh) process: out of core, or whole trace in memory."""
    import xarray as xr

    from vaedyn_cli import classification, store

    ds = store.open_trace(Path(path))
    params = classification.trace_params(ds)
    base = _current_rss_mb()
    t0 = time.perf_counter()
    if mode == "stream":
        labels = classification.classify_trace(ds, params)
    else:  # the time series the classifier reads, loaded whole; then one chunk spanning the trace
        whole = xr.open_zarr(path, consolidated=False, chunks=None)[["act_std", "std"]].load()
        loaded = ds.assign(act_std=whole["act_std"], std=whole["std"])
        labels = classification.classify_trace(loaded, params.model_copy(update={"chunk_steps": ds.sizes["step"]}))
    seconds = time.perf_counter() - t0
    return {"mode": mode, "steps": ds.sizes["step"], "channels": ds.sizes["channel"], "seconds": round(seconds, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_before_mb": round(base, 1),
            "increase_mb": round(_peak_rss_mb() - base, 1),
            "inactive": int((labels["state"].values != "active").sum())}


def run_child(path: Path, mode: str) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", str(path), mode], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000, help="Steps of the base trace (twice this is also run).")
    ap.add_argument("--keep", action="store_true", help="Keep the generated stores.")
    ap.add_argument("--pairs", type=int, default=3, help="Interleaved (1x, 2x) streamed runs.")
    ap.add_argument("--child", nargs=2, metavar=("STORE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    OUT.mkdir(exist_ok=True)
    sizes = (args.steps, 2 * args.steps)
    paths = {n: OUT / f"classify-{n}.zarr" for n in sizes}
    try:
        for n_steps, path in paths.items():
            t0 = time.perf_counter()
            generate(path, n_steps)
            print(f"generated {n_steps} steps in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        results, ratios = [], []
        for _ in range(args.pairs):  # interleaved: the 2x ratio is the median of per-pair ratios
            pair = {n: run_child(paths[n], "stream") for n in sizes}
            for r in pair.values():
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
            ratios.append(pair[sizes[1]]["seconds"] / pair[sizes[0]]["seconds"])
        for n in sizes:
            r = run_child(paths[n], "memory")
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    finally:
        if not args.keep:
            for path in paths.values():
                shutil.rmtree(path, ignore_errors=True)
    ratio = statistics.median(ratios)
    print("| mode | steps | channels | seconds | peak RSS (MB) | RSS before (MB) | increase (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['steps']} | {r['channels']} | {r['seconds']} | {r['peak_rss_mb']} | "
              f"{r['rss_before_mb']} | {r['increase_mb']} |")
    print(f"\n2x steps / 1x steps (stream, median of {len(ratios)} interleaved pairs: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}): {ratio:.2f}; targets at 10,000 steps: <= 10 s, <= 1024 MB; ratio <= 2.1")
    (OUT / "bench_classify.json").write_text(json.dumps({"results": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
