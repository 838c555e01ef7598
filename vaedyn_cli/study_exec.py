"""Executing a study's pending runs: each is `vaedyn train` (fresh, `--overwrite` or `--resume
latest`), then `vaedyn eval --ablate`, then `vaedyn classify`, through one of:

- in this process, one run after another (`--jobs 1`, the default);
- N subprocesses at a time (`--jobs N`), each with OMP_NUM_THREADS / MKL_NUM_THREADS set to
  cores // N (torch takes its intra-op thread count from them at start), stderr into
  `<study>/logs/<condition>/seed-<k>.log`;
- one submitit job per run (`--executor slurm`, or `submitit-local`: submitit's LocalExecutor,
  the same submission code without Slurm). A job with `slurm.gpus_per_job` > 1 trains under
  `accelerate launch --multi_gpu`;
- or nowhere: `shell_line` is the one shell line per run that `--print-commands` prints.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaedyn_cli import artifacts
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.study_plan import DONE, FAILED, RESTART, RESUME, SLURM_DIR, TRAINS, RunPlan, Study

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------------------------
# the commands


def _train_flags(status: str) -> list[str]:
    return ["--resume", "latest"] if status == RESUME else ["--overwrite"] if status == RESTART else []


def stage_commands(run: RunPlan, ablate: list[str], python: str = "python",
                   launcher: list[str] | None = None) -> list[list[str]]:
    """The CLI calls a run still needs, in order: train (when it is not trained), eval, classify.
    `launcher` replaces `python -m` for train (e.g. `accelerate launch ... -m`)."""
    cli = [python, "-m", "vaedyn_cli"]
    cmds = []
    if run.status in TRAINS:
        cmds.append([*(launcher or [python, "-m"]), "vaedyn_cli", "train", "-c", str(run.config_path),
                     *_train_flags(run.status)])
    cmds.append([*cli, "eval", "--checkpoint", str(run.run_dir), *(a for s in ablate for a in ("--ablate", s))])
    cmds.append([*cli, "classify", str(run.run_dir), "--format", "json"])
    return cmds


def shell_line(run: RunPlan, ablate: list[str]) -> str:
    """One shell line for a pending run (paths quoted; the classification JSON goes to /dev/null: the
    store's `classification` group holds it)."""
    cmds = [shlex.join(c) for c in stage_commands(run, ablate)]
    cmds[-1] += " > /dev/null"
    return " && ".join(cmds)


def available_cores() -> int:
    """The cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def thread_env(jobs: int, cores: int | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one of `jobs` concurrent runs: cores // jobs threads each (at least 1)."""
    env = dict(os.environ if base is None else base)
    n = max(1, (cores if cores is not None else available_cores()) // jobs)
    env.update({k: str(n) for k in THREAD_VARS})
    return env


# ---------------------------------------------------------------------------------------------
# in this process


def run_in_process(run: RunPlan, ablate: list[str]) -> None:
    """Train (as its status needs), evaluate with the ablation, classify: the stages' own functions."""
    from vaedyn_cli import classify, evaluate, train

    if run.status in TRAINS:
        train.train(run.cfg, resume="latest" if run.status == RESUME else None, overwrite=run.status == RESTART)
    evaluate.evaluate(str(run.run_dir), ablate=list(ablate))
    classify.classify_store(run.run_dir / artifacts.TRACE_DIR)


def run_subprocesses(run: RunPlan, ablate: list[str], env: dict[str, str], python: str = sys.executable,
                     launcher: list[str] | None = None) -> None:
    """The same stages as CLI subprocesses; stderr is appended to the run's log file."""
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    for cmd in stage_commands(run, ablate, python=python, launcher=launcher):
        with run.log_path.open("a") as log_file:
            log_file.write(f"$ {shlex.join(cmd)}\n")
            log_file.flush()
            rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log_file, check=False).returncode
        if rc:
            last = _last_line(run.log_path)
            raise RuntimeFailure(f"`vaedyn {cmd[cmd.index('vaedyn_cli') + 1]}` exited {rc} ({last}); see {run.log_path}")


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------------------------------------
# submitit


def import_submitit() -> Any:
    """submitit, or one line saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise VaedynError("--executor slurm needs submitit, which is not installed: pip install 'vaedyn[slurm]'") from None
    return submitit


SLURM_ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def check_not_in_flight(study: Study, pending: list[RunPlan]) -> None:
    """Refuse to submit a run whose job from an earlier `vaedyn study` (stopped while waiting) is still
    queued or running: two jobs would write one run folder."""
    submitit = import_submitit()
    for r in pending:
        if r.job_id is None:
            continue
        state = str(submitit.SlurmJob(folder=str(study.folder / SLURM_DIR / "%j"), job_id=r.job_id).state)
        if state.split()[0] in SLURM_ACTIVE:
            raise VaedynError(
                f"run {r.key} is still in Slurm job {r.job_id} ({state}) submitted by an earlier `vaedyn study`; "
                f"wait for it to end (or `scancel {r.job_id}`), then rerun"
            )


@dataclass
class JobSpec:
    """What one submitit job needs (pickled to the job): a run, how to train it, its share of cores."""

    run: RunPlan
    ablate: list[str]
    gpus: int
    threads: int


def run_job(spec: JobSpec) -> str:
    """The body of a submitit job: the run's stages, with `accelerate launch` for a multi-GPU train.
    Without OMP_NUM_THREADS in the job's environment, torch gets the job's cores (`threads`)."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # the job's log: as the CLI's
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env.update({k: str(spec.threads) for k in THREAD_VARS})
        torch.set_num_threads(spec.threads)
    run = spec.run
    if spec.gpus > 1 and run.status in TRAINS:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(spec.gpus), "-m"]
        run_subprocesses(run, spec.ablate, env, launcher=launcher)
    else:
        run_in_process(run, spec.ablate)
    return str(run.run_dir)


def _executor(study: Study, cluster: str) -> Any:
    submitit = import_submitit()
    opts = study.spec.slurm
    ex = submitit.AutoExecutor(folder=str(study.folder / SLURM_DIR / "%j"), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": opts.timeout_min, "cpus_per_task": opts.cpus_per_job,
                              "name": f"vaedyn-{study.name}"}
    if cluster == "slurm":
        params.update(gpus_per_node=opts.gpus_per_job, slurm_additional_parameters=dict(opts.additional))
        params.update({f"slurm_{k}": v for k, v in (("partition", opts.partition), ("account", opts.account)) if v})
        if opts.mem_gb is not None:
            params["mem_gb"] = opts.mem_gb
    ex.update_parameters(**params)
    return ex


def _submitit(study: Study, pending: list[RunPlan], cluster: str, on_change: Callable[[], Any]) -> None:
    ex = _executor(study, cluster)
    opts = study.spec.slurm
    gpus = opts.gpus_per_job if cluster == "slurm" else 0
    # a local job shares this machine with the others, all started at once
    threads = opts.cpus_per_job if cluster == "slurm" else max(1, available_cores() // len(pending))
    jobs = [(r, ex.submit(run_job, JobSpec(r, study.ablate, gpus, threads))) for r in pending]
    for r, job in jobs:
        r.job_id = str(job.job_id)
    on_change()
    log.info("submitted %d jobs (%s); waiting for them (their logs: %s)", len(jobs),
             ", ".join(r.job_id or "" for r, _ in jobs), study.folder / SLURM_DIR)
    for r, job in jobs:
        try:
            job.result()
            r.status, r.error = DONE, None
        except Exception as e:  # noqa: BLE001 - a failed job is recorded, the others still count
            r.status, r.error = FAILED, _one_line(e)
        log.info("%s: %s", r.key, r.status if r.error is None else f"failed: {r.error}")
        on_change()


# ---------------------------------------------------------------------------------------------
# dispatch


def _one_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(e).__name__}: {text}"[:300] if not isinstance(e, VaedynError) else text[:300]


def execute(study: Study, pending: list[RunPlan], *, executor: str, jobs: int, on_change: Callable[[], Any]) -> None:
    """Run every pending run; each ends DONE or FAILED (with `error`), and `on_change` is called after
    each, from this thread (study.json follows the runs)."""
    if executor != "local":
        _submitit(study, pending, "slurm" if executor == "slurm" else "local", on_change)
        return
    if jobs == 1:
        for r in pending:
            log.info("%s: %s", r.key, r.status)
            try:
                run_in_process(r, study.ablate)
                r.status, r.error = DONE, None
            except Exception as e:  # noqa: BLE001 - record the failure and go on with the other runs
                r.status, r.error = FAILED, _one_line(e)
                log.warning("%s failed: %s", r.key, r.error)
            on_change()
        return
    env = thread_env(jobs)
    log.info("%d runs, %d at a time, %s threads each", len(pending), jobs, env[THREAD_VARS[0]])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_subprocesses, r, study.ablate, env): r for r in pending}
        for future in as_completed(futures):
            r = futures[future]
            error = future.exception()
            r.status, r.error = (DONE, None) if error is None else (FAILED, _one_line(error))
            log.info("%s: %s", r.key, r.status if error is None else f"failed: {r.error}")
            on_change()
