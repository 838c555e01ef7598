"""The trace store (schema "vaedyn.trace", version 1): Zarr v3, readable by plain xarray.

Layout (DESIGN.md "Trace store"): root group with dims `step` (appendable) and `channel` (every
tracked channel, in module order), per-step-per-channel statistics, training scalars and
`near_zero_frac` (step, param); group `events` (dim `event`) for interventions; group
`classification` written by `vaedyn classify`.

How a step becomes visible. Arrays along `step` are chunked `chunk_steps` rows at a time and grow
a whole chunk at once; a background thread fills the current chunk in memory and writes it whole
(no read-modify-write). A commit then rewrites the root `zarr.json` in one atomic rename: the
attribute `committed_steps` and the consolidated metadata, in which every `step` array has exactly
`committed_steps` rows. So plain `xarray.open_datatree(path, engine="zarr")` sees the committed
prefix only, and `open_trace` also trims to `committed_steps` when read without consolidated
metadata. A crash leaves arrays longer than `committed_steps`: they read as the committed prefix.
Commits happen when a chunk fills, `commit_interval_s` after the first uncommitted step, and on
`flush()`, `truncate()`, `add_events()` and `close()`; a clean close trims the arrays to their
committed length. Events follow the same rule with the root attribute `committed_events`: rows go
after the committed ones, the count is committed last, readers read each column up to it (the
first rows make the group aside and rename it in). Every rewrite of the root zarr.json holds an
advisory lock (`.vaedyn-commit.lock`), so a `consolidate` by another process (classify) never
writes an older count back over a newer commit. Resuming truncates steps and events to the
checkpoint's step, dropping whatever a killed writer left uncommitted.

Strings are stored as zarr v3 `string` (variable-length UTF-8), which zarr specifies, so no
"unstable specification" warning. Anything else that writes into a store (e.g. a `classification`
group) calls `consolidate(path)` afterwards so that consolidated readers see it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import xarray as xr

from vaedyn_cli import __version__, artifacts, faults
from vaedyn_cli.errors import RuntimeFailure, VaedynError

log = logging.getLogger(__name__)

SCHEMA = "vaedyn.trace"
SCHEMA_VERSION = 1
EVENTS_GROUP = "events"
CLASSIFICATION_GROUP = "classification"
ZARR_JSON = "zarr.json"
LOCK_FILE = ".vaedyn-commit.lock"  # serialises rewrites of the root zarr.json (writer commits, consolidate)
CHANNEL_CHUNK = 4096  # channels per chunk: a per-channel read touches a few chunks, an append a handful
EVENT_CHUNK = 1024

STD_NOTE = "population std (ddof=0) over batch and spatial positions"

# Per-step, per-channel statistics (float32), with what they mean.
CHANNEL_VARS: dict[str, str] = {
    "in_std": f"std of the norm's input channel, {STD_NOTE}",
    "mean": "mean of the norm's output y = gamma * xhat + beta over batch and spatial positions",
    "mean_abs": "mean |y| over batch and spatial positions (the original project's activity metric)",
    "std": f"std of y, {STD_NOTE}",
    "act_mean": "mean of act(y) where an activation follows the norm, else NaN",
    "act_std": f"std of act(y), {STD_NOTE}; NaN where no activation follows",
    "gn_weight": "GroupNorm gamma used by this step's forward",
    "gn_bias": "GroupNorm beta used by this step's forward",
    "gn_weight_grad": "|d loss / d gamma| of this step (NaN when tracked without gradients)",
    "out_weight_norm": "L2 norm of the weights of the next layer(s) that read this channel (NaN when unknown; "
    "in training traces recorded once per track.weight_interval steps, NaN in between)",
}
SCALAR_VARS: dict[str, str] = {
    "loss": "training loss of the step (NaN when not training)",
    "rec_loss": "reconstruction (MSE) loss of the step (NaN when not training)",
    "kl_loss": "mean per-image KL of the step (NaN when not training)",
    "lr": "learning rate of the step (NaN when not training)",
}
PARAM_VARS: dict[str, str] = {
    "near_zero_frac": "share of near-zero weights of each conv/linear weight (track.near_zero; in training "
    "traces recorded once per track.weight_interval steps, NaN in between)",
}
STEP_VARS = ("step", *CHANNEL_VARS, *SCALAR_VARS, *PARAM_VARS)
CHANNEL_COORDS = ("layer", "channel_index", "part", "has_activation")
EVENT_FIELDS: dict[str, type] = {
    "step": np.int64,
    "layer": str,
    "channel_index": np.int64,
    "strategy": str,
    "param": str,
    "before": np.float64,
    "after": np.float64,
}
REQUIRED_ATTRS = ("schema", "schema_version", "committed_steps")


# ---------------------------------------------------------------------------------------------
# what a store holds


@dataclass(frozen=True)
class ChannelLayout:
    """The fixed `channel` and `param` axes of a store: which channels of which layers are tracked."""

    layer: tuple[str, ...]
    channel_index: tuple[int, ...]
    part: tuple[str, ...]
    has_activation: tuple[bool, ...]
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.layer)
        if not (len(self.channel_index) == len(self.part) == len(self.has_activation) == n):
            raise ValueError("layout columns differ in length")

    @classmethod
    def from_layers(
        cls, layers: Iterable[tuple[str, int, str, bool]], params: Iterable[str] = ()
    ) -> ChannelLayout:
        """From (layer name, channel count, part, has_activation) per layer, in module order."""
        cols: tuple[list, list, list, list] = ([], [], [], [])
        for name, channels, part, has_act in layers:
            for c in range(channels):
                for col, v in zip(cols, (name, c, part, bool(has_act)), strict=True):
                    col.append(v)
        return cls(*(tuple(c) for c in cols), params=tuple(params))

    @property
    def n_channels(self) -> int:
        return len(self.layer)

    @property
    def layers(self) -> list[str]:
        """Layer names in store order."""
        return list(dict.fromkeys(self.layer))

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> ChannelLayout:
        params = tuple(str(p) for p in ds["param"].values) if "param" in ds.coords else ()
        return cls(
            tuple(str(v) for v in ds["layer"].values),
            tuple(int(v) for v in ds["channel_index"].values),
            tuple(str(v) for v in ds["part"].values),
            tuple(bool(v) for v in ds["has_activation"].values),
            params,
        )


@dataclass
class TraceRecord:
    """One tracked step: per-channel statistics, training scalars, near-zero fractions per param.
    Missing entries are NaN."""

    step: int
    channels: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    near_zero_frac: np.ndarray | None = None

    def resolve(self) -> TraceRecord:
        return self


class PendingRecord(Protocol):
    """A record whose numbers are finished on the writer thread (e.g. after an async device copy)."""

    step: int

    def resolve(self) -> TraceRecord: ...


def _row(record: TraceRecord, name: str, layout: ChannelLayout) -> np.ndarray:
    if name in CHANNEL_VARS:
        v = record.channels.get(name)
        if v is None:
            return np.full(layout.n_channels, np.nan, np.float32)
        v = np.asarray(v, dtype=np.float32).reshape(-1)
        if v.shape[0] != layout.n_channels:
            raise ValueError(f"record '{name}' has {v.shape[0]} channels, the store {layout.n_channels}")
        return v
    if name in SCALAR_VARS:
        return np.float64(record.scalars.get(name, np.nan))
    if name == "near_zero_frac":
        if record.near_zero_frac is None:
            return np.full(len(layout.params), np.nan, np.float32)
        v = np.asarray(record.near_zero_frac, dtype=np.float32).reshape(-1)
        if v.shape[0] != len(layout.params):
            raise ValueError(f"record near_zero_frac has {v.shape[0]} params, the store {len(layout.params)}")
        return v
    if name == "step":
        return np.int64(record.step)
    raise KeyError(name)


def records_to_dataset(
    records: Sequence[TraceRecord], layout: ChannelLayout, attrs: Mapping[str, Any] | None = None
) -> xr.Dataset:
    """Records as an in-memory Dataset with the store's schema (also the skeleton of a new store)."""
    n = len(records)
    data: dict[str, Any] = {}
    for name, doc in CHANNEL_VARS.items():
        rows = [_row(r, name, layout) for r in records]
        arr = np.stack(rows) if rows else np.zeros((0, layout.n_channels), np.float32)
        data[name] = (("step", "channel"), arr, {"description": doc})
    for name, doc in SCALAR_VARS.items():
        arr = np.array([_row(r, name, layout) for r in records], dtype=np.float64).reshape(n)
        data[name] = (("step",), arr, {"description": doc})
    rows = [_row(r, "near_zero_frac", layout) for r in records]
    arr = np.stack(rows) if rows else np.zeros((0, len(layout.params)), np.float32)
    data["near_zero_frac"] = (("step", "param"), arr, {"description": PARAM_VARS["near_zero_frac"]})
    coords = {
        "step": ("step", np.array([r.step for r in records], dtype=np.int64), {"description": "global optimizer step"}),
        "layer": ("channel", np.array(layout.layer, dtype=object), {"description": "module path of the norm"}),
        "channel_index": ("channel", np.array(layout.channel_index, dtype=np.int64),
                          {"description": "index of the channel inside its layer"}),
        "part": ("channel", np.array(layout.part, dtype=object), {"description": "encoder or decoder"}),
        "has_activation": ("channel", np.array(layout.has_activation, dtype=bool),
                           {"description": "whether a nonlinearity follows this norm"}),
        "param": ("param", np.array(layout.params, dtype=object), {"description": "conv/linear weight name"}),
    }
    ds = xr.Dataset(data, coords=coords, attrs=dict(attrs or {}))
    steps = ds["step"].values
    if n > 1 and not (np.diff(steps) > 0).all():
        raise ValueError(f"steps must be strictly increasing, got {steps.tolist()}")
    return ds


def store_attrs(
    source: Literal["train", "track"], run_name: str, config_json: str, model_config_json: str
) -> dict[str, Any]:
    """The root attributes of a new store (DESIGN.md)."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "vaedyn_version": __version__,
        "source": source,
        "run_name": run_name,
        "config": config_json,
        "model_config": model_config_json,
        "committed_steps": 0,
        "std_definition": STD_NOTE,
        "step_definition": (
            "source=train: step k holds the forward pass of optimizer step k (weights after k-1 updates), "
            "as the loss does (with track.source=probe: the probe after update k); "
            "source=track: the weights saved at global step k"
        ),
    }


# ---------------------------------------------------------------------------------------------
# root metadata: the commit point


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _atomic_write_json(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _node_metadata(root: Path) -> dict[str, dict[str, Any]]:
    """Every node's zarr.json below the root, by relative path (as zarr's consolidation keys them)."""
    found: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here == root or ZARR_JSON not in filenames:
            continue
        try:
            meta = _read_json(here / ZARR_JSON)
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
def _root_lock(root: Path) -> Iterator[None]:
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


def _commit_root(root: Path, attributes: Mapping[str, Any], step_rows: int | None) -> None:
    """Rewrite the root zarr.json (attributes + consolidated metadata) in one atomic rename.

    `step_rows`: the length given to every root array along `step` in the consolidated metadata
    (None: as on disk). Arrays of the `events` group get the length `committed_events` (when set)."""
    with _root_lock(root):
        _write_root(root, attributes, step_rows)


def _write_root(root: Path, attributes: Mapping[str, Any], step_rows: int | None) -> None:
    doc = _read_json(root / ZARR_JSON)
    doc["attributes"] = dict(attributes)
    nodes = _node_metadata(root)
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
    _atomic_write_json(root / ZARR_JSON, doc)


def consolidate(path: str | Path) -> None:
    """Refresh the consolidated metadata of a store after writing into it outside TraceWriter
    (e.g. a `classification` group), keeping the committed step count (attributes read under the
    commit lock, so a concurrent writer's newer commit is never undone)."""
    root = Path(path)
    with _root_lock(root):
        attrs = _root_attrs(root)
        _write_root(root, attrs, int(attrs.get("committed_steps", 0)))


def _root_attrs(root: Path) -> dict[str, Any]:
    return dict(_read_json(root / ZARR_JSON).get("attributes", {}))


# ---------------------------------------------------------------------------------------------
# reading


def _missing_store(path: Path) -> VaedynError:
    return VaedynError(
        f"trace store {path} not found: `vaedyn train` writes <run>/{artifacts.TRACE_DIR} and `vaedyn track` writes "
        f"<run>/{artifacts.TRACK_TRACE_DIR} (or its --out); pass one of those or a run folder"
    )


def check_store(path: str | Path) -> dict[str, Any]:
    """The root attributes of a vaedyn.trace store; VaedynError (one line) when it is not one."""
    root = Path(path)
    if not root.exists():
        raise _missing_store(root)
    meta_file = root / ZARR_JSON
    if not meta_file.is_file():
        raise VaedynError(f"{root} is not a trace store (no {ZARR_JSON}): pass a trace.zarr folder or a run folder")
    try:
        meta = _read_json(meta_file)
    except (OSError, ValueError):
        raise VaedynError(f"{meta_file} is not valid JSON: the store is damaged; rewrite it with `vaedyn track`") from None
    attrs = meta.get("attributes", {})
    if meta.get("zarr_format") != 3 or attrs.get("schema") != SCHEMA:
        raise VaedynError(
            f"{root} is not a {SCHEMA} store (schema {attrs.get('schema')!r}): pass a store written by "
            "`vaedyn train` or `vaedyn track`"
        )
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise VaedynError(
            f"{root} has {SCHEMA} schema_version {version!r}; this vaedyn ({__version__}) reads version "
            f"{SCHEMA_VERSION}: use the vaedyn that wrote it, or re-create the trace with `vaedyn track`"
        )
    return dict(attrs)


def resolve_store_path(arg: str | Path) -> Path:
    """A store path, a run folder (its trace.zarr, else its trace-track.zarr), or '-' (the last
    non-empty line of stdin, so that `vaedyn train ... | vaedyn classify -` works)."""
    text = str(arg)
    if text == "-":
        lines = [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
        if not lines:
            raise VaedynError("STORE is '-' but stdin is empty; pipe a store or run folder path into it")
        text = lines[-1]
    return _locate(Path(text).expanduser())


def _locate(path: Path) -> Path:
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


def _open_group(root: Path, group: str | None = None) -> xr.Dataset:
    """Lazily open a group, through the consolidated metadata when the store has it."""
    consolidated = "consolidated_metadata" in _read_json(root / ZARR_JSON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # xarray's "no consolidated metadata" hint
        return xr.open_zarr(root, group=group, consolidated=consolidated, chunks=None, zarr_format=3)


def open_trace(path: str | Path) -> xr.Dataset:
    """The root group of a trace store, lazily loaded, trimmed to the committed steps."""
    root = _locate(Path(path))
    attrs = check_store(root)
    try:
        ds = _open_group(root)
    except Exception as e:  # noqa: BLE001 - zarr and xarray raise many types for a damaged store
        first = str(e).splitlines()[0] if str(e) else ""
        raise VaedynError(f"cannot read trace store {root}: {type(e).__name__}: {first}") from None
    committed = int(attrs.get("committed_steps", 0))
    _check_complete(root, ds, committed)
    if ds.sizes.get("step", 0) > committed:
        ds = ds.isel(step=slice(0, committed))
    return ds


def _check_complete(root: Path, ds: xr.Dataset, committed: int) -> None:
    """Fail on a damaged store here rather than with NaNs later: every root array that the consolidated
    metadata lists still has its own metadata on disk (zarr reads a missing array as fill values), and
    the arrays hold every committed step."""
    fix = "restore it from a copy, or re-create the trace with `vaedyn track`"
    listed = (_read_json(root / ZARR_JSON).get("consolidated_metadata") or {}).get("metadata") or {}
    for key, meta in listed.items():
        if "/" not in key and meta.get("node_type") == "array" and not (root / key / ZARR_JSON).is_file():
            raise VaedynError(
                f"trace store {root} is damaged: array '{key}' is listed in its {ZARR_JSON} but "
                f"{root / key / ZARR_JSON} is missing; {fix}"
            )
    rows = ds.sizes.get("step", 0)
    if rows < committed:
        raise VaedynError(
            f"trace store {root} is truncated: committed_steps {committed} but its arrays hold {rows} steps; {fix}"
        )


def read_events(path: str | Path) -> xr.Dataset | None:
    """The `events` group, loaded and trimmed to the committed events (None when no intervention was
    recorded). Each column is read to `committed_events` on its own, so a reader never sees the
    columns of a half-appended batch of rows, nor the rows a crashed writer left uncommitted."""
    import zarr

    root = _locate(Path(path))
    attrs = check_store(root)
    if attrs.get("committed_events") == 0 or not (root / EVENTS_GROUP / ZARR_JSON).is_file():
        return None  # (a group left by a writer killed before committing its first rows is not read)
    try:
        group = zarr.open_group(str(root / EVENTS_GROUP), mode="r", use_consolidated=False)
        n = _committed_events(attrs, group)
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
        first = str(e).splitlines()[0] if str(e) else ""
        raise VaedynError(
            f"cannot read the events group of trace store {root}: {type(e).__name__}: {first}; "
            "restore the store from a copy"
        ) from None
    return xr.Dataset(data, attrs=group_attrs)


def _committed_events(attrs: Mapping[str, Any], group: Any) -> int:
    """Rows of the events group that were committed (stores without the attribute: every row on disk)."""
    lengths = [group[name].shape[0] for name in EVENT_FIELDS if name in group]
    on_disk = min(lengths) if len(lengths) == len(EVENT_FIELDS) else 0
    committed = attrs.get("committed_events")
    return on_disk if committed is None else min(int(committed), on_disk)


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += (Path(dirpath) / f).stat().st_size
            except OSError:
                pass
    return total


def store_info(path: str | Path, ds: xr.Dataset | None = None) -> dict[str, Any]:
    """A summary of a store: steps and range, channels, layers by part, variables, size, events, classification.

    `ds`: the root group as the caller already opened it (`open_trace`), so that a summary of a store
    that is being written describes the same committed steps as the caller's other numbers."""
    root = _locate(Path(path))
    ds = open_trace(root) if ds is None else ds
    attrs = dict(ds.attrs)
    steps = ds["step"].values
    layer = np.array([str(v) for v in ds["layer"].values], dtype=object)
    part = np.array([str(v) for v in ds["part"].values], dtype=object)
    by_part: dict[str, dict[str, int]] = {}
    for p in dict.fromkeys(part.tolist()):
        sel = part == p
        by_part[p] = {"layers": len(dict.fromkeys(layer[sel].tolist())), "channels": int(sel.sum())}
    events = read_events(root)
    return {
        "path": str(root),
        "schema": attrs.get("schema"),
        "schema_version": attrs.get("schema_version"),
        "vaedyn_version": attrs.get("vaedyn_version"),
        "source": attrs.get("source"),
        "run_name": attrs.get("run_name"),
        "steps": int(steps.size),
        "first_step": int(steps[0]) if steps.size else None,
        "last_step": int(steps[-1]) if steps.size else None,
        "channels": int(ds.sizes.get("channel", 0)),
        "layers": len(dict.fromkeys(layer.tolist())),
        "layers_by_part": by_part,
        "params": int(ds.sizes.get("param", 0)),
        "variables": sorted(str(v) for v in ds.data_vars),
        "size_bytes": _dir_size(root),
        "events": 0 if events is None else int(events.sizes.get("event", 0)),
        "classification": (root / CLASSIFICATION_GROUP / ZARR_JSON).is_file(),
    }


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def info_table(info: Mapping[str, Any]) -> Any:
    """A rich table of `store_info`."""
    from rich.table import Table

    table = Table(title=f"trace store {info['path']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    steps = info["steps"]
    span = f" ({info['first_step']} .. {info['last_step']})" if steps else ""
    table.add_row("schema", f"{info['schema']} v{info['schema_version']} (vaedyn {info['vaedyn_version']})")
    table.add_row("source", f"{info['source']}, run {info['run_name']}")
    table.add_row("steps", f"{steps}{span}")
    table.add_row("channels", f"{info['channels']} in {info['layers']} layers")
    for p, v in info["layers_by_part"].items():
        table.add_row(f"  {p}", f"{v['layers']} layers, {v['channels']} channels")
    table.add_row("params", str(info["params"]))
    table.add_row("variables", ", ".join(info["variables"]))
    table.add_row("size on disk", _human_bytes(info["size_bytes"]))
    table.add_row("events", str(info["events"]))
    table.add_row("classification", "yes" if info["classification"] else "no (run `vaedyn classify`)")
    return table


# ---------------------------------------------------------------------------------------------
# writing


def _compressor() -> Any:
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")  # fast: commits re-encode the current chunk


def _encoding(ds: xr.Dataset, chunk_steps: int) -> dict[str, dict[str, Any]]:
    enc: dict[str, dict[str, Any]] = {}
    for name, var in ds.variables.items():
        shape = []
        for dim in var.dims:
            if dim == "step":
                shape.append(chunk_steps)
            elif dim == "channel" and "step" in var.dims:
                shape.append(max(1, min(ds.sizes["channel"], CHANNEL_CHUNK)))
            elif dim == "event":
                shape.append(EVENT_CHUNK)
            else:
                shape.append(max(1, ds.sizes[dim]))
        enc[str(name)] = {"chunks": tuple(shape), "compressors": (_compressor(),)}
    return enc


def _events_dataset(rows: Sequence[Mapping[str, Any]]) -> xr.Dataset:
    """Validated event rows as a Dataset with dim `event`."""
    cols: dict[str, list] = {k: [] for k in EVENT_FIELDS}
    for i, row in enumerate(rows):
        missing = [k for k in EVENT_FIELDS if k not in row]
        if missing:
            raise ValueError(f"event row {i} lacks {', '.join(missing)} (fields: {', '.join(EVENT_FIELDS)})")
        for k in EVENT_FIELDS:
            cols[k].append(row[k])
    data = {}
    for k, kind in EVENT_FIELDS.items():
        arr = np.array([str(v) for v in cols[k]], dtype=object) if kind is str else np.array(cols[k], dtype=kind)
        data[k] = ("event", arr.reshape(len(rows)))
    return xr.Dataset(data, attrs={"description": "one row per intervention (written by in-training nudges)"})


def _new_store(path: Path, layout: ChannelLayout, attrs: Mapping[str, Any], chunk_steps: int) -> None:
    """Write an empty store under a temporary name and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        skeleton = records_to_dataset([], layout, {**attrs, "committed_steps": 0})
        skeleton.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=_encoding(skeleton, chunk_steps))
        _commit_root(tmp, _root_attrs(tmp), 0)
        artifacts.replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stored_layout(path: Path) -> ChannelLayout:
    with _open_group(path) as ds:
        return ChannelLayout.from_dataset(ds)


_CLOSE = object()


class TraceWriter:
    """Appends tracked steps to a store from a background thread.

    `append` only enqueues (it blocks when `queue_size` steps wait); the thread writes and commits
    (see the module docstring). `mode="w"` starts a new store (replacing an existing trace store at
    `path`, never any other folder); `mode="a"` opens an existing one with the same layout, or
    creates it. Errors of the thread surface on the next call and on `close()`.
    """

    def __init__(
        self,
        path: str | Path,
        layout: ChannelLayout,
        attrs: Mapping[str, Any],
        *,
        mode: Literal["w", "a"] = "a",
        chunk_steps: int = 64,
        queue_size: int = 8,
        commit_interval_s: float = 60.0,
        keep_recent: int = 0,
    ):
        self.path = Path(path)
        self.layout = layout
        self.chunk_steps = int(chunk_steps)
        self.commit_interval_s = float(commit_interval_s)
        self._recent: deque[TraceRecord] = deque(maxlen=max(0, keep_recent))
        self._open_or_create(mode, attrs)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"vaedyn-trace-writer:{self.path.name}", daemon=True)
        self._thread.start()

    # -- caller side ------------------------------------------------------------------------

    def _open_or_create(self, mode: str, attrs: Mapping[str, Any]) -> None:
        exists = self.path.exists()
        if exists and not (self.path / ZARR_JSON).is_file() and any(self.path.iterdir()):
            raise VaedynError(f"{self.path} exists and is not a trace store; choose another path or remove it")
        if exists and (self.path / ZARR_JSON).is_file():
            check_store(self.path)
            if mode == "a":
                stored = _stored_layout(self.path)
                if stored != self.layout:
                    raise VaedynError(
                        f"trace store {self.path} tracks other channels ({stored.n_channels} channels, "
                        f"{len(stored.params)} params) than this model and track config ({self.layout.n_channels}, "
                        f"{len(self.layout.params)}); resume with the same config or write a new store"
                    )
        if mode == "w" or not exists or not (self.path / ZARR_JSON).is_file():
            if exists and not (self.path / ZARR_JSON).is_file():
                self.path.rmdir()  # an empty folder
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _new_store(self.path, self.layout, attrs, self.chunk_steps)
        self._attrs = _root_attrs(self.path)
        self._n = int(self._attrs.get("committed_steps", 0))
        import zarr

        for stale in self.path.glob(f".{EVENTS_GROUP}.tmp-*"):  # a crash while the first events were written
            shutil.rmtree(stale, ignore_errors=True)
        if "committed_events" not in self._attrs:
            ev_dir = self.path / EVENTS_GROUP
            self._attrs["committed_events"] = (
                _committed_events({}, zarr.open_group(str(ev_dir), mode="r", use_consolidated=False))
                if (ev_dir / ZARR_JSON).is_file() else 0
            )

        group = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        self._arrays = {name: group[name] for name in STEP_VARS}
        chunk = self._arrays["step"].chunks[0]
        if chunk != self.chunk_steps:
            log.info("store %s has chunks of %d steps; using that instead of %d", self.path, chunk, self.chunk_steps)
            self.chunk_steps = chunk
        self._load_cache()
        self._last_step = int(self._arrays["step"][self._n - 1]) if self._n else None

    def append(self, record: TraceRecord | PendingRecord) -> None:
        """Queue one step (strictly after the previous one); blocks only while the queue is full."""
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("TraceWriter is closed")
        step = int(record.step)
        if self._last_step is not None and step <= self._last_step:
            raise VaedynError(
                f"trace store {self.path}: step {step} is not after the last recorded step {self._last_step} "
                "(steps must be strictly increasing; truncate first when resuming)"
            )
        self._last_step = step
        self._put(("record", record))

    def add_events(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Queue intervention rows (fields: step, layer, channel_index, strategy, param, before, after)."""
        if rows:
            self._put(("events", _events_dataset(rows)))

    def truncate(self, step: int) -> None:
        """Drop every step after `step` (and the events after it), e.g. when resuming from a checkpoint."""
        self._call("truncate", int(step))
        steps = self._arrays_steps()
        self._last_step = int(steps[-1]) if steps.size else None

    def flush(self) -> None:
        """Write and commit everything queued so far."""
        self._call("flush", None)

    def close(self) -> None:
        """Flush, trim the arrays to the committed steps, stop the thread; raises the thread's error."""
        with self._lock:
            if self._closed:
                self._raise_if_failed()
                return
            self._closed = True
        self._queue.put((_CLOSE, None))
        self._thread.join()
        self._raise_if_failed()

    def recent(self) -> list[TraceRecord]:
        """The last `keep_recent` written records (oldest first), e.g. for in-training classification."""
        return list(self._recent)

    @property
    def committed_steps(self) -> int:
        return self._n

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, item: tuple[Any, Any]) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_if_failed()
                    raise RuntimeFailure(f"trace writer for {self.path} stopped") from None

    def _call(self, op: str, arg: Any) -> None:
        if self._closed:
            raise RuntimeError("TraceWriter is closed")
        done = threading.Event()
        self._put((op, (arg, done)))
        while not done.wait(0.5):
            if not self._thread.is_alive():
                break
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            raise RuntimeFailure(
                f"writing trace store {self.path} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e

    # -- writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        deadline: float | None = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                op, arg = self._queue.get(timeout=timeout)
            except queue.Empty:
                op, arg = "tick", None
            if self._error is not None:  # failed: keep draining so producers never block
                self._release(op, arg)
                if op is _CLOSE:
                    return
                continue
            try:
                if op == "record":
                    self._add_row(arg.resolve())
                    if self._pending == 0:
                        deadline = None
                    elif deadline is None:
                        deadline = time.monotonic() + self.commit_interval_s
                    continue
                if op == "tick":
                    self._commit_pending()
                elif op == "events":
                    self._commit_pending()
                    self._append_events(arg)
                elif op == "truncate":
                    self._commit_pending()
                    self._truncate(arg[0])
                elif op == "flush":
                    self._commit_pending()
                elif op is _CLOSE:
                    self._commit_pending()
                    self._trim_to_committed()
                    return
                deadline = None
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                self._error = e
                log.error("trace writer for %s failed: %s", self.path, e)
                if op is _CLOSE:
                    return  # close() is waiting for this thread to end
            finally:
                if op not in ("record", "tick") or self._error is not None:
                    self._release(op, arg)

    @staticmethod
    def _release(op: Any, arg: Any) -> None:
        if op in ("truncate", "flush") and arg is not None:
            arg[1].set()

    def _load_cache(self) -> None:
        """The in-memory copy of the chunk that holds the next step (its committed rows included)."""
        self._start = (self._n // self.chunk_steps) * self.chunk_steps
        self._cache = {}
        for name, arr in self._arrays.items():
            block = np.full((self.chunk_steps, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
            have = self._n - self._start
            if have:
                block[:have] = arr[self._start : self._n]
            self._cache[name] = block
        self._pending = 0

    def _arrays_steps(self) -> np.ndarray:
        return np.asarray(self._arrays["step"][: self._n]) if self._n else np.zeros(0, np.int64)

    def _add_row(self, record: TraceRecord) -> None:
        i = self._n + self._pending - self._start
        for name in STEP_VARS:
            self._cache[name][i] = _row(record, name, self.layout)
        self._pending += 1
        if self._recent.maxlen:
            self._recent.append(record)
        if i + 1 == self.chunk_steps:
            self._commit_pending()

    def _write_cache(self) -> None:
        end = self._start + self.chunk_steps
        for name, arr in self._arrays.items():
            if arr.shape[0] < end:
                arr.resize((end, *arr.shape[1:]))
            arr[self._start : end] = self._cache[name]

    def _commit(self) -> None:
        self._attrs["committed_steps"] = int(self._n)
        _commit_root(self.path, self._attrs, self._n)

    def _commit_pending(self) -> None:
        if not self._pending:
            return
        self._write_cache()
        if faults.armed("writer_flush"):
            first = self._n - self._start
            for step in self._cache["step"][first : first + self._pending]:
                faults.maybe_fail("writer_flush", int(step))
        self._n += self._pending
        self._pending = 0
        self._commit()
        if self._n - self._start == self.chunk_steps:
            self._load_cache()

    def _truncate(self, step: int) -> None:
        """Commit the shorter counts first, then drop what lies beyond them on disk (rows a crashed
        writer left uncommitted included)."""
        import zarr

        keep = int(np.searchsorted(self._arrays_steps(), step, side="right"))
        if keep != self._n:
            log.info("trace %s: dropping %d steps after step %d", self.path, self._n - keep, step)
        self._n = keep
        self._load_cache()
        ev_dir = self.path / EVENTS_GROUP
        committed = int(self._attrs.get("committed_events", 0))
        group = zarr.open_group(str(ev_dir), mode="r+", use_consolidated=False) if committed else None
        n_keep = 0
        if group is not None:
            ev_steps = np.asarray(group["step"][:committed])
            n_keep = int((ev_steps <= step).sum())
            if not (ev_steps[:n_keep] <= step).all():
                raise RuntimeError("events are not in step order; cannot truncate them")
        self._attrs["committed_events"] = n_keep
        self._commit()
        if group is None or n_keep == 0:
            shutil.rmtree(ev_dir, ignore_errors=True)
        else:
            for name in EVENT_FIELDS:
                if group[name].shape[0] != n_keep:
                    group[name].resize((n_keep,))
        self._commit()

    def _append_events(self, ds: xr.Dataset) -> None:
        """Rows after the committed ones (overwriting what a crashed writer left), then a commit of
        `committed_events`; the first rows make the group aside and rename it into place."""
        ev_dir = self.path / EVENTS_GROUP
        n0, k = int(self._attrs.get("committed_events", 0)), ds.sizes["event"]
        if n0 == 0:
            tmp = self.path / f".{EVENTS_GROUP}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=_encoding(ds, self.chunk_steps))
                shutil.rmtree(ev_dir, ignore_errors=True)
                os.rename(tmp, ev_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            import zarr

            group = zarr.open_group(str(ev_dir), mode="r+", use_consolidated=False)
            for name in EVENT_FIELDS:
                arr = group[name]
                arr.resize((n0 + k,))
                values = ds[name].values
                arr[n0:] = values.astype(object) if values.dtype.kind in "OUT" else values
        self._attrs["committed_events"] = n0 + k
        self._commit()

    def _trim_to_committed(self) -> None:
        for arr in self._arrays.values():
            if arr.shape[0] != self._n:
                arr.resize((self._n, *arr.shape[1:]))
        self._commit()


def write_records(
    path: str | Path,
    records: Sequence[TraceRecord],
    layout: ChannelLayout,
    attrs: Mapping[str, Any],
    chunk_steps: int = 64,
) -> Path:
    """Write a whole store at once (tests, conversions); replaces an existing trace store at `path`."""
    with TraceWriter(path, layout, attrs, mode="w", chunk_steps=chunk_steps) as writer:
        for record in records:
            writer.append(record)
    return Path(path)


def write_group(path: str | Path, name: str, ds: xr.Dataset) -> None:
    """Write (replace) a child group of a store and refresh the consolidated metadata."""
    root = Path(path)
    check_store(root)
    ds.to_zarr(root, group=name, mode="w", zarr_format=3, consolidated=False)
    consolidate(root)


__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "CHANNEL_VARS",
    "SCALAR_VARS",
    "PARAM_VARS",
    "EVENT_FIELDS",
    "ChannelLayout",
    "TraceRecord",
    "TraceWriter",
    "check_store",
    "consolidate",
    "info_table",
    "open_trace",
    "read_events",
    "records_to_dataset",
    "resolve_store_path",
    "store_attrs",
    "store_info",
    "write_group",
    "write_records",
]
