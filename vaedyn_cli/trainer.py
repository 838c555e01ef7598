"""One training run's loop: the prepared objects, the optimizer steps with their hooks, validation,
atomic step checkpoints, and the state a checkpoint carries (global step, epoch, position in it).

Reproducibility by construction (`vaedyn_cli.randomness`): the data order of an epoch depends only
on (seed, epoch), and the posterior noise of an image only on (seed, epoch, its position in the
epoch's order), whatever the number of processes. A checkpoint stores the global step and the
position in the epoch, so a resumed run replays exactly what an uninterrupted one does: on CPU the
final weights are bitwise identical. Under N processes each takes every N-th micro-batch of that
order (accelerate's sharding), so N processes with data.batch_size B see the batches of one
process with N * B.

Crash safety: a checkpoint is written aside and renamed into place, and hooks commit what a resume
from it needs first (`TrainHook.before_save`: the trace up to that step), so a process killed at
any instant resumes from `latest` into the same numbers (see `vaedyn_cli.faults`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vaedyn_cli import artifacts, faults, inputs
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.hooks import HookFactory, TrainContext, TrainHook
from vaedyn_cli.loss import PosteriorCapture, training_loss
from vaedyn_cli.metrics import per_image_mse, reconstruct
from vaedyn_cli.randomness import EpochSampler, SampleNoise

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint as JSON (`artifacts.TRAINING_STATE_FILE`),
    not through accelerate's custom states, which it unpickles with `weights_only=False`."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed (this process)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: Any, where: str) -> None:
        """Set from a saved state; VaedynError naming `where` unless it holds exactly these counts."""
        names = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != names or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in state.values()):
            raise VaedynError(f"{where} is not a training state ({', '.join(sorted(names))}: counts); "
                              "the checkpoint is damaged: resume from another one")
        for key, value in state.items():
            setattr(self, key, value)


def _load_plain(path: Path, what: str) -> Any:
    """A torch.save file of accelerate's, read with `weights_only=True` (tensors, numbers, numpy
    arrays of RNG states: nothing that runs code), or a VaedynError that names it."""
    from accelerate.utils.other import load

    try:
        return load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - an UnpicklingError for a planted object, others for damage
        raise _not_plain(path.parent, f"{path.name} ({what})", e) from None


def _not_plain(folder: Path, what: str, err: Exception) -> VaedynError:
    return VaedynError(
        f"cannot resume from {folder}: {what} does not load as plain data ({type(err).__name__}: "
        f"{inputs.shorten(inputs.first_line(err), 80)}); it is damaged or holds objects that would run code, which "
        "vaedyn never loads: resume from another checkpoint"
    )


@contextlib.contextmanager
def _without(folder: Path, pattern: str) -> Iterator[Path]:
    """`folder` as seen without the files matching `pattern`: a temporary folder of links to the
    others (for accelerate's `load_state`, which unpickles every custom state it finds, unsafely)."""
    with tempfile.TemporaryDirectory(prefix="vaedyn-resume-") as view:
        for entry in folder.iterdir():
            if not entry.match(pattern):
                os.symlink(entry.resolve(), Path(view) / entry.name)
        yield Path(view)



# pragma: no mutate start  (mutation testing covers the resume path only: [tool.mutmut] in pyproject.toml)
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


class Trainer:
    """One training run: holds the prepared objects and the state the loop advances."""

    def __init__(self, cfg: RunConfig, run_dir: Path, accelerator: Any, model: Any, train_ds: Any, val_ds: Any | None,
                 hooks: Sequence[HookFactory] = ()):
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
        accelerator.register_save_state_pre_hook(self._plain_weights_on_save)
        accelerator.register_load_state_pre_hook(self._plain_model_on_load)
        self.capture = PosteriorCapture(self.vae)
        self.noise = SampleNoise(
            accelerator.device, cfg.seed, cfg.data.batch_size, accelerator.process_index, accelerator.num_processes
        )
        self.window = _LossWindow(accelerator, cfg.log.log_interval)
        self.factories = tuple(hooks)
        self.hooks: list[TrainHook] = []

    # pragma: no mutate end
    def start(self, resume_dir: Path | None) -> None:
        """Build the hooks (the run folder exists now), then load the checkpoint to resume from, and
        only once it has loaded completely drop what the run recorded after it."""
        resume_step = artifacts.parse_step(resume_dir.name) if resume_dir is not None else None
        if resume_dir is not None:
            self._check_processes(resume_dir)
        ctx = TrainContext(
            self.cfg, self.acc, self.model, self.optimizer, self.run_dir, resume_step, self.train_loader, self.hooks
        )
        for factory in self.factories:
            hook = factory(ctx)
            if hook is not None:
                self.hooks.append(hook)
        if resume_dir is not None:
            self._load(resume_dir, resume_step)
            for hook in self.hooks:
                hook.load_state(resume_dir)
            self._resumed(self.state.global_step)

    def _resumed(self, step: int) -> None:
        """The continuation abandoned by resuming from `step` goes: later checkpoints, validation and
        resume records (main process), and what the hooks recorded (the trace, its events)."""
        if self.main:
            for s, path in artifacts.list_checkpoints(self.run_dir):
                if s > step:
                    log.warning("removing %s: it belongs to the continuation abandoned by resuming from step %d", path, step)
                    shutil.rmtree(path)
            for name in (artifacts.VALIDATION_FILE, artifacts.RESUMES_FILE):
                artifacts.truncate_jsonl(self.run_dir / name, step)
        for hook in self.hooks:
            hook.resumed(step)

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
        saved_by = len(list(resume_dir.glob(artifacts.RANDOM_STATES_GLOB)))
        if saved_by and saved_by != self.acc.num_processes:
            raise VaedynError(
                f"{resume_dir} was written by {saved_by} processes, this run has {self.acc.num_processes}; "
                f"resume it with {saved_by} processes (see README, Several GPUs)"
            )

    def _load(self, resume_dir: Path, resume_step: int | None) -> None:
        """Load a checkpoint so that no file in it can run code: the training state from JSON (or an
        earlier vaedyn's pickle of it, read with weights_only=True), the RNG states and scheduler
        checked as plain data first (accelerate would swallow a failure of the one and reads both
        with weights_only=True), then `accelerate.load_state` (safetensors weights, optimizer with
        weights_only=True) on the folder without any custom-state pickle."""
        state_file = resume_dir / artifacts.TRAINING_STATE_FILE
        pickles = sorted(p.name for p in resume_dir.glob(artifacts.CUSTOM_STATE_GLOB))
        if state_file.is_file():
            if pickles:
                raise VaedynError(
                    f"cannot resume from {resume_dir}: it holds {pickles[0]}, which vaedyn does not write (its training "
                    f"state is {artifacts.TRAINING_STATE_FILE}); remove that file or resume from another checkpoint"
                )
            saved = inputs.read_json(state_file, "training state", "resume from another checkpoint")
        elif pickles == [artifacts.LEGACY_TRAINING_STATE_FILE]:
            saved = _load_plain(resume_dir / pickles[0], "training state of an earlier vaedyn")
        else:
            raise VaedynError(f"cannot resume from {resume_dir}: no {artifacts.TRAINING_STATE_FILE}; pick another checkpoint")
        self.state.load_state_dict(saved, str(state_file if state_file.is_file() else resume_dir / pickles[0]))
        rng = resume_dir / f"random_states_{self.acc.process_index}.pkl"
        if not rng.is_file() or not isinstance(_load_plain(rng, "random number generator states"), dict):
            raise VaedynError(f"cannot resume from {resume_dir}: {rng.name} is missing or damaged; resume from another "
                              "checkpoint")
        for scheduler in sorted(resume_dir.glob("scheduler*.bin")):
            _load_plain(scheduler, "learning rate schedule")
        try:
            with _without(resume_dir, artifacts.CUSTOM_STATE_GLOB) as view:
                self.acc.load_state(str(view))
        except pickle.UnpicklingError as e:  # (scheduler and RNG states passed above: the optimizer's)
            raise _not_plain(resume_dir, "the optimizer state", e) from None
        except Exception as e:  # noqa: BLE001 - accelerate raises many types for a foreign checkpoint
            raise VaedynError(
                f"cannot resume from {resume_dir}: {inputs.first_line(e) or type(e).__name__}; "
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
        tmp = artifacts.temp_path(root / name)
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        for hook in self.hooks:
            hook.save_state(tmp)
        self.acc.wait_for_everyone()
        target = root / name
        if self.main:
            self.vae.save_config(str(tmp))
            (tmp / artifacts.RUN_CONFIG_IN_CHECKPOINT).write_text(self.cfg.to_yaml())
            (tmp / artifacts.TRAINING_STATE_FILE).write_text(json.dumps(self.state.state_dict()) + "\n")
            faults.maybe_fail("checkpoint_save", self.state.global_step)
            artifacts.replace_dir(tmp, target)
            limit = self.cfg.train.checkpoints_total_limit
            if limit is not None:
                for _, old in artifacts.list_checkpoints(self.run_dir)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return target

    # -- validation ---------------------------------------------------------------------------

    # pragma: no mutate block  (from here to the end of the class; as above)
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean reconstruction MSE and KL over the validation split (posterior mode, all processes)."""
        self.check_finite()
        for hook in self.hooks:
            hook.before_validation(self.state.global_step)
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
            with open(self.run_dir / artifacts.VALIDATION_FILE, "a") as f:
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
            bad = getattr(self.train_ds, "skipped", ())
            if bad:
                log.warning("replaced %d unreadable training images by the next readable ones (data.on_bad_image=skip; "
                            "this process, data loader workers not counted)", len(bad))
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
