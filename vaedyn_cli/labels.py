"""The classification's vocabulary and its record: what a channel's labels are called, and the
JSON/CSV record of one channel (`vaedyn classify --format json`, read by nudge, eval and report).

The definitions behind the labels are in `vaedyn_cli/classification.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

STATES = ("active", "dormant", "dead")
TRAJECTORIES = ("active", "born_dormant", "died", "revived", "intermittent")
MECHANISMS = ("gn_scale", "saturated", "input_collapse", "other")
FLAGS = ("unused", "input_collapsed")
UNKNOWN = "unknown"  # state and trajectory of a channel with no finite statistic in the window
NO_STEP = -1  # onset_step / revival_step when there is none (JSON null in records, -1 in arrays and the store)
PARTS = ("encoder", "decoder")
RECORD_KEYS = (
    "layer", "channel_index", "part", "state", "trajectory", "mechanism", *FLAGS,
    "score", "onset_step", "revival_step", "n_transitions",
)

# per-step state codes (the report and the TensorBoard hook count them)
UNOBSERVED, ACTIVE, DORMANT, DEAD = -1, 0, 1, 2
CODE_NAMES = {UNOBSERVED: UNKNOWN, ACTIVE: "active", DORMANT: "dormant", DEAD: "dead"}


def _nullable_step(v: Any) -> int | None:
    v = int(v)
    return None if v == NO_STEP else v


def to_records(labels: xr.Dataset) -> list[dict[str, Any]]:
    """One dict per channel with exactly RECORD_KEYS (None for a missing step or mechanism)."""
    cols = {k: labels[k].values.tolist() for k in RECORD_KEYS}
    records = []
    for i in range(labels.sizes["channel"]):
        score = cols["score"][i]
        records.append({
            "layer": str(cols["layer"][i]),
            "channel_index": int(cols["channel_index"][i]),
            "part": str(cols["part"][i]),
            "state": str(cols["state"][i]),
            "trajectory": str(cols["trajectory"][i]),
            "mechanism": cols["mechanism"][i] or None,
            "unused": bool(cols["unused"][i]),
            "input_collapsed": bool(cols["input_collapsed"][i]),
            "score": None if score is None or not np.isfinite(score) else float(score),
            "onset_step": _nullable_step(cols["onset_step"][i]),
            "revival_step": _nullable_step(cols["revival_step"][i]),
            "n_transitions": int(cols["n_transitions"][i]),
        })
    return records




def to_json(labels: xr.Dataset, store: Path | str) -> dict[str, Any]:
    """The JSON object `vaedyn classify` prints (documented in README.md, read by `vaedyn nudge`)."""
    layer = labels["layer"].values.tolist()
    return {
        "store": str(store),
        "method": labels.attrs["method"],
        "params": json.loads(labels.attrs["params"]),
        "steps": [labels.attrs["first_step"], labels.attrs["last_step"]],
        "layers": {n: layer.count(n) for n in dict.fromkeys(layer)},
        "channels": to_records(labels),
    }

