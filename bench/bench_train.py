"""Step time of `vaedyn train`'s loop against a minimal plain diffusers + accelerate loop (issue 3 target).

Both loops train the same SDXL-architecture VAE (same init) on the same builtin:natural images with
the same batch, AdamW, LR schedule, loss (MSE + kl_weight * KL, posterior sampled) and gradient
clipping; vaedyn runs through `vaedyn_cli.train.train` (tracking, validation, checkpoints and
trackers off, logging every 10 steps like the plain loop). Runs are interleaved (the order alternates),
each timed over its steps after a warm-up; the figure is the median of the per-pair ratios
vaedyn / plain (target <= 1.02).

    python bench/bench_train.py                                              # CPU defaults
    python bench/bench_train.py --width 1 --resolution 256 --batch 8 --mixed-precision bf16  # GPU
    python bench/bench_train.py --width 0.0625 --resolution 16 --steps 6 --repeats 2          # smoke

Prints a markdown table row (with its header) on stdout; details on stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LOG_INTERVAL = 10
SEED = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=0.25, help="SDXL width multiplier (1 = the real architecture)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each run")
    p.add_argument("--repeats", type=int, default=5, help="interleaved (plain, vaedyn) pairs")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-header", action="store_true", help="print the row only")
    return p.parse_args()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total, self.start, self.end = warmup, total, None, None

    def at_step_end(self, step: int) -> None:
        if step == self.warmup:
            _sync()
            self.start = time.perf_counter()
        elif step == self.total:
            _sync()
            self.end = time.perf_counter()

    def per_step(self) -> float:
        assert self.start is not None and self.end is not None, "the run ended early"
        return (self.end - self.start) / (self.total - self.warmup)


def run_config(args: argparse.Namespace, out_dir: Path):  # noqa: ANN201 - RunConfig
    from vaedyn_cli.config import RunConfig

    total = args.warmup + args.steps
    return RunConfig.model_validate({
        "run_name": "bench", "output_dir": str(out_dir), "seed": SEED,
        "model": {"architecture": "sdxl", "width": args.width},
        "data": {"dataset_name": "builtin:natural", "resolution": args.resolution, "batch_size": args.batch,
                 "max_samples": min(2048, total * args.batch), "do_validation": False},
        "train": {"max_steps": total, "save_interval": 10**9, "mixed_precision": args.mixed_precision,
                  "lr_warmup_steps": 2, "learning_rate": 1e-4},
        "track": {"enabled": False},
        "log": {"report_to": "none", "log_interval": LOG_INTERVAL},
    })


def plain_loop(args: argparse.Namespace) -> float:
    """What a minimal diffusers + accelerate fine-tuning script does, nothing more."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from vaedyn_cli import data as data_mod
    from vaedyn_cli.model import build_preset

    cfg = run_config(args, Path(tempfile.gettempdir()))
    t = cfg.train
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    model = build_preset(args.width, SEED)
    dataset = data_mod.train_dataset(cfg.data, cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, generator=torch.Generator().manual_seed(SEED)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=t.lr_warmup_steps,
                              num_training_steps=t.max_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    generator = torch.Generator(device=accelerator.device).manual_seed(SEED)
    timer = StepTimer(args.warmup, t.max_steps)
    step = 0
    while step < t.max_steps:
        for x in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():  # encode/decode bypass the autocast that prepare() puts on forward
                    posterior = model.encode(x).latent_dist
                    recon = model.decode(posterior.sample(generator=generator)).sample
                loss = F.mse_loss(recon.float(), x.float()) + t.kl_weight * posterior.kl().mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % LOG_INTERVAL == 0:
                accelerator.log({"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=step)
            timer.at_step_end(step)
            if step >= t.max_steps:
                break
    return timer.per_step()


def vaedyn_loop(args: argparse.Namespace) -> float:
    """`vaedyn train` itself, timed by a hook at the end of every step."""
    from vaedyn_cli import train as train_mod
    from vaedyn_cli.hooks import TrainHook

    class Timer(TrainHook):
        def __init__(self, timer: StepTimer):
            self.timer = timer

        def end_step(self, step, scalars):  # noqa: ANN001
            self.timer.at_step_end(step)

    timer = StepTimer(args.warmup, args.warmup + args.steps)
    factory = lambda ctx: Timer(timer)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        train_mod.train(run_config(args, Path(tmp)), hooks=(*train_mod.DEFAULT_HOOKS, factory))
    return timer.per_step()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    plain_times, vaedyn_times, ratios = [], [], []
    for r in range(args.repeats):
        if r % 2 == 0:
            p, v = plain_loop(args), vaedyn_loop(args)
        else:
            v, p = vaedyn_loop(args), plain_loop(args)
        plain_times.append(p)
        vaedyn_times.append(v)
        ratios.append(v / p)
        print(f"pair {r + 1}/{args.repeats}: plain {p * 1e3:.2f} ms  vaedyn {v * 1e3:.2f} ms  ratio {v / p:.4f}",
              file=sys.stderr, flush=True)
    result = {
        "device": device, "width": args.width, "resolution": args.resolution, "batch": args.batch,
        "steps": args.steps, "repeats": args.repeats, "mixed_precision": args.mixed_precision,
        "plain_ms": statistics.median(plain_times) * 1e3, "vaedyn_ms": statistics.median(vaedyn_times) * 1e3,
        "ratio_median": statistics.median(ratios), "ratios": ratios,
    }
    print(json.dumps(result), file=sys.stderr)
    if not args.no_header:
        print("| device | width | resolution | batch | precision | steps x pairs | plain ms/step | vaedyn ms/step | "
              "median ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {device} | {args.width:g} | {args.resolution} | {args.batch} | {args.mixed_precision} | "
          f"{args.steps} x {args.repeats} | {result['plain_ms']:.2f} | {result['vaedyn_ms']:.2f} | "
          f"{result['ratio_median']:.4f} |")


if __name__ == "__main__":
    main()
