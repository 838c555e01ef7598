"""Names of every file and folder that stages exchange, defined once (STYLE 6).

A run folder holds `config.yaml`, `trace.zarr/`, `checkpoints/step-NNNNNN/`, `final/`,
`logs/` and `eval/`; see DESIGN.md "Run folder".
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

CONFIG_FILE = "config.yaml"
TRACE_DIR = "trace.zarr"
TRACK_TRACE_DIR = "trace-track.zarr"  # written by `vaedyn track` into the run its checkpoints belong to
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
LOGS_DIR = "logs"
EVAL_DIR = "eval"
REPORT_DIR = "report"  # written by `vaedyn report` for a run's trace
METRICS_FILE = "metrics.json"
NUDGE_FILE = "nudge.json"
VALIDATION_FILE = "validation.jsonl"  # one JSON line per validation during training: step, epoch, val_* metrics
# Written beside accelerate's own files in every step folder and in `final/`.
RUN_CONFIG_IN_CHECKPOINT = "vaedyn_config.yaml"
MODEL_CONFIG_FILE = "config.json"  # diffusers model config
STEP_FILE = "vaedyn_step.json"  # {"step": N} in final/ and nudged folders: the global step of the weights
ACCELERATE_MODEL_FILE = "model.safetensors"  # accelerate.save_state's name for model 0

STEP_PREFIX = "step-"
_STEP_RE = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    """`step-000200`: zero-padded so that names sort like numbers."""
    return f"{STEP_PREFIX}{step:06d}"


def parse_step(name: str) -> int | None:
    """The global step of a `step-NNNNNN` folder name, or None for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first (folders being written are skipped)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = parse_step(p.name)
        if step is not None and p.is_dir():
            found.append((step, p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place. An older folder of that name is first moved aside under a
    hidden unique name and deleted after, so a reader finds the old or the new one, never a mix."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
