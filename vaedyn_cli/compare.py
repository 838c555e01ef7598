"""`vaedyn eval --compare`: finished evaluations side by side, in the original study's Table 1 layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vaedyn_cli import artifacts, inputs
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.metrics import LOWER_IS_BETTER, METRICS, TABLE_FORMAT

log = logging.getLogger(__name__)


def load_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json file, or the eval folder holding one."""
    path = Path(path)
    file = path / artifacts.METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise VaedynError(f"{path} has no {artifacts.METRICS_FILE}: pass files or folders written by `vaedyn eval`")
    fix = "rerun `vaedyn eval`"
    record = inputs.parse_json(inputs.read_text(file, "metrics file", fix), str(file),
                               f"it is not a metrics file written by `vaedyn eval`; {fix}")
    values = record.get("metrics") if isinstance(record, dict) else None
    if not isinstance(values, dict):
        raise VaedynError(f"{file} is not a metrics file written by `vaedyn eval` (no 'metrics' mapping); {fix}")
    missing = [m for m in METRICS if m not in values]
    if missing:
        raise VaedynError(f"{file} lacks metrics {', '.join(missing)}; {fix}")
    for m in METRICS:
        if not isinstance(values[m], int | float) or isinstance(values[m], bool):
            raise VaedynError(f"{file}: metric '{m}' is {inputs.shorten(json.dumps(values[m]), 30)}, not a number; {fix}")
    record["path"] = str(file)
    return record


def _labels(records: list[dict[str, Any]]) -> list[str]:
    """Run names from the stored configs; made unique with the step, then the position."""
    names = [str((r.get("config") or {}).get("run_name") or Path(r["path"]).parent.name) for r in records]
    if len(set(names)) < len(names):
        names = [f"{n}@{r.get('step', 0)}" for n, r in zip(names, records, strict=True)]
    if len(set(names)) < len(names):
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    return names


def _better(values: list[float], labels: list[str], lower: bool) -> str:
    best = min(values) if lower else max(values)
    winners = [lab for lab, v in zip(labels, values, strict=True) if v == best]
    return winners[0] if len(winners) == 1 else "tie"


def comparison(paths: list[Path]) -> dict[str, Any]:
    """Metric by metric: each run's value, delta (last minus first) and which run is better."""
    if len(paths) < 2:
        raise VaedynError("--compare needs at least two metrics.json files or eval folders")
    records = [load_metrics(p) for p in paths]
    if len({r.get("split") for r in records}) > 1 or len({r.get("num_images") for r in records}) > 1:
        log.warning("warning: the evaluations differ in split or number of images; the comparison is not like for like")
    labels = _labels(records)
    rows = []
    for key in METRICS:
        values = [float(r["metrics"][key]) for r in records]
        rows.append({
            "metric": key,
            "values": dict(zip(labels, values, strict=True)),
            "delta": values[-1] - values[0],
            "better": _better(values, labels, LOWER_IS_BETTER[key]),
        })
    runs = [
        {k: r.get(k) for k in ("path", "checkpoint", "step", "split", "num_images")} | {"label": lab}
        for lab, r in zip(labels, records, strict=True)
    ]
    return {"runs": runs, "rows": rows}


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
        cells = [f"{row['values'][lab] * scale:.{digits}f}" for lab in labels]
        lines.append([label, *cells, f"{row['delta'] * scale:+.{digits}f}", row["better"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt_line(cells: list[str]) -> str:
        padded = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    numeric = [0 < i < len(header) - 1 for i in range(len(header))]
    sep = "|" + "|".join("-" * (w + 1) + (":" if numeric[i] else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt_line(lines[0]), sep, *(fmt_line(line) for line in lines[1:])])

