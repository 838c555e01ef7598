"""`vaedyn eval --grids LAYER`: activation grids and the linear lens of chosen layers, labelled.

Per layer: grid-<layer>.png (the first eval.grid_samples evaluated images, every channel a tile,
outlined by its classified state) and lens-<layer>.png (the linear lens fitted on the first
LENS_IMAGES evaluated images: even ones fit, odd ones held out for R^2). Labels: the
classification of --store or of the checkpoint's run trace (as --ablate); without one the grid
has no outlines and the lens splits channels by their activity on the lens images themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaedyn_cli import anatomy, lens
from vaedyn_cli.ablation import labels_store
from vaedyn_cli.config import TrackConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.selection import check_classification_fits, store_classification

log = logging.getLogger(__name__)

LENS_IMAGES = 8


@dataclass
class GridPlan:
    """The layers --grids names and the classified state of their channels, checked before any pass."""

    layers: list[str]
    source: str | None  # the trace store the labels come from (None: unlabelled)
    states: dict[str, dict[int, str]] = field(default_factory=dict)  # layer -> channel -> state
    capture: str = "output"  # which tensor of each layer is drawn (track.capture)


def grid_layers(patterns: Iterable[str], model: torch.nn.Module, module_types: Sequence[str] = ("GroupNorm",),
                capture: str = "output") -> list[str]:
    """The layers named by module paths (any module with feature maps: a norm, a conv such as
    conv_shortcut, a block) or matched by fnmatch globs (among the modules of `module_types`, as
    track.layers selects them), in module order."""
    import fnmatch

    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if n and type(m).__name__ in set(module_types)]
    chosen: set[str] = set()
    for pattern in patterns:
        hit = {pattern} if pattern in modules and pattern else {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hit:
            some = ", ".join(names[:2] + ["...", names[-1]]) if len(names) > 3 else ", ".join(names)
            kinds = "/".join(module_types)
            raise VaedynError(
                f"--grids {pattern!r} matches no {kinds} layer of the model ({len(names)} layers: {some}); "
                "pass a module path (any module, e.g. a conv_shortcut) or a glob such as 'decoder.up_blocks.*.norm2'"
            )
        for name in hit:
            if anatomy.captured_channels(model, name, capture) is None:
                raise VaedynError(f"--grids {name!r}: its {capture} has no fixed channel count to draw; pass a norm, "
                                  "a conv or a block")
        chosen |= hit
    return [n for n in modules if n in chosen]


def grids_plan(patterns: list[str], store: str | Path | None, ckpt: Any, model: torch.nn.Module, where: str,
               classification: dict[str, Any] | None = None, track: TrackConfig | None = None) -> GridPlan:
    """Resolve --grids on this model (globs among track.module_types) and read the labels
    (`classification` when --ablate read it already)."""
    track = track or TrackConfig()
    layers = grid_layers(patterns, model, track.module_types, track.capture)
    if classification is None:
        source = labels_store(store, ckpt)
        if source is None:
            log.info("--grids: no trace store for %s, so no channel labels (pass --store to outline tiles)", ckpt.source)
            return GridPlan(layers, None, capture=track.capture)
        classification = store_classification(source)
    check_classification_fits(classification, model, f"from {classification['store']}", where)
    states: dict[str, dict[int, str]] = {}
    for rec in classification["channels"]:
        if rec["layer"] in layers:
            states.setdefault(rec["layer"], {})[int(rec["channel_index"])] = str(rec["state"])
    return GridPlan(layers, str(classification["store"]), states, track.capture)


def _first_images(dataset: Any, n: int) -> torch.Tensor:
    """The first n images of the evaluated split, (n, 3, H, W) in [-1, 1]."""
    import itertools

    if hasattr(dataset, "__len__"):
        items = [dataset[i] for i in range(min(n, len(dataset)))]
    else:
        items = list(itertools.islice(iter(dataset), n))
    return torch.stack([x[0] if isinstance(x, list | tuple) else x for x in items])


def _r2(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # NaN: the target images are constant


def grids_section(plan: GridPlan, model: torch.nn.Module, dataset: Any, grid_samples: int, folder: Path,
                  scale: str = "layer") -> dict[str, Any]:
    """Write grid-<layer>.png and lens-<layer>.png into `folder`; metrics.json's `grids` section."""
    images = _first_images(dataset, max(grid_samples, LENS_IMAGES))
    section: dict[str, Any] = {}
    for layer in plan.layers:
        labels = plan.states.get(layer)
        grid_file, lens_file = f"grid-{layer}.png", f"lens-{layer}.png"
        grid = lens.grid_figure(model, images[:grid_samples], layer, labels=labels, out_png=folder / grid_file,
                                scale=scale, capture=plan.capture)
        fit = lens.lens_figure(model, images[:LENS_IMAGES], layer, labels=labels, out_png=folder / lens_file,
                               capture=plan.capture)
        section[layer] = {
            "grid": grid_file,
            "lens": lens_file,
            "r2": {k: _r2(v) for k, v in fit["r2"].items()},
            "r2_on": fit["r2_on"],
            "what": fit["what"],
            "resolution": fit["resolution"],
            "labels_from": f"classification of {plan.source}" if labels else "activity on the lens images (no classification)",
            "channels": fit["channels"],
            "grid_images": grid["images"],
            "tiles": grid["tiles"],
            "scale": grid["scale"],
            "flat_channels": grid["flat_channels"],
            "quiet_channels": grid["quiet_channels"],
            "outlines": grid["outlines"],
            "lens_images": fit["n_images"],
        }
    return section

