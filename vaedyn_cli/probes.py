"""The per-channel statistics engine: forward hooks on chosen modules, on-device sums, one host copy.

What is measured, per tracked channel and tracked step (docs/design.md "Trace store"), on the
captured tensor of each tracked module (its output, or with track.capture input its input):
`mean`, `mean_abs`, `std`; for a norm's output also `in_std` of its input x; `act_mean`,
`act_std` (and with track.extra_statistics `act_mean_abs`) of act(y) where a nonlinearity follows
(read from that activation module's own output, so nothing is recomputed); the module's
per-channel scale and shift (a norm's gamma and beta, a conv's bias) and |grad gamma|;
`out_weight_norm` and `out_weight_l1`, the L2 and L1 norms of the weights of the layer(s) reading
the channel; optionally `in_weight_grad`, the mean |grad| of the channel's incoming filter; and
`near_zero_frac` per parameter tensor. Every std is the population std (ddof=0) over batch and
spatial positions (the length axis for (batch, channel, length) tensors; a linear's tensors hold
their channels last), pooled over all micro-batches of the step (with track.pooling interval: of
every step since the previous tracked one) and, under several processes, over all processes: the
numbers equal one process seeing the global batch.

How. Hooks exist only while forwards are measured (registered at `begin_step`, removed after the
step's last backward, before the optimizer step). Each hook only reduces its tensors per (sample,
channel) over the spatial axes and keeps the small (batch, channel) results: the input's sum and
sum of squared deviations (var_mean on GPU; on CPU, where var_mean is slow, two-pass for small maps
and a sum and a sum of squares per row for large ones, with ill-conditioned rows recomputed
two-pass; in the tensor's own memory layout), sum |y|, and the same two sums of the activation. On
CPU every temporary lives in reused scratch memory (`Scratch`), so a tracked step allocates nothing
activation-sized. A plain GroupNorm's output moments are not measured but derived from its input's
(its normalisation is affine per sample and group): one pass over y fewer. After the step's last
backward they are folded, all layers at once, into one preallocated float64 device buffer as
per-channel sums (of means, variances and squared means, weighted by the spatial size; squares in
float64 so that the between-sample variance does not cancel); the sums are additive, so a pooled
interval folds each step into the same buffer. The buffer (sums, counts, parameter statistics) is
all-reduced when needed and copied to the host once per tracked step (asynchronously into pinned
memory on CUDA); turning sums into statistics happens on the store's writer thread. Hooks fire
only inside the forward of the model's top-level parts, so gradient checkpointing's recomputation
during backward is not counted twice.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vaedyn_cli import anatomy
from vaedyn_cli.config import RunConfig, TrackConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.kernels import (
    Scratch,
    abs_sum,
    capture_view,
    moments,
    near_zero_fractions,
    out_weight_l1,
    out_weight_norm,
    per_sample_view,
)
from vaedyn_cli.store import ChannelLayout, TraceRecord

log = logging.getLogger(__name__)

# (sample, channel) of spatial means, spatial variances and squared spatial means, each times the
# spatial size; plus sum |y| and sum |act(y)|. Statistics: mean = S_m / N; var = S_v / N + S_m2 / N - mean^2.
X_M, X_V, X_M2, Y_M, Y_V, Y_M2, Y_ABS, A_M, A_V, A_M2, A_ABS = range(11)
N_ROWS = 11
# Rows of the parameter block.
P_WEIGHT, P_BIAS, P_GRAD, P_OUT_NORM, P_OUT_L1, P_IN_GRAD = range(6)
N_PARAM_ROWS = 6


# ---------------------------------------------------------------------------------------------
# which layers, and what reads them


@dataclass
class ProbeLayer:
    """A tracked module, where its channels sit in the store, and its neighbours."""

    name: str
    module: nn.Module
    offset: int
    channels: int
    part: str
    activation: nn.Module | None  # the nonlinearity applied to the captured output
    readers: list[nn.Module]  # modules whose weights read the captured channels
    capture: str = "output"
    norm: bool = True  # a normalisation layer's output: its input x is measured too (in_std)
    channel_last: bool = False  # the module's tensors hold channels last (a linear)
    producer: nn.Module | None = None  # the conv/linear whose weight[c] makes channel c (incoming filter)

    @property
    def module_type(self) -> str:
        return type(self.module).__name__


def select_layers(model: nn.Module, cfg: TrackConfig) -> list[ProbeLayer]:
    """The modules matched by track.layers (globs on module names) and track.module_types, in module order."""
    layers: list[ProbeLayer] = []
    offset = 0
    types = set(cfg.module_types)
    for name, module in model.named_modules():
        if not name or type(module).__name__ not in types or not any(fnmatch.fnmatchcase(name, p) for p in cfg.layers):
            continue
        channels = anatomy.captured_channels(model, name, cfg.capture)
        if channels is None:
            raise VaedynError(
                f"track.layers matches {name} ({type(module).__name__}), whose {cfg.capture} has no fixed channel "
                "count (not a tensor of 2+ dims, or called with different widths); track its parts instead, e.g. "
                "its norms or convs"
            )
        readers = [model.get_submodule(r) for r in anatomy.readers(model, name, cfg.capture)]
        filt = anatomy.incoming_filter(model, name, cfg.capture) if "in_weight_grad" in cfg.extra_statistics else None
        output = cfg.capture == "output"
        layers.append(ProbeLayer(
            name, module, offset, channels, anatomy.part_of(name),
            anatomy.activation(model, name) if output else None, readers, cfg.capture,
            norm=output and anatomy.is_norm(module), channel_last=anatomy.channel_last(module),
            producer=model.get_submodule(filt) if filt is not None else None,
        ))
        offset += channels
    if not layers:
        raise VaedynError(
            f"track.layers {cfg.layers} with track.module_types {cfg.module_types} match no module of the model; "
            "use module names such as 'decoder.*' or 'encoder.conv_in' and class names such as GroupNorm or "
            "Conv2d (see `vaedyn store info`)"
        )
    return layers


def weight_params(model: nn.Module, which: str = "all") -> list[tuple[str, torch.Tensor]]:
    """The parameter tensors the near-zero tracker covers: `all` (every parameter, by its
    named_parameters name) or `weights` (every conv/linear weight)."""
    if which == "all":
        return list(model.named_parameters())
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.Linear):
            found.append((f"{name}.weight", module.weight))
    return found


def _plain_group_norm(module: nn.Module) -> bool:
    """An nn.GroupNorm whose forward is GroupNorm's own (not a subclass that changes it)."""
    return isinstance(module, nn.GroupNorm) and type(module).forward is nn.GroupNorm.forward



class _Snapshot:
    """A tracked step copied off the device; turned into a TraceRecord on the writer thread."""

    def __init__(self, step: int, host: torch.Tensor, event: Any, probes: ChannelProbes, scalars: dict[str, float]):
        self.step, self._host, self._event, self._probes, self._scalars = step, host, event, probes, scalars

    def resolve(self) -> TraceRecord:
        if self._event is not None:
            self._event.synchronize()
        return self._probes.finalize(self._host.numpy(), self.step, self._scalars)


class ChannelProbes:
    """Hooks and device buffers for the tracked layers of one model.

    `exact`: reduce every tensor in float64 and measure each output's moments directly (no
    derivation from the input's): statistics exact to double precision, at several times the cost,
    for measurements taken once (ablation means, the TensorBoard view) rather than every step."""

    def __init__(self, model: nn.Module, cfg: TrackConfig, ring: int = 2, exact: bool = False):
        self.model = model
        self.cfg = cfg
        self.exact = exact
        self.layers = select_layers(model, cfg)
        self.weights = weight_params(model, cfg.near_zero.params) if cfg.near_zero.enabled else []
        self.extra = tuple(v for v in ("act_mean_abs", "in_weight_grad") if v in cfg.extra_statistics)
        self.n_channels = sum(layer.channels for layer in self.layers)
        self.layout = ChannelLayout.from_layers(
            ((layer.name, layer.channels, layer.part, layer.activation is not None, layer.module_type, layer.capture)
             for layer in self.layers),
            [name for name, _ in self.weights],
            extra=self.extra,
        )
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        c, n_layers, p = self.n_channels, len(self.layers), len(self.weights)
        # One flat buffer: sums | counts (x/y and act per layer) | parameter block | near-zero fractions.
        self._sizes = (N_ROWS * c, 2 * n_layers, N_PARAM_ROWS * c, p)
        self._flat = torch.zeros(sum(self._sizes), dtype=self._dtype(), device=self.device)
        a, b, d, _ = np.cumsum(self._sizes)
        self.sums = self._flat[:a].view(N_ROWS, c)
        self.counts = self._flat[a:b].view(2, n_layers)
        self.reduced = self._flat[:b]  # what is summed over processes
        self.params = self._flat[b:d].view(N_PARAM_ROWS, c)
        self.near_zero = self._flat[d:]
        self._host_counts = np.zeros((2, n_layers), dtype=np.float64)
        self._ring_size = max(2, ring)
        self._ring: list[torch.Tensor] = []
        self._ring_next = 0
        self._handles: list[Any] = []
        self._depth = 0
        self._pending: tuple[int, torch.Tensor] | None = None
        self._xy: list[tuple[int, int, tuple[torch.Tensor, ...]]] = []
        self._act: list[tuple[int, int, tuple[torch.Tensor, ...]]] = []
        self._gn: list[tuple[int, int, tuple[torch.Tensor, ...]]] = []  # norms whose output moments are derived
        self._cap: list[tuple[int, int, tuple[torch.Tensor, ...]]] = []  # other modules: the captured tensor only
        self._act_abs = "act_mean_abs" in self.extra
        self._derivable = [not exact and layer.norm and _plain_group_norm(layer.module) for layer in self.layers]
        self._affine = torch.zeros(2, self.n_channels, dtype=self._dtype(), device=self.device)  # gamma, beta at arm
        self._group_cache: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._col_cache: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.scratch = Scratch()  # work buffers of the probes and the weight statistics
        self._count_ring: list[tuple[torch.Tensor, Any]] = []
        self._count_next = 0

    def _dtype(self) -> torch.dtype:
        return torch.float32 if self.device.type == "mps" else torch.float64

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def reset(self) -> None:
        """Zero the sums and mark every parameter statistic as not measured (NaN)."""
        self._flat.zero_()
        self.params.fill_(math.nan)
        self.near_zero.fill_(math.nan)
        self._host_counts[:] = 0
        self._pending = None
        for entries in (self._xy, self._gn, self._cap, self._act):
            entries.clear()

    def arm(self) -> None:
        """Register the hooks (statistics hooks first, so they run before a part's gate closes) and
        keep gamma and beta as the forward will use them (the optimizer changes them before `finish`)."""
        if self._handles:
            return
        self._snapshot_affine()
        for i, layer in enumerate(self.layers):
            if layer.norm:
                self._handles.append(layer.module.register_forward_hook(self._make_norm_hook(i)))
            elif layer.capture == "input":
                self._handles.append(layer.module.register_forward_pre_hook(self._make_capture_hook(i)))
            else:
                self._handles.append(layer.module.register_forward_hook(self._make_capture_hook(i)))
        seen: set[int] = set()
        for layer in self.layers:
            act = layer.activation
            if act is not None and id(act) not in seen:
                seen.add(id(act))
                self._handles.append(act.register_forward_hook(self._act_hook))
        for part in self._parts():  # the gate opens before any pre-hook of a tracked part itself
            self._handles.append(part.register_forward_pre_hook(self._open_gate, prepend=True))
            self._handles.append(part.register_forward_hook(self._close_gate))

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._depth = 0
        self._pending = None

    def _parts(self) -> list[nn.Module]:
        """The outermost modules that are called around the tracked layers (diffusers' VAE: encoder
        and decoder); a top-level ModuleList or ModuleDict is never called itself, so its called
        member stands in for it."""
        parts: dict[int, nn.Module] = {}
        for layer in self.layers:
            names = layer.name.split(".")
            module = self.model.get_submodule(names[0])
            for k in range(1, len(names)):
                if not isinstance(module, nn.ModuleList | nn.ModuleDict):
                    break
                module = self.model.get_submodule(".".join(names[: k + 1]))
            parts[id(module)] = module
        return list(parts.values())

    # -- hooks --------------------------------------------------------------------------------

    def _open_gate(self, _module: nn.Module, _inputs: Any) -> None:
        self._depth += 1

    def _close_gate(self, _module: nn.Module, _inputs: Any, _output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _make_norm_hook(self, i: int) -> Callable[..., None]:
        has_act = self.layers[i].activation is not None
        derive = self._derivable[i]

        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if self._depth <= 0 or not inputs or not isinstance(output, torch.Tensor):
                return
            with torch.no_grad():
                x, y = per_sample_view(inputs[0], self.exact), per_sample_view(output, self.exact)
                xs, xm2 = moments(x, self.scratch)  # (B, C)
                y1 = abs_sum(y, self.scratch)
                if derive and output.dtype in (torch.float32, torch.float64):
                    self._gn.append((i, x.shape[-1], (xs, xm2, y1)))  # y's moments follow from x's (`_derive`)
                else:
                    ys, ym2 = moments(y, self.scratch)
                    self._xy.append((i, x.shape[-1], (xs, xm2, ys, ym2, y1)))
            self._host_counts[0, i] += x.shape[0] * x.shape[-1]
            self._pending = (i, output) if has_act else None

        return hook

    def _make_capture_hook(self, i: int) -> Callable[..., None]:
        """The hook of a module other than a norm's output: the captured tensor's moments and sum |.|."""
        layer = self.layers[i]
        has_act, from_input, last = layer.activation is not None, layer.capture == "input", layer.channel_last

        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any = None) -> None:
            t = (inputs[0] if inputs else None) if from_input else output
            if self._depth <= 0 or not isinstance(t, torch.Tensor) or t.ndim < 2:
                return
            with torch.no_grad():
                c = capture_view(t, last, self.exact)
                cs, cm2 = moments(c, self.scratch)
                self._cap.append((i, c.shape[-1], (cs, cm2, abs_sum(c, self.scratch))))
            self._host_counts[0, i] += c.shape[0] * c.shape[-1]
            self._pending = (i, output) if has_act else None

        return hook

    def _act_hook(self, _module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        pending = self._pending
        if pending is None or self._depth <= 0 or not inputs or inputs[0] is not pending[1]:
            return
        self._pending = None
        i = pending[0]
        with torch.no_grad():
            a = capture_view(output, self.layers[i].channel_last, self.exact)
            a_s, a_m2 = moments(a, self.scratch)
            stats = (a_s, a_m2, abs_sum(a, self.scratch)) if self._act_abs else (a_s, a_m2)
        self._act.append((i, a.shape[-1], stats))
        self._host_counts[1, i] += a.shape[0] * a.shape[-1]

    def _fold(self, entries: list[tuple[int, int, tuple[torch.Tensor, ...]]], first_row: int, derive: bool = False,
              abs_row: int = Y_ABS) -> None:
        """Add the per-(sample, channel) statistics collected by the hooks into the sums, all layers
        at once: moment triplets (sum of means, variances, squared means, times the spatial size)
        and, for the norm outputs, sum |y|. A few kernels per step instead of a few per layer: every
        statistic of every call goes side by side into one float64 block (one cat), and each
        moment pair is added with two index_adds. An odd last statistic is a sum |.|, added to `abs_row`."""
        groups: dict[int, list[tuple[int, int, tuple[torch.Tensor, ...]]]] = {}
        for entry in entries:
            groups.setdefault(entry[2][0].shape[0], []).append(entry)
        for b, group in groups.items():
            signature = tuple((i, n) for i, n, _ in group)
            cols, spatial = self._columns(signature)
            k, width = len(group[0][2]), cols.numel()
            parts = [e[2][j] for j in range(k) for e in group]
            stats = self.scratch.take("fold", self.sums, (b, k, width))
            flat, dtype = stats.view(b, k * width), parts[0].dtype
            if dtype == flat.dtype:
                torch.cat(parts, dim=1, out=flat)
            elif all(p.dtype == dtype for p in parts):  # cat's fast path needs one dtype: cat first, then convert
                flat.copy_(torch.cat(parts, dim=1, out=self.scratch.take("fold", parts[0], (b, k * width))))
            else:  # mixed dtypes (cat promotes)
                flat.copy_(torch.cat(parts, dim=1))
            n_pairs = k // 2
            stats[:, : 2 * n_pairs].div_(spatial)  # (sum, M2) -> (mean, variance)
            pairs = [stats[:, 2 * p : 2 * p + 2] for p in range(n_pairs)]  # (B, 2, K): mean, variance
            if derive:
                pairs.append(self._derive(signature, cols, stats[:, 0], stats[:, 1]))
            for p, mv in enumerate(pairs):
                # squares in the buffer's precision: the between-sample variance S_m2/N - mean^2 cancels
                rows = self.sums[first_row + 3 * p : first_row + 3 * p + 3]
                rows[:2].index_add_(1, cols, mv.sum(0).mul_(spatial))
                rows[2].index_add_(0, cols, torch.mul(mv[:, 0], mv[:, 0]).sum(0).mul_(spatial))
            if k % 2:
                self.sums[abs_row].index_add_(0, cols, stats[:, -1].sum(0))
        entries.clear()

    def _snapshot_affine(self) -> None:
        """gamma and beta of the derivable norms (1 and 0 where a norm has none)."""
        with torch.no_grad():
            self._affine[0].copy_(self._per_channel("weight", 1.0, self._derivable))
            self._affine[1].copy_(self._per_channel("bias", 0.0, self._derivable))

    def _per_channel(self, attr: str, fill: float, where: Sequence[bool] | None = None) -> torch.Tensor:
        """A per-channel parameter (a 1-D `weight` or `bias` with one entry per captured output
        channel: a norm's gamma or beta, a conv's bias) of every tracked layer side by side, `fill`
        for layers without it (or not in `where`)."""
        vals = []
        for k, layer in enumerate(self.layers):
            p = getattr(layer.module, attr, None) if (where is None or where[k]) and layer.capture == "output" else None
            per_channel = isinstance(p, torch.Tensor) and p.ndim == 1 and p.numel() == layer.channels
            vals.append(p.detach() if per_channel else
                        torch.full((layer.channels,), fill, dtype=self._flat.dtype, device=self.device))
        return torch.cat(vals)

    def _derive(
        self, signature: tuple[tuple[int, int], ...], cols: torch.Tensor, xm: torch.Tensor, xv: torch.Tensor
    ) -> torch.Tensor:
        """The output moments of plain GroupNorms from their inputs', all layers at once: (B, 2, K)
        float64, the means and variances of y per sample and column. y = gamma (x - mu_g) rstd_g +
        beta per sample and group, where the group's mean and variance pool its channels' (law of
        total variance) and rstd_g = 1 / sqrt(var_g + eps), as GroupNorm computes them. Exact up to
        the rounding of y itself, and a pass over y fewer."""
        gid, size, eps = self._groups(signature)
        b = xm.shape[0]
        mu = torch.zeros(b, size.numel(), dtype=xm.dtype, device=xm.device).index_add_(1, gid, xm).div_(size)
        out = torch.empty(b, 2, xm.shape[1], dtype=xm.dtype, device=xm.device)
        # spread per column with gather (on CPU 3x faster than index_select along dim 1, which is
        # 5x faster than indexing with a tensor)
        g = gid.expand(b, -1)
        d = torch.sub(xm, torch.gather(mu, 1, g), out=out[:, 0])
        var_g = torch.zeros_like(mu).index_add_(1, gid, torch.addcmul(xv, d, d)).div_(size)
        gamma, beta = torch.gather(self._affine, 1, cols.expand(2, -1))
        scale = torch.gather(var_g.add_(eps).rsqrt_(), 1, g).mul_(gamma)
        torch.mul(xv, scale.square(), out=out[:, 1])
        d.mul_(scale).add_(beta)
        return out

    def _groups(self, signature: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a sequence of derivable hook calls: each column's group (numbered over the sequence),
        each group's channel count and eps (cached like `_columns`)."""
        found = self._group_cache.get(signature)
        if found is None:
            gid, size, eps, base = [], [], [], 0
            for i, _ in signature:
                module = self.layers[i].module
                g, c = module.num_groups, self.layers[i].channels
                gid.extend(base + k // (c // g) for k in range(c))
                size.extend([float(c // g)] * g)
                eps.extend([float(module.eps)] * g)
                base += g
            found = (
                torch.tensor(gid, dtype=torch.long, device=self.device),
                torch.tensor(size, dtype=self._dtype(), device=self.device),
                torch.tensor(eps, dtype=self._dtype(), device=self.device),
            )
            self._group_cache[signature] = found
        return found

    def _columns(self, signature: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Store columns and per-column spatial sizes of a sequence of hook calls (cached: the same
        layers run in the same order every step, so the host-to-device copy happens once)."""
        found = self._col_cache.get(signature)
        if found is None:
            cols, spatial = [], []
            for i, n in signature:
                layer = self.layers[i]
                cols.extend(range(layer.offset, layer.offset + layer.channels))
                spatial.extend([float(n)] * layer.channels)
            found = (
                torch.tensor(cols, dtype=torch.long, device=self.device),
                torch.tensor(spatial, dtype=self.sums.dtype, device=self.device),
            )
            self._col_cache[signature] = found
        return found

    # -- parameters ---------------------------------------------------------------------------

    @torch.no_grad()
    def capture_params(self, weights: bool = True) -> None:
        """gamma and beta (and, with `weights`, out_weight_norm, out_weight_l1 and near_zero_frac) as they are now."""
        self.params[P_WEIGHT].copy_(self._per_channel("weight", math.nan))
        self.params[P_BIAS].copy_(self._per_channel("bias", math.nan))
        if not weights:
            return
        for row, stat in ((P_OUT_NORM, out_weight_norm), (P_OUT_L1, out_weight_l1)):
            norms = []
            for layer in self.layers:
                v = stat(layer.readers, layer.channels, self.scratch)
                norms.append(v if v is not None else self._nan(layer.channels))
            self.params[row].copy_(torch.cat(norms))
        if self.weights:
            self.near_zero.copy_(near_zero_fractions([w for _, w in self.weights], self.cfg.near_zero, self.scratch))

    @torch.no_grad()
    def capture_grads(self) -> None:
        """|d loss / d gamma| (NaN where gamma has no gradient) and, when recorded, each channel's
        mean |grad| over its incoming filter."""
        vals = []
        for layer in self.layers:
            w = getattr(layer.module, "weight", None) if layer.capture == "output" else None
            g = w.grad if isinstance(w, torch.Tensor) and w.ndim == 1 and w.numel() == layer.channels else None
            vals.append(g.detach() if g is not None else self._nan(layer.channels))
        self.params[P_GRAD].copy_(torch.cat(vals).abs())
        if "in_weight_grad" not in self.extra:
            return
        vals = []
        for layer in self.layers:
            w = getattr(layer.producer, "weight", None)
            g = w.grad if isinstance(w, torch.Tensor) else None
            if g is None or g.shape[0] != layer.channels:
                vals.append(self._nan(layer.channels))
                continue
            g = g.detach()
            vals.append(torch.abs(g, out=self.scratch.take("work", g)).view(layer.channels, -1).mean(1))
        self.params[P_IN_GRAD].copy_(torch.cat(vals))

    def _nan(self, n: int) -> torch.Tensor:
        return torch.full((n,), math.nan, dtype=self._flat.dtype, device=self.device)

    # -- end of a tracked step ----------------------------------------------------------------

    def fold(self) -> None:
        """Add what the hooks collected since the last fold into the sums (with the gamma and beta
        of the last `arm`, which the derived norm moments use). The sums are additive: a pooled
        interval folds each step's forwards into the same sums."""
        with torch.no_grad():
            self._fold(self._xy, X_M)
            self._fold(self._gn, X_M, derive=True)
            self._fold(self._cap, Y_M)
            self._fold(self._act, A_M, abs_row=A_ABS)

    def finish(self, accelerator: Any = None) -> None:
        """Close the tracked step's sums: fold in what the hooks collected, put the element counts
        into the buffer and, under several processes, sum sums and counts over them (as if one
        process had seen the global batch)."""
        self.fold()
        self._stage_counts()
        if accelerator is not None and int(accelerator.num_processes) > 1:
            self.reduced.copy_(accelerator.reduce(self.reduced, reduction="sum"))

    @property
    def host_counts(self) -> np.ndarray:
        """Element counts (2, layers) of the forwards measured since `reset`, not yet in the buffer."""
        return self._host_counts

    def collect(self, accelerator: Any) -> None:
        """Sum the sums and counts measured so far over the processes onto the main process (the
        others start again from zero): an open pooled window as one process would hold it."""
        self._stage_counts()
        self.reduced.copy_(accelerator.reduce(self.reduced, reduction="sum"))
        if accelerator.is_main_process:
            self._host_counts[:] = self.counts.cpu().numpy()
        else:
            self.reduced.zero_()
            self._host_counts[:] = 0
        self.counts.zero_()

    def _stage_counts(self) -> None:
        """Host counts -> device buffer; on CUDA through pinned memory without a host sync."""
        host = torch.from_numpy(self._host_counts).to(self.counts.dtype)
        if self.device.type != "cuda":
            self.counts.copy_(host)
            return
        if len(self._count_ring) < self._ring_size:
            self._count_ring.append((torch.empty_like(host).pin_memory(), None))
        slot = self._count_next % len(self._count_ring)
        self._count_next += 1
        pinned, done = self._count_ring[slot]
        if done is not None:
            done.synchronize()  # the copy from this slot ran long ago; never overwrite it before
        pinned.copy_(host)
        self.counts.copy_(pinned, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._count_ring[slot] = (pinned, event)

    def snapshot(self, step: int, scalars: Mapping[str, float] | None = None) -> _Snapshot:
        """One device-to-host copy of the whole buffer (call `finish` first); the record is finished
        on the writer thread."""
        event = None
        if self.device.type == "cuda":
            if len(self._ring) < self._ring_size:
                self._ring.append(torch.empty_like(self._flat, device="cpu").pin_memory())
            host = self._ring[self._ring_next % len(self._ring)]
            self._ring_next += 1
            host.copy_(self._flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = self._flat.to("cpu", copy=True)
        return _Snapshot(step, host, event, self, {k: float(v) for k, v in (scalars or {}).items()})

    def finalize(self, flat: np.ndarray, step: int, scalars: Mapping[str, float]) -> TraceRecord:
        """Sums -> statistics (float64 on the host)."""
        c, n_layers = self.n_channels, len(self.layers)
        a, b, d, _ = np.cumsum(self._sizes)
        sums = flat[:a].reshape(N_ROWS, c).astype(np.float64)
        counts = flat[a:b].reshape(2, n_layers)
        params = flat[b:d].reshape(N_PARAM_ROWS, c).copy()  # the host buffer is reused (pinned ring)
        sizes = [layer.channels for layer in self.layers]
        n_xy = np.repeat(counts[0], sizes)
        n_act = np.repeat(counts[1], sizes)

        def moments(m: int, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = sums[m] / n
                var = sums[m + 1] / n + (sums[m + 2] / n - mean * mean)
            return mean, np.sqrt(np.maximum(var, 0.0))

        _, in_std = moments(X_M, n_xy)
        mean, std = moments(Y_M, n_xy)
        act_mean, act_std = moments(A_M, n_act)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_abs = sums[Y_ABS] / n_xy
            act_mean_abs = sums[A_ABS] / n_act
        norm = np.repeat([layer.norm for layer in self.layers], sizes)
        channels = {
            "in_std": np.where(norm, in_std, np.nan),
            "mean": mean,
            "mean_abs": mean_abs,
            "std": std,
            "act_mean": act_mean,
            "act_std": act_std,
            "gn_weight": params[P_WEIGHT],
            "gn_bias": params[P_BIAS],
            "gn_weight_grad": params[P_GRAD],
            "out_weight_norm": params[P_OUT_NORM],
            "out_weight_l1": params[P_OUT_L1],
        }
        if self._act_abs:
            channels["act_mean_abs"] = act_mean_abs
        if "in_weight_grad" in self.extra:
            channels["in_weight_grad"] = params[P_IN_GRAD]
        for key in ("in_std", "mean", "mean_abs", "std"):
            channels[key] = np.where(n_xy > 0, channels[key], np.nan)
        for key in ("act_mean", "act_std", "act_mean_abs"):
            if key in channels:
                channels[key] = np.where(n_act > 0, channels[key], np.nan)
        return TraceRecord(step, channels, dict(scalars), flat[d:].copy() if self.weights else None)


# ---------------------------------------------------------------------------------------------
# probe passes (no gradients)


def run_probe(
    model: nn.Module,
    batch: torch.Tensor,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> None:
    """Encode (posterior mode) and decode `batch` in eval mode without gradients, `batch_size` at a time."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
            for chunk in batch.split(batch_size):
                model(chunk.to(device), sample_posterior=False)
    finally:
        model.train(was_training)


def probe_split(cfg: RunConfig) -> str:
    return cfg.track.probe_split or cfg.data.validation_split_name


def load_probe_batch(cfg: RunConfig) -> torch.Tensor:
    """The fixed probe set: the first track.probe_samples images of the probe split."""
    from vaedyn_cli import data

    return data.probe_batch(cfg.data, probe_split(cfg), cfg.track.probe_samples, cfg.seed)


def model_config_json(model: nn.Module) -> str:
    """The model's diffusers config as JSON (stored with every trace)."""
    config = getattr(model, "config", None)
    return json.dumps(dict(config) if config is not None else {}, default=str)
