"""What a report shows, read from a trace store and reduced: per-step inactive counts, the heatmap's
scores, |gamma| quantiles, the classification, events, validation records, per-layer tables.

Out of core: per-step quantities are read in chunks of at most `classify.chunk_steps` steps at an
evenly spaced subset of at most MAX_LINE_STEPS steps (MAX_HEATMAP_STEPS for the heatmap), always
including the first and the last step, and reduced on the fly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vaedyn_cli import artifacts
from vaedyn_cli import store as store_mod
from vaedyn_cli.classification import Channels, select_channels, step_states, stored_labels, trace_params
from vaedyn_cli.config import ClassifyConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.labels import ACTIVE, DEAD, DORMANT, MECHANISMS, PARTS, STATES, TRAJECTORIES, UNKNOWN

ACTIVE_NAME, DORMANT_NAME, DEAD_NAME = STATES

log = logging.getLogger(__name__)

MAX_LINE_STEPS = 2000
MAX_HEATMAP_STEPS = 400
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.0)  # the last: the smallest |gamma|, where a few channels collapse


@dataclass
class ReportData:
    """Everything read from the store, reduced to what the figures and tables show."""

    path: Path
    ds: xr.Dataset
    run_dir: Path | None
    params: ClassifyConfig
    channels: Channels  # every channel, in store order (classify.select_channels)
    steps: np.ndarray  # all committed steps
    line_idx: np.ndarray  # positions of the steps used by line plots
    heat_idx: np.ndarray  # positions of the heatmap's columns
    inactive: dict[str, np.ndarray] = field(default_factory=dict)  # part -> count per line step
    dead: dict[str, np.ndarray] = field(default_factory=dict)
    heat_score: np.ndarray | None = None  # (channels, heat steps)
    heat_codes: np.ndarray | None = None  # (channels, heat steps) per-step state codes
    inactive_steps: np.ndarray | None = None  # per channel: line steps at which the per-step rule says inactive
    last_codes: np.ndarray | None = None  # raw state code per channel at the last step
    gamma_q: dict[str, np.ndarray] = field(default_factory=dict)  # part -> (quantiles, line steps)
    labels: xr.Dataset | None = None
    labels_from: str = ""
    events: xr.Dataset | None = None
    validation: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


def spread(n: int, limit: int) -> np.ndarray:
    """At most `limit` evenly spaced positions out of n, always with the first and the last."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))


def run_dir(path: Path) -> Path | None:
    """The run folder of a run's own trace (None for any other store)."""
    return artifacts.run_of(path, levels=1) if path.name == artifacts.TRACE_DIR else None


def text(values: Any) -> np.ndarray:
    """Strings of any stored kind (numpy StringDType, object, bytes-free unicode) as a plain str array."""
    return np.asarray([str(v) for v in np.asarray(values).tolist()], dtype=str)


def has(ds: xr.Dataset, name: str) -> bool:
    return name in ds.variables


def read_steps(ds: xr.Dataset, name: str, idx: np.ndarray) -> np.ndarray:
    return np.asarray(ds[name].isel(step=idx).values, dtype=np.float64)


def read_channels(ds: xr.Dataset, name: str, idx: np.ndarray, ch: Channels) -> np.ndarray:
    """A (steps, channels) variable at the step positions `idx`, its columns in the order of `ch`."""
    values = read_steps(ds, name, idx)
    return values if np.array_equal(ch.pos, np.arange(values.shape[1])) else values[:, ch.pos]


def _reduce_steps(d: ReportData) -> None:
    """One chunked pass over the line steps: inactive counts, heatmap columns, |gamma| quantiles."""
    ch, ds = d.channels, d.ds
    parts = {p: ch.part == p for p in PARTS}
    heat_set = set(d.heat_idx.tolist())
    n = len(d.line_idx)
    d.inactive = {p: np.zeros(n, np.int64) for p in PARTS}
    d.dead = {p: np.zeros(n, np.int64) for p in PARTS}
    heat_cols: list[np.ndarray] = []
    heat_code_cols: list[np.ndarray] = []
    d.inactive_steps = np.zeros(ch.n, np.int64)
    want_gamma = has(ds, "gn_weight")
    gq = {p: np.full((len(QUANTILES), n), np.nan) for p in PARTS}
    chunk = max(1, d.params.chunk_steps)
    for a in range(0, n, chunk):
        idx = d.line_idx[a : a + chunk]
        codes, score = step_states(ds, d.params, idx, channels=ch)
        inactive = codes >= DORMANT
        dead = codes == DEAD
        d.inactive_steps += inactive.sum(axis=0)
        for p, sel in parts.items():
            d.inactive[p][a : a + len(idx)] = inactive[:, sel].sum(axis=1)
            d.dead[p][a : a + len(idx)] = dead[:, sel].sum(axis=1)
        keep = [i for i, s in enumerate(idx.tolist()) if s in heat_set]
        if keep:
            heat_cols.append(score[keep].T)
            heat_code_cols.append(codes[keep].T)
        if want_gamma:
            g = np.abs(read_channels(ds, "gn_weight", idx, ch))
            for p, sel in parts.items():
                if sel.any():
                    with np.errstate(all="ignore"):
                        gq[p][:, a : a + len(idx)] = np.nanquantile(g[:, sel], QUANTILES, axis=1) \
                            if np.isfinite(g[:, sel]).any() else np.nan
        if a + len(idx) == n:
            d.last_codes = codes[-1]
    d.heat_score = np.concatenate(heat_cols, axis=1) if heat_cols else None
    d.heat_codes = np.concatenate(heat_code_cols, axis=1) if heat_code_cols else None
    d.gamma_q = gq if want_gamma else {}


def _load_validation(d: ReportData) -> list[dict[str, Any]]:
    """Validation records: `val_*` variables of the store, else the run folder's validation lines."""
    names = [n for n in d.ds.data_vars if str(n).startswith("val_") and d.ds[n].dims == ("step",)]
    if names:
        rows = []
        values = {n: read_steps(d.ds, n, d.line_idx) for n in names}
        for i, s in enumerate(d.steps[d.line_idx].tolist()):
            row = {n: values[n][i] for n in names if np.isfinite(values[n][i])}
            if row:
                rows.append({"step": int(s), **row})
        return rows
    if d.run_dir is None or not (d.run_dir / artifacts.VALIDATION_FILE).is_file():
        return []
    rows = []
    for rec in artifacts.read_jsonl(d.run_dir / artifacts.VALIDATION_FILE):
        if isinstance(rec, dict) and "step" in rec:
            rows.append(rec)
    return rows


def gather(path: Path, ds: xr.Dataset) -> ReportData:
    """Read and reduce what the report shows (the classification too, in memory when not stored)."""
    steps = np.asarray(ds["step"].values).astype(np.int64)
    if len(steps) == 0:
        raise VaedynError(f"trace {path} has no committed step yet; report after the first tracked step is written")
    params = trace_params(ds)
    d = ReportData(path=path, ds=ds, run_dir=run_dir(path), params=params,
                   channels=select_channels(ds), steps=steps,
                   line_idx=spread(len(steps), MAX_LINE_STEPS), heat_idx=np.array([], np.int64))
    d.heat_idx = d.line_idx[spread(len(d.line_idx), MAX_HEATMAP_STEPS)]
    _reduce_steps(d)
    d.labels, d.labels_from = stored_labels(path, ds)
    d.events = store_mod.read_events(path)
    d.validation = _load_validation(d)
    return d



def event_steps(d: ReportData) -> tuple[np.ndarray, int]:
    if d.events is None or d.events.sizes.get("event", 0) == 0 or "step" not in d.events:
        return np.array([], np.int64), 0
    ev_steps = np.asarray(d.events["step"].values).astype(np.int64)
    return np.unique(ev_steps), len(ev_steps)



def died(d: ReportData) -> dict[str, Any] | None:
    """The channels the classification says died during the trace (trajectory `died`: active first,
    then inactive for good from `onset_step`), by mechanism: how many, and their onset steps in
    order. None without a classification."""
    if d.labels is None:
        return None
    cols = label_columns(d, "trajectory", "mechanism", "onset_step")
    sel = (cols["trajectory"] == "died") & (cols["onset_step"] >= 0)
    onsets = {m: np.sort(cols["onset_step"][sel & (cols["mechanism"] == m)]).astype(np.int64) for m in MECHANISMS}
    all_onsets = np.sort(np.concatenate(list(onsets.values())))
    return {"total": int(sel.sum()), "channels": int(d.channels.n),
            "by_mechanism": {m: int(len(v)) for m, v in onsets.items()},
            "onsets": {m: v.tolist() for m, v in onsets.items()},
            "first_onset": int(all_onsets[0]) if len(all_onsets) else None,
            "median_onset": float(np.median(all_onsets)) if len(all_onsets) else None,
            "last_onset": int(all_onsets[-1]) if len(all_onsets) else None}


def layer_table(d: ReportData) -> list[dict[str, Any]]:
    """Per layer at the last step: channels, dormant, dead, inactive share, median |gamma|."""
    ch, codes = d.channels, d.last_codes
    gamma = None
    if has(d.ds, "gn_weight"):
        gamma = np.abs(read_channels(d.ds, "gn_weight", d.line_idx[-1:], ch)[0])
    rows = []
    for name in ch.names:
        sel = ch.layer == name
        c = codes[sel] if codes is not None else np.array([])
        dormant, dead = int((c == DORMANT).sum()), int((c == DEAD).sum())
        g = gamma[sel] if gamma is not None else np.array([np.nan])
        rows.append({
            "layer": str(name), "part": str(ch.part[sel][0]), "channels": int(sel.sum()),
            "dormant": dormant, "dead": dead, "inactive_fraction": (dormant + dead) / max(int(sel.sum()), 1),
            "median_abs_gamma": float(np.nanmedian(g)) if np.isfinite(g).any() else None,
        })
    return rows



def class_counts(labels: xr.Dataset) -> dict[str, dict[str, dict[str, int]]]:
    """{trajectory|mechanism|flag: {class: {part: count}}} from per-channel labels."""
    part = text(labels["part"].values)
    out: dict[str, dict[str, dict[str, int]]] = {"state": {}, "trajectory": {}, "mechanism": {}, "flag": {}}
    for key, classes in (("state", (*STATES, UNKNOWN)),
                         ("trajectory", (*TRAJECTORIES, UNKNOWN)),
                         ("mechanism", MECHANISMS)):
        v = np.asarray([str(x) if x is not None else "" for x in labels[key].values.tolist()])
        for c in classes:
            counts = {p: int(((v == c) & (part == p)).sum()) for p in PARTS}
            if sum(counts.values()) or c != UNKNOWN:
                out[key][c] = counts
    for flag in ("unused", "input_collapsed"):
        v = np.asarray(labels[flag].values).astype(bool)
        out["flag"][flag] = {p: int((v & (part == p)).sum()) for p in PARTS}
    return out



def label_columns(d: ReportData, *keys: str) -> dict[str, np.ndarray]:
    """Columns of the classification aligned with `d.channels` ("" / -1 for channels it does not cover)."""
    ch = d.channels
    out = {k: np.full(ch.n, "", dtype=object) if k in ("state", "trajectory", "mechanism") else np.full(ch.n, -1)
           for k in keys}
    if d.labels is None:
        return out
    where = {(str(n), int(i)): k for k, (n, i) in enumerate(zip(ch.layer.tolist(), ch.channel_index.tolist(),
                                                                 strict=True))}
    rows = [where.get((str(n), int(i)), -1) for n, i in zip(text(d.labels["layer"].values).tolist(),
                                                             np.asarray(d.labels["channel_index"].values).tolist(),
                                                             strict=True)]
    rows = np.asarray(rows, np.int64)
    ok = rows >= 0
    for k in keys:
        values = np.asarray(d.labels[k].values)
        out[k][rows[ok]] = np.asarray([str(v) for v in values.tolist()], dtype=object)[ok] \
            if out[k].dtype == object else values[ok]
    return out


def _held(codes: np.ndarray, inactive: bool) -> int:
    """Tracked steps at the end of `codes` (one channel's tail) in a row with the same inactive/active state."""
    same = (codes >= DORMANT) if inactive else (codes == ACTIVE)
    return len(same) - int(np.flatnonzero(~same)[-1]) - 1 if (~same).any() else len(same)


MAX_RECONCILED = 100  # channels listed in summary.json's reconciliation


def reconcile(d: ReportData) -> dict[str, Any] | None:
    """Where the per-step rule at the last step and the persistence-filtered classification disagree,
    channel by channel, and why: a change the classification has not counted yet (it holds fewer than
    `min_persist` tracked steps), or a classification made over another window or with other settings.
    None without a classification."""
    if d.labels is None or d.last_codes is None:
        return None
    ch = d.channels
    stored = json.loads(d.labels.attrs.get("params", "{}") or "{}")
    persist = int(stored.get("min_persist", d.params.min_persist))
    state = label_columns(d, "state")["state"]
    covered = state != ""
    per_step = d.last_codes >= DORMANT
    classified = np.isin(state, (DORMANT_NAME, DEAD_NAME))
    only_step = np.flatnonzero(covered & per_step & ~classified)
    only_class = np.flatnonzero(covered & ~per_step & classified)
    n_tail = min(len(d.steps), persist + 1)
    tail = np.arange(len(d.steps) - n_tail, len(d.steps))
    codes = step_states(d.ds, d.params, tail, channels=ch)[0] if len(only_step) + len(only_class) else None
    steps = d.steps[tail]

    def rows(index: np.ndarray, inactive: bool) -> list[dict[str, Any]]:
        out = []
        for i in index[:MAX_RECONCILED].tolist():
            held = _held(codes[:, i], inactive)
            out.append({"layer": str(ch.layer[i]), "channel_index": int(ch.channel_index[i]), "part": str(ch.part[i]),
                        "state": str(state[i]), "since_step": int(steps[len(steps) - held]) if held else None,
                        "held": held, "at_least": held == n_tail})
        return out

    settings = {k: stored.get(k) for k in ("method", "tau", "threshold", "dead_threshold") if k in stored}
    differ = {k: v for k, v in settings.items() if v != getattr(d.params, k)}
    return {
        "step": int(d.steps[-1]),
        "min_persist": persist,
        "window": [int(d.labels.attrs.get("first_step", d.steps[0])), int(d.labels.attrs.get("last_step", d.steps[-1]))],
        "per_step": {p: int((per_step & (ch.part == p)).sum()) for p in PARTS},
        "classified": {p: int((classified & (ch.part == p)).sum()) for p in PARTS},
        "covered": int(covered.sum()),
        "n_only_per_step": len(only_step),
        "n_only_classified": len(only_class),
        "only_per_step": rows(only_step, True),
        "only_classified": rows(only_class, False),
        "settings_differ": differ,
    }


def stored_config(d: ReportData) -> dict[str, Any]:
    """The run config stored in the trace (empty when there is none)."""
    return store_mod.stored_config(d.ds.attrs) or {}
