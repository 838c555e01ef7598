"""The study report: `<study>/report/index.html` and its PNG figures.

The page opens from disk like `vaedyn report`'s (sibling PNGs, inline CSS, no script; its
helpers are reused). First screen: the three answers with their intervals and n, and what the
statistics can and cannot say with this many seeds; then the comparisons, the per-condition
summaries, the figures, the runs and the study file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vaedyn_cli import artifacts, pages
from vaedyn_cli import figures as run_figures
from vaedyn_cli import store as store_mod
from vaedyn_cli.classification import select_channels, step_states, trace_params
from vaedyn_cli.labels import DORMANT, PARTS
from vaedyn_cli.metrics import METRICS, TABLE_FORMAT
from vaedyn_cli.report_data import MAX_LINE_STEPS, spread
from vaedyn_cli.seedstats import fmt
from vaedyn_cli.study_plan import STUDY_FILE, Study
from vaedyn_cli.study_results import SUPPRESSION

INDEX_FILE = "index.html"
FIGURES: dict[str, tuple[str, str]] = {
    "inactive_over_steps.png": (
        "Inactive channels over training, per condition",
        "Dormant + dead channels per part at each tracked step (classify's per-step rule, no persistence filter): "
        "the line is the mean over seeds, the band spans the seeds' lowest to highest count; ticks at the bottom "
        "mark steps with interventions (nudge events) in any seed of the condition.",
    ),
    "metrics_by_condition.png": (
        "Final reconstruction metrics per condition",
        "Mean over seeds (bar marker) with its 95% bootstrap interval (error bar) and each seed's value (dots). "
        "Conditions on different datasets are measured on different test sets.",
    ),
    "counts_by_condition.png": (
        "Suppression counts per condition",
        "Channels inactive at the end (by part, dead), channels that died during training, and inactive channels "
        "by mechanism: mean over seeds with 95% bootstrap interval; dots are seeds.",
    ),
    "suppression_by_layer.png": (
        "Suppression by layer, per condition",
        "Share of each layer's channels inactive at the end (from the classification), mean over seeds.",
    ),
    "ablation_by_condition.png": (
        "The causal check: ablating the inactive channels vs random active ones",
        "Change in MSE when the inactive channels are mean-ablated, and when as many random active channels of the "
        "same layers are (the control): mean over seeds with 95% bootstrap interval; dots are seeds.",
    ),
}


# ---------------------------------------------------------------------------------------------
# traces over steps


def inactive_series(store: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps, {part: inactive count per step}) of a trace, at up to MAX_LINE_STEPS steps."""
    ds = store_mod.open_trace(store)
    params = trace_params(ds)
    ch = select_channels(ds)
    steps = np.asarray(ds["step"].values).astype(np.int64)
    idx = spread(len(steps), MAX_LINE_STEPS)
    counts = {p: np.zeros(len(idx), np.int64) for p in PARTS}
    for a in range(0, len(idx), params.chunk_steps):
        codes, _ = step_states(ds, params, idx[a:a + params.chunk_steps], channels=ch)
        for p in PARTS:
            counts[p][a:a + len(codes)] = (codes[:, ch.part == p] >= DORMANT).sum(axis=1)
    return steps[idx], counts


def _event_steps(store: Path) -> np.ndarray:
    ev = store_mod.read_events(store)
    if ev is None or ev.sizes.get("event", 0) == 0:
        return np.array([], np.int64)
    return np.unique(np.asarray(ev["step"].values).astype(np.int64))


def _series(study: Study) -> dict[str, dict[str, Any]]:
    """condition -> {steps, part -> (seeds, steps) counts (NaN where a seed lacks a step), events}."""
    out = {}
    for cond in study.spec.conditions:
        per_seed = [inactive_series(r.run_dir / artifacts.TRACE_DIR) for r in study.runs_of(cond)]
        steps = np.unique(np.concatenate([s for s, _ in per_seed]))
        parts = {}
        for p in PARTS:
            grid = np.full((len(per_seed), len(steps)), np.nan)
            for i, (s, c) in enumerate(per_seed):
                grid[i, np.searchsorted(steps, s)] = c[p]
            parts[p] = grid
        events = [_event_steps(r.run_dir / artifacts.TRACE_DIR) for r in study.runs_of(cond)]
        out[cond] = {"steps": steps, "parts": parts, "events": np.unique(np.concatenate(events))}
    return out


# ---------------------------------------------------------------------------------------------
# figures


def _colours(conditions: list[str]) -> dict[str, Any]:
    plt = run_figures.pyplot()
    cmap = plt.get_cmap("tab10")
    return {c: cmap(i % 10) for i, c in enumerate(conditions)}


def fig_over_steps(study: Study, stats: dict[str, Any], results: dict[str, Any]) -> Any:
    plt = run_figures.pyplot()
    series = _series(study)
    colours = _colours(list(series))
    # one y scale per part (their channel counts differ); each axis scaled after all its data are drawn
    fig, axes = plt.subplots(1, len(PARTS), figsize=(12, 4.6), squeeze=False)
    for ax, p in zip(axes[0], PARTS, strict=True):
        for k, (cond, s) in enumerate(series.items()):
            grid = s["parts"][p]
            ax.plot(s["steps"], np.nanmean(grid, axis=0), color=colours[cond], label=f"{cond} (n={grid.shape[0]})")
            ax.fill_between(s["steps"], np.nanmin(grid, axis=0), np.nanmax(grid, axis=0), color=colours[cond], alpha=0.2)
            if len(s["events"]):
                lo = 0.015 * k
                ax.vlines(s["events"], lo, lo + 0.04, transform=ax.get_xaxis_transform(), color=colours[cond],
                          linewidth=0.8)
        ax.set_title(p, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("inactive channels (dormant + dead, count)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Inactive channels over training: mean over seeds, band from lowest to highest seed", fontsize=11)
    fig.tight_layout()
    return fig


def _interval_panel(ax: Any, names: list[str], entries: list[dict[str, Any]], colours: dict[str, Any]) -> None:
    """One panel: per name, mean marker, interval bar and seed dots."""
    for i, (name, e) in enumerate(zip(names, entries, strict=True)):
        low, high = e["ci"]
        c = colours.get(name, "black")
        if low is not None:
            ax.errorbar([i], [e["mean"]], yerr=[[e["mean"] - low], [high - e["mean"]]], fmt="s", color=c, capsize=5)
        else:
            ax.plot([i], [e["mean"]], "s", color=c)
        jitter = np.linspace(-0.12, 0.12, len(e["values"])) if len(e["values"]) > 1 else [0.0]
        ax.scatter(i + np.asarray(jitter) + 0.25, e["values"], s=14, color=c, alpha=0.7, zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def fig_metrics(study: Study, stats: dict[str, Any], results: dict[str, Any]) -> Any:
    plt = run_figures.pyplot()
    conds = list(stats["summary"])
    colours = _colours(conds)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4.2), squeeze=False)
    for ax, m in zip(axes[0], METRICS, strict=True):
        _interval_panel(ax, conds, [stats["summary"][c]["metrics"][m] for c in conds], colours)
        better = "lower" if m in ("mse", "kl") else "higher"
        name = re.sub(r" \([^)]*\)", "", TABLE_FORMAT[m][0])  # without the unit: the panel shows raw values
        ax.set_title(f"{name} ({better} is better)", fontsize=10)
    fig.suptitle(f"Final metrics per condition (n = {len(study.seeds)} seeds, 95% bootstrap intervals)", fontsize=11)
    fig.tight_layout()
    return fig


def fig_counts(study: Study, stats: dict[str, Any], results: dict[str, Any]) -> Any:
    plt = run_figures.pyplot()
    conds = list(stats["summary"])
    colours = _colours(conds)
    keys = [k for k in SUPPRESSION if any(stats["summary"][c]["counts"][k]["mean"] for c in conds)] or ["inactive"]
    cols = min(len(keys), 5)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys, strict=False):
        _interval_panel(ax, conds, [stats["summary"][c]["counts"][k] for c in conds], colours)
        ax.set_title(k.replace("_", " "), fontsize=10)
        ax.set_ylabel("channels (count)", fontsize=8)
    fig.suptitle("Suppression counts per condition (mean, 95% bootstrap interval, seeds)", fontsize=11)
    fig.tight_layout()
    return fig


def fig_by_layer(study: Study, stats: dict[str, Any], results: dict[str, Any]) -> Any:
    plt = run_figures.pyplot()
    conds = list(results)
    layers = list(next(iter(next(iter(results.values())).values()))["layers"].items())
    share = np.array([[np.mean([results[c][s]["by_layer"][name] / max(size, 1) for s in results[c]]) for c in conds]
                      for name, size in layers])
    fig, ax = plt.subplots(figsize=(3 + 1.1 * len(conds), 2 + 0.17 * len(layers)))
    top = max(float(share.max()), 1e-9)
    image = ax.imshow(share, aspect="auto", cmap="Reds", vmin=0, vmax=top)
    ax.set_xticks(range(len(conds)))
    ax.set_xticklabels(conds, rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"{name.split('.', 1)[0][:3]} {run_figures.short_layer(name)}" for name, _ in layers], fontsize=6)
    for i in range(len(layers)):
        for j in range(len(conds)):
            if share[i, j] > 0:
                ax.text(j, i, f"{share[i, j]:.0%}", ha="center", va="center", fontsize=5,
                        color="white" if share[i, j] > 0.6 * top else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label("inactive share of the layer (mean over seeds)")
    ax.set_title("Inactive share per layer at the end", fontsize=11)
    fig.tight_layout()
    return fig


def fig_ablation(study: Study, stats: dict[str, Any], results: dict[str, Any]) -> Any:
    plt = run_figures.pyplot()
    conds = list(stats["summary"])
    names, entries = [], []
    for c in conds:
        ab = stats["summary"][c]["ablation"]["mse"]
        names += [f"{c}: inactive", f"{c}: random active"]
        entries += [ab["delta_ablated"], ab["delta_control"]]
    colours = {n: ("#d62728" if n.endswith("inactive") else "#7f7f7f") for n in names}
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(conds), 4.4))
    _interval_panel(ax, names, entries, colours)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("MSE change when mean-ablated (ablated minus baseline)")
    ax.set_title("Causal check per condition (mean, 95% bootstrap interval, seeds)", fontsize=11)
    fig.tight_layout()
    return fig


FIGURE_FUNCS: dict[str, Callable[[Study, dict[str, Any], dict[str, Any]], Any]] = {
    "inactive_over_steps.png": fig_over_steps,
    "metrics_by_condition.png": fig_metrics,
    "counts_by_condition.png": fig_counts,
    "suppression_by_layer.png": fig_by_layer,
    "ablation_by_condition.png": fig_ablation,
}


# ---------------------------------------------------------------------------------------------
# the page


def _interval_text(e: dict[str, Any], scale: float = 1.0) -> str:
    low, high = e["ci"]
    if low is None:
        return fmt(e["mean"] * scale)
    return f"{fmt(e['mean'] * scale)} [{fmt(low * scale)}, {fmt(high * scale)}]"


def _comparison_rows(c: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for m, e in c["metrics"].items():
        label, scale, _ = TABLE_FORMAT[m]
        relative = "-" if e["relative"] is None else f"{e['relative']:+.2%}"
        rows.append([label, _interval_text(e, scale), relative, fmt(e["p_value"]), e["verdict"]])
    for k, e in c["counts"].items():
        rows.append([f"{k} (channels)", _interval_text(e), "", fmt(e["p_value"]), e["verdict"]])
    return rows


def render_html(study: Study, stats: dict[str, Any], figures: dict[str, str | None]) -> str:
    e, table = pages.esc, pages.table
    n = len(study.seeds)
    method = stats["method"]
    title = f"vaedyn study: {study.name}"
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>',
           f"<style>{pages.CSS}</style></head><body><h1>{e(title)}</h1>",
           f"<p>{len(study.spec.conditions)} conditions x {n} seeds ({', '.join(map(str, study.seeds))}) over "
           f"{e(study.base_path)}; reference {e(study.spec.reference)}.</p>",
           '<nav><a href="#answers">answers</a><a href="#comparisons">comparisons</a><a href="#conditions">conditions</a>'
           '<a href="#figures">figures</a><a href="#runs">runs</a><a href="#file">study file</a></nav>',
           '<h2 id="answers">Answers</h2>']
    for a in stats["answers"]:
        out.append(f"<h3>{e(a['question'])}</h3><p><b>{e(a['answer'])}</b></p>")
        out.append("<ul>" + "".join(f"<li>{e(d)}</li>" for d in a["details"]) + "</ul>")
    out.append(f'<p class="note">n = {n} seeds, paired by seed. Intervals: {e(method["interval"])}. '
               f'p-values: {e(method["test"])}; {e(method["min_p_value_note"])}. '
               f'Verdicts: {e(method["verdict_rule"])}. {e(method["false_call_note"])}.</p>')
    out.append('<h2 id="comparisons">Comparisons (condition minus reference, seed by seed)</h2>')
    for c in stats["comparison_results"]:
        out.append(f"<h3>{e(c['condition'])} vs {e(c['reference'])}</h3>"
                   f"<p>Differs in: {e(', '.join(c['differs']) or 'nothing but the condition name')}.</p>")
        if c["note"]:
            out.append(f'<p class="note">{e(c["note"])}.</p>')
        out.append(table(["quantity", "mean difference [95% CI]", "of the reference", "p", "verdict"],
                         _comparison_rows(c)))
    out.append('<h2 id="conditions">Per condition (mean [95% CI] over seeds)</h2>')
    conds = list(stats["summary"])
    rows = [[TABLE_FORMAT[m][0], *(_interval_text(stats["summary"][c]["metrics"][m], TABLE_FORMAT[m][1]) for c in conds)]
            for m in METRICS]
    rows += [[f"{k} (channels)", *(_interval_text(stats["summary"][c]["counts"][k]) for c in conds)] for k in SUPPRESSION]
    out.append(table(["quantity", *conds], rows))
    out.append("<h3>Causal check: MSE change (x1e-3) when mean-ablated</h3>")
    rows = []
    for c in conds:
        ab = stats["summary"][c]["ablation"]
        x = ab["mse"]["ablated_minus_control"]
        rows.append([c, _interval_text(ab["n_channels"]), _interval_text(ab["mse"]["delta_ablated"], 1e3),
                     _interval_text(ab["mse"]["delta_control"], 1e3), _interval_text(x, 1e3), fmt(x["p_value"]),
                     x["verdict"]])
    out.append(table(["condition", "channels ablated", "inactive ablated", "random active ablated",
                      "difference", "p", "verdict"], rows))
    out.append('<h2 id="figures">Figures</h2>' + pages.figures_html(figures, FIGURES))
    out.append('<h2 id="runs">Runs</h2>')
    measured = {(r["condition"], r["seed"]): r for r in stats["per_run"]}
    rows = []
    for r in stats["runs"]:
        m = measured[(r["condition"], r["seed"])]
        rows.append([r["condition"], r["seed"], *(fmt(m["metrics"][k] * TABLE_FORMAT[k][1], 4) for k in METRICS),
                     m["counts"]["inactive"], m["ablation"]["n_channels"], r["status"], r["path"]])
    out.append(table(["condition", "seed", *(TABLE_FORMAT[k][0] for k in METRICS), "inactive", "ablated", "status",
                      "run folder"], rows, left=2))
    out.append(f'<h2 id="file">Study file</h2><pre>{e(study.file.read_text())}</pre></body></html>\n')
    return "\n".join(out)


def build(study: Study, stats: dict[str, Any], results: dict[str, Any]) -> Path:
    """Write `<study>/report/` (index.html and the figures) from study.json's statistics; returns the folder."""
    doc = json.loads((study.folder / STUDY_FILE).read_text())
    out = study.folder / artifacts.REPORT_DIR
    artifacts.check_replaceable(out, artifacts.REPORT, "study report folder")
    with artifacts.atomic_folder(out, artifacts.REPORT) as tmp:
        figures = run_figures.save_figures(FIGURE_FUNCS, tmp, study, stats, results)
        (tmp / INDEX_FILE).write_text(render_html(study, doc, figures))
    return out
