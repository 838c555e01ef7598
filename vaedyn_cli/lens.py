"""Looking inside one layer: per-channel activation grids and a fitted linear lens.

Activation grids (the original study's Figure 2): each channel's map of a layer, for a few
images, as a tile normalised to [0, 1]; a flat tile is a suppressed channel. Tiles are outlined
by the channel's class (active, dormant, dead).

Linear lens: a least-squares map from a layer's channels (per spatial position) to the input
image downsampled to that layer's resolution. Fitted on the probe images, it says how much of
the image each channel set can still express: all channels, only the active ones, only the
dormant ones, each with its R^2.

What a layer shows: the output of a GroupNorm, passed through the activation that follows it
where one does (SiLU after `norm1`, `norm2` and `conv_norm_out`), i.e. what the next
convolution reads; attention `group_norm` outputs are shown as they are; any other module (a
conv such as `conv_shortcut`, a block) its raw output, or with capture "input" its input (the
original project's grids showed raw outputs). Figures say which.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vaedyn_cli import anatomy, artifacts
from vaedyn_cli.classification import layer_states
from vaedyn_cli.config import ClassifyConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.labels import CODE_NAMES

# Outline colour of each class; unlabelled channels get no outline.
LABEL_COLOURS = {"active": "#2ca02c", "dormant": "#ff7f0e", "dead": "#d62728"}
FLAT_RTOL = 1e-6  # a tile is flat when its range is below this share of the layer's largest range
GRID_SCALES = ("layer", "tile")  # grey scale of the tiles: one range for the layer, or each tile its own
GRID_INCHES = 10.0  # width of an activation grid figure
LAYER_WHITE = 0.995  # the shared grey scale is white from this quantile of the layer's values up
QUIET_TAU = 0.1  # a tile is quiet when its spread is at most this share of the layer's mean (classify's tau)
MAX_LENS_ROWS = 200_000  # pixels used to fit the lens (a seeded subsample beyond that)

Labels = Sequence[str] | Mapping[int, str] | None


def _module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    module = modules.get(layer) if layer else None
    if module is None:
        names = [n for n, m in modules.items() if isinstance(m, torch.nn.GroupNorm)]
        hint = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise VaedynError(f"layer '{layer}' is not a module of the model; pass a module path such as {hint}")
    return module


@dataclass
class LayerActivations:
    """One layer's maps for a batch of images and what they are."""

    layer: str
    maps: torch.Tensor  # (N, C, h, w), float32 on CPU
    what: str  # e.g. "silu(GroupNorm output)"


@torch.no_grad()
def layer_activations(model: torch.nn.Module, images: torch.Tensor, layer: str,
                      capture: str = "output") -> LayerActivations:
    """Run images (N, 3, H, W in [-1, 1]) through the VAE (posterior mode) and capture one module's
    output (through the activation that follows it, where one does) or input."""
    module = _module(model, layer)
    act = anatomy.activation(model, layer) if capture == "output" else None
    act_name = str(getattr(getattr(model, "config", None), "act_fn", type(act).__name__.lower()))
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, inputs: Any, output: Any = None) -> None:
        t = inputs[0] if capture == "input" else output
        if not captured and isinstance(t, torch.Tensor):
            captured.append(t.detach())

    was_training = model.training
    model.eval()
    handle = (module.register_forward_pre_hook(hook) if capture == "input" else module.register_forward_hook(hook))
    try:
        param = next(model.parameters())
        model(images.to(param.device, param.dtype), sample_posterior=False)
    finally:
        handle.remove()
        model.train(was_training)
    if not captured or captured[0].ndim < 3:
        raise VaedynError(f"layer '{layer}' has no {capture} feature maps to draw (got no tensor of 3+ dims)")
    maps = captured[0]
    if anatomy.channel_last(module):  # a linear's (N, ..., C)
        maps = maps.flatten(1, -2).transpose(1, 2)
    if maps.ndim == 3:  # (N, C, length), e.g. attention's group_norm: back to maps of the image's aspect
        n, c, length = maps.shape
        h = max(1, round(math.sqrt(length * images.shape[-2] / images.shape[-1])))
        maps = maps.reshape(n, c, h, length // h)
    if act is not None:
        maps = act(maps)
    kind = type(module).__name__
    what = f"{act_name}({kind} {capture})" if act is not None else f"{kind} {capture}"
    return LayerActivations(layer, maps.float().cpu(), what)


def labels_list(labels: Labels, n_channels: int) -> list[str | None]:
    """Per-channel labels from a sequence (index = channel) or a {channel: label} mapping."""
    if labels is None:
        return [None] * n_channels
    if isinstance(labels, Mapping):
        return [labels.get(c) for c in range(n_channels)]
    out = [None if v is None else str(v) for v in labels]
    if len(out) != n_channels:
        raise VaedynError(f"got {len(out)} channel labels for a layer of {n_channels} channels; pass one per channel")
    return out


def probe_states(maps: torch.Tensor, params: ClassifyConfig | None = None) -> list[str]:
    """States from the probe maps themselves, by the classification's per-step rule (dormancy
    method): activity = std over images and space, divided by the layer's mean activity."""
    params = (params or ClassifyConfig()).model_copy(update={"method": "dormancy"})
    std = maps.double().transpose(0, 1).reshape(maps.shape[1], -1).std(dim=1, unbiased=False)
    return [CODE_NAMES[code] for code in layer_states(std.numpy(), params).tolist()]


# ---------------------------------------------------------------------------------------------
# activation grids


def normalise_tiles(maps: torch.Tensor, scale: str = "tile") -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, channel) maps as [0, 1] tiles: with scale "tile" each map on its own range (the
    original Figure 2: every tile uses the full grey range, so a quiet channel looks as structured as a
    busy one); with "layer" one range for all the maps of the layer (a quiet channel looks flat). Flat
    maps (range ~0 relative to the layer's largest) become all-zero tiles either way. Returns tiles
    (N, C, h, w) and flat (N, C) booleans."""
    if scale not in GRID_SCALES:
        raise VaedynError(f"grid scale {scale!r}: choose one of {', '.join(GRID_SCALES)}")
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    rng = hi - lo
    flat = (rng <= FLAT_RTOL * rng.max().clamp_min(1e-30)).squeeze(-1).squeeze(-1)
    if scale == "layer":
        lo, hi = layer_range(maps)
        rng = hi - lo
    tiles = torch.where(rng > 0, (maps - lo) / rng.clamp_min(1e-30), torch.zeros_like(maps)).clamp(0.0, 1.0)
    tiles[flat] = 0.0
    return tiles, flat


def layer_range(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The grey range shared by a layer's tiles: black at its lowest value, white at its LAYER_WHITE
    quantile (a few bright pixels would otherwise leave every other tile black)."""
    values = maps.flatten().double()
    if values.numel() > 1_000_000:  # quantile's input limit; a seeded subsample is as good for a grey scale
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return maps.amin(), torch.quantile(values, LAYER_WHITE).to(maps.dtype)


def tile_spread(maps: torch.Tensor) -> torch.Tensor:
    """Each (image, channel) map's spread: its std over space, (N, C), in the layer's own units."""
    return maps.double().flatten(2).std(dim=2, unbiased=False).float()


def quiet_tiles(spread: torch.Tensor, tau: float = QUIET_TAU) -> torch.Tensor:
    """(N, C) booleans: a tile whose spread is at most `tau` x the mean spread of the layer's tiles of that
    image (the per-step dormancy rule, on one image's map)."""
    return spread <= tau * spread.mean(dim=1, keepdim=True)


def tile_mosaic(tiles: torch.Tensor, pad: int = 1, bar: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Lay the C tiles of one image (C, h, w) on a near-square grid, leaving `bar` rows under each tile
    (for its spread bar); returns the mosaic (NaN between tiles) and each channel's box (row, col, h, w)
    in it, in channel order."""
    c, h, w = tiles.shape
    cols = max(1, math.ceil(math.sqrt(c)))
    rows = max(1, math.ceil(c / cols))
    mosaic = np.full((rows * (h + bar + pad) + pad, cols * (w + pad) + pad), np.nan, dtype=np.float32)
    boxes = []
    for i in range(c):
        r0 = pad + (i // cols) * (h + bar + pad)
        c0 = pad + (i % cols) * (w + pad)
        mosaic[r0 : r0 + h, c0 : c0 + w] = tiles[i].numpy()
        boxes.append((r0, c0, h, w))
    return mosaic, boxes


def _to_rgb(image: torch.Tensor) -> np.ndarray:
    return ((image.float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def activation_grid(
    model: torch.nn.Module,
    images: torch.Tensor,
    layer: str,
    labels: Labels = None,
    out_png: Path | str = "grid.png",
    scale: str = "layer",
) -> Path:
    """Write one grid per image: the image, then every channel of `layer` as a [0, 1] tile (on the layer's
    shared range, or with scale="tile" each on its own), a bar under each tile showing its spread, outlined
    by its label (state per channel, e.g. from the classification)."""
    return Path(grid_figure(model, images, layer, labels, out_png, scale)["png"])


def grid_figure(
    model: torch.nn.Module,
    images: torch.Tensor,
    layer: str,
    labels: Labels = None,
    out_png: Path | str = "grid.png",
    scale: str = "layer",
    capture: str = "output",
) -> dict[str, Any]:
    """`activation_grid`, returning a JSON-able summary of what it drew: layer, what was read (`capture`:
    the module's output or input), images, tiles per image, the scale, channels flat in every image,
    channels quiet in every image, outlines per label, png."""
    acts = layer_activations(model, images, layer, capture)
    tiles, flat = normalise_tiles(acts.maps, scale)
    spread = tile_spread(acts.maps)
    n, c = tiles.shape[:2]
    names = labels_list(labels, c)
    fig = _grid_figure(acts, tiles, flat, spread, names, images, scale)
    png = _save(fig, out_png)
    return {
        "layer": layer,
        "what": acts.what,
        "images": int(n),
        "tiles": len(tile_mosaic(tiles[0])[1]),
        "scale": scale,
        "flat_channels": [int(i) for i in torch.nonzero(flat.all(dim=0)).flatten().tolist()],
        "quiet_channels": [int(i) for i in torch.nonzero(quiet_tiles(spread).all(dim=0)).flatten().tolist()],
        "outlines": {k: names.count(k) for k in LABEL_COLOURS if k in names},
        "png": str(png),
    }


def _grid_figure(acts: LayerActivations, tiles: torch.Tensor, flat: torch.Tensor, spread: torch.Tensor,
                 names: list[str | None], images: torch.Tensor, scale: str):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    n, c, h, w = tiles.shape
    bar = max(2, round(h / 6))
    mosaic0, _ = tile_mosaic(tiles[0], bar=bar)
    aspect = mosaic0.shape[1] / mosaic0.shape[0]
    row_h = min(6.0, max(2.5, (GRID_INCHES - 0.6) / (0.6 + aspect)))  # the tiles as large as 10 inches allow
    fig, axes = plt.subplots(n, 2, figsize=(row_h * (0.6 + aspect) + 0.6, row_h * n + 1.4), squeeze=False,
                             gridspec_kw={"width_ratios": [0.6, aspect]})
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    top = float(spread.max()) or 1.0
    quiet = quiet_tiles(spread)
    for i in range(n):
        ax_img, ax_grid = axes[i]
        ax_img.imshow(_to_rgb(images[i]))
        ax_img.set_title(f"image {i}", fontsize=9)
        ax_img.axis("off")
        mosaic, boxes = tile_mosaic(tiles[i], bar=bar)
        ax_grid.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        for ch, (r0, c0, bh, bw) in enumerate(boxes):
            # the spread bar: a light track the tile's width, filled in proportion to its spread
            y = r0 + bh - 0.5 + 0.15 * bar
            ax_grid.add_patch(Rectangle((c0 - 0.5, y), bw, 0.7 * bar, facecolor="#dddddd", edgecolor="none"))
            ax_grid.add_patch(Rectangle((c0 - 0.5, y), bw * float(spread[i, ch]) / top, 0.7 * bar,
                                        facecolor="#c00000" if quiet[i, ch] else "#303030", edgecolor="none"))
            colour = LABEL_COLOURS.get(names[ch] or "", None)
            if colour:
                ax_grid.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), bw, bh, fill=False, edgecolor=colour, linewidth=1.2))
        ax_grid.set_title(f"image {i}: {int(quiet[i].sum())} of {c} tiles quiet, {int(flat[i].sum())} flat", fontsize=9)
        ax_grid.axis("off")
    present = [k for k in LABEL_COLOURS if k in names]
    if present:
        counts = {k: names.count(k) for k in present}
        handles = [Patch(facecolor="none", edgecolor=LABEL_COLOURS[k], label=f"{k} ({counts[k]})") for k in present]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, title="outline: channel class")
    import textwrap

    lo, hi = (float(v) for v in layer_range(acts.maps))
    how = (f"one grey scale for the whole layer (black {lo:.3g}, white {hi:.3g} and above), so a quiet channel looks "
           "flat" if scale == "layer" else "each tile scaled to its own [0, 1] (a quiet channel looks as busy as any)")
    detail = (f"{c} channels of {acts.what}, {h}x{w} px each; {how}. Bar under each tile: its spread (std over "
              f"space) relative to the largest tile's; red: quiet, spread <= {QUIET_TAU:g} x the mean of the image's "
              "tiles")
    width = max(40, int(fig.get_figwidth() * 12))  # characters of a 10-point title that fit the figure
    title = "\n".join([f"Activation grid of {acts.layer}", *textwrap.wrap(detail, width)])
    fig.suptitle(title, fontsize=10)
    top_frac = 1 - (0.2 + 0.17 * title.count("\n")) / fig.get_figheight()
    fig.tight_layout(rect=(0, 0.06 if present else 0, 1, top_frac))
    return fig


def _save(fig: Any, out_png: Path | str) -> Path:
    import matplotlib.pyplot as plt

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = artifacts.temp_path(out, artifacts.unique_tag())
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------------
# linear lens


def _design(features: torch.Tensor) -> torch.Tensor:
    f = features.detach().to("cpu", torch.float64)
    return torch.cat([f, torch.ones(f.shape[0], 1, dtype=torch.float64)], dim=1)


def lens_predict(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Apply a fitted lens (C + 1, K; last row is the bias) to features (N, C)."""
    return _design(features) @ weights


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """R^2 pooled over outputs: 1 - residual sum of squares / total sum of squares about each output's mean."""
    y = target.detach().to("cpu", torch.float64)
    sse = float(((y - pred.to(torch.float64)) ** 2).sum())
    sst = float(((y - y.mean(dim=0, keepdim=True)) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


def fit_linear_lens(features: torch.Tensor, targets: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, float]:
    """Least squares targets (N, K) ~ features (N, C) @ W + b, in float64 on CPU (SVD driver, so dead
    channels, i.e. constant columns, are fine). Returns W stacked over b as (C + 1, K) and R^2 on the
    fit rows. `ridge` > 0 adds an L2 penalty on W (not on b), scaled by the mean feature variance."""
    if features.ndim != 2 or targets.ndim != 2 or features.shape[0] != targets.shape[0]:
        raise ValueError(f"features (N, C) and targets (N, K) must share N; got {tuple(features.shape)}, "
                         f"{tuple(targets.shape)}")
    a = _design(features)
    b = targets.detach().to("cpu", torch.float64)
    c = features.shape[1]
    if ridge > 0 and c:
        scale = float(a[:, :c].var(dim=0).mean()) * a.shape[0] or 1.0
        penalty = torch.zeros(c, c + 1, dtype=torch.float64)
        penalty[:, :c] = torch.eye(c, dtype=torch.float64) * math.sqrt(ridge * scale)
        a_fit = torch.cat([a, penalty])
        b_fit = torch.cat([b, torch.zeros(c, b.shape[1], dtype=torch.float64)])
    else:
        a_fit, b_fit = a, b
    weights = torch.linalg.lstsq(a_fit, b_fit, driver="gelsd").solution
    return weights, r2_score(a @ weights, b)


def lens_data(maps: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel features (N*h*w, C) of a layer and the input image area-downsampled to (h, w) as
    targets (N*h*w, 3)."""
    n, c, h, w = maps.shape
    target = F.adaptive_avg_pool2d(images.float().cpu(), (h, w))
    return maps.permute(0, 2, 3, 1).reshape(-1, c), target.permute(0, 2, 3, 1).reshape(-1, 3)


def _subsample(n_rows: int, limit: int, seed: int) -> torch.Tensor:
    if n_rows <= limit:
        return torch.arange(n_rows)
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))[:limit]


def lens_fits(maps: torch.Tensor, images: torch.Tensor, states: list[str], ridge: float = 1e-6,
              seed: int = 0) -> dict[str, Any]:
    """Fit the lens on all, active-only and dormant-only (dormant + dead) channels. With 2+ images,
    even-numbered images are fitted and R^2 is measured on the odd ones (held-out pixels); with one
    image R^2 is on the fit pixels. Returns channel subsets, weights, R^2 and where it was measured."""
    n, c = maps.shape[:2]
    subsets = {
        "all": list(range(c)),
        "active": [i for i, s in enumerate(states) if s == "active"],
        "dormant": [i for i, s in enumerate(states) if s in ("dormant", "dead")],
    }
    fit_idx = list(range(0, n, 2)) if n >= 2 else [0]
    test_idx = list(range(1, n, 2)) if n >= 2 else [0]
    x_fit, y_fit = lens_data(maps[fit_idx], images[fit_idx])
    x_test, y_test = lens_data(maps[test_idx], images[test_idx])
    rows = _subsample(x_fit.shape[0], MAX_LENS_ROWS, seed)
    x_fit, y_fit = x_fit[rows], y_fit[rows]
    result: dict[str, Any] = {"r2_on": "held-out pixels" if n >= 2 else "fit pixels", "subsets": subsets,
                              "weights": {}, "r2": {}, "r2_fit": {}}
    for name, chans in subsets.items():
        w, r2_fit = fit_linear_lens(x_fit[:, chans], y_fit, ridge=ridge)
        result["weights"][name] = w
        result["r2_fit"][name] = r2_fit
        result["r2"][name] = r2_score(lens_predict(w, x_test[:, chans]), y_test) if n >= 2 else r2_fit
    return result


def lens_figure(
    model: torch.nn.Module,
    images: torch.Tensor,
    layer: str,
    labels: Labels = None,
    out_png: Path | str = "lens.png",
    show: int = 2,
    params: ClassifyConfig | None = None,
    capture: str = "output",
) -> dict[str, Any]:
    """Fit the linear lens of `layer` on `images` and draw what each channel set reconstructs.

    labels: state per channel (`active`/`dormant`/`dead`, e.g. from the classification); when None,
    states come from the probe images themselves (`probe_states`). Returns a JSON-able summary:
    layer, what was read, resolution, channel counts, R^2 per set and where it was measured, png."""
    acts = layer_activations(model, images, layer, capture)
    c = acts.maps.shape[1]
    given = labels_list(labels, c)
    states = [s or "active" for s in given] if labels is not None else probe_states(acts.maps, params)
    fits = lens_fits(acts.maps, images, states)
    shown = list(range(1, images.shape[0], 2))[:show] if images.shape[0] >= 2 else [0]
    fig = _lens_plot(acts, images, fits, shown)
    png = _save(fig, out_png)
    h, w = acts.maps.shape[-2:]
    return {
        "layer": layer,
        "what": acts.what,
        "resolution": [int(h), int(w)],
        "n_images": int(images.shape[0]),
        "channels": {k: len(v) for k, v in fits["subsets"].items()},
        "labels_from": "given" if labels is not None else "probe images",
        "r2": {k: float(v) for k, v in fits["r2"].items()},
        "r2_fit": {k: float(v) for k, v in fits["r2_fit"].items()},
        "r2_on": fits["r2_on"],
        "png": str(png),
    }


def _lens_plot(acts: LayerActivations, images: torch.Tensor, fits: dict[str, Any], shown: list[int]):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c, h, w = acts.maps.shape
    cols = ["target", "all", "active", "dormant"]
    fig, axes = plt.subplots(len(shown), 4, figsize=(11, 3.2 * len(shown) + 1.0), squeeze=False)
    for row, i in enumerate(shown):
        x, y = lens_data(acts.maps[i : i + 1], images[i : i + 1])
        panels = {"target": y}
        for name in cols[1:]:
            chans = fits["subsets"][name]
            panels[name] = lens_predict(fits["weights"][name], x[:, chans]).float()
        for j, name in enumerate(cols):
            ax = axes[row, j]
            img = ((panels[name].reshape(h, w, 3).clamp(-1, 1) + 1) / 2).numpy()
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if name == "target":
                ax.set_title(f"image {i} at {h}x{w} px", fontsize=9)
            else:
                k = len(fits["subsets"][name])
                ax.set_title(f"{name} channels ({k}/{c})\nR$^2$ = {fits['r2'][name]:.3f}", fontsize=9)
    fig.suptitle(f"Linear lens of {acts.layer}: least squares from {acts.what} to the input image\n"
                 f"(R$^2$ on {fits['r2_on']}; dormant = dormant + dead channels)", fontsize=10)
    fig.tight_layout()
    return fig
