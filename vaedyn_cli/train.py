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

from vaedyn_cli import artifacts, inputs
from vaedyn_cli.config import RunConfig, config_from_text, flatten, load_config, resume_changes
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.hooks import HookFactory
from vaedyn_cli.live_nudge import make_training_nudge
from vaedyn_cli.tb import tensorboard_hook
from vaedyn_cli.tracker import make_tracker
from vaedyn_cli.trainer import Trainer

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
    return {k: v if isinstance(v, bool | int | float | str) else json.dumps(v)
            for k, v in flatten(cfg.model_dump(mode="json")).items()}


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


def _settings_changes(cfg: RunConfig, resume_dir: Path) -> dict[str, tuple[Any, Any]]:
    """The settings that differ from those the checkpoint was trained with: refused (VaedynError)
    where they change the trajectory, else returned to be applied and recorded (config.RESUME_MAY_CHANGE)."""
    from vaedyn_cli.model import resolve_checkpoint

    stored = resolve_checkpoint(resume_dir).config
    if stored is None:
        raise VaedynError(f"--resume {resume_dir}: the checkpoint carries no {artifacts.RUN_CONFIG_IN_CHECKPOINT}, so "
                          "vaedyn cannot tell whether this config continues it; pick another checkpoint")
    refused, allowed = resume_changes(stored, cfg)
    if refused:
        shown = "; ".join(f"{k} {_show(a)} (trained) vs {_show(b)} (given)" for k, (a, b) in refused.items())
        raise VaedynError(
            f"--resume {resume_dir}: {len(refused)} setting(s) differ from the run's and would change its trajectory: "
            f"{shown}; resume with the run's own settings ({artifacts.CONFIG_FILE} of the run) or start a new run "
            "(another run_name)"
        )
    return allowed


def _show(value: Any) -> str:
    return inputs.shorten(json.dumps(value), 40)


def _record_changes(cfg: RunConfig, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Say and record (resumes.jsonl) the settings a resumed run changed; warn where a longer run
    re-stretches an LR schedule that decays over the run's length."""
    log.warning("resuming at step %d with changed settings: %s (recorded in %s)", step,
                ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items()), artifacts.RESUMES_FILE)
    if {"train.max_steps", "train.num_train_epochs"} & changes.keys() and cfg.train.lr_scheduler_type not in {
            "constant", "constant_with_warmup"}:
        log.warning("the %s learning rate schedule now spans the new length: from step %d on it follows the longer "
                    "run's schedule, not the one this run started with", cfg.train.lr_scheduler_type, step)
    record = {"step": step, "changed": {k: [a, b] for k, (a, b) in changes.items()}}
    with open(cfg.run_dir / artifacts.RESUMES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """The run folder can be made (no file in the way), continued (it is a run folder), or started
    over (vaedyn made it and nothing else is in it)."""
    fix = "set output_dir (or run_name) to a folder path"
    artifacts.check_creatable(run_dir, "run folder", fix)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise VaedynError(f"run folder {run_dir} is a file or a symbolic link, not a folder vaedyn made; {fix}")
    if not run_dir.exists():
        return
    if resume is None and not overwrite:
        raise VaedynError(
            f"run folder {run_dir} already exists: pass --resume latest to continue it, --overwrite to start over, "
            "or choose another run_name"
        )
    if overwrite:
        artifacts.check_replaceable(run_dir, artifacts.RUN, "run folder")
    elif artifacts.marker_kind(run_dir) not in (None, artifacts.RUN.name):
        raise VaedynError(f"{run_dir} is not a run folder (its {artifacts.MARKER_FILE} marker says otherwise); "
                          "choose another run_name")


def _start_over(run_dir: Path) -> None:
    """--overwrite: empty the run folder (checked again now that this process holds its lock) but
    for the lock itself, so that no second trainer can slip in while it is rebuilt."""
    artifacts.check_replaceable(run_dir, artifacts.RUN, "run folder")
    keep = {artifacts.TRAIN_LOCK_FILE, artifacts.TRAIN_PID_FILE}
    for entry in run_dir.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


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
    has_state = any((path / name).is_file() for name in (artifacts.TRAINING_STATE_FILE, artifacts.LEGACY_TRAINING_STATE_FILE))
    if not (path / artifacts.ACCELERATE_MODEL_FILE).is_file() or not has_state:
        raise VaedynError(f"--resume {resume}: the checkpoint is incomplete (no model or training state); pick another")
    owner = artifacts.run_of(path)
    if cfg.run_dir.exists() and (owner is None or owner.resolve() != cfg.run_dir.resolve()):
        raise VaedynError(
            f"--resume {resume}: the checkpoint belongs to {owner or 'no run folder'}, not to run folder {cfg.run_dir}, "
            "which exists: resuming would cut that run's trace; set run_name to a new folder to branch off"
        )
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
    _check_run_dir(run_dir, resume, overwrite)
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
    vae = model_mod.build_model(ensure_base_model(cfg).model, cfg.seed)
    changes: dict[str, tuple[Any, Any]] = {}
    if resume_dir is not None:
        _check_resume_fits(resume_dir, vae)
        changes = _settings_changes(cfg, resume_dir)
    set_seed(cfg.seed)
    logs_dir = run_dir / artifacts.LOGS_DIR
    accelerator = _accelerator(cfg, run_dir, logs_dir)
    trainer = Trainer(cfg, run_dir, accelerator, vae, train_ds, val_ds, DEFAULT_HOOKS if hooks is None else hooks)
    model_mod.warn_fp16(cfg.train.mixed_precision)  # after the input checks: an input error stays one line
    main = accelerator.is_main_process
    created = resume is None or not run_dir.exists()
    lock = artifacts.RunLock(run_dir) if main else None  # only the main process writes the run folder
    started = discard = owned = False
    try:
        if lock is not None:
            if resume is None and not overwrite:
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                try:
                    run_dir.mkdir()
                except FileExistsError:
                    raise VaedynError(f"run folder {run_dir} was just made by another process; choose another run_name") from None
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            owned = True
            if overwrite:
                _start_over(run_dir)
            if created:
                artifacts.write_marker(run_dir, artifacts.RUN)
            artifacts.remove_stale_temps(run_dir / artifacts.CHECKPOINTS_DIR)
        accelerator.wait_for_everyone()
        trainer.start(resume_dir)  # loads the checkpoint, then drops what came after it
        if main:
            if not created and artifacts.marker_kind(run_dir) is None:
                artifacts.write_marker(run_dir, artifacts.RUN)  # a run of an earlier vaedyn, resumed by this one
            artifacts.atomic_write_text(run_dir / artifacts.CONFIG_FILE, cfg.to_yaml())
            if resume_dir is not None:
                log.info("resuming %s from step %d", run_dir, trainer.state.global_step)
                if changes:
                    _record_changes(cfg, trainer.state.global_step, changes)
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
        discard = not started and created and owned  # nothing half-written: the run never began
        raise
    finally:
        try:
            trainer.close()  # before discarding: the hooks' writers still hold files in the run folder
        finally:
            accelerator.end_training()
            if discard:
                shutil.rmtree(run_dir, ignore_errors=True)
            if lock is not None:
                lock.release()
    return run_dir


BASE_CONFIG_SUFFIXES = (".yaml", ".yml")


def base_config(cfg: RunConfig) -> RunConfig | None:
    """The run config that `model.pretrained` names when it is a vaedyn config file (.yaml/.yml):
    the model is that run's `final/`, built by vaedyn itself. None for any other source."""
    source = cfg.model.pretrained
    if not source or not source.endswith(BASE_CONFIG_SUFFIXES):
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise VaedynError(
            f"model.pretrained {source}: no such config file (a .yaml names the vaedyn run config whose final/ "
            "model to start from); fix the path, relative to the folder you run vaedyn in"
        )
    base = load_config(path)
    if base_config(base) is not None:
        raise VaedynError(f"model.pretrained {source} names a config whose model.pretrained is a config too; "
                          "build the base model from a preset or from weights")
    return base


BASE_READY, BASE_BUILD, BASE_RESUME, BASE_REBUILD = "ready", "build", "resume", "rebuild"


def base_status(cfg: RunConfig) -> tuple[RunConfig, str] | None:
    """The base run config that `model.pretrained` names and what its run folder needs: `ready`
    (its final/ was built from exactly this config), `resume` (interrupted after a checkpoint),
    `rebuild` (built from other settings), `build` (anything else). None when it names no config."""
    base = base_config(cfg)
    if base is None:
        return None
    built_from = base.run_dir / artifacts.FINAL_DIR / artifacts.RUN_CONFIG_IN_CHECKPOINT
    if built_from.is_file():
        stored = config_from_text(inputs.read_text(built_from, "stored config"), str(built_from))
        return base, BASE_READY if stored.model_dump(mode="json") == base.model_dump(mode="json") else BASE_REBUILD
    return base, BASE_RESUME if artifacts.latest_checkpoint(base.run_dir) is not None else BASE_BUILD


def base_train_flags(base: RunConfig, status: str) -> list[str]:
    """The `vaedyn train -c BASE` flags that bring a base run folder to `ready`."""
    if status == BASE_RESUME:
        return ["--resume", "latest"]
    return ["--overwrite"] if status == BASE_REBUILD or base.run_dir.exists() else []


def ensure_base_model(cfg: RunConfig) -> RunConfig:
    """`cfg` with `model.pretrained` pointing at the model it names: a base run config's `final/`
    (under that config's output_dir and run_name), trained first when it is not there (resumed
    from its latest checkpoint after an interruption, rebuilt when it was built from other
    settings), so the embedded experiment needs no download and every run of a study starts from
    the same weights. Any other source is returned as it is."""
    found = base_status(cfg)
    if found is None:
        return cfg
    base, status = found
    final = base.run_dir / artifacts.FINAL_DIR
    source = cfg.model.pretrained
    if status == BASE_READY:
        log.info("base model %s (from %s)", final, source)
        return _with_pretrained(cfg, final)
    if status == BASE_REBUILD:
        log.warning("%s was built from other settings than %s: rebuilding it", final, source)
    elif status == BASE_RESUME:
        log.info("finishing the base model %s from its latest checkpoint (%s)", base.run_dir, source)
    else:
        log.info("building the base model %s from %s (once; later runs reuse it)", base.run_dir, source)
    flags = base_train_flags(base, status)
    train(base, resume="latest" if "--resume" in flags else None, overwrite="--overwrite" in flags)
    return _with_pretrained(cfg, final)


def _with_pretrained(cfg: RunConfig, folder: Path) -> RunConfig:
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": str(folder)})})


def interrupt_hint(cfg: RunConfig, command: str) -> str:
    """What an interrupted `vaedyn train` says after its cleanup (the trace committed, the lock
    released, a run that never began removed): how to go on from what is on disk now."""
    run_dir = cfg.run_dir
    latest = artifacts.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is not None:
        return f"resume with: {command} --resume latest (continues from step {artifacts.parse_step(latest.name)})"
    if run_dir.is_dir():
        return (f"{run_dir} has no checkpoint yet (one every train.save_interval = {cfg.train.save_interval} steps): "
                f"start over with: {command} --overwrite")
    return f"nothing was written: start again with: {command}"


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


