"""Reconstruction metrics of a VAE over a loader (MSE, KL, PSNR, SSIM) and the pictures of an evaluation.

Conventions: the posterior MODE is decoded (deterministic); MSE is on [-1, 1] images; KL is the
posterior's KL to N(0, I) summed over latent elements and averaged over images; PSNR and SSIM
(torchmetrics) are per-image values averaged over images, computed on images mapped to [0, 1]
(reconstructions clamped) with data range 1.0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vaedyn_cli import artifacts
from vaedyn_cli.errors import VaedynError

METRICS = ("mse", "kl", "psnr", "ssim")
LOWER_IS_BETTER = {"mse": True, "kl": True, "psnr": False, "ssim": False}
# Table 1 of the original study: label, scale applied to the value, decimals.
TABLE_FORMAT = {"mse": ("MSE (x1e-3)", 1e3, 3), "kl": ("KL", 1.0, 2), "psnr": ("PSNR (dB)", 1.0, 3), "ssim": ("SSIM", 1.0, 4)}
GRID_IMAGES = 8
GRID_TILE_PX = 128  # grid.png draws each image at least this large (32x32 images at 4x)


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

