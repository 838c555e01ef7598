"""`vaedyn report`: pictures of the channel dynamics in a trace store, and one HTML page.

Reads a trace store (from `train` or `track`), its `classification` group (or classifies in
memory when there is none, without writing), its `events` group and, for a run folder, the
validation lines that training wrote. Writes PNG figures (matplotlib, Agg), `summary.json`
(the numbers behind the tables) and `index.html`, which opens from disk with no server: images
are sibling files referenced by relative path, styles are inline, there is no script.

A figure whose data the store lacks (no events, NaN training scalars in a `track` store, no
near-zero tracker, ...) is skipped with a note in the page, not an error. The numbers come from
`vaedyn_cli.report_data`, the pictures from `vaedyn_cli.figures`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vaedyn_cli import artifacts
from vaedyn_cli import store as store_mod
from vaedyn_cli.figures import FIGURES, render_figures
from vaedyn_cli.labels import PARTS
from vaedyn_cli.pages import CSS, esc, figures_html, fmt, table
from vaedyn_cli.report_data import (
    ReportData,
    class_counts,
    died,
    event_steps,
    gather,
    layer_table,
    reconcile,
    run_dir,
    stored_config,
    text,
)

log = logging.getLogger(__name__)

TOP_LAYERS = 15
SENTENCE_CHANNELS = 8  # channels the reconciling sentence names (summary.json lists more)
SUMMARY_FILE = artifacts.SUMMARY_FILE
INDEX_FILE = artifacts.INDEX_FILE


def default_out(path: Path) -> Path:
    """<run>/report/ for a run's trace, <store>.report/ next to a bare store."""
    run = run_dir(path)
    return run / artifacts.REPORT_DIR if run else path.with_name(path.name + ".report")


def _events_summary(d: ReportData) -> dict[str, Any]:
    ev_steps, n = event_steps(d)
    if not n:
        return {"events": 0}
    ev = d.events
    assert ev is not None
    strategies: dict[str, int] = {}
    for s in text(ev["strategy"].values).tolist() if "strategy" in ev else []:
        strategies[s] = strategies.get(s, 0) + 1
    chans = set()
    if "layer" in ev and "channel_index" in ev:
        chans = set(zip(text(ev["layer"].values).tolist(),
                        np.asarray(ev["channel_index"].values).astype(int).tolist(), strict=True))
    return {"events": n, "steps": len(ev_steps), "first_step": int(ev_steps[0]), "last_step": int(ev_steps[-1]),
            "channels_touched": len(chans), "by_strategy": strategies}


def per_step_rule(d: ReportData) -> str:
    p = d.params
    test = f"mean |output| < {p.threshold:g}" if p.method == "mean_abs_threshold" else \
        f"dormancy score <= {p.tau:g} (dead: activity <= {p.dead_threshold:g})"
    return f"per-step rule: {test} at step {int(d.steps[-1])} alone, no persistence filter"


def classification_rule(d: ReportData) -> str:
    labels = d.labels
    assert labels is not None
    params = json.loads(labels.attrs.get("params", "{}") or "{}")
    return (f"classification: {labels.attrs.get('method')}, a change counts once it holds "
            f"{params.get('min_persist', d.params.min_persist)} tracked steps, over steps "
            f"{labels.attrs.get('first_step')}..{labels.attrs.get('last_step')}; labels {d.labels_from}")


def _channel(r: dict[str, Any]) -> str:
    return f"{r['layer']} #{r['channel_index']}"


def reconciliation_text(rec: dict[str, Any] | None) -> str:
    """One sentence: how many channels each rule counts inactive at the last step and, where they differ, why."""
    if rec is None:
        return ""
    step, m = rec["step"], rec["min_persist"]
    n_step, n_class = sum(rec["per_step"].values()), sum(rec["classified"].values())
    head = (f"{n_step} channel{'s' * (n_step != 1)} {'are' if n_step != 1 else 'is'} inactive at step {step} by the "
            f"per-step rule; {n_class} by the classification (persistence {m} steps)")
    if not rec["n_only_per_step"] and not rec["n_only_classified"]:
        return head + ": the same channels."
    why = []
    for r in rec["only_per_step"]:
        since = f"since at least step {r['since_step']}" if r["at_least"] else f"at step {r['since_step']}"
        why.append(f"{_channel(r)} became inactive {since} and has held {r['held']} of {m} steps"
                   if not r["at_least"] else f"{_channel(r)} has been inactive {since} (the classification is "
                   f"{r['state'] or 'absent'}: it covers steps {rec['window'][0]}..{rec['window'][1]})")
    for r in rec["only_classified"]:
        why.append(f"{_channel(r)} is active again since step {r['since_step']} ({r['held']} of {m} steps), so the "
                   f"classification still counts it {r['state']}" if r["held"] else
                   f"{_channel(r)} is not observed at step {step}; the classification counts it {r['state']}")
    shown = why[:SENTENCE_CHANNELS]
    more = len(why) - len(shown) + (rec["n_only_per_step"] - len(rec["only_per_step"])) + \
        (rec["n_only_classified"] - len(rec["only_classified"]))
    tail = f"; and {more} more (summary.json, `reconciliation`)" if more else ""
    extra = ""
    if rec["window"][1] != step:
        extra += f" The classification ends at step {rec['window'][1]}, the per-step count is at step {step}."
    if rec["settings_differ"]:
        extra += " The classification was made with " + ", ".join(f"{k} {v}" for k, v in rec["settings_differ"].items()) \
            + " (the per-step counts use the trace's config)."
    return head + ": " + "; ".join(shown) + tail + "." + extra


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
        **{k: info[k] for k in ("schema", "schema_version", "vaedyn_version", "source", "run_name", "size_bytes",
                                     "torch_version", "torch_threads")},
        "steps": {"count": info["steps"], "first": info["first_step"], "last": info["last_step"],
                  "shown_in_lines": len(d.line_idx), "shown_in_heatmap": len(d.heat_idx)},
        "channels": {"total": info["channels"],
                     **{p: info["layers_by_part"].get(p, {}).get("channels", 0) for p in PARTS}},
        "layers": info["layers"],
        "params": info["params"],
        "classify": {"method": d.params.method, "tau": d.params.tau, "threshold": d.params.threshold,
                     "dead_threshold": d.params.dead_threshold, "min_persist": d.params.min_persist},
        "last_step": last,
        "last_step_rule": per_step_rule(d),
        "classification": {"from": d.labels_from, **({"counts": class_counts(d.labels),
                                                      "rule": classification_rule(d)} if d.labels is not None else {})},
        "reconciliation": reconcile(d),
        "died": died(d),
        "most_affected_layers": [r for r in ranked if r["dormant"] + r["dead"] > 0][:TOP_LAYERS],
        "events": _events_summary(d),
        "validation_records": len(d.validation),
        "figures": {k: ("written" if v is None else f"skipped: {v}") for k, v in figures.items()},
    }


LEAD_FIGURE = "died_over_training.png"  # shown first, under the page's opening sentence


def died_text(info: dict[str, Any] | None, last_step: int) -> str:
    """The page's opening sentence: how many channels died during the trace and how."""
    if info is None:
        return "No classification: which channels died cannot be told (run `vaedyn classify` on the store)."
    if not info["total"]:
        return f"No channel died during the trace (none went from active to inactive for good by step {last_step})."
    share = 100 * info["total"] / max(info["channels"], 1)
    how = ", ".join(f"{n} {m.replace('_', ' ')}" for m, n in info["by_mechanism"].items() if n)
    return (f"{info['total']} of {info['channels']} channels ({share:.1f} %) died during training: active at first, "
            f"inactive for good from step {info['first_onset']} to {info['last_onset']} (median "
            f"{info['median_onset']:g}) by the classification; by mechanism: {how}.")


def render_html(d: ReportData, summary: dict[str, Any], figures: dict[str, str | None]) -> str:
    """The self-contained page: summary, figures (sibling PNGs), tables, config."""
    s = summary
    title = f"vaedyn report: {s['run_name'] or d.path.name}"
    parts: list[str] = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
                        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>",
                        '<nav><a href="#summary">summary</a><a href="#figures">figures</a><a href="#layers">layers</a>'
                        '<a href="#classes">classes</a><a href="#config">config</a></nav>']
    st, chs = s["steps"], s["channels"]
    rows = [
        ["store", f"{s['store']} ({s['size_bytes'] / 2**20:.1f} MiB)"], ["schema", f"{s['schema']} v{s['schema_version']}"],
        ["written by", f"vaedyn {s['vaedyn_version']} ({s['source']})"
                       + (f", torch {s['torch_version']}, {s['torch_threads']} threads" if s.get("torch_threads") else "")],
        ["steps", f"{st['count']} tracked, {st['first']} .. {st['last']}"],
        ["channels", f"{chs['total']} in {s['layers']} layers (encoder {chs['encoder']}, decoder {chs['decoder']})"],
        ["weights tracked for near-zero share", s["params"]],
        [f"inactive at step {st['last']}, per-step rule",
         ", ".join(f"{p} {v['inactive']} of {v['channels']} ({v['dead']} dead)" for p, v in s["last_step"].items())
         + f" [{s['last_step_rule']}]"],
    ]
    rec = s["reconciliation"]
    if rec is not None:
        rows.append([f"inactive at step {rec['window'][1]}, classification",
                     ", ".join(f"{p} {n}" for p, n in rec["classified"].items()) + f" [{s['classification']['rule']}]"])
        rows.append(["why the two counts differ" if rec["n_only_per_step"] or rec["n_only_classified"] else
                     "the two counts", reconciliation_text(rec)])
    else:
        rows.append(["classification", f"none ({s['classification']['from']})"])
    rows += [
        ["interventions", _events_text(s["events"])],
        ["validation records", s["validation_records"]],
    ]
    lead = {LEAD_FIGURE: figures[LEAD_FIGURE]} if LEAD_FIGURE in figures else {}
    parts.append(f'<p class="lead">{esc(died_text(s["died"], st["last"]))}</p>' + figures_html(lead, FIGURES))
    parts.append('<h2 id="summary">Summary</h2>' + table(None, rows, left=2))
    rest = {k: v for k, v in figures.items() if k not in lead}
    parts.append('<h2 id="figures">Figures</h2>' + figures_html(rest, FIGURES))
    layers = s["most_affected_layers"]
    parts.append(f'<h2 id="layers">Most affected layers at step {st["last"]} (per-step rule)</h2>')
    parts.append(f'<p>Counted by the {esc(s["last_step_rule"])}.</p>')
    if layers:
        parts.append(table(["layer", "part", "channels", "dormant", "dead", "inactive share", "median |gamma|"],
                            [[r["layer"], r["part"], r["channels"], r["dormant"], r["dead"],
                              f"{r['inactive_fraction']:.0%}", fmt(r["median_abs_gamma"])] for r in layers], left=2))
    else:
        parts.append('<p class="note">No channel is dormant or dead at the last step.</p>')
    parts.append('<h2 id="classes">Class counts (classification)</h2>')
    counts = s["classification"].get("counts")
    if counts:
        parts.append(f'<p>Counted by the {esc(s["classification"]["rule"])}. {esc(reconciliation_text(rec))}</p>')
        heads = {"state": f"state at step {rec['window'][1] if rec else st['last']}", "trajectory": "trajectory",
                 "mechanism": "mechanism (inactive at the end)", "flag": "flag"}
        for key, by_class in counts.items():
            parts.append(f"<h3>{esc(heads.get(key, key))}</h3>" + table(
                [key, *PARTS, "total"], [[c, *v.values(), sum(v.values())] for c, v in by_class.items()]))
    else:
        parts.append('<p class="note">No classification.</p>')
    parts.append('<h2 id="config">Run config</h2>')
    cfg = stored_config(d)
    parts.append(f"<pre>{esc(json.dumps(cfg, indent=2)) if cfg else 'not stored in the trace'}</pre>")
    model_cfg = d.ds.attrs.get("model_config")
    if model_cfg:
        try:
            model_cfg = json.dumps(json.loads(model_cfg), indent=2) if isinstance(model_cfg, str) else \
                json.dumps(model_cfg, indent=2)
        except (ValueError, RecursionError):
            pass
        parts.append(f"<h3>Model config</h3><pre>{esc(model_cfg)}</pre>")
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


def build_report(store: str | Path, out: Path | None = None) -> Path:
    """Write the report of a trace store (a store path, a run folder, or '-' for a path on stdin)
    into `out` (default: <run>/report/ or <store>.report/); returns the folder."""
    path = store_mod.resolve_store_path(store)
    ds = store_mod.open_trace(path)
    what = "--out" if out is not None else "report folder"
    out = Path(out) if out is not None else default_out(path)
    artifacts.check_replaceable(out, artifacts.REPORT, what)
    d = gather(path, ds)
    import matplotlib

    # names in a store are data: a `$` in a layer name must not start matplotlib's math mode
    with artifacts.atomic_folder(out, artifacts.REPORT) as tmp, matplotlib.rc_context({"text.parse_math": False}):
        figures = render_figures(d, tmp)
        summary = build_summary(d, figures)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        (tmp / INDEX_FILE).write_text(render_html(d, summary, figures))
    return out


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")

