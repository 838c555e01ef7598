"""`vaedyn store info`: a summary of a store, as a dict and as a table."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vaedyn_cli.store.chunks import ALL_CHUNKS, check_chunks
from vaedyn_cli.store.classification import read_classification
from vaedyn_cli.store.reader import check_store, locate, open_trace, read_events
from vaedyn_cli.store.schema import CLASSIFICATION_GROUP, ZARR_JSON


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
    root = locate(Path(path))
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
        "torch_version": attrs.get("torch_version"),
        "torch_threads": attrs.get("torch_threads"),
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


def verify_store(path: str | Path) -> str:
    """`vaedyn store check`: the checks every reader makes (metadata, counts, step order, each
    committed chunk present and its header sound), then every chunk of every group decoded. Returns
    the one OK line; the first problem is a VaedynError naming the array, the chunk and its steps."""
    root = locate(Path(path))
    ds = open_trace(root)
    events = read_events(root)
    read_classification(root)
    attrs = {**check_store(root), "committed_steps": int(ds.sizes.get("step", 0))}
    if events is not None:
        attrs["committed_events"] = int(events.sizes["event"])
    n = check_chunks(root, attrs, None, decode=True, steps=ds["step"].values)
    note = "" if attrs.get(ALL_CHUNKS) else (
        " (written by a vaedyn that skipped chunks of fill values only: a missing chunk cannot be told from one)")
    return (f"OK: trace store {root}: {attrs['committed_steps']} steps, {0 if events is None else events.sizes['event']} "
            f"events, {n} chunks decode{note}")


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
    if info["torch_threads"] is not None:
        table.add_row("written with", f"torch {info['torch_version']}, {info['torch_threads']} threads")
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

