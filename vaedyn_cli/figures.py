"""The report's figures: one function per PNG, registered with its title and caption (`FIGURES`).

A figure whose data the store lacks (no events, NaN training scalars in a `track` store, no
near-zero tracker, ...) raises `Skip` with the note the page shows instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vaedyn_cli.labels import ACTIVE, PARTS
from vaedyn_cli.report_data import (
    ReportData,
    class_counts,
    event_steps,
    has,
    layer_table,
    read_steps,
    spread,
    stored_config,
)

log = logging.getLogger(__name__)

PART_COLOURS = {"encoder": "#1f77b4", "decoder": "#d62728"}
MAX_HEATMAP_INCHES = 14  # beyond ~1,500 rows the heatmap averages neighbouring (sorted) channels
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
        "Share of near-zero weights per parameter tensor",
        "Share of each tracked parameter tensor (every weight and bias, norms included, or the conv/linear "
        "weights: track.near_zero.params) below the near-zero threshold over training; the 10 with the highest "
        "peak labelled (the original study's Figure 1).",
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


class Skip(Exception):
    """A figure whose data the store lacks; the message is the note shown in the page."""



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
        ticks = spread(len(steps), 8)
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
    ev, n_events = event_steps(d)
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
    if not has(d.ds, "near_zero_frac") or d.ds["near_zero_frac"].size == 0:
        raise Skip("the trace has no near_zero_frac (track.near_zero.enabled was off)")
    values = read_steps(d.ds, "near_zero_frac", d.line_idx) * 100  # (steps, param)
    if not np.isfinite(values).any():
        raise Skip("near_zero_frac is NaN at every step")
    plt = _plt()
    params = [str(p) for p in np.asarray(d.ds["param"].values).tolist()] if "param" in d.ds.coords else \
        [f"param {i}" for i in range(values.shape[1])]
    x = d.steps[d.line_idx]
    peak = np.nan_to_num(np.nanmax(np.where(np.isfinite(values), values, np.nan), axis=0), nan=-1)
    top = list(np.argsort(-peak, kind="stable")[: min(10, len(params))])  # the original's Figure 1: top 10 by peak
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for j in [j for j in range(len(params)) if j not in top] + top:  # steps without a record are left out
        ok = np.isfinite(values[:, j])
        if j in top:
            ax.plot(x[ok], values[ok, j], linewidth=1.4, marker=_marker(int(ok.sum())), label=params[j])
        else:
            ax.plot(x[ok], values[ok, j], color="#999999", linewidth=0.6, alpha=0.6)
    ax.set_xlabel(_step_xlabel(d))
    if d.steps[-1] > d.steps[0]:
        pad = 0.03 * float(d.steps[-1] - d.steps[0])
        ax.set_xlim(d.steps[0] - pad, d.steps[-1] + pad)
    ax.set_ylabel("near-zero weights (% of the tensor)")
    nz = stored_config(d).get("track", {}).get("near_zero", {})
    how = f" (mode {nz.get('mode')}, abs {nz.get('abs_threshold')}, rel {nz.get('rel_threshold')})" if nz else ""
    recorded = int(np.isfinite(values).any(axis=1).sum())
    when = f", recorded at {recorded} of {len(x)} steps" if recorded < len(x) else ""
    ax.set_title(f"Share of near-zero entries per parameter tensor{how}{when}\n{len(top)} highest labelled, rest grey",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig



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
    train = {n: read_steps(d.ds, n, d.line_idx) for n in SCALARS if has(d.ds, n)}
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

