"""`vaedyn report`: pictures of the channel dynamics in a trace store, and one HTML page.

Reads a trace store (from `train` or `track`), its `classification` group (or classifies in
memory when there is none, without writing), its `events` group and, for a run folder, the
validation lines that training wrote. Writes PNG figures (matplotlib, Agg), `summary.json`
(the numbers behind the tables) and `index.html`, which opens from disk with no server: images
are sibling files referenced by relative path, styles are inline, there is no script.

A figure whose data the store lacks (no events, NaN training scalars in a `track` store, no
near-zero tracker, ...) is skipped with a note in the page, not an error.

Out of core: per-step quantities are read in chunks of at most `classify.chunk_steps` steps
at an evenly spaced subset of at most MAX_LINE_STEPS steps (MAX_HEATMAP_STEPS for the
heatmap), always including the first and the last step, and reduced on the fly.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vaedyn_cli import artifacts
from vaedyn_cli import classify as classify_mod
from vaedyn_cli import store as store_mod
from vaedyn_cli.classify import ACTIVE, DEAD, DORMANT, Channels, select_channels, step_states
from vaedyn_cli.config import ClassifyConfig
from vaedyn_cli.errors import VaedynError

log = logging.getLogger(__name__)

PARTS = ("encoder", "decoder")
PART_COLOURS = {"encoder": "#1f77b4", "decoder": "#d62728"}
MAX_LINE_STEPS = 2000
MAX_HEATMAP_STEPS = 400
MAX_HEATMAP_INCHES = 14  # beyond ~1,500 rows the heatmap averages neighbouring (sorted) channels
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
TOP_LAYERS = 15
DPI = 110
SCALARS = ("loss", "rec_loss", "kl_loss", "lr")

# file -> (title, caption); the order of the page
FIGURES: dict[str, tuple[str, str]] = {
    "dormancy_heatmap.png": (
        "Dormancy over training, channel by channel",
        "Each row is a channel, each column a tracked step; colour is the dormancy score (activity / mean "
        "activity of its layer). Red: at or below the dormancy threshold; grey: not observed. Rows are grouped by "
        "layer (lines) in module order, encoder and decoder apart; within a layer, channels are sorted by their "
        "score at the last step, so the channels that end inactive form the top of each band.",
    ),
    "dormant_counts.png": (
        "Number of inactive channels over training",
        "Dormant + dead channels per part at each tracked step; vertical ticks mark steps with interventions "
        "(events). The original study's Figure 5.",
    ),
    "dormant_by_layer.png": (
        "Inactive channels per layer at the last step",
        "Share of each layer's channels that are dormant or dead at the last tracked step, encoder vs decoder.",
    ),
    "gamma_quantiles.png": (
        "GroupNorm scale |gamma| over training",
        "Quantile bands (5-95 % and 25-75 %) and median of |gamma| over all channels of each part.",
    ),
    "near_zero_weights.png": (
        "Share of near-zero weights per layer",
        "Share of each conv/linear weight tensor below the near-zero threshold over training "
        "(the original study's Figure 1).",
    ),
    "class_counts.png": (
        "Channels by trajectory, mechanism and flag",
        "Counts from the classification: trajectory over the trace, mechanism of the channels inactive at the "
        "end, and the unused / input_collapsed flags, per part.",
    ),
    "loss_curves.png": (
        "Training and validation losses",
        "Training scalars recorded with the trace (total, reconstruction, KL, learning rate) and the "
        "validation metrics written during training.",
    ),
}
SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.html"


class Skip(Exception):
    """A figure whose data the store lacks; the message is the note shown in the page."""


# ---------------------------------------------------------------------------------------------
# gathering what the figures need


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
    last_codes: np.ndarray | None = None  # raw state code per channel at the last step
    gamma_q: dict[str, np.ndarray] = field(default_factory=dict)  # part -> (quantiles, line steps)
    labels: xr.Dataset | None = None
    labels_from: str = ""
    events: xr.Dataset | None = None
    validation: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


def _spread(n: int, limit: int) -> np.ndarray:
    """At most `limit` evenly spaced positions out of n, always with the first and the last."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))


def _run_dir(path: Path) -> Path | None:
    parent = path.parent
    if path.name == artifacts.TRACE_DIR and (parent / artifacts.CONFIG_FILE).is_file():
        return parent
    return None


def default_out(path: Path) -> Path:
    """<run>/report/ for a run's trace, <store>.report/ next to a bare store."""
    run = _run_dir(path)
    return run / artifacts.REPORT_DIR if run else path.with_name(path.name + ".report")


def _text(values: Any) -> np.ndarray:
    """Strings of any stored kind (numpy StringDType, object, bytes-free unicode) as a plain str array."""
    return np.asarray([str(v) for v in np.asarray(values).tolist()], dtype=str)


def _has(ds: xr.Dataset, name: str) -> bool:
    return name in ds.variables


def _read_steps(ds: xr.Dataset, name: str, idx: np.ndarray) -> np.ndarray:
    return np.asarray(ds[name].isel(step=idx).values, dtype=np.float64)


def _read_channels(ds: xr.Dataset, name: str, idx: np.ndarray, ch: Channels) -> np.ndarray:
    """A (steps, channels) variable at the step positions `idx`, its columns in the order of `ch`."""
    values = _read_steps(ds, name, idx)
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
    want_gamma = _has(ds, "gn_weight")
    gq = {p: np.full((len(QUANTILES), n), np.nan) for p in PARTS}
    chunk = max(1, d.params.chunk_steps)
    for a in range(0, n, chunk):
        idx = d.line_idx[a : a + chunk]
        codes, score = step_states(ds, d.params, idx, channels=ch)
        inactive = codes >= DORMANT
        dead = codes == DEAD
        for p, sel in parts.items():
            d.inactive[p][a : a + len(idx)] = inactive[:, sel].sum(axis=1)
            d.dead[p][a : a + len(idx)] = dead[:, sel].sum(axis=1)
        keep = [i for i, s in enumerate(idx.tolist()) if s in heat_set]
        if keep:
            heat_cols.append(score[keep].T)
        if want_gamma:
            g = np.abs(_read_channels(ds, "gn_weight", idx, ch))
            for p, sel in parts.items():
                if sel.any():
                    with np.errstate(all="ignore"):
                        gq[p][:, a : a + len(idx)] = np.nanquantile(g[:, sel], QUANTILES, axis=1) \
                            if np.isfinite(g[:, sel]).any() else np.nan
        if a + len(idx) == n:
            d.last_codes = codes[-1]
    d.heat_score = np.concatenate(heat_cols, axis=1) if heat_cols else None
    d.gamma_q = gq if want_gamma else {}


def _load_validation(d: ReportData) -> list[dict[str, Any]]:
    """Validation records: `val_*` variables of the store, else the run folder's validation lines."""
    names = [n for n in d.ds.data_vars if str(n).startswith("val_") and d.ds[n].dims == ("step",)]
    if names:
        rows = []
        values = {n: _read_steps(d.ds, n, d.line_idx) for n in names}
        for i, s in enumerate(d.steps[d.line_idx].tolist()):
            row = {n: values[n][i] for n in names if np.isfinite(values[n][i])}
            if row:
                rows.append({"step": int(s), **row})
        return rows
    if d.run_dir is None or not (d.run_dir / artifacts.VALIDATION_FILE).is_file():
        return []
    rows = []
    for line in (d.run_dir / artifacts.VALIDATION_FILE).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written when training stopped
        if isinstance(rec, dict) and "step" in rec:
            rows.append(rec)
    return rows


def gather(path: Path, ds: xr.Dataset) -> ReportData:
    """Read and reduce what the report shows (the classification too, in memory when not stored)."""
    steps = np.asarray(ds["step"].values).astype(np.int64)
    if len(steps) == 0:
        raise VaedynError(f"trace {path} has no committed step yet; report after the first tracked step is written")
    params = classify_mod.resolve_params(ds)
    d = ReportData(path=path, ds=ds, run_dir=_run_dir(path), params=params,
                   channels=select_channels(ds), steps=steps,
                   line_idx=_spread(len(steps), MAX_LINE_STEPS), heat_idx=np.array([], np.int64))
    d.heat_idx = d.line_idx[_spread(len(d.line_idx), MAX_HEATMAP_STEPS)]
    _reduce_steps(d)
    stored = classify_mod.read_classification(path)
    if stored is not None and "classified" in stored:
        keep = np.asarray(stored["classified"].values, bool)
        stored = stored.isel(channel=keep).assign_coords(
            layer=("channel", _text(ds["layer"].values)[keep]),
            channel_index=("channel", np.asarray(ds["channel_index"].values)[keep]),
            part=("channel", _text(ds["part"].values)[keep]),
        )
    if stored is not None:
        d.labels, d.labels_from = stored, "stored by `vaedyn classify`"
    else:
        d.labels, d.labels_from = classify_mod.classify_trace(ds, params), "computed in memory (store has none)"
    d.events = store_mod.read_events(path)
    d.validation = _load_validation(d)
    return d


# ---------------------------------------------------------------------------------------------
# figures


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_layer(name: str) -> str:
    """`decoder.up_blocks.0.resnets.1.norm2` -> `up0.r1.norm2` (the part is shown elsewhere)."""
    s = name.split(".", 1)[1] if name.startswith(PARTS) and "." in name else name
    for a, b in (("down_blocks.", "down"), ("up_blocks.", "up"), ("mid_block.", "mid."), ("resnets.", "r"),
                 ("attentions.", "attn"), (".group_norm", ".gn")):
        s = s.replace(a, b)
    return s


def _step_xlabel(d: ReportData) -> str:
    src = d.ds.attrs.get("source", "train")
    return "optimizer step (one tracked checkpoint per point)" if src == "track" else "optimizer step"


def _marker(n: int) -> str | None:
    return "o" if n <= 50 else None


def fig_heatmap(d: ReportData):  # noqa: ANN201
    if d.heat_score is None or not np.isfinite(d.heat_score).any():
        raise Skip("no finite activity statistic in the trace")
    from matplotlib.colors import TwoSlopeNorm

    plt = _plt()
    ch = d.channels
    parts = [p for p in PARTS if (ch.part == p).any()] or ["(all)"]
    sizes = [max(int((ch.part == p).sum()), 1) if p in PARTS else ch.n for p in parts]
    height = min(MAX_HEATMAP_INCHES, 3 + 0.012 * sum(sizes) + 2 * len(parts))
    fig, axes = plt.subplots(len(parts), 1, figsize=(11, height), squeeze=False, gridspec_kw={"height_ratios": sizes},
                             layout="constrained")
    mean_abs = d.params.method == "mean_abs_threshold"
    centre = d.params.threshold if mean_abs else d.params.tau
    finite = d.heat_score[np.isfinite(d.heat_score)]
    top = max(float(np.quantile(finite, 0.99)), centre * 2, 1e-12)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=centre, vmax=top)
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#bbbbbb")
    steps = d.steps[d.heat_idx]
    image = None
    for ax, p in zip(axes[:, 0], parts, strict=True):
        sel = np.flatnonzero(ch.part == p) if p in PARTS else np.arange(ch.n)
        last = d.heat_score[sel, -1]
        sel = sel[np.lexsort((np.where(np.isfinite(last), last, np.inf), ch.seg[sel]))]
        block = d.heat_score[sel]
        image = ax.imshow(np.ma.masked_invalid(block), aspect="auto", cmap=cmap, norm=norm, interpolation="auto",
                          extent=(-0.5, len(steps) - 0.5, len(sel) - 0.5, -0.5))
        names = ch.layer[sel]
        bounds = [0] + [i for i in range(1, len(names)) if names[i] != names[i - 1]] + [len(names)]
        for b in bounds[1:-1]:
            ax.axhline(b - 0.5, color="black", linewidth=0.4)
        # label the layers whose band is tall enough for a 4-point label
        px_per_row = 0.75 * height * DPI / sum(sizes)
        shown = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if (hi - lo) * px_per_row >= 6.5]
        ax.set_yticks([(lo + hi - 1) / 2 for lo, hi in shown])
        band_px = min(((hi - lo) * px_per_row for lo, hi in shown), default=20.0)
        size = min(7.0, max(4.0, band_px * 72 / DPI))  # points
        ax.set_yticklabels([short_layer(names[lo]) for lo, _ in shown], fontsize=size)
        n_layers = len(bounds) - 1
        ticks = _spread(len(steps), 8)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(s) for s in steps[ticks]])
        ax.set_title(f"{p}: {len(sel)} channels in {n_layers} layers", fontsize=10)
        ax.set_ylabel("layer (module order)")
    axes[-1, 0].set_xlabel(_step_xlabel(d) + (f", {len(steps)} of {len(d.steps)} steps shown"
                                              if len(steps) < len(d.steps) else ""))
    what = "mean |output|" if mean_abs else "dormancy score = activity / layer mean"
    cbar = fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01, shrink=0.8)
    cbar.set_label(f"{what} (dimensionless); threshold {centre:g}")
    fig.suptitle("Dormancy heatmap: channels x steps", fontsize=12)
    return fig


def _event_steps(d: ReportData) -> tuple[np.ndarray, int]:
    if d.events is None or d.events.sizes.get("event", 0) == 0 or "step" not in d.events:
        return np.array([], np.int64), 0
    ev_steps = np.asarray(d.events["step"].values).astype(np.int64)
    return np.unique(ev_steps), len(ev_steps)


def fig_counts(d: ReportData):  # noqa: ANN201
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    ch = d.channels
    x = d.steps[d.line_idx]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for p in PARTS:
        total = int((ch.part == p).sum())
        if total:
            ax.plot(x, d.inactive[p], color=PART_COLOURS[p], marker=_marker(len(x)), label=f"{p} (of {total} channels)")
            if d.dead[p].any():
                ax.plot(x, d.dead[p], color=PART_COLOURS[p], linestyle=":", label=f"{p}: dead only")
    ev, n_events = _event_steps(d)
    if len(ev):
        ax.vlines(ev, 0, 0.06, transform=ax.get_xaxis_transform(), color="black", linewidth=0.8,
                  label=f"intervention ({len(ev)} steps, {n_events} events)")
    ax.set_xlabel(_step_xlabel(d))
    ax.set_ylabel("inactive channels (dormant + dead, count)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_title("Inactive channels over training" + ("" if len(ev) else " (no interventions recorded)"))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def layer_table(d: ReportData) -> list[dict[str, Any]]:
    """Per layer at the last step: channels, dormant, dead, inactive share, median |gamma|."""
    ch, codes = d.channels, d.last_codes
    gamma = None
    if _has(d.ds, "gn_weight"):
        gamma = np.abs(_read_channels(d.ds, "gn_weight", d.line_idx[-1:], ch)[0])
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


def fig_by_layer(d: ReportData):  # noqa: ANN201
    if d.last_codes is None or not (d.last_codes >= ACTIVE).any():
        raise Skip("no channel is observed at the last step")
    plt = _plt()
    rows = layer_table(d)
    parts = [p for p in PARTS if any(r["part"] == p for r in rows)]
    n_max = max(sum(r["part"] == p for r in rows) for p in parts)
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), max(3.0, 1.5 + 0.2 * n_max)), squeeze=False)
    for ax, p in zip(axes[0], parts, strict=True):
        rs = [r for r in rows if r["part"] == p]
        y = np.arange(len(rs))
        dormant = np.array([r["dormant"] / r["channels"] for r in rs])
        dead = np.array([r["dead"] / r["channels"] for r in rs])
        ax.barh(y, dead, color="#7f0000", label="dead")
        ax.barh(y, dormant, left=dead, color=PART_COLOURS[p], label="dormant")
        ax.set_yticks(y)
        ax.set_yticklabels([short_layer(r["layer"]) for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the layer's channels (0-1)")
        total = sum(r["dormant"] + r["dead"] for r in rs)
        ax.set_title(f"{p}: {total} of {sum(r['channels'] for r in rs)} inactive", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Inactive share per layer at step {int(d.steps[-1])}", fontsize=12)
    fig.tight_layout()
    return fig


def fig_gamma(d: ReportData):  # noqa: ANN201
    if not d.gamma_q or not any(np.isfinite(q).any() for q in d.gamma_q.values()):
        raise Skip("the trace has no finite gn_weight (|gamma|) values")
    plt = _plt()
    x = d.steps[d.line_idx]
    parts = [p for p in PARTS if np.isfinite(d.gamma_q[p]).any()]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.2), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], parts, strict=True):
        q = d.gamma_q[p]
        c = PART_COLOURS[p]
        ax.fill_between(x, q[0], q[4], color=c, alpha=0.15, label="5-95 %")
        ax.fill_between(x, q[1], q[3], color=c, alpha=0.35, label="25-75 %")
        ax.plot(x, q[2], color=c, marker=_marker(len(x)), label="median")
        finite = q[np.isfinite(q)]
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 10:
            ax.set_yscale("log")
        elif len(finite) and finite.max() > 1e3 * max(finite.min(), 0):
            ax.set_yscale("symlog", linthresh=1e-3)  # zeros among the values: linear near 0, log above 1e-3
        ax.set_xlabel(_step_xlabel(d))
        ax.set_title(f"{p} ({int((d.channels.part == p).sum())} channels)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel(f"|gamma| (GroupNorm scale, {axes[0, 0].get_yscale()} axis)")
    fig.suptitle("Distribution of |gamma| over training", fontsize=12)
    fig.tight_layout()
    return fig


def fig_near_zero(d: ReportData):  # noqa: ANN201
    if not _has(d.ds, "near_zero_frac") or d.ds["near_zero_frac"].size == 0:
        raise Skip("the trace has no near_zero_frac (track.near_zero.enabled was off)")
    values = _read_steps(d.ds, "near_zero_frac", d.line_idx) * 100  # (steps, param)
    if not np.isfinite(values).any():
        raise Skip("near_zero_frac is NaN at every step")
    plt = _plt()
    params = [str(p) for p in np.asarray(d.ds["param"].values).tolist()] if "param" in d.ds.coords else \
        [f"param {i}" for i in range(values.shape[1])]
    x = d.steps[d.line_idx]
    peak = np.nan_to_num(np.nanmax(np.where(np.isfinite(values), values, np.nan), axis=0), nan=-1)
    top = list(np.argsort(-peak, kind="stable")[: min(8, len(params))])
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for j in [j for j in range(len(params)) if j not in top] + top:  # steps without a record are left out
        ok = np.isfinite(values[:, j])
        if j in top:
            ax.plot(x[ok], values[ok, j], linewidth=1.4, marker=_marker(int(ok.sum())),
                    label=params[j].removesuffix(".weight"))
        else:
            ax.plot(x[ok], values[ok, j], color="#999999", linewidth=0.6, alpha=0.6)
    ax.set_xlabel(_step_xlabel(d))
    if d.steps[-1] > d.steps[0]:
        pad = 0.03 * float(d.steps[-1] - d.steps[0])
        ax.set_xlim(d.steps[0] - pad, d.steps[-1] + pad)
    ax.set_ylabel("near-zero weights (% of the tensor)")
    nz = _stored_config(d).get("track", {}).get("near_zero", {})
    how = f" (mode {nz.get('mode')}, abs {nz.get('abs_threshold')}, rel {nz.get('rel_threshold')})" if nz else ""
    recorded = int(np.isfinite(values).any(axis=1).sum())
    when = f", recorded at {recorded} of {len(x)} steps" if recorded < len(x) else ""
    ax.set_title(f"Share of near-zero weights per layer{how}{when}\n{len(top)} highest labelled, rest grey", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def class_counts(labels: xr.Dataset) -> dict[str, dict[str, dict[str, int]]]:
    """{trajectory|mechanism|flag: {class: {part: count}}} from per-channel labels."""
    part = _text(labels["part"].values)
    out: dict[str, dict[str, dict[str, int]]] = {"state": {}, "trajectory": {}, "mechanism": {}, "flag": {}}
    for key, classes in (("state", (*classify_mod.STATES, classify_mod.UNKNOWN)),
                         ("trajectory", (*classify_mod.TRAJECTORIES, classify_mod.UNKNOWN)),
                         ("mechanism", classify_mod.MECHANISMS)):
        v = np.asarray([str(x) if x is not None else "" for x in labels[key].values.tolist()])
        for c in classes:
            counts = {p: int(((v == c) & (part == p)).sum()) for p in PARTS}
            if sum(counts.values()) or c != classify_mod.UNKNOWN:
                out[key][c] = counts
    for flag in ("unused", "input_collapsed"):
        v = np.asarray(labels[flag].values).astype(bool)
        out["flag"][flag] = {p: int((v & (part == p)).sum()) for p in PARTS}
    return out


def fig_classes(d: ReportData):  # noqa: ANN201
    if d.labels is None:
        raise Skip("no classification")
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    counts = class_counts(d.labels)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [5, 4, 2]})
    for ax, key, title in zip(axes, ("trajectory", "mechanism", "flag"),
                              ("trajectory over the trace", "mechanism (inactive at the end)", "flags"), strict=True):
        classes = list(counts[key])
        x = np.arange(len(classes))
        for k, p in enumerate(PARTS):
            vals = [counts[key][c][p] for c in classes]
            bars = ax.bar(x + (k - 0.5) * 0.4, vals, width=0.4, color=PART_COLOURS[p], label=p)
            ax.bar_label(bars, fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([c.replace("_", " ") for c in classes], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("channels (count)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, max(1, *(max(v.values()) for v in counts[key].values())) * 1.1)
        ax.legend(fontsize=8)
    fig.suptitle(f"Channel classes ({d.labels.attrs.get('method', '')}, {d.labels_from})", fontsize=11)
    fig.tight_layout()
    return fig


def _val_series(d: ReportData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each validation metric as (steps, values), sorted by step; a step recorded twice keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    for rec in d.validation:
        for k, v in rec.items():
            if k in ("step", "epoch") or not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if np.isfinite(v):
                series.setdefault(k, {})[int(rec["step"])] = float(v)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def _panel_of(metric: str) -> str:
    m = metric.lower()
    if "kl" in m:
        return "kl"
    if "loss" in m or "mse" in m:
        return "loss"
    return "quality"


def fig_losses(d: ReportData):  # noqa: ANN201
    x = d.steps[d.line_idx]
    train = {n: _read_steps(d.ds, n, d.line_idx) for n in SCALARS if _has(d.ds, n)}
    train = {n: v for n, v in train.items() if np.isfinite(v).any()}
    val = _val_series(d)
    if not train and not val:
        why = "a `track` store has no training scalars" if d.ds.attrs.get("source") == "track" else \
            "training scalars are NaN at every step"
        raise Skip(f"{why} and no validation metrics were recorded")
    panels = {"loss": [], "kl": [], "quality": [], "lr": []}
    for n in train:
        panels["lr" if n == "lr" else "kl" if n == "kl_loss" else "loss"].append(("train " + n, x, train[n]))
    for n, (s, v) in val.items():
        panels[_panel_of(n)].append(("validation " + n, s, v))
    used = [k for k, v in panels.items() if v]
    plt = _plt()
    fig, axes = plt.subplots(1, len(used), figsize=(4.6 * len(used), 4.2), squeeze=False)
    ylabels = {"loss": "loss (MSE on [-1, 1] images)", "kl": "KL (nats)", "quality": "validation metric",
               "lr": "learning rate"}
    for ax, key in zip(axes[0], used, strict=True):
        positive = True
        for label, xs, ys in panels[key]:
            style = {"linestyle": "--", "marker": "o"} if label.startswith("validation") else {"marker": _marker(len(xs))}
            ax.plot(xs, ys, label=label, **style)
            positive &= bool(np.all(ys[np.isfinite(ys)] > 0))
        if key in ("loss", "kl") and positive:
            ax.set_yscale("log")
        ax.set_xlabel(_step_xlabel(d))
        ax.set_ylabel(ylabels[key])
        titles = {"loss": "total and reconstruction loss", "kl": "KL divergence", "quality": "validation quality",
                  "lr": "learning rate"}
        ax.set_title(titles[key], fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Training and validation curves", fontsize=12)
    fig.tight_layout()
    return fig


FIGURE_FUNCS: dict[str, Callable[[ReportData], Any]] = {
    "dormancy_heatmap.png": fig_heatmap,
    "dormant_counts.png": fig_counts,
    "dormant_by_layer.png": fig_by_layer,
    "gamma_quantiles.png": fig_gamma,
    "near_zero_weights.png": fig_near_zero,
    "class_counts.png": fig_classes,
    "loss_curves.png": fig_losses,
}


def render_figures(d: ReportData, out: Path) -> dict[str, str | None]:
    """Write every figure it can into `out`; returns file -> None (written) or the reason it was skipped."""
    plt = _plt()
    result: dict[str, str | None] = {}
    for name, fn in FIGURE_FUNCS.items():
        try:
            fig = fn(d)
        except Skip as e:
            result[name] = str(e)
            log.info("skipped %s: %s", name, e)
            continue
        fig.savefig(out / name, dpi=DPI, pil_kwargs={"compress_level": 3})
        plt.close(fig)
        result[name] = None
    return result


# ---------------------------------------------------------------------------------------------
# summary and page


def _stored_config(d: ReportData) -> dict[str, Any]:
    raw = d.ds.attrs.get("config")
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    except ValueError:
        import yaml

        cfg = yaml.safe_load(raw) or {}
    return cfg if isinstance(cfg, dict) else {}


def _events_summary(d: ReportData) -> dict[str, Any]:
    ev_steps, n = _event_steps(d)
    if not n:
        return {"events": 0}
    ev = d.events
    assert ev is not None
    strategies: dict[str, int] = {}
    for s in _text(ev["strategy"].values).tolist() if "strategy" in ev else []:
        strategies[s] = strategies.get(s, 0) + 1
    chans = set()
    if "layer" in ev and "channel_index" in ev:
        chans = set(zip(_text(ev["layer"].values).tolist(),
                        np.asarray(ev["channel_index"].values).astype(int).tolist(), strict=True))
    return {"events": n, "steps": len(ev_steps), "first_step": int(ev_steps[0]), "last_step": int(ev_steps[-1]),
            "channels_touched": len(chans), "by_strategy": strategies}


def build_summary(d: ReportData, figures: dict[str, str | None]) -> dict[str, Any]:
    """The numbers behind the page (also written as summary.json)."""
    ch = d.channels
    info = store_mod.store_info(d.path, d.ds)  # the steps the figures show, also while training appends
    layers = layer_table(d)
    ranked = sorted(layers, key=lambda r: (-r["inactive_fraction"], -(r["dormant"] + r["dead"])))
    last = {p: {"inactive": int(d.inactive[p][-1]), "dead": int(d.dead[p][-1]),
                "channels": int((ch.part == p).sum())} for p in PARTS}
    return {
        "store": info["path"],
        **{k: info[k] for k in ("schema", "schema_version", "vaedyn_version", "source", "run_name", "size_bytes")},
        "steps": {"count": info["steps"], "first": info["first_step"], "last": info["last_step"],
                  "shown_in_lines": len(d.line_idx), "shown_in_heatmap": len(d.heat_idx)},
        "channels": {"total": info["channels"],
                     **{p: info["layers_by_part"].get(p, {}).get("channels", 0) for p in PARTS}},
        "layers": info["layers"],
        "params": info["params"],
        "classify": {"method": d.params.method, "tau": d.params.tau, "threshold": d.params.threshold,
                     "dead_threshold": d.params.dead_threshold, "min_persist": d.params.min_persist},
        "last_step": last,
        "classification": {"from": d.labels_from, **({"counts": class_counts(d.labels)} if d.labels is not None else {})},
        "most_affected_layers": [r for r in ranked if r["dormant"] + r["dead"] > 0][:TOP_LAYERS],
        "events": _events_summary(d),
        "validation_records": len(d.validation),
        "figures": {k: ("written" if v is None else f"skipped: {v}") for k, v in figures.items()},
    }


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}figure{margin:1.2em 0}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:.3em}.note{background:#fff8e0;border-left:4px solid #e0b000;padding:.5em 1em}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}nav a{margin-right:1em}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _table(header: list[str] | None, rows: list[list[Any]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{_e(v)}</{tag}>"

    head = "<thead><tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def figures_html(figures: dict[str, str | None], captions: dict[str, tuple[str, str]]) -> str:
    """Each figure (file -> None when drawn, else why not) with its title and caption, or the note."""
    parts = []
    for name, why in figures.items():
        head, caption = captions[name]
        if why is None:
            parts.append(f'<figure><h3>{_e(head)}</h3><img src="{_e(name)}" alt="{_e(head)}">'
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
        else:
            parts.append(f'<h3>{_e(head)}</h3><p class="note">Not drawn: {_e(why)}.</p>')
    return "\n".join(parts)


def render_html(d: ReportData, summary: dict[str, Any], figures: dict[str, str | None]) -> str:
    """The self-contained page: summary, figures (sibling PNGs), tables, config."""
    s = summary
    title = f"vaedyn report: {s['run_name'] or d.path.name}"
    parts: list[str] = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>",
                        f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>",
                        '<nav><a href="#summary">summary</a><a href="#figures">figures</a><a href="#layers">layers</a>'
                        '<a href="#classes">classes</a><a href="#config">config</a></nav>']
    st, chs, cl = s["steps"], s["channels"], s["classify"]
    rows = [
        ["store", f"{s['store']} ({s['size_bytes'] / 2**20:.1f} MiB)"], ["schema", f"{s['schema']} v{s['schema_version']}"],
        ["written by", f"vaedyn {s['vaedyn_version']} ({s['source']})"],
        ["steps", f"{st['count']} tracked, {st['first']} .. {st['last']}"],
        ["channels", f"{chs['total']} in {s['layers']} layers (encoder {chs['encoder']}, decoder {chs['decoder']})"],
        ["weights tracked for near-zero share", s["params"]],
        ["inactive at the last step", ", ".join(f"{p} {v['inactive']} of {v['channels']} ({v['dead']} dead)"
                                                for p, v in s["last_step"].items())],
        ["classification", f"{cl['method']} (tau {cl['tau']}, dead below {cl['dead_threshold']}, persistence "
                           f"{cl['min_persist']} steps), {s['classification']['from']}"],
        ["interventions", _events_text(s["events"])],
        ["validation records", s["validation_records"]],
    ]
    parts.append('<h2 id="summary">Summary</h2>' + _table(None, rows, left=2))
    parts.append('<h2 id="figures">Figures</h2>' + figures_html(figures, FIGURES))
    layers = s["most_affected_layers"]
    parts.append(f'<h2 id="layers">Most affected layers (step {st["last"]})</h2>')
    if layers:
        parts.append(_table(["layer", "part", "channels", "dormant", "dead", "inactive share", "median |gamma|"],
                            [[r["layer"], r["part"], r["channels"], r["dormant"], r["dead"],
                              f"{r['inactive_fraction']:.0%}", _fmt(r["median_abs_gamma"])] for r in layers], left=2))
    else:
        parts.append('<p class="note">No channel is dormant or dead at the last step.</p>')
    parts.append('<h2 id="classes">Class counts</h2>')
    counts = s["classification"].get("counts")
    if counts:
        for key, table in counts.items():
            parts.append(f"<h3>{_e(key)}</h3>" + _table([key, *PARTS, "total"],
                                                         [[c, *v.values(), sum(v.values())] for c, v in table.items()]))
    else:
        parts.append('<p class="note">No classification.</p>')
    parts.append('<h2 id="config">Run config</h2>')
    cfg = _stored_config(d)
    parts.append(f"<pre>{_e(json.dumps(cfg, indent=2)) if cfg else 'not stored in the trace'}</pre>")
    model_cfg = d.ds.attrs.get("model_config")
    if model_cfg:
        try:
            model_cfg = json.dumps(json.loads(model_cfg), indent=2) if isinstance(model_cfg, str) else \
                json.dumps(model_cfg, indent=2)
        except ValueError:
            pass
        parts.append(f"<h3>Model config</h3><pre>{_e(model_cfg)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _events_text(ev: dict[str, Any]) -> str:
    if not ev.get("events"):
        return "none recorded"
    strategies = ", ".join(f"{k} {v}" for k, v in ev.get("by_strategy", {}).items())
    return (f"{ev['events']} events on {ev['channels_touched']} channels at {ev['steps']} steps "
            f"({ev['first_step']} .. {ev['last_step']}); {strategies}")


# ---------------------------------------------------------------------------------------------
# entry point


def _check_out(out: Path) -> None:
    """Refuse to replace anything but an earlier report."""
    if out.is_file():
        raise VaedynError(f"--out {out} is a file; pass a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX_FILE).is_file():
        raise VaedynError(f"--out {out} exists and is not a vaedyn report (no {INDEX_FILE}); "
                          "choose another folder or empty it")


def build_report(store: str | Path, out: Path | None = None) -> Path:
    """Write the report of a trace store (a store path, a run folder, or '-' for a path on stdin)
    into `out` (default: <run>/report/ or <store>.report/); returns the folder."""
    path = store_mod.resolve_store_path(store)
    ds = store_mod.open_trace(path)
    out = Path(out) if out is not None else default_out(path)
    _check_out(out)
    d = gather(path, ds)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        figures = render_figures(d, tmp)
        summary = build_summary(d, figures)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        (tmp / INDEX_FILE).write_text(render_html(d, summary, figures))
        artifacts.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
