"""Names of every file and folder that stages exchange, and the one way vaedyn writes them atomically.

A run folder holds `config.yaml`, `trace.zarr/`, `checkpoints/step-NNNNNN/`, `final/`, `logs/` and
`eval/` (docs/design.md "Run folder"). Work in progress lives under a hidden sibling name
(`temp_path`) and is renamed into place when complete, so a reader finds the old or the new
artifact, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vaedyn_cli import inputs

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
TRAINING_STATE_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first registered object (TrainState)
RANDOM_STATES_GLOB = "random_states_*.pkl"  # accelerate writes one per process
SAMPLES_DIR = "samples"  # eval: NNNN_{original,reconstruction}.png
EVAL_GRID_FILE = "grid.png"  # eval: originals over reconstructions
SUMMARY_FILE = "summary.json"  # report: the numbers behind the page
INDEX_FILE = "index.html"  # report: the page

STEP_PREFIX = "step-"
_STEP_RE = re.compile(r"^step-(\d{6,})$")
TEMP_MARK = ".tmp"  # `.NAME.tmp[-TAG]`: a hidden sibling being written


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


def run_of(path: Path | str, levels: int = 2) -> Path | None:
    """The run folder (one holding `config.yaml`) that `path` lies in, looking `levels` folders up
    (`final/` and nudged folders sit in the run, `checkpoints/step-*` one level deeper)."""
    parent = Path(path).parent
    for _ in range(levels):
        if (parent / CONFIG_FILE).is_file():
            return parent
        parent = parent.parent
    return None


def read_jsonl(path: Path) -> list[Any]:
    """The records of a JSON-lines file that vaedyn appends to (validation.jsonl): a line that does not
    parse (one being written when the process was killed; a damaged one) is skipped."""
    records = []
    for line in inputs.read_text(path, "records file", "restore it or delete it").splitlines():
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            continue
    return records


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of a JSON-lines file up to global step `step` (and drop lines that do not
    parse): what a run resumed from the checkpoint of `step` keeps of its validation records."""
    if path.is_file():
        keep = [r for r in read_jsonl(path) if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


# ---------------------------------------------------------------------------------------------
# atomic writes


def unique_tag() -> str:
    """A tag no other writer uses: this process and a random part."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_path(target: Path | str, tag: str | None = None) -> Path:
    """The hidden sibling where `target` is written before it is renamed into place:
    `.NAME.tmp` (one writer owns the target, e.g. a checkpoint of a locked run folder; a crashed
    attempt is found and removed by that name) or `.NAME.tmp-TAG` (any number of writers)."""
    target = Path(target)
    return target.with_name(f".{target.name}{TEMP_MARK}" + (f"-{tag}" if tag else ""))


def is_temp(name: str) -> bool:
    """Whether a file or folder name is a `temp_path` (a leftover of an interrupted write)."""
    return name.startswith(".") and (name.endswith(TEMP_MARK) or f"{TEMP_MARK}-" in name)


def remove_stale_temps(folder: Path) -> None:
    """Delete what interrupted writes left in `folder` (only `temp_path` names)."""
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            if is_temp(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a text file under a temporary name and rename it over `path`."""
    path = Path(path)
    tmp = temp_path(path, unique_tag())
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place. An older folder of that name is first moved aside under a
    hidden unique name and deleted after, so a reader finds the old or the new one, never a mix."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = temp_path(target, "old-" + unique_tag())
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: Path | str) -> Iterator[Path]:
    """Yield an empty hidden folder to write `target` into; renamed into place (replacing an older
    `target`) when the block ends without error, deleted when it raises."""
    target = Path(target)
    tmp = temp_path(target, unique_tag())
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
