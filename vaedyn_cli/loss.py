"""The training objective: MSE(reconstruction, input) + kl_weight x the mean per-image KL, with the
posterior sampled, computed through the prepared (possibly DDP) module's own forward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class PosteriorCapture:
    """Captures the posterior parameters (the output of quant_conv, or of the encoder without one)
    during the model's own forward, so training runs through the prepared (DDP) module's forward."""

    def __init__(self, vae: torch.nn.Module):
        module = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder
        self.parts: list[torch.Tensor] = []
        self.active = False
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if self.active:
            self.parts.append(output)

    def kl(self) -> torch.Tensor:
        """Per-image KL of the captured posterior (summed over latent elements)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        self.parts = []
        return DiagonalGaussianDistribution(moments.float()).kl()




def training_loss(
    model: torch.nn.Module,
    capture: PosteriorCapture,
    x: torch.Tensor,
    generator: torch.Generator | list[torch.Generator],
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rec_loss, kl_loss): MSE(recon, x) + kl_weight * mean per-image KL, posterior sampled."""
    capture.active, capture.parts = True, []
    try:
        recon = model(x, sample_posterior=True, generator=generator).sample
    finally:
        capture.active = False
    rec = F.mse_loss(recon.float(), x.float())
    kl = capture.kl().mean()
    return rec + kl_weight * kl, rec, kl

