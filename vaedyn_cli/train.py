"""The training loop (accelerate): AdamW + a diffusers LR schedule on MSE + kl_weight * KL, as the
original project, with atomic step checkpoints, exact mid-epoch resume, validation, trackers and
extension points (`TrainHook`, `HOOK_FACTORIES`) for the tracking and nudging stages.

Reproducibility by construction: the data order of an epoch depends only on (seed, epoch), and the
posterior noise of an image only on (seed, epoch, its position in the epoch's order), whatever the
number of processes. A checkpoint stores the global step and the position in the epoch, so a
resumed run replays exactly what an uninterrupted one does: on CPU the final weights are bitwise
identical. Under N processes each takes every N-th micro-batch of that order (accelerate's
sharding), so N processes with data.batch_size B see the batches of one process with N * B.

Crash safety: a checkpoint is written aside and renamed into place, and hooks commit what a resume
from it needs first (`TrainHook.before_save`: the trace up to that step), so a process killed at
any instant resumes from `latest` into the same numbers (see `vaedyn_cli.faults`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vaedyn_cli import artifacts, faults
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import RuntimeFailure, VaedynError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------------------------
# extension points


class TrainHook:
    """Called by the loop at fixed points of every optimizer step; the base does nothing.

    Hooks run on every process (a hook that writes files should do so on the main process only).
    """

    def begin_step(self, step: int) -> None:
        """Before the first micro-batch forward of optimizer step `step` (1-based)."""

    def after_backward(self, step: int) -> None:
        """After the last backward of the step (gradients synced), before clipping and optimizer.step."""

    def end_step(self, step: int, scalars: Mapping[str, float]) -> None:
        """After optimizer.step, scheduler.step and zero_grad. `scalars` (loss, rec_loss, kl_loss, lr:
        this process's means over the step's micro-batches) is computed on first access (one device sync)."""

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
    weights are in `model` right after the factories return)."""

    cfg: RunConfig
    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run_dir: Path
    resume_step: int | None
    train_loader: Any
    hooks: list[TrainHook] = field(default_factory=list)  # the hooks built so far, in HOOK_FACTORIES order


HOOK_FACTORIES: list[Callable[[TrainContext], TrainHook | None]] = []


# ---------------------------------------------------------------------------------------------
# reproducible randomness


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from several integers (well mixed, so nearby inputs give unrelated streams)."""
    entropy = [int(p) % (1 << 63) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class EpochSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch that depends only on (seed, epoch), so any epoch can be replayed."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (accelerate custom state)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed (this process)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


# ---------------------------------------------------------------------------------------------
# the loss


class _MomentsCapture:
    """Captures the posterior parameters (the output of quant_conv, or of the encoder without one)
    during the model's own forward, so training runs through the prepared (DDP) module's forward."""

    def __init__(self, vae: torch.nn.Module):
        module = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder
        self.parts: list[torch.Tensor] = []
        self.active = False
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if self.active:
            self.parts.append(output)

    def kl(self) -> torch.Tensor:
        """Per-image KL of the captured posterior (summed over latent elements)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        self.parts = []
        return DiagonalGaussianDistribution(moments.float()).kl()


class SampleNoise:
    """One generator per image of a micro-batch, seeded by (seed, epoch, position of the image in the
    epoch's order): the posterior noise of an image does not depend on how images are grouped into
    micro-batches and processes (diffusers draws image i's noise from generator i)."""

    def __init__(self, device: torch.device, seed: int, batch_size: int, process_index: int, num_processes: int):
        self.device, self.seed, self.batch_size = device, seed, batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self._pool: list[torch.Generator] = []

    def generators(self, epoch: int, batch_in_epoch: int, n: int) -> list[torch.Generator]:
        """For this process's micro-batch `batch_in_epoch` (of n images) of `epoch`."""
        while len(self._pool) < n:
            self._pool.append(torch.Generator(device=self.device))
        first = (batch_in_epoch * self.num_processes + self.process_index) * self.batch_size
        for i, gen in enumerate(self._pool[:n]):
            gen.manual_seed(mix_seed(self.seed, epoch, first + i))
        return self._pool[:n]


def training_loss(
    model: torch.nn.Module,
    capture: _MomentsCapture,
    x: torch.Tensor,
    generator: torch.Generator | list[torch.Generator],
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rec_loss, kl_loss): MSE(recon, x) + kl_weight * mean per-image KL, posterior sampled."""
    capture.active, capture.parts = True, []
    try:
        recon = model(x, sample_posterior=True, generator=generator).sample
    finally:
        capture.active = False
    rec = F.mse_loss(recon.float(), x.float())
    kl = capture.kl().mean()
    return rec + kl_weight * kl, rec, kl


# ---------------------------------------------------------------------------------------------
# setup


def _check_report_to(report_to: str) -> None:
    if report_to in {"wandb", "all"}:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise VaedynError(
                f"log.report_to={report_to} needs wandb, which is not installed: `pip install vaedyn[wandb]` "
                "(or set log.report_to=tensorboard)"
            ) from None


def _trackers(cfg: RunConfig, logs_dir: Path) -> list[Any]:
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    found: list[Any] = []
    if cfg.log.report_to in {"tensorboard", "all"}:
        found.append(TensorBoardTracker("", logs_dir))
    if cfg.log.report_to in {"wandb", "all"}:
        kwargs = {"name": cfg.run_name, "dir": str(logs_dir)}
        if cfg.log.wandb_entity:
            kwargs["entity"] = cfg.log.wandb_entity
        found.append(WandBTracker(cfg.log.wandb_project, **kwargs))
    return found


def _flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as flat `section.key` scalars (what TensorBoard hparams accept)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            key = prefix[:-1]
            flat[key] = node if isinstance(node, bool | int | float | str) else json.dumps(node)

    walk(cfg.model_dump(mode="json"), "")
    return flat


def _check_output_dir(run_dir: Path) -> None:
    """The run folder can be made: no existing file stands where it or a folder above it goes."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise VaedynError(
                    f"{path} is a file, so run folder {run_dir} cannot be made there; set output_dir (or run_name) "
                    "to a folder path"
                )
            return


def _resolve_resume(cfg: RunConfig, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        if not cfg.run_dir.is_dir():
            raise VaedynError(f"--resume latest: run folder {cfg.run_dir} does not exist; start the run without --resume")
        found = artifacts.latest_checkpoint(cfg.run_dir)
        if found is None:
            raise VaedynError(
                f"--resume latest: {cfg.run_dir / artifacts.CHECKPOINTS_DIR} holds no step-* checkpoint yet; "
                "rerun without --resume and --overwrite to start again"
            )
        return found
    path = Path(resume).expanduser()
    if artifacts.parse_step(path.name) is None or not path.is_dir():
        raise VaedynError(f"--resume {resume}: not a checkpoints/step-NNNNNN folder; pass one or `latest`")
    if not (path / artifacts.ACCELERATE_MODEL_FILE).is_file() or not (path / "custom_checkpoint_0.pkl").is_file():
        raise VaedynError(f"--resume {resume}: the checkpoint is incomplete (no model or training state); pick another")
    return path


def _check_resume_fits(resume_dir: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights have the shapes of this config's model (read from the safetensors header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(resume_dir / artifacts.ACCELERATE_MODEL_FILE), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise VaedynError(f"--resume {resume_dir}: cannot read {artifacts.ACCELERATE_MODEL_FILE} ({e}); pick another") from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in own.keys() | saved.keys() if own.get(k) != saved.get(k))
    if wrong:
        raise VaedynError(
            f"--resume {resume_dir}: its weights do not fit the model of this config ({len(wrong)} tensors differ, "
            f"e.g. '{wrong[0]}'); resume with the config the run was trained with (its {artifacts.CONFIG_FILE})"
        )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _lr_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int, num_processes: int) -> Any:
    """The diffusers schedule in optimizer steps; accelerate's scheduler wrapper steps it once per
    process per optimizer step, hence the scaling (as the diffusers training examples do)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.train.lr_scheduler_type,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )


def _validation_log(run_dir: Path) -> Path:
    return run_dir / artifacts.VALIDATION_FILE


def _truncate_validation(run_dir: Path, step: int) -> None:
    """Drop validation records written after the checkpoint a run resumes from."""
    path = _validation_log(run_dir)
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        _atomic_write(path, "".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# progress


class _Progress:
    """A rich bar on a terminal; plain log lines (every log_interval) otherwise. Main process only."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        self.task = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[ips]} img/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", ips="-")
            self.bar.start()
        self.enabled = enabled

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def show(self, step: int, total: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, loss=f"{values['loss']:.4g}", ips=f"{values['images_per_s']:.1f}")
            return
        log.info(
            "step %d/%d loss %.5g rec %.5g kl %.5g lr %.3g grad_norm %.3g %.1f img/s",
            step, total, values["loss"], values["rec_loss"], values["kl_loss"], values["lr"],
            values.get("grad_norm", float("nan")), values["images_per_s"],
        )

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(message)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _LossWindow:
    """(loss, rec, kl) of each step since the last read, kept on the device: one row copy per step,
    one transfer per read. A read (every log, validation and checkpoint) finds the first non-finite
    step and adds the finite steps to the running log means, over all processes."""

    def __init__(self, accelerator: Any, rows: int):
        self.acc = accelerator
        self.buffer = torch.zeros(rows, 3, device=accelerator.device)
        self.first_step, self.count = 1, 0
        self.sums, self.steps = [0.0, 0.0, 0.0], 0
        self.first_bad: int | None = None

    def record(self, step: int, means: torch.Tensor) -> None:
        if self.count == 0:
            self.first_step = step
        self.buffer[self.count].copy_(means)
        self.count += 1

    def read(self) -> None:
        if self.count == 0:
            return
        rows = self.acc.gather(self.buffer[: self.count].unsqueeze(0)).reshape(-1, self.count, 3).cpu()
        finite = torch.isfinite(rows).all(dim=2)  # (processes, steps)
        bad = (~finite).any(dim=0).nonzero()
        if len(bad) and self.first_bad is None:
            self.first_bad = self.first_step + int(bad[0])
        good = rows[finite]
        self.sums = [a + b for a, b in zip(self.sums, good.double().sum(0).tolist(), strict=True)]
        self.steps += good.shape[0]  # finite (process, step) rows
        self.count = 0

    def log_means(self) -> dict[str, float]:
        """Means over the finite steps since the last call (averaged over processes); resets them."""
        n = max(self.steps, 1e-12)
        loss, rec, kl = (v / n for v in self.sums)
        self.sums, self.steps = [0.0, 0.0, 0.0], 0
        return {"loss": loss, "rec_loss": rec, "kl_loss": kl}


class _StepScalars(Mapping[str, float]):
    """loss / rec_loss / kl_loss / lr of one step, read from the device only when first accessed."""

    def __init__(self, means: torch.Tensor, lr: float):
        self._means, self._lr = means, lr
        self._values: dict[str, float] | None = None

    def _load(self) -> dict[str, float]:
        if self._values is None:
            loss, rec, kl = self._means.tolist()
            self._values = {"loss": loss, "rec_loss": rec, "kl_loss": kl, "lr": self._lr}
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(("loss", "rec_loss", "kl_loss", "lr"))

    def __len__(self) -> int:
        return 4


# ---------------------------------------------------------------------------------------------
# the loop


class _Trainer:
    """One training run: holds the prepared objects and the state the loop advances."""

    def __init__(self, cfg: RunConfig, run_dir: Path, accelerator: Any, model: Any, train_ds: Any, val_ds: Any | None):
        self.cfg, self.run_dir, self.acc = cfg, run_dir, accelerator
        self.main = accelerator.is_main_process
        t = cfg.train
        sized = hasattr(train_ds, "__len__")
        loader_kwargs = {"batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers, "drop_last": False}
        if sized:
            loader_kwargs["sampler"] = EpochSampler(len(train_ds), cfg.seed)
        self.train_ds = train_ds
        train_loader = torch.utils.data.DataLoader(train_ds, **loader_kwargs)
        if t.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        self.raw_optimizer = torch.optim.AdamW(
            model.parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
        )
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, self.raw_optimizer, train_loader)
        self.vae = accelerator.unwrap_model(self.model)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / t.gradient_accumulation_steps) if sized else None
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        elif self.steps_per_epoch is None:
            raise VaedynError("a streamed dataset has no length: set train.max_steps instead of train.num_train_epochs")
        else:
            self.total_steps = t.num_train_epochs * self.steps_per_epoch
        self.lr_scheduler = accelerator.prepare(
            _lr_scheduler(cfg, self.raw_optimizer, self.total_steps, accelerator.num_processes)
        )
        self.val_loader = None
        if val_ds is not None:
            val_loader = torch.utils.data.DataLoader(
                val_ds, batch_size=cfg.data.validation_batch_size, shuffle=False, num_workers=cfg.data.num_workers
            )
            self.val_loader = accelerator.prepare(val_loader)
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.state)
        accelerator.register_save_state_pre_hook(self._plain_weights_on_save)
        accelerator.register_load_state_pre_hook(self._plain_model_on_load)
        self.capture = _MomentsCapture(self.vae)
        self.noise = SampleNoise(
            accelerator.device, cfg.seed, cfg.data.batch_size, accelerator.process_index, accelerator.num_processes
        )
        self.window = _LossWindow(accelerator, cfg.log.log_interval)
        self.hooks: list[TrainHook] = []

    def start(self, resume_dir: Path | None) -> None:
        """Build the hooks (the run folder exists now), then load the checkpoint to resume from."""
        resume_step = artifacts.parse_step(resume_dir.name) if resume_dir is not None else None
        if resume_dir is not None:
            self._check_processes(resume_dir)
        ctx = TrainContext(
            self.cfg, self.acc, self.model, self.optimizer, self.run_dir, resume_step, self.train_loader, self.hooks
        )
        for factory in HOOK_FACTORIES:
            hook = factory(ctx)
            if hook is not None:
                self.hooks.append(hook)
        if resume_dir is not None:
            self._load(resume_dir, resume_step)

    # -- checkpoint plumbing ----------------------------------------------------------------

    def _plain_weights_on_save(self, models: list, weights: list, _output_dir: str) -> None:
        """Step folders hold the bare AutoencoderKL state dict (no DDP `module.` prefix), so that
        `vaedyn eval`/`track` load them like any checkpoint, whatever the number of processes."""
        for i, m in enumerate(models):
            if i < len(weights):
                weights[i] = self.acc.unwrap_model(m).state_dict()

    def _plain_model_on_load(self, models: list, _input_dir: str) -> None:
        models[:] = [self.acc.unwrap_model(m) for m in models]

    def _check_processes(self, resume_dir: Path) -> None:
        """A checkpoint resumes under as many processes as wrote it (its position in the epoch counts
        per-process micro-batches); checked before any hook touches the run folder."""
        saved_by = len(list(resume_dir.glob("random_states_*.pkl")))  # accelerate writes one per process
        if saved_by and saved_by != self.acc.num_processes:
            raise VaedynError(
                f"{resume_dir} was written by {saved_by} processes, this run has {self.acc.num_processes}; "
                f"resume it with {saved_by} processes (see README, Several GPUs)"
            )

    def _load(self, resume_dir: Path, resume_step: int | None) -> None:
        try:
            self.acc.load_state(str(resume_dir))
        except Exception as e:  # noqa: BLE001 - accelerate raises many types for a foreign checkpoint
            raise VaedynError(
                f"cannot resume from {resume_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                "the checkpoint does not match this config (model, optimizer or tracked state)"
            ) from None
        if self.state.global_step != resume_step:
            raise VaedynError(f"{resume_dir} holds the state of step {self.state.global_step}, not {resume_step}")
        unfinished = self.state.global_step == self.total_steps and not (self.run_dir / artifacts.FINAL_DIR).is_dir()
        if self.state.global_step >= self.total_steps and not unfinished:  # else: only final/ is left to write
            raise VaedynError(
                f"{resume_dir} is at step {self.state.global_step}, already at train.max_steps ({self.total_steps}); "
                "raise train.max_steps (or num_train_epochs) to train further"
            )

    def save_checkpoint(self) -> Path:
        """accelerate state + diffusers model config + run config into checkpoints/step-NNNNNN, atomically."""
        self.check_finite()
        for hook in self.hooks:
            hook.before_save(self.state.global_step)
        root = self.run_dir / artifacts.CHECKPOINTS_DIR
        name = artifacts.step_dir_name(self.state.global_step)
        tmp = root / f"{TMP_PREFIX}{name}"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        target = root / name
        if self.main:
            self.vae.save_config(str(tmp))
            (tmp / artifacts.RUN_CONFIG_IN_CHECKPOINT).write_text(self.cfg.to_yaml())
            faults.maybe_fail("checkpoint_save", self.state.global_step)
            artifacts.replace_dir(tmp, target)
            limit = self.cfg.train.checkpoints_total_limit
            if limit is not None:
                for _, old in artifacts.list_checkpoints(self.run_dir)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return target

    # -- validation ---------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean reconstruction MSE and KL over the validation split (posterior mode, all processes)."""
        from vaedyn_cli.evaluate import per_image_mse, reconstruct

        self.check_finite()
        self.vae.eval()
        recs, kls = [], []
        try:
            for x in self.val_loader:
                with self.acc.autocast():
                    recon, kl = reconstruct(self.vae, x)
                recs.append(self.acc.gather_for_metrics(per_image_mse(recon, x)))
                kls.append(self.acc.gather_for_metrics(kl.float()))
        finally:
            self.vae.train()
        metrics = {"val_rec_loss": torch.cat(recs).mean().item(), "val_kl_loss": torch.cat(kls).mean().item()}
        step = self.state.global_step
        self.acc.log(metrics, step=step)
        if self.main:
            with open(_validation_log(self.run_dir), "a") as f:
                f.write(json.dumps({"step": step, "epoch": self.state.epoch, **metrics}) + "\n")
        for hook in self.hooks:
            hook.on_validation(step, metrics)
        return metrics

    # -- non-finite losses --------------------------------------------------------------------

    def check_finite(self) -> None:
        """Raise (on every process) if some step had a non-finite loss (on_nonfinite=error)."""
        self.window.read()
        if self.cfg.train.on_nonfinite == "error" and self.window.first_bad is not None:
            raise RuntimeFailure(
                f"non-finite loss at step {self.window.first_bad}: lower train.learning_rate, use train.mixed_precision "
                "bf16 or no (the SDXL VAE overflows in fp16), or set train.on_nonfinite=skip"
            )

    def _step_is_finite(self, step_sums: torch.Tensor) -> bool:
        """on_nonfinite=skip: one flag agreed by all processes (a device sync per step)."""
        bad = (~torch.isfinite(step_sums).all()).float()
        return bool(self.acc.reduce(bad, reduction="sum").item() == 0)

    # -- main loop ----------------------------------------------------------------------------

    def run(self) -> int:
        acc, cfg, state = self.acc, self.cfg, self.state
        t = cfg.train
        skip_mode = t.on_nonfinite == "skip"
        progress = _Progress(self.main, self.total_steps, state.global_step)
        window_images, window_start, skipped = 0, time.perf_counter(), 0
        grad_norm: torch.Tensor | None = None
        new_step = True
        parts: list[torch.Tensor] = []  # (loss, rec, kl) of each micro-batch of the step
        try:
            while state.global_step < self.total_steps:
                self.train_loader.set_epoch(state.epoch)
                if hasattr(self.train_ds, "epoch"):
                    self.train_ds.epoch = state.epoch
                loader = self.train_loader
                if state.batch_in_epoch:
                    loader = acc.skip_first_batches(self.train_loader, state.batch_in_epoch)
                for x in loader:
                    step = state.global_step + 1
                    if new_step:
                        new_step, parts = False, []
                        for hook in self.hooks:
                            hook.begin_step(step)
                    with acc.accumulate(self.model):
                        noise = self.noise.generators(state.epoch, state.batch_in_epoch, x.shape[0])
                        loss, rec, kl = training_loss(self.model, self.capture, x, noise, t.kl_weight)
                        acc.backward(loss)
                        state.batch_in_epoch += 1
                        parts.append(torch.stack([loss.detach(), rec.detach(), kl.detach()]))
                        window_images += x.shape[0] * acc.num_processes
                        if acc.sync_gradients:
                            faults.maybe_fail("step", step)
                            for hook in self.hooks:
                                hook.after_backward(step)
                            means = parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)
                            finite = self._step_is_finite(means) if skip_mode else True
                            if finite:
                                log_now = step % cfg.log.log_interval == 0
                                if t.max_grad_norm is not None:
                                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
                                elif log_now:
                                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), float("inf"))
                                self.optimizer.step()
                            else:
                                skipped += 1
                            self.lr_scheduler.step()
                            self.optimizer.zero_grad(set_to_none=True)
                    if not acc.sync_gradients:
                        continue
                    # one optimizer step done
                    state.global_step = step
                    new_step = True
                    self.window.record(step, means)
                    lr = self.lr_scheduler.get_last_lr()[0]
                    if self.hooks:
                        scalars = _StepScalars(means, lr)
                        for hook in self.hooks:
                            hook.end_step(step, scalars)
                    progress.advance()
                    end_of_epoch = acc.gradient_state.end_of_dataloader
                    if step % cfg.log.log_interval == 0:
                        self.check_finite()
                        values = {**self.window.log_means(), "lr": lr}
                        if grad_norm is not None:
                            values["grad_norm"] = float(grad_norm)
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        values["images_per_s"] = window_images / elapsed
                        if skip_mode:
                            values["skipped_steps"] = float(skipped)
                        acc.log(values, step=step)
                        progress.show(step, self.total_steps, values)
                        window_images, window_start = 0, time.perf_counter()
                    if end_of_epoch:
                        state.epoch += 1
                        state.batch_in_epoch = 0
                    if self.val_loader is not None and self._validation_due(step, end_of_epoch):
                        metrics = self.validate()
                        progress.say(
                            f"validation at step {step}: rec {metrics['val_rec_loss']:.5g} kl {metrics['val_kl_loss']:.5g}"
                        )
                    if step % t.save_interval == 0:
                        path = self.save_checkpoint()
                        progress.say(f"saved {path}")
                    if state.global_step >= self.total_steps or end_of_epoch:
                        break
            self.check_finite()
            if skipped and self.main:
                log.warning("skipped %d optimizer steps with a non-finite loss", skipped)
        finally:
            progress.close()
        return state.global_step

    def _validation_due(self, step: int, end_of_epoch: bool) -> bool:
        t = self.cfg.train
        if t.validation_unit == "step":
            return step % t.validation_interval == 0
        return end_of_epoch and self.state.epoch % t.validation_interval == 0

    def close(self) -> None:
        errors = []
        for hook in self.hooks:
            try:
                hook.close()
            except Exception as e:  # noqa: BLE001 - close every hook, report the first failure
                errors.append(e)
        self.capture.handle.remove()
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------------------------------
# the stage


def train(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train the configured VAE into `<output_dir>/<run_name>/`; returns the run folder.

    On a non-finite loss, `train.on_nonfinite=error` stops with a RuntimeFailure naming the first bad
    step (checked at every log, validation and checkpoint, before anything is saved); `skip` drops
    that optimizer update (gradients zeroed, weights and Adam moments untouched) while the step
    counter and the LR schedule still advance, so step numbers keep matching the data position.
    """
    from accelerate.utils import set_seed

    from vaedyn_cli import data as data_mod
    from vaedyn_cli import model as model_mod

    if resume is not None and overwrite:
        raise VaedynError("--resume and --overwrite exclude each other: resume keeps the run folder, overwrite deletes it")
    run_dir = cfg.run_dir
    if resume is None and run_dir.exists() and not overwrite:
        raise VaedynError(
            f"run folder {run_dir} already exists: pass --resume latest to continue it, --overwrite to start over, "
            "or choose another run_name"
        )
    _check_output_dir(run_dir)
    _check_report_to(cfg.log.report_to)
    resume_dir = _resolve_resume(cfg, resume)
    resume_step = artifacts.parse_step(resume_dir.name) if resume_dir is not None else None
    finished = (run_dir / artifacts.FINAL_DIR).is_dir() or (resume_step or 0) > (cfg.train.max_steps or 0)
    if resume_step is not None and cfg.train.max_steps is not None and resume_step >= cfg.train.max_steps and finished:
        # (a run killed after its last checkpoint but before final/ resumes only to write final/)
        raise VaedynError(
            f"{resume_dir} is at step {resume_step}, already at train.max_steps ({cfg.train.max_steps}); "
            "raise train.max_steps to train further"
        )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save/load lines, unless --debug
    # Inputs first: data, model and accelerate settings fail here, before anything is written.
    train_ds = data_mod.train_dataset(cfg.data, cfg.seed)
    val_ds = data_mod.validation_dataset(cfg.data, cfg.seed) if cfg.data.do_validation else None
    for ds in (train_ds, val_ds):  # decode one image: a split without readable images fails before any write
        if ds is not None and hasattr(ds, "__len__"):
            ds[0]
    vae = model_mod.build_model(cfg.model, cfg.seed)
    if resume_dir is not None:
        _check_resume_fits(resume_dir, vae)
    set_seed(cfg.seed)
    logs_dir = run_dir / artifacts.LOGS_DIR
    accelerator = _accelerator(cfg, run_dir, logs_dir)
    trainer = _Trainer(cfg, run_dir, accelerator, vae, train_ds, val_ds)
    model_mod.warn_fp16(cfg.train.mixed_precision)  # after the input checks: an input error stays one line
    main = accelerator.is_main_process
    created = resume is None or not run_dir.exists()
    started = discard = False
    try:
        if main:
            if overwrite and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in (run_dir / artifacts.CHECKPOINTS_DIR).glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        trainer.start(resume_dir)
        if main:
            _atomic_write(run_dir / artifacts.CONFIG_FILE, cfg.to_yaml())
            if resume_dir is not None:
                log.info("resuming %s from step %d", run_dir, trainer.state.global_step)
                _drop_later_checkpoints(run_dir, trainer.state.global_step)
                _truncate_validation(run_dir, trainer.state.global_step)
        accelerator.wait_for_everyone()
        accelerator.init_trackers(cfg.run_name, config=_flat_config(cfg))
        started = True
        step = trainer.run()
        accelerator.wait_for_everyone()
        if main:
            tmp = run_dir / f"{TMP_PREFIX}{artifacts.FINAL_DIR}"
            shutil.rmtree(tmp, ignore_errors=True)
            model_mod.save_model(trainer.vae, tmp, cfg, step=step)
            artifacts.replace_dir(tmp, run_dir / artifacts.FINAL_DIR)
        accelerator.wait_for_everyone()
    except BaseException:
        discard = not started and created and main  # nothing half-written: the run never began
        raise
    finally:
        try:
            trainer.close()  # before discarding: the hooks' writers still hold files in the run folder
        finally:
            accelerator.end_training()
            if discard:
                shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def launched_processes() -> int:
    """How many processes the launcher (torchrun, `accelerate launch`, MPI) started; 1 without one."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def _no_accelerator_device() -> bool:
    """No GPU-like device for the processes to use (accelerate's multi-device backends)."""
    from accelerate import utils

    if torch.cuda.is_available():
        return False
    checks = ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available", "is_sdaa_available")
    return not any(getattr(utils, name, lambda: False)() for name in checks)


def _accelerator(cfg: RunConfig, run_dir: Path, logs_dir: Path) -> Any:
    """The Accelerator; several launched processes on a machine without GPUs train together on CPU
    (gloo): accelerate does that only when asked for the CPU before its state exists, and would
    otherwise set up every process as a lone one."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    launched = launched_processes()
    cpu = launched > 1 and _no_accelerator_device()
    try:
        if cpu:
            PartialState(cpu=True)
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.train.gradient_accumulation_steps),
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(logs_dir)),
            log_with=_trackers(cfg, logs_dir) or None,
        )
    except ValueError as e:
        raise VaedynError(f"train.mixed_precision={cfg.train.mixed_precision}: {str(e).splitlines()[0]}") from None
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeFailure(
            f"launched as {launched} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train alone and overwrite the run folder; launch with "
            "`accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N -m vaedyn_cli train`"
        )
    return accelerator


def is_main_process() -> bool:
    """Whether this is the process that writes artifacts and stdout (always true without a launcher)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _drop_later_checkpoints(run_dir: Path, step: int) -> None:
    """A resumed run abandons what came after its checkpoint (as the trace store truncates to it)."""
    for s, path in artifacts.list_checkpoints(run_dir):
        if s > step:
            log.warning("removing %s: it belongs to the continuation abandoned by resuming from step %d", path, step)
            shutil.rmtree(path, ignore_errors=True)


def _tracker_factory(ctx: TrainContext) -> TrainHook | None:
    """The trace store's Tracker (track.enabled), registered first so later hooks see its record."""
    from vaedyn_cli.track import make_tracker

    return make_tracker(ctx)


HOOK_FACTORIES.append(_tracker_factory)


def _nudge_factory(ctx: TrainContext) -> TrainHook | None:
    """In-training nudges (nudge.enabled), right after the tracker whose live trace they classify."""
    from vaedyn_cli.nudge import make_training_nudge

    return make_training_nudge(ctx)


HOOK_FACTORIES.append(_nudge_factory)

import vaedyn_cli.tb  # noqa: E402,F401  registers the TensorBoard hook (dormant counts, |gamma|, reconstructions)
