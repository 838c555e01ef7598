"""The training hook protocol: what the loop calls at fixed points of every optimizer step, and
what a hook factory is given to build a hook.

The train stage (`vaedyn_cli.train.train`) takes its hooks explicitly as a sequence of factories
(default `train.DEFAULT_HOOKS`: tracker, in-training nudge, TensorBoard), builds them in that
order and calls them in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaedyn_cli.config import RunConfig


class TrainHook:
    """Called by the loop at fixed points of every optimizer step; the base does nothing.

    Hooks run on every process (a hook that writes files should do so on the main process only).
    """

    def resumed(self, step: int) -> None:
        """A resumed run only, once the checkpoint of `step` has loaded completely and been checked:
        drop what was recorded after `step` (the tracker cuts its trace and events back to it). A hook
        destroys nothing before this call, so a resume whose checkpoint fails to load leaves the run
        folder as it was."""

    def begin_step(self, step: int) -> None:
        """Before the first micro-batch forward of optimizer step `step` (1-based)."""

    def after_backward(self, step: int) -> None:
        """After the last backward of the step (gradients synced), before clipping and optimizer.step."""

    def end_step(self, step: int, scalars: Mapping[str, float]) -> None:
        """After optimizer.step, scheduler.step and zero_grad. `scalars` (loss, rec_loss, kl_loss, lr:
        this process's means over the step's micro-batches) is computed on first access (one device sync)."""

    def save_state(self, folder: Path) -> None:
        """While the checkpoint of the current step is written into `folder` (every process: a hook may
        gather over them; the main process writes): what the hook itself must carry across a resume, in
        a format that cannot run code (JSON, safetensors)."""

    def load_state(self, folder: Path) -> None:
        """Read back what `save_state` wrote, on every process, right after the checkpoint loaded."""

    def before_validation(self, step: int) -> None:
        """Before a validation pass (after end_step of `step`)."""

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        """After a validation pass (metrics: val_rec_loss, val_kl_loss, over all processes)."""

    def before_save(self, step: int) -> None:
        """Before the checkpoint of step `step` is written: make durable what a resume from it needs
        (the tracker commits its trace up to `step`)."""

    def close(self) -> None:
        """Always called at the end of training, also after an error."""


@dataclass
class TrainContext:
    """What a hook factory gets. Factories run after accelerator.prepare and before a resumed
    checkpoint is loaded (so objects they register for checkpointing are restored; the resumed
    weights are in `model` right after the factories return); `TrainHook.resumed` follows the load."""

    cfg: RunConfig
    accelerator: Any
    model: Any  # the prepared (possibly DDP-wrapped) AutoencoderKL
    optimizer: Any
    run_dir: Path
    resume_step: int | None
    train_loader: Any
    hooks: list[TrainHook] = field(default_factory=list)  # the hooks built so far, in factory order


HookFactory = Callable[[TrainContext], "TrainHook | None"]
