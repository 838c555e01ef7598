"""Reconstruction metrics of a VAE over a loader (MSE, KL, PSNR, SSIM) and the pictures of an evaluation.

Conventions: the posterior MODE is decoded (deterministic); MSE is on [-1, 1] images; KL is the
posterior's KL to N(0, I) summed over latent elements and averaged over images. PSNR and SSIM are
computed on images mapped to [0, 1] (reconstructions clamped) with data range 1.0, in float64:

- `psnr_pooled`: -10 log10 of the squared error pooled over every pixel of the split, what
  torchmetrics' `PeakSignalNoiseRatio(data_range=1.0)` computes with its defaults (dim=None), and so
  the PSNR of the original study's Table 1;
- `psnr_per_image_mean`: the mean over images of each image's PSNR (torchmetrics with dim=(1, 2, 3));
  by Jensen never below the pooled one. A metrics.json of vaedyn before both existed holds it as `psnr`;
- `ssim`: torchmetrics' SSIM with the original's arguments (Gaussian window, sigma 1.5: 11 px
  whatever `kernel_size` says; reflect padding, so images from 6 px on), averaged over images.

The PSNRs come from the float64 sums directly: torchmetrics accumulates the pooled error in float32
and scales by a float32 10 / ln 10 (about 1e-6 dB off); the definitions are the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vaedyn_cli import artifacts, inputs
from vaedyn_cli.errors import VaedynError

METRICS = ("mse", "kl", "psnr_pooled", "psnr_per_image_mean", "ssim")
LOWER_IS_BETTER = {"mse": True, "kl": True, "psnr_pooled": False, "psnr_per_image_mean": False, "ssim": False}
# Table 1 of the original study (its PSNR is the pooled one), plus the per-image mean: label, scale, decimals.
TABLE_FORMAT = {
    "mse": ("MSE (x1e-3)", 1e3, 3),
    "kl": ("KL", 1.0, 2),
    "psnr_pooled": ("PSNR (dB) pooled [Table 1]", 1.0, 3),
    "psnr_per_image_mean": ("PSNR (dB) per-image mean", 1.0, 3),
    "ssim": ("SSIM", 1.0, 4),
}
# metrics.json of earlier vaedyn versions: old name -> today's (`psnr` was the per-image mean)
LEGACY_NAMES = {"psnr": "psnr_per_image_mean"}
GRID_IMAGES = 8
GRID_TILE_PX = 128  # grid.png draws each image at least this large (32x32 images at 4x)

log = logging.getLogger(__name__)


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


def psnr_db(mse: torch.Tensor | float) -> torch.Tensor:
    """PSNR in dB of a mean squared error on [0, 1] images (data range 1): -10 log10(mse)."""
    return -10.0 * torch.log10(torch.as_tensor(mse, dtype=torch.float64))


def current_names(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The metrics of a metrics.json under today's names, and the old names it used. An older file's
    `psnr` is its per-image mean; the pooled PSNR it lacks becomes None (its MSE is on [-1, 1] and
    unclamped, so the PSNR of the clamped [0, 1] images cannot be derived from it)."""
    values = dict(values)
    old = [name for name in LEGACY_NAMES if name in values and LEGACY_NAMES[name] not in values]
    for name in old:
        values[LEGACY_NAMES[name]] = values.pop(name)
    if old:
        values.setdefault("psnr_pooled", None)
    return values, old


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
    """MSE, KL, both PSNRs and SSIM of `model` (anything with diffusers' encode/decode) over `loader`
    (batches of (B, 3, H, W) images in [-1, 1]); keeps the first `keep` pairs for pictures."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    device = torch.device(device) if device is not None else next(iter(model.parameters())).device
    # the original's arguments (with the Gaussian window kernel_size is not used: the window is 11 px);
    # float64 states: the sum of per-image values is float32 by default
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, gaussian_kernel=True, sigma=1.5, kernel_size=11)
    ssim = ssim.set_dtype(torch.float64).to(device)
    mse_sum = kl_sum = sse_unit = 0.0
    elements = n = 0
    psnr_images: list[torch.Tensor] = []
    kept_x: list[torch.Tensor] = []
    kept_r: list[torch.Tensor] = []
    for batch in loader:
        x = (batch[0] if isinstance(batch, list | tuple) else batch).to(device)
        recon, kl = reconstruct(model, x)
        ux, ur = to_unit(x), to_unit(recon)
        # float64: SSIM's variances (E[x^2] - E[x]^2) lose ~1e-4 to cancellation in float32
        squared = (ur.double() - ux.double()).pow(2).flatten(1)
        sse_unit += float(squared.sum())
        elements += squared.numel()
        psnr_images.append(psnr_db(squared.mean(1)).cpu())
        ssim.update(ur.double(), ux.double())
        mse_sum += float(per_image_mse(recon, x).double().sum())
        kl_sum += float(kl.double().sum())
        n += x.shape[0]
        if sum(t.shape[0] for t in kept_x) < keep:
            kept_x.append(ux.cpu())
            kept_r.append(ur.cpu())
    if n == 0:
        raise VaedynError("no images to evaluate: the split is empty; check the split name and max_samples")
    metrics = {
        "mse": mse_sum / n,
        "kl": kl_sum / n,
        "psnr_pooled": float(psnr_db(sse_unit / elements)),
        "psnr_per_image_mean": float(torch.cat(psnr_images).mean()),
        "ssim": float(ssim.compute()),
    }
    originals = torch.cat(kept_x)[:keep] if kept_x else torch.empty(0)
    recons = torch.cat(kept_r)[:keep] if kept_r else torch.empty(0)
    return EvalResult(metrics, n, originals, recons)


# ---------------------------------------------------------------------------------------------
# pictures


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def grid_zoom(h: int, w: int) -> int:
    """The whole-number enlargement that makes an image at least GRID_TILE_PX on its longer side."""
    return max(1, -(-GRID_TILE_PX // max(h, w, 1)))


def image_grid(originals: torch.Tensor, reconstructions: torch.Tensor, gap: int = 4) -> Image.Image:
    """Originals in the top row, their reconstructions below, separated by white lines; small images are
    enlarged by a whole factor (`grid_zoom`, nearest neighbour: every pixel stays a square of one colour)."""
    k, _, h, w = originals.shape
    z = grid_zoom(h, w)
    canvas = np.full((2 * h * z + 3 * gap, k * w * z + (k + 1) * gap, 3), 255, dtype=np.uint8)
    for row, images in enumerate((originals, reconstructions)):
        top = gap + row * (h * z + gap)
        for i in range(k):
            left = gap + i * (w * z + gap)
            canvas[top : top + h * z, left : left + w * z] = _to_uint8(images[i]).repeat(z, 0).repeat(z, 1)
    return Image.fromarray(canvas)


def write_pictures(folder: Path, result: EvalResult, num_pairs: int) -> None:
    if result.originals.numel() == 0:
        return
    k = min(GRID_IMAGES, result.originals.shape[0])
    image_grid(result.originals[:k], result.reconstructions[:k]).save(folder / artifacts.EVAL_GRID_FILE)
    if num_pairs:
        samples = folder / artifacts.SAMPLES_DIR
        samples.mkdir()
        for i in range(min(num_pairs, result.originals.shape[0])):
            Image.fromarray(_to_uint8(result.originals[i])).save(samples / f"{i:04d}_original.png")
            Image.fromarray(_to_uint8(result.reconstructions[i])).save(samples / f"{i:04d}_reconstruction.png")


def load_metrics(path: Path) -> dict[str, Any]:
    """A metrics.json file, or the eval folder holding one; its metrics under today's names (an older
    file's, see `current_names`, with a warning), None for one such a file cannot have."""
    path = Path(path)
    file = path / artifacts.METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise VaedynError(f"{path} has no {artifacts.METRICS_FILE}: pass files or folders written by `vaedyn eval`")
    fix = "rerun `vaedyn eval`"
    record = inputs.parse_json(inputs.read_text(file, "metrics file", fix), str(file),
                               f"it is not a metrics file written by `vaedyn eval`; {fix}")
    stored = record.get("metrics") if isinstance(record, dict) else None
    if not isinstance(stored, dict):
        raise VaedynError(f"{file} is not a metrics file written by `vaedyn eval` (no 'metrics' mapping); {fix}")
    values, old = current_names(stored)
    missing = [m for m in METRICS if m not in values]
    if missing:
        raise VaedynError(f"{file} lacks metrics {', '.join(missing)}; {fix}")
    for m in METRICS:
        v = values[m]
        if v is None and old and m not in stored:  # what an older file cannot have: n/a
            continue
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise VaedynError(f"{file}: metric '{m}' is {inputs.shorten(json.dumps(v), 30)}, not a number; {fix}")
    if old:
        log.warning("warning: %s was written by an older vaedyn: its %s is shown as %s and it has no %s (n/a); "
                    "rerun `vaedyn eval` for all of them", file, ", ".join(old),
                    ", ".join(LEGACY_NAMES[o] for o in old), ", ".join(m for m in METRICS if values[m] is None))
    record["metrics"] = {m: values[m] for m in METRICS}
    record["path"] = str(file)
    return record
