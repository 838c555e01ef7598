"""The training step and the Tracker that bench_track.py and profile_track.py both measure, so
that the two scripts time the same work: a Tracker built as `vaedyn train` builds it, and a step
that calls its hooks where vaedyn's loop does (begin_step, the forward and backward,
after_backward, the optimizer step, end_step with the step's scalars)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def make_tracker(model: torch.nn.Module, opt: torch.optim.Optimizer, acc: Any, run_dir: Path, *, width: float,
                 interval: int, near_zero: bool = True, pooling: str = "step") -> Any:
    """A Tracker over `model` recording every `interval` steps into run_dir's trace store (with
    `pooling` interval: every step's forwards pooled into the tracked step's)."""
    from vaedyn_cli.config import RunConfig
    from vaedyn_cli.tracker import Tracker

    cfg = RunConfig.model_validate({
        "model": {"width": width},
        "track": {"interval": interval, "near_zero": {"enabled": near_zero}, "pooling": pooling},
        "log": {"report_to": "none"},
    })
    ctx = SimpleNamespace(cfg=cfg, accelerator=acc, model=model, optimizer=opt, run_dir=run_dir,
                          resume_step=None, train_loader=None)
    return Tracker(ctx)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, tracker: Any, step: int) -> None:
    """One reconstruction step on batch x; `tracker` None for an untracked step."""
    if tracker:
        tracker.begin_step(step)
    out = model(x).sample
    loss = torch.nn.functional.mse_loss(out, x)
    loss.backward()
    if tracker:
        tracker.after_backward(step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if tracker:
        tracker.end_step(step, {"loss": loss.detach(), "rec_loss": loss.detach(), "kl_loss": 0.0, "lr": 1e-6})
