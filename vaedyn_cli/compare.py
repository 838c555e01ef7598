"""`vaedyn eval --compare`: finished evaluations side by side, in the original study's Table 1 layout
(its PSNR row is the pooled PSNR; the per-image mean follows it, labelled)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vaedyn_cli import artifacts
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.metrics import LOWER_IS_BETTER, METRICS, TABLE_FORMAT, load_metrics

log = logging.getLogger(__name__)


BETTER = "n/a (single runs: see `vaedyn study`)"  # which run is better needs repeated runs, not one of each
NOT_LIKE_FOR_LIKE = {  # what two evaluations must share to be compared, and how to read it from metrics.json
    "split": lambda r: r.get("split"),
    "dataset": lambda r: {k: v for k, v in ((r.get("config") or {}).get("data") or {}).items()
                          if k in ("dataset_name", "dataset_config_name", "image_column", "resolution")} or None,
    "number of images": lambda r: r.get("num_images"),
}


def _nudge(record: dict[str, Any]) -> dict[str, Any] | None:
    """What `vaedyn nudge` did to the evaluated checkpoint: from metrics.json, else the checkpoint's nudge.json."""
    if record.get("nudge"):
        return record["nudge"]
    file = Path(str(record.get("checkpoint", ""))) / artifacts.NUDGE_FILE
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except ValueError:
        return None


def run_label(record: dict[str, Any]) -> str:
    """What the evaluated model is: its run, and for a nudged checkpoint the strategy it was nudged with."""
    name = str((record.get("config") or {}).get("run_name") or Path(record["path"]).parent.name)
    nudge = _nudge(record)
    return f"{name} nudged {nudge.get('strategy', '?')}" if nudge else name


def _labels(records: list[dict[str, Any]]) -> list[str]:
    """Run labels (`run_label`); made unique with the step, then the split, then the position."""
    names = [run_label(r) for r in records]
    for extra in (lambda r: f" step {r.get('step', 0)}", lambda r: f" {r.get('split')}"):
        longer = [n + extra(r) if names.count(n) > 1 else n for n, r in zip(names, records, strict=True)]
        if len(set(longer)) > len(set(names)):  # only where it tells runs apart
            names = longer
    return [f"{n} #{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _warn_unlike(records: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """One warning line per way the evaluations differ (split, dataset, number of images)."""
    lines = []
    for what, read in NOT_LIKE_FOR_LIKE.items():
        values = [read(r) for r in records]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"{lab}: {json.dumps(v) if isinstance(v, dict) else v}" for lab, v in
                              zip(labels, values, strict=True))
            lines.append(f"warning: the evaluations differ in {what} ({shown}); the comparison is not like for like")
    for line in lines:
        log.warning(line)
    return lines


def _cell(value: float | None, scale: float, digits: int, sign: str = "") -> str:
    """A table cell; n/a for a metric an older metrics.json lacks."""
    return "n/a" if value is None else f"{value * scale:{sign}.{digits}f}"


def comparison(paths: list[Path]) -> dict[str, Any]:
    """Metric by metric: each run's value and delta (last minus first); no run is called better (BETTER)."""
    if len(paths) < 2:
        raise VaedynError("--compare needs at least two metrics.json files or eval folders")
    records = [load_metrics(p) for p in paths]
    labels = _labels(records)
    warnings = _warn_unlike(records, labels)
    rows = []
    for key in METRICS:
        values = [None if r["metrics"][key] is None else float(r["metrics"][key]) for r in records]
        known = None not in values
        rows.append({
            "metric": key,
            "values": dict(zip(labels, values, strict=True)),
            "delta": values[-1] - values[0] if known else None,
            "better": None,  # single runs: no run is better on this evidence (BETTER)
            "lower_is_better": LOWER_IS_BETTER[key],
        })
    runs = [
        {k: r.get(k) for k in ("path", "checkpoint", "step", "split", "num_images")}
        | {"label": lab, "nudge": (_nudge(r) or {}).get("strategy")}
        for lab, r in zip(labels, records, strict=True)
    ]
    return {"runs": runs, "rows": rows, "better": BETTER, "warnings": warnings}


def compare(paths: list[Path], fmt: str = "table") -> str:
    """The original study's Table 1 layout as a markdown table (or JSON with fmt="json")."""
    if fmt not in {"table", "json"}:
        raise VaedynError(f"--format {fmt!r}: choose table or json")
    result = comparison(paths)
    if fmt == "json":
        return json.dumps(result, indent=2)
    labels = [r["label"] for r in result["runs"]]
    header = ["metric", *labels, "delta", "better"]
    lines = [header]
    for row in result["rows"]:
        label, scale, digits = TABLE_FORMAT[row["metric"]]
        cells = [_cell(row["values"][lab], scale, digits) for lab in labels]
        lines.append([label, *cells, _cell(row["delta"], scale, digits, "+"), "n/a"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt_line(cells: list[str]) -> str:
        padded = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    numeric = [0 < i < len(header) - 1 for i in range(len(header))]
    sep = "|" + "|".join("-" * (w + 1) + (":" if numeric[i] else "-") for i, w in enumerate(widths)) + "|"
    note = f"\nbetter: {BETTER}; a difference between two single runs may be run-to-run noise."
    return "\n".join([fmt_line(lines[0]), sep, *(fmt_line(line) for line in lines[1:])]) + "\n" + note

