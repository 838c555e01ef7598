"""The report's figures: one function per PNG, registered with its title and caption (`FIGURES`).

A figure whose data the store lacks (no events, NaN training scalars in a `track` store, no
near-zero tracker, ...) raises `Skip` with the note the page shows instead.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaedyn_cli.anatomy import flow_order, short_layer
from vaedyn_cli.labels import ACTIVE, DORMANT, PARTS, UNOBSERVED
from vaedyn_cli.report_data import (
    ReportData,
    class_counts,
    died,
    event_steps,
    has,
    label_columns,
    layer_table,
    read_steps,
    spread,
    stored_config,
)

log = logging.getLogger(__name__)

PART_COLOURS = {"encoder": "#1f77b4", "decoder": "#d62728"}
OVERVIEW_INCHES = 6.0  # height of the every-channel panels of the heatmap (all parts together)
MAX_INACTIVE_ROWS = 30  # channels the heatmap's inactive panel draws one row each
MIN_ROW_PX = 2.5  # pixel rows per drawn row of the every-channel panels, at least
SCORE_COLOURS = ("#67000d", "#ef3b2c", "#c6dbef", "#08306b")  # score 0, at the threshold (red); above it, top (blue)
UNOBSERVED_COLOUR = "#bbbbbb"
SHARE_BOUNDS = (0.0, 1e-9, 0.02, 0.1, 0.5, 1.0 + 1e-9)  # share of a layer inactive: none, >0, 2 %, 10 %, 50 %
SHARE_COLOURS = ("#ffffff", "#fb6a4a", "#de2d26", "#a50f15", "#4a0008")
DPI = 110
SCALARS = ("loss", "rec_loss", "kl_loss", "lr")

# file -> (title, caption); the order of the page
FIGURES: dict[str, tuple[str, str]] = {
    "died_over_training.png": (
        "Channels that died during training, by mechanism",
        "Channels the classification calls `died` (active first, then inactive for good) counted from the step "
        "their inactivity began (onset), stacked by how they were silenced: gn_scale (their GroupNorm scale "
        "|gamma| fell to a tenth of the layer's median or less), saturated (the activation after them is flat "
        "where their output lies), input_collapse (their input stopped varying), other. The grey line is every "
        "channel inactive at each tracked step by the per-step rule (died or not, e.g. flickering ones).",
    ),
    "dormancy_heatmap.png": (
        "Dormancy over training: which channels are inactive, and when",
        "Columns are tracked steps; colour is the dormancy score (activity / mean activity of its layer): red at or "
        "below the threshold, darker the lower, blue above it, grey where not observed. Top: every channel that is "
        "inactive at some tracked step by the per-step rule or inactive in the classification, one row each (when "
        "there are too many, those inactive at the most steps), with its classification on the right. Middle: the "
        "share of each layer inactive at each step, layers in data-flow order (the decoder's mid block before its "
        "up blocks), with the count at the last step on the right. Bottom: every channel of each part, layer by layer "
        "in data-flow order, the lowest final score at the top of each band; where a band has fewer pixel rows than "
        "channels, a row shows the lowest score of the neighbours it holds, so an inactive channel is never averaged "
        "away.",
    ),
    "dormant_counts.png": (
        "Number of inactive channels over training",
        "Dormant + dead channels per part at each tracked step by the per-step rule (no persistence filter); the "
        "diamonds at the last step are the classification's count (persistence-filtered); vertical ticks mark steps "
        "with interventions (events). The original study's Figure 5.",
    ),
    "dormant_by_layer.png": (
        "Inactive channels per layer at the last step",
        "Share of each layer's channels that are dormant or dead at the last tracked step by the per-step rule, "
        "with the count beside each bar; layers in data-flow order, encoder vs decoder.",
    ),
    "gamma_quantiles.png": (
        "GroupNorm scale |gamma| over training",
        "Quantile bands (5-95 % and 25-75 %), median and smallest |gamma| over all channels of each part (a few "
        "channels whose scale collapses stay inside the bands; the smallest shows them).",
    ),
    "near_zero_weights.png": (
        "Share of near-zero weights per parameter tensor",
        "Share of each tracked parameter tensor (every weight and bias, norms included, or the conv/linear "
        "weights: track.near_zero.params) below the near-zero threshold at the steps where it was recorded; the "
        "10 with the highest peak labelled (the original study's Figure 1).",
    ),
    "class_counts.png": (
        "Channels by state, trajectory, mechanism and flag",
        "Counts from the classification (persistence-filtered): the state at its last step, the trajectory over the "
        "trace, the mechanism of the channels inactive at the end, and the unused / input_collapsed flags, per part. "
        "A panel whose counts span more than a factor 20 has a log axis, so a few channels show beside thousands.",
    ),
    "loss_curves.png": (
        "Training and validation losses",
        "Training scalars recorded with the trace: the one training batch of each tracked step (stderr and TensorBoard "
        "log means over log_interval steps, so they differ); total loss (drawn once when it equals the reconstruction "
        "loss within 1 %), KL, learning rate; and the validation metrics written during training.",
    ),
}


class Skip(Exception):
    """A figure whose data the store lacks; the message is the note shown in the page."""



def pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _step_xlabel(d: ReportData) -> str:
    src = d.ds.attrs.get("source", "train")
    return "optimizer step (one tracked checkpoint per point)" if src == "track" else "optimizer step"


def _marker(n: int) -> str | None:
    return "o" if n <= 50 else None


@dataclass
class HeatPanel:
    """One panel of the dormancy heatmap: what each drawn row (top first) holds.

    `rows[i]` are positions into `ReportData.channels` of the channels row i shows: one channel in the
    `inactive` panel, a layer's channels in `layers`, and in a part's overview (`encoder`, `decoder`) one
    channel, or neighbours of one layer pooled by their lowest score when there are more channels than
    pixel rows. The figure's axes carry the panel's name as their label (`Axes.get_label()`)."""

    name: str
    title: str
    rows: list[np.ndarray]
    labels: list[str]
    right: list[str] = field(default_factory=list)  # right-hand label per row ("" for none)
    pooled: int = 1  # channels per row at most (overview panels)
    inches: float = 1.0


def score_scale(d: ReportData) -> tuple[Any, Any, float]:
    """Colour map, norm and threshold of the dormancy score: reds at or below the threshold (never
    near white, so a channel just under it stands out), blues above it, grey where not observed."""
    from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm

    mean_abs = d.params.method == "mean_abs_threshold"
    centre = float(d.params.threshold if mean_abs else d.params.tau)
    finite = d.heat_score[np.isfinite(d.heat_score)] if d.heat_score is not None else np.array([])
    top = max(float(np.quantile(finite, 0.99)) if len(finite) else 0.0, centre * 2, 1e-12)
    cmap = LinearSegmentedColormap.from_list(
        "vaedyn_score", [(0.0, SCORE_COLOURS[0]), (0.5, SCORE_COLOURS[1]), (0.5, SCORE_COLOURS[2]), (1.0, SCORE_COLOURS[3])]
    ).with_extremes(bad=UNOBSERVED_COLOUR, over=SCORE_COLOURS[3])
    return cmap, TwoSlopeNorm(vmin=0.0, vcenter=centre, vmax=top), centre


def _layer_order(d: ReportData, part: str | None = None) -> list[int]:
    """Segment indices of `d.channels`' layers (of one part) in data-flow order."""
    names = d.channels.names
    ordered = flow_order([n for n in names if part is None or n.split(".", 1)[0] == part])
    seg = {n: i for i, n in enumerate(names)}
    return [seg[n] for n in ordered]


def _channel_label(d: ReportData, i: int) -> str:
    ch = d.channels
    return f"{str(ch.part[i])[:3]} {short_layer(str(ch.layer[i]))} #{int(ch.channel_index[i])}"


def _inactive_panel(d: ReportData, centre: float) -> HeatPanel:
    ch = d.channels
    cols = label_columns(d, "state", "trajectory", "onset_step", "revival_step")
    classified = np.isin(cols["state"], ("dormant", "dead"))
    seen = d.inactive_steps if d.inactive_steps is not None else np.zeros(ch.n, np.int64)
    cand = np.flatnonzero((seen > 0) | classified)
    last = d.last_codes >= DORMANT if d.last_codes is not None else np.zeros(ch.n, bool)
    score = d.heat_score[:, -1]
    # the longest inactive first when they do not all fit; drawn in data-flow order
    rank = np.lexsort((np.where(np.isfinite(score[cand]), score[cand], np.inf), -seen[cand], ~last[cand]))
    shown = cand[rank[:MAX_INACTIVE_ROWS]]
    flow = {s: k for k, s in enumerate(_layer_order(d))}
    shown = shown[np.lexsort((ch.channel_index[shown], [flow[s] for s in ch.seg[shown]]))]

    def right(i: int) -> str:
        st, tr = cols["state"][i], cols["trajectory"][i]
        if not st:
            return ""
        step = cols["onset_step"][i] if tr == "died" else cols["revival_step"][i] if tr == "revived" else -1
        return st if tr == st else f"{st}; {tr.replace('_', ' ')}" + (f" {int(step)}" if step >= 0 else "")

    what = "mean |output|" if d.params.method == "mean_abs_threshold" else "score"
    more = f"; the {len(shown)} inactive at the most steps shown" if len(cand) > len(shown) else ""
    title = (f"Inactive channels: {len(cand)} inactive at some tracked step (per-step rule: {what} <= {centre:g})"
             f" or in the classification{more}")
    return HeatPanel("inactive", title, [np.array([i]) for i in shown.tolist()],
                     [_channel_label(d, i) for i in shown.tolist()], [right(i) for i in shown.tolist()],
                     inches=max(0.9, 0.15 * len(shown) + 0.7))


def _layers_panel(d: ReportData) -> HeatPanel:
    ch = d.channels
    order = [s for p in PARTS for s in _layer_order(d, p)]
    rows = [np.flatnonzero(ch.seg == s) for s in order]
    last = d.last_codes if d.last_codes is not None else np.zeros(ch.n, np.int8)
    names = ch.names
    labels = [f"{names[s].split('.', 1)[0][:3]} {short_layer(names[s])}" for s in order]
    right = [f"{int((last[r] >= DORMANT).sum())}/{len(r)}" for r in rows]
    return HeatPanel("layers", "Share of each layer inactive at each tracked step (per-step rule), layers in "
                     f"data-flow order; right: inactive / channels at step {int(d.steps[-1])}", rows, labels, right,
                     inches=0.115 * len(rows) + 0.8)


def _part_panel(d: ReportData, part: str, inches: float) -> HeatPanel:
    """Every channel of a part, layer by layer in data-flow order, lowest final score at the top of each
    band; where a layer has more channels than its band has pixel rows, neighbours are pooled by their
    lowest score (never averaged, so an inactive channel always colours its row)."""
    ch = d.channels
    score = d.heat_score[:, -1]
    layers = []
    for s in _layer_order(d, part):
        sel = np.flatnonzero(ch.seg == s)
        layers.append(sel[np.argsort(np.where(np.isfinite(score[sel]), score[sel], np.inf), kind="stable")])
    pixel_rows = max(8, int(inches * DPI * 0.65 / MIN_ROW_PX))  # the axes take about 0.7 of the panel
    k = 1
    while sum(-(-len(sel) // k) for sel in layers) > pixel_rows:
        k += 1
    rows, labels = [], []
    for sel in layers:
        band = [sel[i : i + k] for i in range(0, len(sel), k)]
        rows += band
        labels += [short_layer(str(ch.layer[sel[0]]))] + [""] * (len(band) - 1)
    n = int((ch.part == part).sum())
    pooled = f"; one pixel row = the lowest score of up to {k} channels" if k > 1 else ""
    title = f"{part}: all {n} channels in {len(layers)} layers (data-flow order; lowest final score first{pooled})"
    return HeatPanel(part, title, rows, labels, pooled=k, inches=inches)


def heatmap_panels(d: ReportData) -> list[HeatPanel]:
    """The panels of the dormancy heatmap, top to bottom: inactive channels (one row each), the share of
    each layer inactive, then every channel of each part."""
    _, _, centre = score_scale(d)
    ch = d.channels
    parts = [p for p in PARTS if (ch.part == p).any()]
    total = sum(int((ch.part == p).sum()) for p in parts)
    budget = min(OVERVIEW_INCHES, 0.1 * total + 0.8 * len(parts))
    panels = [_inactive_panel(d, centre), _layers_panel(d)]
    panels += [_part_panel(d, p, max(1.0, budget * int((ch.part == p).sum()) / max(total, 1))) for p in parts]
    return panels


def _panel_values(d: ReportData, panel: HeatPanel) -> np.ndarray:
    if panel.name == "layers":
        codes = d.heat_codes
        with np.errstate(invalid="ignore"):
            return np.array([(codes[r] >= DORMANT).sum(0) / np.maximum((codes[r] != UNOBSERVED).sum(0), 1)
                             for r in panel.rows]).reshape(len(panel.rows), -1)
    if not panel.rows:
        return np.zeros((0, d.heat_score.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN (grey)
        return np.array([np.nanmin(d.heat_score[r], axis=0) for r in panel.rows])


def fig_heatmap(d: ReportData):  # noqa: ANN201
    if d.heat_score is None or not np.isfinite(d.heat_score).any():
        raise Skip("no finite activity statistic in the trace")
    from matplotlib.colors import BoundaryNorm, ListedColormap

    plt = pyplot()
    cmap, norm, centre = score_scale(d)
    panels = heatmap_panels(d)
    steps = d.steps[d.heat_idx]
    fig = plt.figure(figsize=(11, sum(p.inches for p in panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": [p.inches for p in panels]})[:, 0]
    share_cmap = ListedColormap(SHARE_COLOURS).with_extremes(bad=UNOBSERVED_COLOUR)
    share_norm = BoundaryNorm(SHARE_BOUNDS, len(SHARE_COLOURS))
    ticks = spread(len(steps), 8)
    score_image = share_image = None
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_label(panel.name)
        ax.set_title(panel.title, fontsize=9, loc="left")
        values = _panel_values(d, panel)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(s) for s in steps[ticks]], fontsize=7)
        if not panel.rows:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no channel is inactive at any tracked step, and none in the classification",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9)
            ax.set_xlim(-0.5, len(steps) - 0.5)
            continue
        share = panel.name == "layers"
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest",
                          cmap=share_cmap if share else cmap, norm=share_norm if share else norm,
                          extent=(-0.5, len(steps) - 0.5, len(panel.rows) - 0.5, -0.5))
        if share:
            share_image = image
        else:
            score_image = image
        labelled = [i for i, lab in enumerate(panel.labels) if lab]
        if panel.name in PARTS:  # a label per layer band, where the band is tall enough for it
            starts = labelled + [len(panel.rows)]
            # band boundaries as ticks outside the image: a line over it would darken the rows next to it,
            # which are the lowest-scoring channels of each band
            ax.set_yticks([b - 0.5 for b in starts[1:-1]], minor=True)
            ax.tick_params(axis="y", which="minor", length=10, width=0.8)
            ax.tick_params(axis="y", which="major", length=0)
            px = panel.inches * DPI * 0.7 / len(panel.rows)
            centres = [((lo + hi - 1) / 2, panel.labels[lo]) for lo, hi in zip(starts[:-1], starts[1:], strict=True)
                       if (hi - lo) * px >= 8]
            ax.set_yticks([c for c, _ in centres])
            ax.set_yticklabels([lab for _, lab in centres], fontsize=6)
            ax.set_ylabel("layer", fontsize=8)
        else:
            ax.set_yticks(range(len(panel.rows)))
            ax.set_yticklabels(panel.labels, fontsize=6.5)
            if panel.name == "layers":
                n_enc = sum(lab.startswith("enc") for lab in panel.labels)
                if 0 < n_enc < len(panel.rows):
                    ax.axhline(n_enc - 0.5, color="black", linewidth=1.0)
            twin = ax.twinx()
            twin.set_ylim(ax.get_ylim())
            twin.set_yticks(range(len(panel.rows)))
            twin.set_yticklabels(panel.right, fontsize=6.5)
            twin.tick_params(length=0)
            if panel.name == "inactive":
                twin.set_ylabel("classification", fontsize=8)
    axes[-1].set_xlabel(_step_xlabel(d) + (f", {len(steps)} of {len(d.steps)} steps shown"
                                           if len(steps) < len(d.steps) else ""))
    what = "mean |output|" if d.params.method == "mean_abs_threshold" else "dormancy score"
    for group in (["inactive"], list(PARTS)):  # a score colour bar beside each group of score panels
        near = [a for a, p in zip(axes, panels, strict=True) if p.name in group and p.rows]
        if near:
            cbar = fig.colorbar(score_image, ax=near, fraction=0.02, pad=0.01, extend="max", aspect=15)
            cbar.set_label(f"{what} (red: <= {centre:g})", fontsize=7)
            cbar.ax.tick_params(labelsize=7)
    if share_image is not None:
        cbar = fig.colorbar(share_image, ax=[a for a, p in zip(axes, panels, strict=True) if p.name == "layers"],
                            fraction=0.02, pad=0.01, ticks=SHARE_BOUNDS[1:-1], aspect=15)
        cbar.ax.set_yticklabels([f"{b:.0%}" if b >= 0.01 else ">0" for b in SHARE_BOUNDS[1:-1]], fontsize=7)
        cbar.set_label("share of the layer inactive", fontsize=7)
    fig.suptitle("Dormancy over training: which channels are inactive, and when", fontsize=12)
    return fig


def _rule(d: ReportData) -> str:
    """The per-step rule in words (the counts it produces say so)."""
    if d.params.method == "mean_abs_threshold":
        return f"per-step rule: mean |output| < {d.params.threshold:g} at that step"
    return f"per-step rule: score <= {d.params.tau:g} at that step, no persistence filter"


MECHANISM_COLOURS = {"gn_scale": "#d62728", "saturated": "#9467bd", "input_collapse": "#ff7f0e", "other": "#7f7f7f"}


def fig_died(d: ReportData):  # noqa: ANN201
    info = died(d)
    if info is None:
        raise Skip("no classification")
    plt = pyplot()
    x = d.steps[d.line_idx]
    fig, ax = plt.subplots(figsize=(9, 4.6))
    order = [m for m in MECHANISM_COLOURS if info["by_mechanism"][m]]
    stacked = [np.searchsorted(np.asarray(info["onsets"][m]), x, side="right") for m in order]
    if order:
        ax.stackplot(x, *stacked, colors=[MECHANISM_COLOURS[m] for m in order], step="post", alpha=0.85,
                     labels=[f"{m.replace('_', ' ')} ({info['by_mechanism'][m]})" for m in order])
    per_step = sum(d.inactive[p] for p in PARTS)
    ax.plot(x, per_step, color="#444444", linewidth=1.0, label="inactive at the step (per-step rule)")
    _over_steps_axes(ax, d, "channels (count)")
    share = 100 * info["total"] / max(info["channels"], 1)
    ax.set_title(f"{info['total']} of {info['channels']} channels ({share:.1f} %) died during training"
                 + (f", onsets at steps {info['first_onset']}-{info['last_onset']}" if info["total"] else ""),
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _over_steps_axes(ax, d: ReportData, ylabel: str) -> np.ndarray:  # noqa: ANN001
    """A count-over-steps panel's marks of the interventions, step axis and integer count axis from 0;
    returns the intervention steps."""
    from matplotlib.ticker import MaxNLocator

    ev, n_events = event_steps(d)
    if len(ev):
        ax.vlines(ev, 0, 0.06, transform=ax.get_xaxis_transform(), color="black", linewidth=0.8,
                  label=f"intervention ({len(ev)} steps, {n_events} events)")
    ax.set_xlabel(_step_xlabel(d))
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    return ev


def fig_counts(d: ReportData):  # noqa: ANN201
    plt = pyplot()
    ch = d.channels
    x = d.steps[d.line_idx]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    state = label_columns(d, "state")["state"] if d.labels is not None else None
    for p in PARTS:
        total = int((ch.part == p).sum())
        if total:
            ax.plot(x, d.inactive[p], color=PART_COLOURS[p], marker=_marker(len(x)), label=f"{p} (of {total} channels)")
            if d.dead[p].any():
                ax.plot(x, d.dead[p], color=PART_COLOURS[p], linestyle=":", label=f"{p}: dead only")
            if state is not None:  # where the persistence-filtered classification ends, for comparison
                n = int((np.isin(state, ("dormant", "dead")) & (ch.part == p)).sum())
                ax.plot([x[-1]], [n], linestyle="none", marker="D", markersize=8, markerfacecolor="none", clip_on=False,
                        markeredgecolor=PART_COLOURS[p], label=f"{p}: classification at the end ({n})")
    ev = _over_steps_axes(ax, d, "inactive channels (dormant + dead, count)")
    ax.set_title("Inactive channels over training" + ("" if len(ev) else " (no interventions recorded)")
                 + f"\n{_rule(d)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fig_by_layer(d: ReportData):  # noqa: ANN201
    if d.last_codes is None or not (d.last_codes >= ACTIVE).any():
        raise Skip("no channel is observed at the last step")
    plt = pyplot()
    by_name = {r["layer"]: r for r in layer_table(d)}
    rows = [by_name[n] for n in flow_order(list(by_name))]
    parts = [p for p in PARTS if any(r["part"] == p for r in rows)]
    n_max = max(sum(r["part"] == p for r in rows) for p in parts)
    top = max(r["inactive_fraction"] for r in rows)
    right = min(1.0, max(0.05, top * 1.3))  # room for the largest bar and its count
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), max(3.0, 1.5 + 0.2 * n_max)), squeeze=False,
                             sharex=True)
    for ax, p in zip(axes[0], parts, strict=True):
        rs = [r for r in rows if r["part"] == p]
        y = np.arange(len(rs))
        dormant = np.array([r["dormant"] / r["channels"] for r in rs])
        dead = np.array([r["dead"] / r["channels"] for r in rs])
        ax.barh(y, dead, color="#7f0000", label="dead")
        ax.barh(y, dormant, left=dead, color=PART_COLOURS[p], label="dormant")
        for yi, r in zip(y, rs, strict=True):
            k = r["dormant"] + r["dead"]
            if k:
                ax.text(r["inactive_fraction"] + right * 0.01, yi, f"{k}/{r['channels']}", va="center", fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels([short_layer(r["layer"]) for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, right)
        ax.set_xlabel("share of the layer's channels (0-1)")
        total = sum(r["dormant"] + r["dead"] for r in rs)
        ax.set_title(f"{p}: {total} of {sum(r['channels'] for r in rs)} inactive (data-flow order)", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Inactive share per layer at step {int(d.steps[-1])} ({_rule(d)})", fontsize=11)
    fig.tight_layout()
    return fig


def fig_gamma(d: ReportData):  # noqa: ANN201
    if not d.gamma_q or not any(np.isfinite(q).any() for q in d.gamma_q.values()):
        raise Skip("the trace has no finite gn_weight (|gamma|) values")
    plt = pyplot()
    x = d.steps[d.line_idx]
    parts = [p for p in PARTS if np.isfinite(d.gamma_q[p]).any()]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.2), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], parts, strict=True):
        q = d.gamma_q[p]
        c = PART_COLOURS[p]
        ax.fill_between(x, q[0], q[4], color=c, alpha=0.15, label="5-95 %")
        ax.fill_between(x, q[1], q[3], color=c, alpha=0.35, label="25-75 %")
        ax.plot(x, q[2], color=c, marker=_marker(len(x)), label="median")
        if len(q) > 5:  # a handful of collapsing channels among thousands leave the bands; the minimum shows them
            ax.plot(x, q[5], color=c, linestyle=":", linewidth=1.2, label="smallest")
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


def _near_zero_rule(nz: dict[str, Any]) -> str:
    """The near-zero test of the stored config, only the threshold(s) its mode uses."""
    mode = nz.get("mode")
    absolute = f"|w| < {nz.get('abs_threshold')}"
    relative = f"|w| < {nz.get('rel_threshold')} x mean |w| of the tensor"
    rule = {"absolute": absolute, "percent_of_mean": relative, "both": f"{absolute} and {relative}"}.get(mode)
    return f" ({rule})" if rule else ""


def fig_near_zero(d: ReportData):  # noqa: ANN201
    if not has(d.ds, "near_zero_frac") or d.ds["near_zero_frac"].size == 0:
        raise Skip("the trace has no near_zero_frac (track.near_zero.enabled was off)")
    values = read_steps(d.ds, "near_zero_frac", d.line_idx) * 100  # (steps, param)
    if not np.isfinite(values).any():
        raise Skip("near_zero_frac is NaN at every step")
    plt = pyplot()
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
    recorded_x = x[np.isfinite(values).any(axis=1)]
    if recorded_x[-1] > recorded_x[0]:  # the axis spans the recorded points, not the whole trace
        pad = 0.03 * float(recorded_x[-1] - recorded_x[0])
        ax.set_xlim(recorded_x[0] - pad, recorded_x[-1] + pad)
    ax.set_ylabel("near-zero weights (% of the tensor)")
    how = _near_zero_rule(stored_config(d).get("track", {}).get("near_zero", {}))
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
    plt = pyplot()
    counts = class_counts(d.labels)
    keys = ("state", "trajectory", "mechanism", "flag")
    titles = {"state": f"state at step {d.labels.attrs.get('last_step', '')}", "trajectory": "trajectory over the trace",
              "mechanism": "mechanism (inactive at the end)", "flag": "flags"}
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.4), gridspec_kw={"width_ratios": [3.2, 5, 4, 2]})
    for ax, key in zip(axes, keys, strict=True):
        classes = list(counts[key])
        x = np.arange(len(classes))
        values = [v for c in classes for v in counts[key][c].values()]
        positive = [v for v in values if v > 0]
        log = bool(positive) and max(positive) / min(positive) > 20  # a few channels beside thousands stay visible
        floor = 0.7 if log else 0.0
        for k, p in enumerate(PARTS):
            vals = [counts[key][c][p] for c in classes]
            xs = x + (k - 0.5) * 0.4
            ax.bar(xs, [max(v, floor) if v else 0 for v in vals], width=0.4, bottom=0, color=PART_COLOURS[p], label=p)
            for xi, v in zip(xs, vals, strict=True):
                ax.text(xi, max(v, floor) * (1.08 if log else 1) + (0 if log else 0.01 * max(values + [1])), str(v),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([c.replace("_", " ") for c in classes], rotation=30, ha="right", fontsize=8)
        ax.set_title(titles[key], fontsize=10)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(floor, max(values) * 3)
            ax.set_ylabel("channels (count, log axis)")
        else:
            from matplotlib.ticker import MaxNLocator

            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, max(1, *values) * 1.15)
            ax.set_ylabel("channels (count)")
        ax.legend(fontsize=7)
    params = json.loads(d.labels.attrs.get("params", "{}") or "{}")
    persist = params.get("min_persist", d.params.min_persist)
    fig.suptitle(f"Channel classes by the classification ({d.labels.attrs.get('method', '')}, persistence {persist} "
                 f"tracked steps, steps {d.labels.attrs.get('first_step', '')}..{d.labels.attrs.get('last_step', '')}; "
                 f"{d.labels_from})", fontsize=11)
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
    names = {n: "train " + n for n in train}
    if "loss" in train and "rec_loss" in train:
        with np.errstate(all="ignore"):
            gap = np.nanmax(np.abs(train["loss"] - train["rec_loss"]) / np.abs(train["loss"]))
        if np.isfinite(gap) and gap < 0.01:  # the lines would lie on each other: one line, said so
            names["loss"] = f"train loss (= rec_loss within {gap:.2%}: kl_weight x KL is small)"
            del train["rec_loss"]
    for n in train:
        panels["lr" if n == "lr" else "kl" if n == "kl_loss" else "loss"].append((names[n], x, train[n]))
    for n, (s, v) in val.items():
        panels[_panel_of(n)].append(("validation " + n, s, v))
    used = [k for k, v in panels.items() if v]
    plt = pyplot()
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
    batch = stored_config(d).get("data", {}).get("batch_size")
    fig.suptitle("Training and validation curves\ntrain: one batch per tracked step" + (f" ({batch} images)" if batch else "")
                 + ", as the trace holds it (stderr shows means over log_interval steps); validation: the whole split",
                 fontsize=10)
    fig.tight_layout()
    return fig


FIGURE_FUNCS: dict[str, Callable[[ReportData], Any]] = {
    "died_over_training.png": fig_died,
    "dormancy_heatmap.png": fig_heatmap,
    "dormant_counts.png": fig_counts,
    "dormant_by_layer.png": fig_by_layer,
    "gamma_quantiles.png": fig_gamma,
    "near_zero_weights.png": fig_near_zero,
    "class_counts.png": fig_classes,
    "loss_curves.png": fig_losses,
}


def save_figures(funcs: Mapping[str, Callable[..., Any]], out: Path, *args: Any) -> dict[str, str | None]:
    """Draw `fn(*args)` for each file name -> function and write the PNGs into `out`; returns file ->
    None (written) or the reason it was skipped (`Skip`)."""
    plt = pyplot()
    result: dict[str, str | None] = {}
    for name, fn in funcs.items():
        try:
            fig = fn(*args)
        except Skip as e:
            result[name] = str(e)
            log.info("skipped %s: %s", name, e)
            continue
        fig.savefig(out / name, dpi=DPI, pil_kwargs={"compress_level": 3})
        plt.close(fig)
        result[name] = None
    return result


def render_figures(d: ReportData, out: Path) -> dict[str, str | None]:
    """Every figure of the run report that the store's data allows, into `out`."""
    return save_figures(FIGURE_FUNCS, out, d)
