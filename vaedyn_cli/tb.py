"""TensorBoard pictures of the channel dynamics while training (a `TrainHook`).

Every `log.log_interval` steps: the number of inactive (dormant + dead) and dead channels per part,
and histograms of |gamma| per part; at every validation: the probe images over their
reconstructions. Enabled when `log.report_to` is `tensorboard` or `all`; it writes through
accelerate's TensorBoard tracker, into the run's `logs/`.

The counts use the classification's per-step rule (`classification.step_states`, no persistence filter) on
statistics of that step's training forward, collected by the probes (exact mode) attached for that
step only. They are a live view; the trace store and `vaedyn classify` are the record.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import xarray as xr

from vaedyn_cli.anatomy import groupnorm_layers
from vaedyn_cli.classification import select_channels, step_states
from vaedyn_cli.config import ClassifyConfig, NearZeroConfig, TrackConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.hooks import TrainContext, TrainHook
from vaedyn_cli.labels import DEAD, DORMANT, PARTS, UNOBSERVED
from vaedyn_cli.metrics import reconstruct, to_unit
from vaedyn_cli.probes import ChannelProbes
from vaedyn_cli.store import records_to_dataset

log = logging.getLogger(__name__)

RECON_IMAGES = 4


class ChannelActivity:
    """The probes (exact mode) on every GroupNorm over the forwards made while attached, read as a
    one-step trace and counted with the classification's per-step rule."""

    def __init__(self, model: torch.nn.Module):
        track = TrackConfig(layers=["*"], module_types=["GroupNorm"], near_zero=NearZeroConfig(enabled=False),
                            extra_statistics=["act_mean_abs"])
        self.probes = ChannelProbes(model, track, exact=True)
        self.unavailable: str | None = None  # why the counts cannot be made (said once)
        self.seen = False

    @property
    def attached(self) -> bool:
        return self.probes.armed

    def attach(self) -> None:
        self.probes.disarm()
        self.probes.reset()
        self.probes.arm()
        self.seen = True

    def detach(self) -> None:
        self.probes.disarm()

    def trace(self) -> xr.Dataset | None:
        """The statistics as a one-step trace (the store's variable names), or None before any forward."""
        if not self.seen:
            return None
        self.probes.finish()
        record = self.probes.snapshot(0).resolve()
        if not np.isfinite(record.channels["std"]).any():
            return None
        return records_to_dataset([record], self.probes.layout)

    def counts(self, params: ClassifyConfig) -> dict[str, dict[str, int]] | None:
        """{part: {"inactive": dormant + dead, "dead": dead}} by the classification's per-step rule."""
        ds = self.trace()
        if ds is None:
            return None
        ch = select_channels(ds)
        try:
            codes, _ = step_states(ds, params, [0], channels=ch)
        except VaedynError as e:
            return self._off(str(e))
        if (codes == UNOBSERVED).all():  # a method reading what this live view does not measure (weights, gradients)
            return self._off(f"classify method '{params.method}' reads statistics the live view does not measure")
        return {p: {"inactive": int((codes[0, ch.part == p] >= DORMANT).sum()),
                    "dead": int((codes[0, ch.part == p] == DEAD).sum())} for p in PARTS}

    def _off(self, why: str) -> None:
        if self.unavailable is None:
            self.unavailable = why
            log.warning("TensorBoard channel counts off: %s", why)


def gamma_by_part(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """|gamma| of every GroupNorm channel, per part."""
    found: dict[str, list[torch.Tensor]] = {}
    for name, module in groupnorm_layers(model):
        if module.weight is not None:
            found.setdefault(name.split(".", 1)[0], []).append(module.weight.detach().abs().float().cpu())
    return {p: torch.cat(v) for p, v in found.items()}


class TensorBoardHook(TrainHook):
    """Writes dormant counts, |gamma| histograms and validation reconstructions to TensorBoard."""

    def __init__(self, ctx: TrainContext, probe: torch.Tensor | None):
        self.acc = ctx.accelerator
        self.cfg = ctx.cfg
        self.vae = ctx.accelerator.unwrap_model(ctx.model)
        self.activity = ChannelActivity(self.vae)
        self.probe = probe
        self._writer: Any = None

    def writer(self) -> Any:
        """accelerate's SummaryWriter (trackers start after the hooks are built, so looked up late)."""
        if self._writer is None:
            try:
                tracker = self.acc.get_tracker("tensorboard")
            except ValueError:
                return None
            self._writer = getattr(tracker, "writer", None)
        return self._writer

    def begin_step(self, step: int) -> None:
        if step % self.cfg.log.log_interval == 0:
            self.activity.attach()

    def end_step(self, step: int, scalars: Any) -> None:
        if not self.activity.attached:
            return
        self.activity.detach()
        w = self.writer()
        if w is None:
            return
        counts = self.activity.counts(self.cfg.classify)
        for part, c in (counts or {}).items():
            w.add_scalar(f"channels/inactive_{part}", c["inactive"], step)
            w.add_scalar(f"channels/dead_{part}", c["dead"], step)
        for part, g in gamma_by_part(self.vae).items():
            w.add_histogram(f"gamma_abs/{part}", g, step)

    @torch.no_grad()
    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        w = self.writer()
        if w is None or self.probe is None:
            return
        param = next(self.vae.parameters())
        x = self.probe.to(param.device, param.dtype)
        was_training = self.vae.training
        self.vae.eval()
        try:
            recon, _ = reconstruct(self.vae, x)
        finally:
            self.vae.train(was_training)
        pairs = torch.cat([to_unit(x), to_unit(recon)], dim=2).cpu()  # each image above its reconstruction
        w.add_images("validation/reconstruction", pairs, step)

    def close(self) -> None:
        self.activity.detach()


def tensorboard_hook(ctx: TrainContext) -> TensorBoardHook | None:
    """The hook factory: only on the main process and when TensorBoard is a tracker."""
    if ctx.cfg.log.report_to not in ("tensorboard", "all") or not ctx.accelerator.is_main_process:
        return None
    probe = None
    if ctx.cfg.data.do_validation:
        from vaedyn_cli.data import probe_batch

        cfg = ctx.cfg
        n = min(RECON_IMAGES, cfg.data.validation_max_samples or RECON_IMAGES)
        probe = probe_batch(cfg.data, cfg.data.validation_split_name, n, cfg.seed)
    return TensorBoardHook(ctx, probe)

