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


# table headers: (group, class) -> the column's name; a group's name heads its first column
_GROUPS = ("state", "trajectory", "mechanism", "flag")
_HEAD = {"state": "state", "trajectory": "traj.", "mechanism": "mech.", "flag": "flags"}
_COLUMN = {"active": "act", "dormant": "dorm", "dead": "dead", "unknown": "unk", "born_dormant": "born",
           "died": "died", "revived": "rev", "intermittent": "int", "gn_scale": "gn", "saturated": "sat",
           "input_collapse": "in", "other": "oth", "unused": "unus", "input_collapsed": "coll"}
_LEGEND = ("state at the last step: act(ive), dorm(ant), dead; traj(ectory): act(ive), born (dormant), died, "
           "rev(ived), int(ermittent); mech(anism), of the channels inactive at the end: gn (gn_scale), sat(urated), "
           "in (input_collapse), oth(er); flags: unus(ed), coll (input_collapsed); . = 0")


def _columns(rows: list[dict[str, Any]], group: str) -> list[str]:
    """The classes of a group that the table shows (`unknown` only where some channel has it)."""
    classes = list(rows[0][group]) if rows else []
    return [c for c in classes if c != "unknown" or any(r[group][c] for r in rows)]


def _table(rows: list[dict[str, Any]], groups: Sequence[str], title: str, short: bool, tight: bool = False) -> Any:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from vaedyn_cli.anatomy import PARTS, flow_order, short_layer

    table = Table(title=title, show_footer=True, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                  collapse_padding=tight, title_justify="left")
    table.add_column("\nlayer", footer="total", no_wrap=True)
    table.add_column("\nch", justify="right", footer=str(sum(r["channels"] for r in rows)), no_wrap=True)
    cells = []
    for g in groups:
        for i, c in enumerate(_columns(rows, g)):
            total = sum(r[g][c] for r in rows)
            table.add_column(f"{_HEAD[g] if i == 0 else ''}\n{_COLUMN.get(c, c)}", justify="right",
                             footer=str(total) if total else ".", no_wrap=True)
            cells.append((g, c))
    by_name = {r["layer"]: r for r in rows}
    for p in PARTS:
        names = [n for n in flow_order(list(by_name)) if by_name[n]["part"] == p]
        if short and names:  # the short names leave out the part: it heads its rows
            table.add_row(Text(p, style="bold"), *[""] * (len(cells) + 1))
        for k, name in enumerate(names):
            r = by_name[name]
            table.add_row(short_layer(name) if short else name, str(r["channels"]),
                          *[str(r[g][c]) if r[g][c] else "." for g, c in cells], end_section=k == len(names) - 1)
    return table


def to_table(labels: xr.Dataset, store: Path | str, color: bool = True, width: int | None = None) -> str:
    """Per-layer counts by state, trajectory, mechanism and flags (layers in data-flow order, a total row),
    rendered to text at `width` columns (default: the terminal's; 240 when piped). One table where it fits,
    else two (state and trajectory; mechanism and flags), with layer names shortened (`up0.r1.norm2`) where
    the full ones would not fit."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.text import Text

    rows = summary(labels)
    title = (f"{store}: method {labels.attrs['method']}, steps {labels.attrs['first_step']}.."
             f"{labels.attrs['last_step']} ({labels.attrs['n_steps']} tracked)")
    if width is None:  # a terminal's own width; piped text gets room for the longest layer names
        width = shutil.get_terminal_size().columns if color else 240
    console = Console(file=io.StringIO(), force_terminal=color, width=width)
    one, two = [_GROUPS], [_GROUPS[:2], _GROUPS[2:]]
    layouts = [(one, False, False), (one, True, False), (two, False, False), (two, True, False), (two, True, True)]
    for parts, short, tight in layouts:  # the first that fits
        tables = [_table(rows, groups, title if i == 0 else "", short, tight) for i, groups in enumerate(parts)]
        wide = console.options.update_width(100_000)  # the width each table wants, not what it would get
        if all(Measurement.get(console, wide, t).maximum <= width for t in tables):
            break
    for t in tables:
        console.print(t)
    console.print(Text(_LEGEND + ("; layers: up0.r1.norm2 = decoder.up_blocks.0.resnets.1.norm2" if short else "")))
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


