"""Reading a store: checks, path resolution, the committed root group and events."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vaedyn_cli import __version__, artifacts, inputs
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.store.chunks import FIX, check_chunks
from vaedyn_cli.store.metadata import read_json
from vaedyn_cli.store.schema import EVENT_FIELDS, EVENTS_GROUP, READABLE_VERSIONS, SCHEMA, ZARR_JSON


def missing_store(path: Path) -> VaedynError:
    return VaedynError(
        f"trace store {path} not found: `vaedyn train` writes <run>/{artifacts.TRACE_DIR} and `vaedyn track` writes "
        f"<run>/{artifacts.TRACK_TRACE_DIR} (or its --out); pass one of those or a run folder"
    )


def check_store(path: str | Path) -> dict[str, Any]:
    """The root attributes of a vaedyn.trace store; VaedynError (one line) when it is not one."""
    root = Path(path)
    if not root.exists():
        raise missing_store(root)
    meta_file = root / ZARR_JSON
    if not meta_file.is_file():
        raise VaedynError(f"{root} is not a trace store (no {ZARR_JSON}): pass a trace.zarr folder or a run folder")
    try:
        meta = read_json(meta_file)
    except (OSError, ValueError):
        raise VaedynError(f"{meta_file} is not valid JSON: the store is damaged; rewrite it with `vaedyn track`") from None
    attrs = meta.get("attributes", {})
    if meta.get("zarr_format") != 3 or attrs.get("schema") != SCHEMA:
        raise VaedynError(
            f"{root} is not a {SCHEMA} store (schema {attrs.get('schema')!r}): pass a store written by "
            "`vaedyn train` or `vaedyn track`"
        )
    version = attrs.get("schema_version")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise VaedynError(
            f"{root} has {SCHEMA} schema_version {version!r}; this vaedyn ({__version__}) reads versions "
            f"{readable}: use the vaedyn that wrote it, or re-create the trace with `vaedyn track`"
        )
    return dict(attrs)


def resolve_store_path(arg: str | Path) -> Path:
    """A store path, a run folder (its trace.zarr, else its trace-track.zarr), or '-' (the last
    non-empty line of stdin, so that `vaedyn train ... | vaedyn classify -` works)."""
    text = str(arg)
    if text == "-":
        piped = inputs.read_stdin("STORE is '-'", "pipe a store or run folder path into it")
        lines = [ln.strip() for ln in piped.splitlines() if ln.strip()]
        if not lines:
            raise VaedynError("STORE is '-' but stdin is empty; pipe a store or run folder path into it")
        text = lines[-1]
    return locate(Path(text).expanduser())


def locate(path: Path) -> Path:
    """A store path as given, or the trace store of a run folder."""
    if path.is_dir() and not (path / ZARR_JSON).is_file():
        for name in (artifacts.TRACE_DIR, artifacts.TRACK_TRACE_DIR):
            if (path / name / ZARR_JSON).is_file():
                return path / name
        if (path / artifacts.CONFIG_FILE).is_file():
            raise VaedynError(
                f"run folder {path} has no trace store: it was trained with track.enabled=false; "
                f"make one with `vaedyn track --checkpoint {path / artifacts.CHECKPOINTS_DIR}`"
            )
    check_store(path)
    return path


def open_group(root: Path, group: str | None = None) -> xr.Dataset:
    """Lazily open a group, through the consolidated metadata when the store has it."""
    consolidated = "consolidated_metadata" in read_json(root / ZARR_JSON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # xarray's "no consolidated metadata" hint
        return xr.open_zarr(root, group=group, consolidated=consolidated, chunks=None, zarr_format=3)


def open_trace(path: str | Path) -> xr.Dataset:
    """The root group of a trace store, lazily loaded, trimmed to the committed steps; a damaged
    store (an array or chunk missing, a chunk that is not what its array says, counts out of range,
    steps out of order) is a VaedynError naming what is wrong, never data."""
    root = locate(Path(path))
    attrs = check_store(root)
    try:
        ds = open_group(root)
    except Exception as e:  # noqa: BLE001 - zarr and xarray raise many types for a damaged store
        first = inputs.first_line(e)
        raise VaedynError(f"cannot read trace store {root}: {type(e).__name__}: {first}") from None
    committed = committed_count(root, attrs, "committed_steps", ds.sizes.get("step", 0))
    _check_complete(root, ds, attrs, committed)
    if ds.sizes.get("step", 0) > committed:
        ds = ds.isel(step=slice(0, committed))
    return fill_v1(ds)


def fill_v1(ds: xr.Dataset) -> xr.Dataset:
    """A version 1 root group with the channel coordinates version 2 added: `module_type` "" (not
    recorded) and `capture` "output" (version 1 measured outputs only). Variables it lacks stay
    missing: a method that needs one says so."""
    n = ds.sizes.get("channel", 0)
    fill = {k: ("channel", np.full(n, v, dtype=object)) for k, v in (("module_type", ""), ("capture", "output"))
            if k not in ds.variables and "layer" in ds.variables}
    return ds.assign_coords(fill) if fill else ds


def committed_count(root: Path, attrs: Mapping[str, Any], name: str, rows: int) -> int:
    """A commit count of the root attributes (`committed_steps`, `committed_events`), checked to be
    a whole number within the rows the arrays hold."""
    value = attrs.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise VaedynError(f"trace store {root} is damaged: {name} is {inputs.shorten(json.dumps(value), 30)}, not a "
                          f"count of rows; {FIX}")
    if value > rows:
        raise VaedynError(
            f"trace store {root} is truncated: {name} {value} but its arrays hold {rows} "
            f"{'steps' if name == 'committed_steps' else 'rows'}; {FIX}"
        )
    return value


def _check_complete(root: Path, ds: xr.Dataset, attrs: Mapping[str, Any], committed: int) -> None:
    """Fail on a damaged store here rather than with NaNs later: every root array that the consolidated
    metadata lists still has its own metadata on disk (zarr reads a missing array as fill values),
    the committed steps are strictly increasing, and every chunk of committed data is there and
    agrees with its array (`chunks.check_chunks`)."""
    listed = (read_json(root / ZARR_JSON).get("consolidated_metadata") or {}).get("metadata") or {}
    for key, meta in listed.items():
        if "/" not in key and meta.get("node_type") == "array" and not (root / key / ZARR_JSON).is_file():
            raise VaedynError(
                f"trace store {root} is damaged: array '{key}' is listed in its {ZARR_JSON} but "
                f"{root / key / ZARR_JSON} is missing; {FIX}"
            )
    try:
        steps = np.asarray(ds["step"].values[:committed])
    except Exception:  # noqa: BLE001 - a damaged chunk of `step`: check_chunks names it
        steps = None
    check_chunks(root, {**attrs, "committed_steps": committed}, decode=steps is None, steps=steps)
    if steps is None:
        raise VaedynError(f"trace store {root} is damaged: its 'step' array does not decode; {FIX}")
    bad = np.flatnonzero(np.diff(steps) <= 0)
    if bad.size:
        i = int(bad[0])
        raise VaedynError(f"trace store {root} is damaged: step {int(steps[i + 1])} (row {i + 1}) follows step "
                          f"{int(steps[i])}; steps must increase; {FIX}")


def read_events(path: str | Path) -> xr.Dataset | None:
    """The `events` group, loaded and trimmed to the committed events (None when no intervention was
    recorded). Each column is read to `committed_events` on its own, so a reader never sees the
    columns of a half-appended batch of rows, nor the rows a crashed writer left uncommitted."""
    import zarr

    root = locate(Path(path))
    attrs = check_store(root)
    if attrs.get("committed_events") == 0 or not (root / EVENTS_GROUP / ZARR_JSON).is_file():
        return None  # (a group left by a writer killed before committing its first rows is not read)
    try:
        group = zarr.open_group(str(root / EVENTS_GROUP), mode="r", use_consolidated=False)
        n = committed_events(attrs, group, root)
    except VaedynError:
        raise
    except Exception as e:  # noqa: BLE001 - zarr raises many types for a damaged group
        raise VaedynError(f"cannot read the events group of trace store {root}: {type(e).__name__}: "
                          f"{inputs.first_line(e)}; restore the store from a copy") from None
    check_chunks(root, {**attrs, "committed_events": n}, EVENTS_GROUP)
    try:
        if n == 0:
            return None
        data = {}
        for name in EVENT_FIELDS:
            values = np.asarray(group[name][:n])
            if values.dtype.kind in "OTU":
                values = np.array([str(v) for v in values], dtype=object)
            data[name] = ("event", values)
        group_attrs = dict(group.attrs)
    except Exception as e:  # noqa: BLE001 - zarr raises many types for a damaged group
        first = inputs.first_line(e)
        raise VaedynError(
            f"cannot read the events group of trace store {root}: {type(e).__name__}: {first}; "
            "restore the store from a copy"
        ) from None
    return xr.Dataset(data, attrs=group_attrs)


def committed_events(attrs: Mapping[str, Any], group: Any, root: Path) -> int:
    """Rows of the events group that were committed (stores without the attribute: every row on disk)."""
    lengths = [group[name].shape[0] for name in EVENT_FIELDS if name in group]
    on_disk = min(lengths) if len(lengths) == len(EVENT_FIELDS) else 0
    if attrs.get("committed_events") is None:
        return on_disk
    return committed_count(root, attrs, "committed_events", on_disk)



def stored_config(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run config stored in a trace's attributes (`config`, JSON; YAML in hand-made stores), as a
    plain dict; None when there is none or it does not parse."""
    raw = attrs.get("config")
    if not raw:
        return None
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError):
        import yaml

        try:
            cfg = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError):
            return None
    return cfg if isinstance(cfg, dict) else None
