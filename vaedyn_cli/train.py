"""`vaedyn train`: train (or fine-tune) the configured VAE into `<output_dir>/<run_name>/`.

The stage checks every input before anything is written (data, model, resume point, accelerate
settings), sets up accelerate (several launched processes without GPUs train together on CPU),
assembles the hooks (by default `DEFAULT_HOOKS`: the trace store's Tracker, then the in-training
nudge that reads it, then the TensorBoard view), runs the loop (`vaedyn_cli.trainer`) and saves
`final/`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vaedyn_cli import artifacts
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.hooks import HookFactory
from vaedyn_cli.live_nudge import make_training_nudge
from vaedyn_cli.tb import tensorboard_hook
from vaedyn_cli.tracker import make_tracker
from vaedyn_cli.trainer import Trainer, truncate_validation

log = logging.getLogger(__name__)

# Built and called in this order: the tracker first, so that the nudge after it sees its record.
DEFAULT_HOOKS: tuple[HookFactory, ...] = (make_tracker, make_training_nudge, tensorboard_hook)


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


def _check_nudge_rule(cfg: RunConfig) -> None:
    """An in-training nudge classifies the live trace: it must record what classify.method reads."""
    if not cfg.nudge.enabled:
        return
    from vaedyn_cli.classification import unrecorded_statistics

    missing = unrecorded_statistics(cfg.classify.method, cfg.track.extra_statistics)
    if missing:
        raise VaedynError(
            f"classify.method {cfg.classify.method} (the in-training nudge's rule) reads {', '.join(missing)}, which "
            f"the trace records only when asked: set track.extra_statistics=[{', '.join(missing)}]"
        )


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
    if not (path / artifacts.ACCELERATE_MODEL_FILE).is_file() or not (path / artifacts.TRAINING_STATE_FILE).is_file():
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




# ---------------------------------------------------------------------------------------------
# the stage


def train(
    cfg: RunConfig, resume: str | None = None, overwrite: bool = False, hooks: Sequence[HookFactory] | None = None
) -> Path:
    """Train the configured VAE into `<output_dir>/<run_name>/`; returns the run folder.

    `hooks`: the hook factories, built and called in this order (default `DEFAULT_HOOKS`; see
    `vaedyn_cli.hooks`).

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
    _check_nudge_rule(cfg)
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
    trainer = Trainer(cfg, run_dir, accelerator, vae, train_ds, val_ds, DEFAULT_HOOKS if hooks is None else hooks)
    model_mod.warn_fp16(cfg.train.mixed_precision)  # after the input checks: an input error stays one line
    main = accelerator.is_main_process
    created = resume is None or not run_dir.exists()
    started = discard = False
    try:
        if main:
            if overwrite and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            artifacts.remove_stale_temps(run_dir / artifacts.CHECKPOINTS_DIR)
        accelerator.wait_for_everyone()
        trainer.start(resume_dir)
        if main:
            artifacts.atomic_write_text(run_dir / artifacts.CONFIG_FILE, cfg.to_yaml())
            if resume_dir is not None:
                log.info("resuming %s from step %d", run_dir, trainer.state.global_step)
                _drop_later_checkpoints(run_dir, trainer.state.global_step)
                truncate_validation(run_dir, trainer.state.global_step)
        accelerator.wait_for_everyone()
        accelerator.init_trackers(cfg.run_name, config=_flat_config(cfg))
        started = True
        step = trainer.run()
        accelerator.wait_for_everyone()
        if main:
            with artifacts.atomic_folder(run_dir / artifacts.FINAL_DIR) as tmp:
                model_mod.save_model(trainer.vae, tmp, cfg, step=step)
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

