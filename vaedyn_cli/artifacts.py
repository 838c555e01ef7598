"""Names of every file and folder that stages exchange, and the one way vaedyn writes them atomically.

A run folder holds `config.yaml`, `trace.zarr/`, `checkpoints/step-NNNNNN/`, `final/`, `logs/` and
`eval/` (docs/design.md "Run folder"). Work in progress lives under a hidden sibling name
(`temp_path`) and is renamed into place when complete, so a reader finds the old or the new
artifact, never a half-written one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaedyn_cli import __version__, inputs
from vaedyn_cli.errors import VaedynError

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
TRAINING_STATE_FILE = "vaedyn_state.json"  # TrainState: global step, epoch, position in it (JSON: cannot run code)
WINDOW_STATE_FILE = "vaedyn_window.safetensors"  # a pooled tracker's open window (tracker.Tracker.save_state)
LEGACY_TRAINING_STATE_FILE = "custom_checkpoint_0.pkl"  # where vaedyn before 0.2 kept it (a pickle; read safely)
CUSTOM_STATE_GLOB = "custom_checkpoint_*.pkl"  # accelerate's files of registered objects (vaedyn registers none)
RANDOM_STATES_GLOB = "random_states_*.pkl"  # accelerate writes one per process
SAMPLES_DIR = "samples"  # eval: NNNN_{original,reconstruction}.png
EVAL_GRID_FILE = "grid.png"  # eval: originals over reconstructions
SUMMARY_FILE = "summary.json"  # report: the numbers behind the page
INDEX_FILE = "index.html"  # report: the page
MARKER_FILE = ".vaedyn"  # {"kind": ..., "vaedyn_version": ...}: in every folder vaedyn makes (see `Kind`)

RESUMES_FILE = "resumes.jsonl"  # one JSON line per resume that changed settings: step, changed {field: [old, new]}
TRAIN_LOCK_FILE = ".vaedyn-train.lock"  # held by the one process that trains a run folder (`RunLock`)
TRAIN_PID_FILE = ".vaedyn-train.pid"  # beside it: who holds it

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
# ownership: vaedyn replaces or deletes only folders it made


@dataclass(frozen=True)
class Kind:
    """A kind of folder vaedyn makes. Its marker file records `name`; `contents` are fnmatch patterns
    of the top-level entries vaedyn writes into it (a trailing "/" matches folders only); a folder of
    an earlier vaedyn, written before markers, is recognised by holding every one of `legacy_files`."""

    name: str
    label: str  # how messages call it: "not a vaedyn {label}"
    contents: tuple[str, ...]
    legacy_files: tuple[str, ...] = ()

    def owns(self, entry: Path) -> bool:
        """Whether vaedyn could have written this top-level entry of such a folder."""
        if entry.name == MARKER_FILE or is_temp(entry.name):
            return True
        return any(fnmatch.fnmatchcase(entry.name, p.rstrip("/")) and (not p.endswith("/") or entry.is_dir())
                   for p in self.contents)


REPORT = Kind("report", "report", (INDEX_FILE, SUMMARY_FILE, "*.png"), (INDEX_FILE, SUMMARY_FILE))
EVALUATION = Kind("eval", "evaluation", (METRICS_FILE, EVAL_GRID_FILE, SAMPLES_DIR + "/", "grid-*.png", "lens-*.png"),
                  (METRICS_FILE,))
NUDGED = Kind("nudged", "nudged checkpoint",
              (MODEL_CONFIG_FILE, "*.safetensors", RUN_CONFIG_IN_CHECKPOINT, STEP_FILE, NUDGE_FILE),
              (NUDGE_FILE, MODEL_CONFIG_FILE))
TRACE = Kind("trace", "trace store", ("zarr.json", "*/", ".*.lock"))  # zarr nodes and the commit lock
RUN = Kind("run", "run folder", (
    CONFIG_FILE, TRACE_DIR + "/", TRACK_TRACE_DIR + "/", CHECKPOINTS_DIR + "/", FINAL_DIR + "/", LOGS_DIR + "/",
    EVAL_DIR + "/", REPORT_DIR + "/", "nudged-*/", VALIDATION_FILE, RESUMES_FILE, TRAIN_LOCK_FILE, TRAIN_PID_FILE,
), (CONFIG_FILE, CHECKPOINTS_DIR))
KINDS = {k.name: k for k in (REPORT, EVALUATION, NUDGED, TRACE, RUN)}


def write_marker(folder: Path | str, kind: Kind) -> None:
    """Mark `folder` as a `kind` vaedyn made (written when the folder is made, before it is renamed into place)."""
    atomic_write_text(Path(folder) / MARKER_FILE, json.dumps({"kind": kind.name, "vaedyn_version": __version__}) + "\n")


def marker_kind(folder: Path | str) -> str | None:
    """The kind recorded in a folder's marker; None without one (or with one vaedyn did not write)."""
    try:
        found = json.loads((Path(folder) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    kind = found.get("kind") if isinstance(found, dict) else None
    return kind if isinstance(kind, str) else None


def check_creatable(path: Path | str, what: str, fix: str = "pass a path in a folder") -> None:
    """Nothing stands in the way of making `path`: no file where a folder above it goes."""
    path = Path(path)
    for above in path.parents:
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise VaedynError(f"{what} {path} lies under {above}, which is a file; {fix}")
            return


class RunLock:
    """The one process that trains a run folder: an OS lock on TRAIN_LOCK_FILE (through `filelock`:
    fcntl on POSIX, msvcrt on Windows), which the system releases when the process ends however it
    ends, and TRAIN_PID_FILE beside it naming the holder (kept after it ends: who trained last), for
    the process that is refused. Both files stay in the run folder."""

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)
        self._lock: Any = None

    def acquire(self) -> None:
        """Take the lock at once or raise a VaedynError naming the process that holds it."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.run_dir / TRAIN_LOCK_FILE), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = (self.run_dir / TRAIN_PID_FILE).read_text(encoding="utf-8").split()
            except OSError:
                holder = []
            who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise VaedynError(
                f"run folder {self.run_dir} is being trained by {who} (it holds {TRAIN_LOCK_FILE}); wait for it to "
                "end or stop it, then continue with --resume latest"
            ) from None
        self._lock = lock
        import socket

        with open(self.run_dir / TRAIN_PID_FILE, "w", encoding="utf-8") as f:  # in place: only the holder writes it
            f.write(f"{os.getpid()} {socket.gethostname()}\n")

    def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()


def check_replaceable(path: Path | str, kind: Kind, what: str, legacy: Callable[[Path], bool] | None = None) -> None:
    """May vaedyn write a new `kind` at `path`, replacing (deleting) what is there?

    Yes where nothing is or an empty folder is; else only a folder that carries the marker of this
    kind (or, without a marker, one an earlier vaedyn wrote: `legacy`, by default `kind.legacy_files`)
    and holds nothing but what vaedyn writes into such a folder. Anything else is a VaedynError
    naming the folder and why: vaedyn never deletes what it did not make, nor a file someone put
    into one of its folders."""
    path = Path(path)
    check_creatable(path, what)
    if path.is_symlink():
        raise VaedynError(f"{what} {path} is a symbolic link; vaedyn replaces only folders it made: choose another path")
    if not path.exists():
        return
    if not path.is_dir():
        raise VaedynError(f"{what} {path} is a file; pass a folder for the {kind.label}")
    entries = sorted(path.iterdir())
    if not entries:
        return
    found = marker_kind(path)
    if found is None:
        old = legacy(path) if legacy is not None else bool(kind.legacy_files) and all(
            (path / name).exists() for name in kind.legacy_files)
        if not old:
            raise VaedynError(
                f"{what} {path} exists and is not a vaedyn {kind.label} (no {MARKER_FILE} marker): vaedyn replaces only "
                "folders it made; choose another path, or empty it yourself"
            )
    elif found != kind.name:
        other = KINDS[found].label if found in KINDS else found
        raise VaedynError(f"{what} {path} is a vaedyn {other}, not a place for a {kind.label}; choose another path")
    foreign = [e.name for e in entries if not kind.owns(e)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise VaedynError(
            f"{what} {path} holds {foreign[0]!r}{more}, which vaedyn does not write into a {kind.label}: move it out "
            "first (vaedyn would delete it), or choose another path"
        )


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
def atomic_folder(target: Path | str, kind: Kind | None = None) -> Iterator[Path]:
    """Yield an empty hidden folder to write `target` into (holding only the marker of `kind`, when
    given); renamed into place (replacing an older `target`) when the block ends without error,
    deleted when it raises. Callers check first that the older `target` may go (`check_replaceable`)."""
    target = Path(target)
    tmp = temp_path(target, unique_tag())
    tmp.mkdir(parents=True)
    try:
        if kind is not None:
            write_marker(tmp, kind)
        yield tmp
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
