"""`vaedyn classify`: label the channels of a trace store, write its classification group, print them.

The labels and their definitions are `vaedyn_cli/classification.py`; this stage resolves the
settings (the store's own `classify` section, then `--set classify.FIELD=VALUE`, then the
command's options), writes the store's `classification` group and renders the table, JSON or CSV.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from vaedyn_cli import store as store_mod
from vaedyn_cli.classification import classify_trace, summary, trace_params
from vaedyn_cli.config import ClassifyConfig, parse_override
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.labels import RECORD_KEYS, to_json, to_records

log = logging.getLogger(__name__)

FORMATS = ("table", "json", "csv")

def classify_store(
    path: Path | str,
    params: ClassifyConfig | None = None,
    *,
    from_step: int | None = None,
    to_step: int | None = None,
    layers: Sequence[str] | None = None,
    write: bool = True,
) -> xr.Dataset:
    """Classify a trace store (params default to its stored config) and write its `classification` group."""
    path = store_mod.resolve_store_path(str(path))
    ds = store_mod.open_trace(path)
    labels = classify_trace(ds, params or trace_params(ds), from_step=from_step, to_step=to_step, layers=layers)
    if write:
        store_mod.write_classification(path, labels, n_channels=ds.sizes["channel"])
    return labels




def to_csv(labels: xr.Dataset) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(RECORD_KEYS), lineterminator="\n")
    writer.writeheader()
    for rec in to_records(labels):
        writer.writerow({k: "" if v is None else v for k, v in rec.items()})
    return buf.getvalue()


_SHORT = {"channels": "ch", "born_dormant": "born", "intermittent": "interm", "input_collapse": "in_coll",
          "input_collapsed": "in_collapsed", "saturated": "satur"}


def to_table(labels: xr.Dataset, store: Path | str, color: bool = True, width: int | None = None) -> str:
    """A rich table: one row per layer, a total row; rendered to text."""
    from rich.console import Console
    from rich.table import Table

    rows = summary(labels)
    keys = [k for k in rows[0] if k != "layer"] if rows else []
    title = (f"{store}: method {labels.attrs['method']}, steps {labels.attrs['first_step']}.."
             f"{labels.attrs['last_step']} ({labels.attrs['n_steps']} tracked)")
    table = Table(title=title, show_footer=True)
    table.add_column("layer", footer="total", no_wrap=True)
    for k in keys:
        table.add_column(_SHORT.get(k, k), justify="right", footer=str(sum(r[k] for r in rows)))
    for r in rows:
        table.add_row(r["layer"], *[str(r[k]) if r[k] else "." for k in keys])
    if width is None:  # a terminal's own width; piped text gets room for the longest layer names
        width = shutil.get_terminal_size().columns if color else 240
    console = Console(file=io.StringIO(), force_terminal=color, width=width)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def run(
    store: str,
    overrides: dict[str, Any] | None = None,
    *,
    sets: Sequence[str] = (),
    from_step: int | None = None,
    to_step: int | None = None,
    layers: Sequence[str] | None = None,
    write: bool = True,
    fmt: str | None = None,
    tty: bool = False,
) -> str:
    """`vaedyn classify`: resolve the store, classify, write the group, render the output text.

    `overrides` (None values ignored) and `sets` (`classify.FIELD=VALUE`) go over the store's config.
    """
    if fmt is not None and fmt not in FORMATS:
        raise VaedynError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    for item in sets:
        keys, _ = parse_override(item)
        if len(keys) != 2 or keys[0] != "classify":
            raise VaedynError(f"--set {item!r}: classify takes only classify.FIELD=VALUE, e.g. classify.tau=0.05")
    path = store_mod.resolve_store_path(store)
    ds = store_mod.open_trace(path)
    params = trace_params(ds, overrides, sets)
    labels = classify_trace(ds, params, from_step=from_step, to_step=to_step, layers=layers)
    if write:
        store_mod.write_classification(path, labels, n_channels=ds.sizes["channel"])
        log.info("wrote %s/%s", path, store_mod.CLASSIFICATION_GROUP)
    fmt = fmt or ("table" if tty else "json")
    if fmt == "json":
        return json.dumps(to_json(labels, path)) + "\n"
    if fmt == "csv":
        return to_csv(labels)
    return to_table(labels, path, color=tty)


