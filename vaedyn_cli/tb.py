"""TensorBoard pictures of the channel dynamics while training (a `TrainHook`).

Every `log.log_interval` steps: the number of inactive (dormant + dead) and dead channels per part,
and histograms of |gamma| per part; at every validation: the probe images over their
reconstructions. Enabled when `log.report_to` is `tensorboard` or `all`; it writes through
accelerate's TensorBoard tracker, into the run's `logs/`.

The counts use the classification's per-step rule (`classify.step_states`, no persistence filter) on
statistics of that step's training forward, collected by forward hooks attached for that step
only. They are a live view; the trace store and `vaedyn classify` are the record.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import xarray as xr

from vaedyn_cli.config import ClassifyConfig
from vaedyn_cli.lens import follows_activation
from vaedyn_cli.model import groupnorm_layers
from vaedyn_cli.train import HOOK_FACTORIES, TrainContext, TrainHook

log = logging.getLogger(__name__)

PARTS = ("encoder", "decoder")
RECON_IMAGES = 4


class ChannelActivity:
    """Per-channel output statistics of every GroupNorm (and of the activation after it) over the
    forwards made while attached: mean, std and mean |y| over batch and space."""

    def __init__(self, model: torch.nn.Module, act_fn: str = "silu"):
        from diffusers.models.activations import get_activation

        self.norms = groupnorm_layers(model)
        self.act = get_activation(act_fn)
        self.handles: list[Any] = []
        self.sums: dict[str, torch.Tensor] = {}
        names = [n for n, m in self.norms for _ in range(m.num_channels)]
        self.meta = {
            "layer": np.asarray(names, dtype=object),
            "channel_index": np.concatenate([np.arange(m.num_channels) for _, m in self.norms]).astype(np.int64),
            "part": np.asarray([n.split(".", 1)[0] for n in names], dtype=object),
            "has_activation": np.asarray([follows_activation(n) for n in names], bool),
        }

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> None:
        self.detach()
        self.sums = {}
        for name, module in self.norms:
            self.handles.append(module.register_forward_hook(self._hook(name, follows_activation(name))))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str, activated: bool):  # noqa: ANN202
        def hook(_m: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            with torch.no_grad():
                y = output.detach().double()
                dims = [d for d in range(y.ndim) if d != 1]
                rows = [y.sum(dims), (y * y).sum(dims), y.abs().sum(dims)]
                if activated:
                    a = self.act(y)
                    rows += [a.sum(dims), (a * a).sum(dims)]
                count = torch.full_like(rows[0], y.numel() / y.shape[1])
                new = torch.stack([count, *rows])
                self.sums[name] = self.sums[name] + new if name in self.sums else new
        return hook

    def trace(self) -> xr.Dataset | None:
        """The statistics as a one-step trace (DESIGN.md variable names), or None before any forward."""
        if len(self.sums) != len(self.norms):
            return None
        std, act_std, mean_abs, mean = [], [], [], []
        for name, module in self.norms:
            s = self.sums[name].cpu().numpy()
            n = s[0]
            m = s[1] / n
            mean.append(m)
            std.append(np.sqrt(np.maximum(s[2] / n - m * m, 0)))
            mean_abs.append(s[3] / n)
            if s.shape[0] > 4:
                am = s[4] / n
                act_std.append(np.sqrt(np.maximum(s[5] / n - am * am, 0)))
            else:
                act_std.append(np.full(module.num_channels, np.nan))
        row = ("step", "channel")
        return xr.Dataset(
            {
                "mean": (row, np.concatenate(mean)[None].astype(np.float32)),
                "std": (row, np.concatenate(std)[None].astype(np.float32)),
                "mean_abs": (row, np.concatenate(mean_abs)[None].astype(np.float32)),
                "act_std": (row, np.concatenate(act_std)[None].astype(np.float32)),
                **{k: ("channel", v) for k, v in self.meta.items()},
            },
            coords={"step": [0]},
        )

    def counts(self, params: ClassifyConfig) -> dict[str, dict[str, int]] | None:
        """{part: {"inactive": dormant + dead, "dead": dead}} by the classification's per-step rule."""
        from vaedyn_cli.classify import DEAD, DORMANT, select_channels, step_states

        ds = self.trace()
        if ds is None:
            return None
        ch = select_channels(ds)
        codes, _ = step_states(ds, params, [0], channels=ch)
        return {p: {"inactive": int((codes[0, ch.part == p] >= DORMANT).sum()),
                    "dead": int((codes[0, ch.part == p] == DEAD).sum())} for p in PARTS}


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
        self.activity = ChannelActivity(self.vae, str(getattr(self.vae.config, "act_fn", "silu")))
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
        from vaedyn_cli.evaluate import reconstruct, to_unit

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


HOOK_FACTORIES.append(tensorboard_hook)
