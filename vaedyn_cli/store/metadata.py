"""The commit point of a store: its root `zarr.json` (attributes + consolidated metadata).

A commit rewrites the root `zarr.json` in one atomic rename: the attribute `committed_steps` and
the consolidated metadata, in which every `step` array has exactly `committed_steps` rows (and
every `events` array `committed_events` rows). Every rewrite holds an advisory lock
(`.vaedyn-commit.lock`), so a `consolidate` by another process (classify) never writes an older
count back over a newer commit.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vaedyn_cli import artifacts
from vaedyn_cli.store.schema import EVENTS_GROUP, LOCK_FILE, ZARR_JSON


def read_json(path: Path) -> dict[str, Any]:
    """A zarr.json; ValueError (also for text that is not UTF-8, or nested beyond what the parser
    recurses) when it does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply") from None


def node_metadata(root: Path) -> dict[str, dict[str, Any]]:
    """Every node's zarr.json below the root, by relative path (as zarr's consolidation keys them)."""
    found: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here == root or ZARR_JSON not in filenames:
            continue
        try:
            meta = read_json(here / ZARR_JSON)
        except (OSError, ValueError):
            continue
        if meta.get("node_type") == "array":
            dirnames[:] = []  # chunk folders below
        else:
            meta.pop("consolidated_metadata", None)
            meta["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
        found[here.relative_to(root).as_posix()] = meta
    return found


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Hold the store's commit lock (an advisory file lock; a no-op where fcntl is missing), so that a
    writer's commit and another process's `consolidate` never interleave their read-modify-write of
    the root zarr.json (which would turn `committed_steps` back)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(root / LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def commit_root(root: Path, attributes: Mapping[str, Any], step_rows: int | None) -> None:
    """Rewrite the root zarr.json (attributes + consolidated metadata) in one atomic rename.

    `step_rows`: the length given to every root array along `step` in the consolidated metadata
    (None: as on disk). Arrays of the `events` group get the length `committed_events` (when set)."""
    with root_lock(root):
        write_root(root, attributes, step_rows)


def write_root(root: Path, attributes: Mapping[str, Any], step_rows: int | None) -> None:
    doc = read_json(root / ZARR_JSON)
    doc["attributes"] = dict(attributes)
    nodes = node_metadata(root)
    events = attributes.get("committed_events")
    for key, meta in nodes.items():
        if meta.get("node_type") != "array":
            continue
        dims = meta.get("dimension_names") or []
        if step_rows is not None and "/" not in key and dims and dims[0] == "step":
            meta["shape"] = [int(step_rows), *meta["shape"][1:]]
        elif events is not None and key.startswith(f"{EVENTS_GROUP}/") and dims and dims[0] == "event":
            meta["shape"] = [min(int(events), int(meta["shape"][0]))]
    doc["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": nodes}
    artifacts.atomic_write_text(root / ZARR_JSON, json.dumps(doc, indent=2, allow_nan=True))


def consolidate(path: str | Path) -> None:
    """Refresh the consolidated metadata of a store after writing into it outside TraceWriter
    (e.g. a `classification` group), keeping the committed step count (attributes read under the
    commit lock, so a concurrent writer's newer commit is never undone)."""
    root = Path(path)
    with root_lock(root):
        attrs = root_attrs(root)
        write_root(root, attrs, int(attrs.get("committed_steps", 0)))


def root_attrs(root: Path) -> dict[str, Any]:
    return dict(read_json(root / ZARR_JSON).get("attributes", {}))

