"""The causal check of `vaedyn eval --ablate`: are quiet channels useless?

Mean ablation of GroupNorm channel c: gamma_c <- 0, beta_c <- m_c, the channel's mean output over
the evaluated images (all images and positions, measured by the probes during the baseline
pass), so the layers after it see the channel's average instead of its signal. A dead channel
(gamma = 0, constant output beta) is left exactly as it was. The control ablates as many
randomly chosen active channels of the same layers (seeded by the config's seed and the layer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaedyn_cli import artifacts
from vaedyn_cli.config import NearZeroConfig, TrackConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.metrics import METRICS, reconstruction_metrics
from vaedyn_cli.probes import ChannelProbes
from vaedyn_cli.randomness import layer_rng
from vaedyn_cli.selection import (
    Target,
    check_classification_fits,
    norm_layers,
    parse_select,
    select_targets,
    store_classification,
)

log = logging.getLogger(__name__)


class ChannelMeans:
    """Mean output per channel of some GroupNorms over the forwards made while attached (float64)."""

    def __init__(self, model: torch.nn.Module, layers: Iterable[str]):
        names = list(dict.fromkeys(layers))
        track = TrackConfig(layers=names, module_types=["GroupNorm"], near_zero=NearZeroConfig(enabled=False))
        self.probes = ChannelProbes(model, track, exact=True) if names else None
        self._means: dict[str, np.ndarray] | None = None

    def __enter__(self) -> ChannelMeans:
        if self.probes is not None:
            self.probes.reset()
            self.probes.arm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.probes is not None:
            self.probes.disarm()

    def mean(self, layer: str, index: int) -> float:
        if self._means is None:
            self._means = {}
            if self.probes is not None:
                self.probes.finish()
                record = self.probes.snapshot(0).resolve()
                for p in self.probes.layers:
                    self._means[p.name] = record.channels["mean"][p.offset : p.offset + p.channels]
        values = self._means.get(layer)
        if values is None or not np.isfinite(values[index]):
            raise VaedynError(f"layer {layer} produced no output during evaluation; it cannot be mean-ablated")
        return float(values[index])


@dataclass
class AblationPlan:
    """What `--ablate` asked for and where the labels came from, checked before any pass runs."""

    select: list[str]
    source: str  # the trace store the classification belongs to
    classification: dict[str, Any]  # the classify JSON
    targets: list[Any] = field(default_factory=list)  # nudge.Target, filled by `plan_targets`
    control: list[Any] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return [t.layer for t in [*self.targets, *self.control]]


def ablation_plan(select: list[str], store: str | Path | None, ckpt: Any) -> AblationPlan:
    """Parse `--ablate` and read the classification (from --store, else the checkpoint's run trace)."""
    parse_select(select, "--ablate")
    if store is None and ckpt.run_dir is None:
        raise VaedynError(
            f"--ablate needs channel labels, and checkpoint {ckpt.source} belongs to no run folder: "
            "pass --store STORE (a trace store or run folder)"
        )
    data = store_classification(labels_store(store, ckpt) or Path(ckpt.run_dir) / artifacts.TRACE_DIR)
    return AblationPlan(list(select), str(data["store"]), data)


def control_targets(channels: list[dict[str, Any]], targets: list[Any], seed: int) -> list[Any]:
    """Per layer of `targets`, as many channels drawn at random from the layer's active, untargeted
    ones (all of them, with a warning, when there are too few); seeded per (seed, layer)."""
    picked = {(t.layer, t.channel_index) for t in targets}
    wanted: dict[str, int] = {}
    for t in targets:
        wanted[t.layer] = wanted.get(t.layer, 0) + 1
    control = []
    for layer, k in wanted.items():
        pool = sorted(
            int(r["channel_index"]) for r in channels
            if r["layer"] == layer and r.get("state") == "active" and (layer, int(r["channel_index"])) not in picked
        )
        if len(pool) < k:
            log.warning("control: %s has %d active channels for %d ablated ones; using all of them", layer, len(pool), k)
        rng = layer_rng(seed, layer)
        chosen = rng.choice(np.asarray(pool, dtype=np.int64), size=min(k, len(pool)), replace=False) if pool else []
        control += [Target(layer, int(i)) for i in sorted(chosen)]
    return control


def plan_targets(plan: AblationPlan, model: torch.nn.Module, seed: int, where: str) -> None:
    """Select the ablated channels and their control on this model (the labels must fit it)."""
    data = plan.classification
    check_classification_fits(data, model, f"from {plan.source}", where)
    plan.targets = select_targets(data["channels"], plan.select, 1.0, norm_layers(data["layers"], model, "--ablate"))
    if not plan.targets:
        log.warning("--ablate %s selects no channel of %s: nothing ablated, no ablation pass run",
                    " ".join(plan.select), plan.source)
    plan.control = control_targets(data["channels"], plan.targets, seed)


@torch.no_grad()
def _mean_ablated_metrics(
    model: torch.nn.Module, targets: list[Any], means: ChannelMeans, loader: Iterable[torch.Tensor], device: Any
) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
    """Metrics with `targets` mean-ablated (None without targets); the parameters are restored afterwards."""
    saved = []
    rows = []
    for t in targets:
        norm = model.get_submodule(t.layer)
        c = t.channel_index
        mean = means.mean(t.layer, c)
        saved.append((norm, c, norm.weight[c].clone(), norm.bias[c].clone()))
        rows.append({"layer": t.layer, "channel_index": c, "mean": mean})
        norm.weight[c] = 0.0
        norm.bias[c] = mean
    try:
        metrics = reconstruction_metrics(model, loader, device=device).metrics if targets else None
    finally:
        for norm, c, w, b in saved:
            norm.weight[c] = w
            norm.bias[c] = b
    return metrics, rows


def ablation_section(
    plan: AblationPlan,
    model: torch.nn.Module,
    baseline: dict[str, float],
    means: ChannelMeans,
    loader: Iterable[torch.Tensor],
    device: Any,
) -> dict[str, Any]:
    """metrics.json's `ablation`: baseline, mean-ablated and control metrics and their deltas."""
    ablated, rows = _mean_ablated_metrics(model, plan.targets, means, loader, device)
    control, control_rows = _mean_ablated_metrics(model, plan.control, means, loader, device)
    ablated, control = ablated or dict(baseline), control or dict(baseline)
    return {
        **_what(plan),
        "mean_source": "eval images (forward hooks during the baseline pass)",
        "n_channels": len(plan.targets),
        "channels": rows,
        "n_control": len(plan.control),
        "control_channels": control_rows,
        "baseline": dict(baseline),
        "ablated": ablated,
        "control": control,
        "delta_ablated": {k: ablated[k] - baseline[k] for k in METRICS},
        "delta_control": {k: control[k] - baseline[k] for k in METRICS},
    }


def _what(plan: AblationPlan) -> dict[str, Any]:
    return {"select": plan.select, "store": plan.source, "classification_steps": plan.classification.get("steps")}


def skipped_ablation(plan: AblationPlan) -> dict[str, Any]:
    """metrics.json's `ablation` when the selection matches no channel: what was asked, no passes run."""
    return {
        **_what(plan),
        "n_channels": 0,
        "channels": [],
        "n_control": 0,
        "control_channels": [],
        "skipped": "the selection matches no channel: no ablation pass was run",
    }


def labels_store(store: str | Path | None, ckpt: Any) -> Path | None:
    """Where channel labels come from: --store, else the checkpoint's run trace (`trace.zarr`, or
    `trace-track.zarr` when it was traced afterwards by `vaedyn track`); None when there is neither."""
    if store is not None:
        return Path(store)
    if ckpt.run_dir is None:
        return None
    run = Path(ckpt.run_dir)
    return next((run / n for n in (artifacts.TRACE_DIR, artifacts.TRACK_TRACE_DIR) if (run / n).exists()), None)

