"""Reconstruction evaluation: MSE, KL, PSNR and SSIM of a checkpoint on a split, sample images,
and the original study's Table 1 comparison of several evaluations.

Conventions (as the original project): the posterior MODE is decoded (deterministic); MSE is on
[-1, 1] images; KL is the posterior's KL to N(0, I) summed over latent elements and averaged over
images; PSNR and SSIM (torchmetrics) are per-image values averaged over images, computed on images
mapped to [0, 1] (reconstructions clamped) with data range 1.0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vaedyn_cli import artifacts
from vaedyn_cli.config import RunConfig, apply_overrides, validate_config
from vaedyn_cli.errors import VaedynError

log = logging.getLogger(__name__)

METRICS = ("mse", "kl", "psnr", "ssim")
LOWER_IS_BETTER = {"mse": True, "kl": True, "psnr": False, "ssim": False}
# Table 1 of the original study: label, scale applied to the value, decimals.
TABLE_FORMAT = {"mse": ("MSE (x1e-3)", 1e3, 3), "kl": ("KL", 1.0, 2), "psnr": ("PSNR (dB)", 1.0, 3), "ssim": ("SSIM", 1.0, 4)}
GRID_IMAGES = 8
SAMPLES_DIR = "samples"
GRID_FILE = "grid.png"


# ---------------------------------------------------------------------------------------------
# metrics


def reconstruct(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the posterior mode of `x`; returns (reconstruction, per-image KL summed over latent elements)."""
    posterior = model.encode(x).latent_dist
    recon = model.decode(posterior.mode()).sample
    return recon, posterior.kl()


def per_image_mse(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image (on the images' own scale), shape (batch,)."""
    return (recon.float() - x.float()).pow(2).flatten(1).mean(1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (reconstructions can overshoot)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _ssim_kernel(side: int) -> int:
    """SSIM's 11-pixel Gaussian window, shrunk to the largest odd size that fits small images."""
    return min(11, side if side % 2 else side - 1)


@dataclass
class EvalResult:
    """Metrics over a loader, the number of images, and the first images kept for pictures ([0, 1])."""

    metrics: dict[str, float]
    num_images: int
    originals: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    reconstructions: torch.Tensor = field(default_factory=lambda: torch.empty(0))


@torch.no_grad()
def reconstruction_metrics(
    model: Any, loader: Iterable[torch.Tensor], *, device: torch.device | str | None = None, keep: int = 0
) -> EvalResult:
    """MSE, KL, PSNR and SSIM of `model` (anything with diffusers' encode/decode) over `loader`
    (batches of (B, 3, H, W) images in [-1, 1]); keeps the first `keep` pairs for pictures."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    device = torch.device(device) if device is not None else next(iter(model.parameters())).device
    psnr = ssim = None
    mse_sum = kl_sum = 0.0
    n = 0
    kept_x: list[torch.Tensor] = []
    kept_r: list[torch.Tensor] = []
    for batch in loader:
        x = (batch[0] if isinstance(batch, list | tuple) else batch).to(device)
        recon, kl = reconstruct(model, x)
        if psnr is None:
            psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)).to(device)
            kernel = _ssim_kernel(min(x.shape[-2:]))
            ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=kernel).to(device)
        ux, ur = to_unit(x), to_unit(recon)
        # float64: SSIM's variances (E[x^2] - E[x]^2) lose ~1e-4 to cancellation in float32
        psnr.update(ur.double(), ux.double())
        ssim.update(ur.double(), ux.double())
        mse_sum += float(per_image_mse(recon, x).double().sum())
        kl_sum += float(kl.double().sum())
        n += x.shape[0]
        if sum(t.shape[0] for t in kept_x) < keep:
            kept_x.append(ux.cpu())
            kept_r.append(ur.cpu())
    if n == 0 or psnr is None or ssim is None:
        raise VaedynError("no images to evaluate: the split is empty; check the split name and max_samples")
    metrics = {"mse": mse_sum / n, "kl": kl_sum / n, "psnr": float(psnr.compute()), "ssim": float(ssim.compute())}
    originals = torch.cat(kept_x)[:keep] if kept_x else torch.empty(0)
    recons = torch.cat(kept_r)[:keep] if kept_r else torch.empty(0)
    return EvalResult(metrics, n, originals, recons)


# ---------------------------------------------------------------------------------------------
# pictures


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def image_grid(originals: torch.Tensor, reconstructions: torch.Tensor, gap: int = 2) -> Image.Image:
    """Originals in the top row, their reconstructions below, separated by white lines."""
    k, _, h, w = originals.shape
    canvas = np.full((2 * h + 3 * gap, k * w + (k + 1) * gap, 3), 255, dtype=np.uint8)
    for row, images in enumerate((originals, reconstructions)):
        top = gap + row * (h + gap)
        for i in range(k):
            left = gap + i * (w + gap)
            canvas[top : top + h, left : left + w] = _to_uint8(images[i])
    return Image.fromarray(canvas)


def _write_pictures(folder: Path, result: EvalResult, num_pairs: int) -> None:
    if result.originals.numel() == 0:
        return
    k = min(GRID_IMAGES, result.originals.shape[0])
    image_grid(result.originals[:k], result.reconstructions[:k]).save(folder / GRID_FILE)
    if num_pairs:
        samples = folder / SAMPLES_DIR
        samples.mkdir()
        for i in range(min(num_pairs, result.originals.shape[0])):
            Image.fromarray(_to_uint8(result.originals[i])).save(samples / f"{i:04d}_original.png")
            Image.fromarray(_to_uint8(result.reconstructions[i])).save(samples / f"{i:04d}_reconstruction.png")


# ---------------------------------------------------------------------------------------------
# ablation: the causal check of `vaedyn eval --ablate`
#
# Mean ablation of GroupNorm channel c: gamma_c <- 0, beta_c <- m_c, the channel's mean output over
# the evaluated images (all images and positions, measured by forward hooks during the baseline
# pass), so the layers after it see the channel's average instead of its signal. A dead channel
# (gamma = 0, constant output beta) is left exactly as it was. The control ablates as many
# randomly chosen active channels of the same layers (seeded by the config's seed).


class ChannelMeans:
    """Mean output per channel of some GroupNorms over the forwards made while attached (float64 sums)."""

    def __init__(self, model: torch.nn.Module, layers: Iterable[str]):
        self.modules = {name: model.get_submodule(name) for name in dict.fromkeys(layers)}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> ChannelMeans:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            y = output.detach().double()
            dims = [d for d in range(y.ndim) if d != 1]
            total = y.sum(dims)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.counts[name] = self.counts.get(name, 0) + y.numel() // y.shape[1]

        return hook

    def mean(self, layer: str, index: int) -> float:
        if not self.counts.get(layer):
            raise VaedynError(f"layer {layer} produced no output during evaluation; it cannot be mean-ablated")
        return float(self.sums[layer][index] / self.counts[layer])


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
    from vaedyn_cli import nudge

    nudge.parse_select(select)
    if store is None and ckpt.run_dir is None:
        raise VaedynError(
            f"--ablate needs channel labels, and checkpoint {ckpt.source} belongs to no run folder: "
            "pass --store STORE (a trace store or run folder)"
        )
    data = nudge.store_classification(labels_store(store, ckpt) or Path(ckpt.run_dir) / artifacts.TRACE_DIR)
    return AblationPlan(list(select), str(data["store"]), data)


def control_targets(channels: list[dict[str, Any]], targets: list[Any], seed: int) -> list[Any]:
    """Per layer of `targets`, as many channels drawn at random from the layer's active, untargeted
    ones (all of them, with a warning, when there are too few); seeded per (seed, layer)."""
    import zlib

    from vaedyn_cli.nudge import Target

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
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(layer.encode())]))
        chosen = rng.choice(np.asarray(pool, dtype=np.int64), size=min(k, len(pool)), replace=False) if pool else []
        control += [Target(layer, int(i)) for i in sorted(chosen)]
    return control


def plan_targets(plan: AblationPlan, model: torch.nn.Module, seed: int, where: str) -> None:
    """Select the ablated channels and their control on this model (the labels must fit it)."""
    from vaedyn_cli import nudge

    data = plan.classification
    nudge.check_classification_fits(data, model, f"from {plan.source}", where)
    plan.targets = nudge.select_targets(data["channels"], plan.select, 1.0, data["layers"])
    if not plan.targets:
        log.warning("--ablate %s selects no channel of %s: nothing to ablate", " ".join(plan.select), plan.source)
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
        "select": plan.select,
        "store": plan.source,
        "classification_steps": plan.classification.get("steps"),
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


def labels_store(store: str | Path | None, ckpt: Any) -> Path | None:
    """Where channel labels come from: --store, else the checkpoint's run trace (`trace.zarr`, or
    `trace-track.zarr` when it was traced afterwards by `vaedyn track`); None when there is neither."""
    if store is not None:
        return Path(store)
    if ckpt.run_dir is None:
        return None
    run = Path(ckpt.run_dir)
    return next((run / n for n in (artifacts.TRACE_DIR, artifacts.TRACK_TRACE_DIR) if (run / n).exists()), None)


# ---------------------------------------------------------------------------------------------
# activation grids and the linear lens: `vaedyn eval --grids LAYER`
#
# Per layer: grid-<layer>.png (the first eval.grid_samples evaluated images, every channel a tile,
# outlined by its classified state) and lens-<layer>.png (the linear lens fitted on the first
# LENS_IMAGES evaluated images: even ones fit, odd ones held out for R^2). Labels: the
# classification of --store or of the checkpoint's run trace (as --ablate); without one the grid
# has no outlines and the lens splits channels by their activity on the lens images themselves.

LENS_IMAGES = 8


@dataclass
class GridPlan:
    """The layers --grids names and the classified state of their channels, checked before any pass."""

    layers: list[str]
    source: str | None  # the trace store the labels come from (None: unlabelled)
    states: dict[str, dict[int, str]] = field(default_factory=dict)  # layer -> channel -> state


def grid_layers(patterns: Iterable[str], model: torch.nn.Module) -> list[str]:
    """The GroupNorm layers matched by module paths or fnmatch globs, in module order."""
    import fnmatch

    from vaedyn_cli.model import groupnorm_layers

    names = [n for n, _ in groupnorm_layers(model)]
    chosen: set[str] = set()
    for pattern in patterns:
        hit = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hit:
            some = ", ".join(names[:2] + ["...", names[-1]]) if len(names) > 3 else ", ".join(names)
            raise VaedynError(
                f"--grids {pattern!r} matches no GroupNorm layer of the model ({len(names)} layers: {some}); "
                "pass a module path or a glob such as 'decoder.up_blocks.*.norm2'"
            )
        chosen |= hit
    return [n for n in names if n in chosen]


def grids_plan(patterns: list[str], store: str | Path | None, ckpt: Any, model: torch.nn.Module, where: str,
               classification: dict[str, Any] | None = None) -> GridPlan:
    """Resolve --grids on this model and read the labels (`classification` when --ablate read it already)."""
    from vaedyn_cli import nudge

    layers = grid_layers(patterns, model)
    if classification is None:
        source = labels_store(store, ckpt)
        if source is None:
            log.info("--grids: no trace store for %s, so no channel labels (pass --store to outline tiles)", ckpt.source)
            return GridPlan(layers, None)
        classification = nudge.store_classification(source)
    nudge.check_classification_fits(classification, model, f"from {classification['store']}", where)
    states: dict[str, dict[int, str]] = {}
    for rec in classification["channels"]:
        if rec["layer"] in layers:
            states.setdefault(rec["layer"], {})[int(rec["channel_index"])] = str(rec["state"])
    return GridPlan(layers, str(classification["store"]), states)


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


def grids_section(plan: GridPlan, model: torch.nn.Module, dataset: Any, grid_samples: int, folder: Path) -> dict[str, Any]:
    """Write grid-<layer>.png and lens-<layer>.png into `folder`; metrics.json's `grids` section."""
    from vaedyn_cli import lens

    images = _first_images(dataset, max(grid_samples, LENS_IMAGES))
    section: dict[str, Any] = {}
    for layer in plan.layers:
        labels = plan.states.get(layer)
        grid_file, lens_file = f"grid-{layer}.png", f"lens-{layer}.png"
        grid = lens.grid_figure(model, images[:grid_samples], layer, labels=labels, out_png=folder / grid_file)
        fit = lens.lens_figure(model, images[:LENS_IMAGES], layer, labels=labels, out_png=folder / lens_file)
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
            "flat_channels": grid["flat_channels"],
            "outlines": grid["outlines"],
            "lens_images": fit["n_images"],
        }
    return section


# ---------------------------------------------------------------------------------------------
# the eval stage


def _resolve_config(cfg: RunConfig | None, stored: RunConfig | None, overrides: list[str] | None, source: str) -> RunConfig:
    """The config given with -c, else the one stored with the checkpoint (with --set applied)."""
    if cfg is not None:
        return cfg
    if stored is None:
        raise VaedynError(
            f"checkpoint {source} carries no vaedyn config, so the data to evaluate on is unknown; pass -c CONFIG"
        )
    if not overrides:
        return stored
    data = apply_overrides(stored.model_dump(mode="json"), overrides)
    return validate_config(data, f"stored with {source} with --set " + " ".join(overrides))


def default_out_dir(ckpt: Any, split: str) -> Path:
    """`<run>/eval/<split>` for a run's final model, `<run>/eval/<folder>/<split>` for any other
    folder of the run (a step checkpoint, a nudged copy), so evaluations never overwrite each other."""
    if ckpt.run_dir is None:
        raise VaedynError(
            f"checkpoint {ckpt.source} does not belong to a run folder, so there is no default place for the "
            "results; pass --out DIR"
        )
    base = Path(ckpt.run_dir) / artifacts.EVAL_DIR
    if ckpt.path is not None and Path(ckpt.path).resolve() == (Path(ckpt.run_dir) / artifacts.FINAL_DIR).resolve():
        return base / split
    return base / Path(ckpt.path).name / split


def _check_out(target: Path) -> None:
    """The results folder may replace an earlier evaluation (a folder with metrics.json), nothing else."""
    if target.exists() and not target.is_dir():
        raise VaedynError(f"--out {target} is a file; pass a folder for the evaluation results")
    if target.is_dir() and any(target.iterdir()) and not (target / artifacts.METRICS_FILE).is_file():
        raise VaedynError(
            f"--out {target} exists and is not an evaluation (no {artifacts.METRICS_FILE}); choose another folder "
            "or empty it"
        )


def evaluate(
    checkpoint: str,
    cfg: RunConfig | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    num_samples_to_save: int | None = None,
    out: Path | None = None,
    *,
    overrides: list[str] | None = None,
    ablate: list[str] | None = None,
    store: str | Path | None = None,
    grids: list[str] | None = None,
) -> Path:
    """Evaluate a checkpoint on a split; writes metrics.json, grid.png and sample pairs; returns metrics.json.

    Unset arguments come from the config's `eval` section (from -c, or stored with the checkpoint).
    Inputs (checkpoint, config, data, labels) are checked before anything is written. With `ablate`
    (select expressions as `vaedyn nudge --select`), metrics.json also gets an `ablation` section:
    the selected channels mean-ablated, and a control of as many random active channels. With
    `grids` (GroupNorm module paths or globs), an activation grid and a linear lens per layer
    (grid-<layer>.png, lens-<layer>.png) and a `grids` section (see `grids_section`).
    """
    from vaedyn_cli import data as data_mod
    from vaedyn_cli import model as model_mod

    ckpt = model_mod.resolve_checkpoint(checkpoint)
    cfg = _resolve_config(cfg, ckpt.config, overrides, str(checkpoint))
    split = split or cfg.eval.split
    batch_size = batch_size if batch_size is not None else cfg.eval.batch_size
    max_samples = max_samples if max_samples is not None else cfg.eval.max_samples
    num_pairs = cfg.eval.num_samples_to_save if num_samples_to_save is None else num_samples_to_save
    if batch_size < 1 or (max_samples is not None and max_samples < 1) or num_pairs < 0:
        raise VaedynError("--batch-size and --max-samples must be at least 1 and --num-samples-to-save at least 0")
    target = Path(out) if out is not None else default_out_dir(ckpt, split)
    _check_out(target)
    if store is not None and not ablate and not grids:
        raise VaedynError(
            "--store only serves --ablate and --grids (where the channel labels come from); add --ablate SELECT "
            "or --grids LAYER"
        )
    plan = ablation_plan(list(ablate), store, ckpt) if ablate else None

    dataset = data_mod.image_dataset(cfg.data, split, max_samples=max_samples, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=cfg.data.num_workers
    )
    from accelerate import PartialState

    device = PartialState().device
    vae = ckpt.load().to(device).eval()
    if plan is not None:
        plan_targets(plan, vae, cfg.seed, f"checkpoint {checkpoint}")
    grid_plan = None
    if grids:
        grid_plan = grids_plan(list(grids), store, ckpt, vae, f"checkpoint {checkpoint}",
                               plan.classification if plan is not None else None)
    # debug only: the summary printed at the end says the same, and an image that fails to decode
    # during the pass should leave one error line on stderr
    log.debug("evaluating %s (step %d) on split %s of %s", checkpoint, ckpt.step, split, cfg.data.dataset_name)
    means = ChannelMeans(vae, plan.layers if plan is not None else [])
    with means:
        result = reconstruction_metrics(vae, loader, device=device, keep=max(num_pairs, GRID_IMAGES))

    resolved = cfg.model_copy(deep=True)
    resolved.eval.split, resolved.eval.batch_size = split, batch_size
    resolved.eval.max_samples, resolved.eval.num_samples_to_save = max_samples, num_pairs
    record = {
        "checkpoint": str(checkpoint),
        "step": ckpt.step,
        "split": split,
        "num_images": result.num_images,
        "metrics": result.metrics,
        "config": resolved.model_dump(mode="json"),
    }
    if plan is not None:
        record["ablation"] = ablation_section(plan, vae, result.metrics, means, loader, device)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if grid_plan is not None:
            record["grids"] = grids_section(grid_plan, vae, dataset, cfg.eval.grid_samples, tmp)
        (tmp / artifacts.METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _write_pictures(tmp, result, num_pairs)
        artifacts.replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_metrics(record)
    return target / artifacts.METRICS_FILE


def _print_metrics(record: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    console.print(f"{record['checkpoint']} · step {record['step']} · split {record['split']} · {record['num_images']} images")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in METRICS:
        label, scale, digits = TABLE_FORMAT[key]
        table.add_row(label, f"{record['metrics'][key] * scale:.{digits}f}")
    console.print(table)
    for layer, g in record.get("grids", {}).items():
        r2 = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in g["r2"].items())
        console.print(f"grids {layer}: {g['grid']}, {g['lens']} (lens R^2 {r2})")
    ab = record.get("ablation")
    if ab is None:
        return
    console.print(f"ablation {' '.join(ab['select'])}: {ab['n_channels']} channels, control {ab['n_control']} active ones")
    table = Table()
    for col in ("metric", "baseline", "ablated", "delta", "control", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key in METRICS:
        label, scale, digits = TABLE_FORMAT[key]
        cells = [ab["baseline"][key], ab["ablated"][key], ab["delta_ablated"][key], ab["control"][key],
                 ab["delta_control"][key]]
        table.add_row(label, *[f"{v * scale:{'+' if i in (2, 4) else ''}.{digits}f}" for i, v in enumerate(cells)])
    console.print(table)


# ---------------------------------------------------------------------------------------------
# comparison (Table 1)


def load_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json file, or the eval folder holding one."""
    path = Path(path)
    file = path / artifacts.METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise VaedynError(f"{path} has no {artifacts.METRICS_FILE}: pass files or folders written by `vaedyn eval`")
    try:
        record = json.loads(file.read_text())
        values = record["metrics"]
        missing = [m for m in METRICS if m not in values]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise VaedynError(f"{file} is not a metrics file written by `vaedyn eval`; rerun the evaluation") from None
    if missing:
        raise VaedynError(f"{file} lacks metrics {', '.join(missing)}; rerun `vaedyn eval`")
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
