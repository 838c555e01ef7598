"""Choosing channels by their labels: the `FIELD=VALUE` grammar of `--select`/`--ablate`, the
classify JSON that carries the labels, and the per-layer cap.

The record's fields and vocabulary are the classification's own (`vaedyn_cli.labels`); nudge,
eval's ablation and grids, and the report choose channels here.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vaedyn_cli import anatomy, classification, inputs, labels
from vaedyn_cli import store as store_mod
from vaedyn_cli.errors import VaedynError

log = logging.getLogger(__name__)

CHANNEL_FIELDS = labels.RECORD_KEYS
VOCABULARY = {
    "part": labels.PARTS,
    "state": (*labels.STATES, labels.UNKNOWN),
    "trajectory": (*labels.TRAJECTORIES, labels.UNKNOWN),
    "mechanism": (*labels.MECHANISMS, "null"),
    **{flag: ("true", "false") for flag in labels.FLAGS},
}


@dataclass(frozen=True)
class Target:
    """One channel to nudge; `score` orders channels when a layer is capped (lowest first)."""

    layer: str
    channel_index: int
    score: float | None = None



def _as_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Selector:
    """`field=a,b` (any alternative matches; globs allowed) or `field!=a,b` (none matches)."""

    field: str
    patterns: tuple[str, ...]
    negate: bool

    @property
    def expression(self) -> str:
        """The selector written out as `--select` takes it (`parse_select([s.expression]) == [s]`)."""
        return f"{self.field}{'!=' if self.negate else '='}{','.join(self.patterns)}"

    def matches(self, record: dict[str, Any]) -> bool:
        text = _as_text(record.get(self.field))
        hit = any(fnmatch.fnmatchcase(text, p) for p in self.patterns)
        return hit != self.negate


def parse_select(exprs: Sequence[str], flag: str = "--select") -> list[Selector]:
    """Parse `--select` expressions (`flag` names the option in errors: `--ablate` takes the same
    grammar); unknown fields and impossible values are errors."""
    selectors = []
    for expr in exprs:
        key, sep, value = expr.partition("=")
        negate = key.endswith("!")
        key = key.removesuffix("!").strip()
        if not sep or not key or not value.strip():
            raise VaedynError(
                f"{flag} {expr!r}: expected FIELD=VALUE (or FIELD!=VALUE), e.g. mechanism=gn_scale, "
                "layer=decoder.*, state=dormant,dead"
            )
        if key not in CHANNEL_FIELDS:
            raise VaedynError(f"{flag} {expr!r}: unknown field '{key}'; fields: {', '.join(CHANNEL_FIELDS)}")
        patterns = tuple(p.strip() for p in value.split(","))
        for p in patterns:
            vocab = VOCABULARY.get(key)
            if vocab and not any(ch in p for ch in "*?[") and p.lower() not in vocab:
                raise VaedynError(f"{flag} {expr!r}: '{p}' is not a value of {key}; values: {', '.join(vocab)}")
        patterns = tuple(p.lower() if key in VOCABULARY else p for p in patterns)
        selectors.append(Selector(key, patterns, negate))
    return selectors


def _priority(record: dict[str, Any]) -> tuple[bool, float, int]:
    score = record.get("score")
    missing = not isinstance(score, int | float) or isinstance(score, bool) or math.isnan(score)
    return (missing, 0.0 if missing else float(score), int(record["channel_index"]))


def select_targets(
    channels: Sequence[dict[str, Any]],
    select: Sequence[str],
    max_fraction: float,
    layer_sizes: dict[str, int],
) -> list[Target]:
    """Channel records that match every selector, at most floor(max_fraction * channels) per layer,
    lowest score first; returned in layer order (of `layer_sizes`), then channel index."""
    selectors = parse_select(select)
    chosen: dict[str, list[dict[str, Any]]] = {}
    for rec in channels:
        if all(s.matches(rec) for s in selectors):
            chosen.setdefault(rec["layer"], []).append(rec)
    targets = []
    for layer, size in layer_sizes.items():
        cap = math.floor(max_fraction * size + 1e-9)
        kept = sorted(chosen.get(layer, []), key=_priority)[:cap]
        for rec in sorted(kept, key=lambda r: int(r["channel_index"])):
            score = None if _priority(rec)[0] else float(rec["score"])
            targets.append(Target(layer, int(rec["channel_index"]), score))
    return targets


def parse_classification(text: str, where: str) -> dict[str, Any]:
    """The classify JSON, checked for the fields nudge needs (layers map, channel records)."""
    hint = "pass the output of `vaedyn classify STORE --format json`"
    data = inputs.parse_json(text, f"targets {where}", hint)
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict) or not isinstance(
        data.get("channels"), list
    ):
        raise VaedynError(f"targets {where} lack a 'layers' mapping and a 'channels' list; {hint}")
    for layer, n in data["layers"].items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise VaedynError(f"targets {where}: layers['{layer}'] must be a channel count, got {n!r}; {hint}")
    seen = set()
    for i, rec in enumerate(data["channels"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("layer"), str):
            raise VaedynError(f"targets {where}: channels[{i}] has no 'layer' string; {hint}")
        idx = rec.get("channel_index")
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise VaedynError(f"targets {where}: channels[{i}] has no integer 'channel_index'; {hint}")
        if (rec["layer"], idx) in seen:
            raise VaedynError(f"targets {where}: channel {rec['layer']}[{idx}] is listed twice; {hint}")
        seen.add((rec["layer"], idx))
    return data


def check_classification_fits(data: dict[str, Any], model: nn.Module, where: str, model_name: str) -> None:
    """The classification was made on this architecture: its layers are modules of the model with the
    same channel counts (a GroupNorm's, or the output's or input's of any other tracked module), and
    its channel indices are in range."""
    norms = anatomy.channel_counts(model)
    modules = dict(model.named_modules())
    layers: dict[str, int] = data["layers"]
    fix = "classify a trace recorded from this model"
    if layers and not set(layers) & set(modules):
        raise VaedynError(
            f"targets {where} come from another architecture: none of their {len(layers)} layers is a "
            f"module of {model_name} (e.g. '{next(iter(layers))}'); {fix}"
        )
    for layer, n in layers.items():
        if layer not in modules:
            raise VaedynError(f"targets {where}: unknown layer '{layer}' (not a module of {model_name}); {fix}")
        counts = [norms[layer]] if layer in norms else \
            [c for cap in ("output", "input") if (c := anatomy.captured_channels(model, layer, cap)) is not None]
        if n not in counts:
            raise VaedynError(
                f"targets {where} come from another architecture: {layer} has {n} channels there and "
                f"{' or '.join(map(str, counts)) or 'no fixed count'} in {model_name}; {fix}"
            )
    for i, rec in enumerate(data["channels"]):
        layer, idx = rec["layer"], rec["channel_index"]
        if layer not in layers:
            raise VaedynError(f"targets {where}: channels[{i}] names layer '{layer}', absent from 'layers'; {fix}")
        if not 0 <= idx < layers[layer]:
            raise VaedynError(
                f"targets {where}: channels[{i}] has channel_index {idx}, out of range for {layer} "
                f"({layers[layer]} channels); {fix}"
            )


def norm_layers(layers: dict[str, int], model: nn.Module, purpose: str) -> dict[str, int]:
    """The GroupNorm layers among classified `layers` (nudges and ablations act on GroupNorm scales);
    the others (a tracked conv, say) are observed only, which is logged once."""
    norms = anatomy.channel_counts(model)
    kept = {k: v for k, v in layers.items() if k in norms}
    left = [k for k in layers if k not in norms]
    if left:
        log.info("%s acts on GroupNorm channels: the %d other classified layer(s) (%s) are left out",
                 purpose, len(left), ", ".join(left[:3]) + (", ..." if len(left) > 3 else ""))
    return kept


def store_classification(store: str | Path) -> dict[str, Any]:
    """The classify JSON (as `vaedyn classify --format json` prints it) of a trace store or run folder:
    its `classification` group when `vaedyn classify` wrote one, else classified in memory with the
    store's own classify settings (nothing is written)."""
    path = store_mod.resolve_store_path(str(store))
    found, _ = classification.stored_labels(path, store_mod.open_trace(path))
    return labels.to_json(found, path)
