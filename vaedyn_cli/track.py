"""Channel probes: forward hooks on the normalisation layers, on-device accumulation, one host copy.

What is measured, per tracked channel and tracked step (DESIGN.md "Trace store"):
`in_std` of the norm's input x; `mean`, `mean_abs`, `std` of its output y; `act_mean`, `act_std`
of act(y) where a nonlinearity follows (read from that activation module's own output, so
nothing is recomputed); gamma, beta, |grad gamma|; `out_weight_norm`, the L2 norm of the weights
of the layer(s) reading the channel; `near_zero_frac` per conv/linear weight. Every std is the
population std (ddof=0) over batch and spatial positions (the length axis for the attention
norm's (batch, channel, length) input), pooled over all micro-batches of the step and, under
several processes, over all processes: the numbers equal one process seeing the global batch.

How. Hooks exist only on tracked steps (registered at `begin_step`, removed after the step's last
backward, before the optimizer step). Each hook only reduces its tensors per (sample, channel)
over the spatial axes and keeps the small (batch, channel) results: the input's sum and sum of
squared deviations (var_mean on GPU; on CPU, where var_mean is slow, two-pass for small maps and a
sum and a sum of squares per row for large ones, with ill-conditioned rows recomputed two-pass; in
the tensor's own memory layout), sum |y|, and the same two sums of the activation. On CPU every
temporary lives in reused scratch memory (`Scratch`), so a tracked step allocates nothing
activation-sized. A plain GroupNorm's output moments are not measured but derived from its
input's (its normalisation is affine per sample and group): one pass over y fewer. After the
step's last backward they are folded, all layers at once, into one preallocated float64 device
buffer as per-channel sums (of means, variances and squared means, weighted by the spatial size;
squares in float64 so that the between-sample variance does not cancel); the buffer (sums,
counts, parameter statistics) is all-reduced when needed and copied to the host once
(asynchronously into pinned memory on CUDA); turning sums into statistics happens on the store's
writer thread. Hooks fire only inside the forward of the model's top-level parts, so gradient
checkpointing's recomputation during backward is not counted twice.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaedyn_cli import artifacts
from vaedyn_cli import store as store_mod
from vaedyn_cli.config import NearZeroConfig, RunConfig, TrackConfig, apply_overrides, validate_config
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.store import ChannelLayout, TraceRecord, TraceWriter
from vaedyn_cli.train import TrainHook

log = logging.getLogger(__name__)

# Rows of the sums buffer: for x (norm input), y (norm output) and a = act(y), the sums over
# (sample, channel) of spatial means, spatial variances and squared spatial means, each times the
# spatial size; plus sum |y|. Statistics: mean = S_m / N; var = S_v / N + S_m2 / N - mean^2.
X_M, X_V, X_M2, Y_M, Y_V, Y_M2, Y_ABS, A_M, A_V, A_M2 = range(10)
N_ROWS = 10
# Rows of the parameter block.
P_WEIGHT, P_BIAS, P_GRAD, P_OUT_NORM = range(4)
N_PARAM_ROWS = 4


# ---------------------------------------------------------------------------------------------
# which layers, and what reads them


@dataclass
class ProbeLayer:
    """A tracked layer, where its channels sit in the store, and its neighbours."""

    name: str
    module: nn.Module
    offset: int
    channels: int
    part: str
    activation: nn.Module | None  # the nonlinearity applied to this layer's output
    readers: list[nn.Module]  # modules whose weights read this layer's output channels


def _channels(module: nn.Module) -> int | None:
    for attr in ("num_channels", "num_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def wiring(model: nn.Module, name: str) -> tuple[nn.Module | None, list[nn.Module]]:
    """(activation after the layer, modules reading its output) for the norms of diffusers' VAE:
    resnet norm1 -> SiLU -> conv1, norm2 -> SiLU -> conv2; encoder/decoder conv_norm_out -> SiLU ->
    conv_out; attention group_norm -> to_q/to_k/to_v (no activation). Unknown places: (None, [])."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if attr in ("norm1", "norm2") and isinstance(getattr(parent, "nonlinearity", None), nn.Module):
        conv = getattr(parent, "conv1" if attr == "norm1" else "conv2", None)
        return parent.nonlinearity, [conv] if conv is not None else []
    if attr == "conv_norm_out":
        act = getattr(parent, "conv_act", None)
        conv = getattr(parent, "conv_out", None)
        return (act if isinstance(act, nn.Module) else None), [conv] if conv is not None else []
    if attr == "group_norm":
        readers = [getattr(parent, k, None) for k in ("to_q", "to_k", "to_v")]
        return None, [r for r in readers if isinstance(r, nn.Module)]
    return None, []


def select_layers(model: nn.Module, cfg: TrackConfig) -> list[ProbeLayer]:
    """The layers matched by track.layers (globs on module names) and track.module_types, in module order."""
    layers: list[ProbeLayer] = []
    offset = 0
    types = set(cfg.module_types)
    for name, module in model.named_modules():
        if type(module).__name__ not in types or not any(fnmatch.fnmatchcase(name, p) for p in cfg.layers):
            continue
        channels = _channels(module)
        if channels is None:
            raise VaedynError(
                f"track.module_types includes {type(module).__name__} ({name}), which is not a normalisation layer "
                "with per-channel input and output; track GroupNorm (or BatchNorm/InstanceNorm) layers"
            )
        activation, readers = wiring(model, name)
        part = name.split(".", 1)[0]
        layers.append(ProbeLayer(name, module, offset, channels, part, activation, readers))
        offset += channels
    if not layers:
        raise VaedynError(
            f"track.layers {cfg.layers} with track.module_types {cfg.module_types} match no layer of the model; "
            "use module names such as 'decoder.*' or 'encoder.down_blocks.0.*' (see `vaedyn store info`)"
        )
    return layers


def weight_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every conv/linear weight (the original project's "dead weight" tracker covers these)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.Linear):
            found.append((f"{name}.weight", module.weight))
    return found


class Scratch:
    """Reusable work buffers, one per (purpose, device, dtype), that grow to the largest request
    and are then kept. The probes' passes write their temporaries here instead of allocating
    activation-sized tensors on every tracked step: on CPU such allocations reshape the heap, and
    the allocator hands pages back and faults them in again during the backward pass (measured
    at width 1: 120k extra page faults and about 0.2 s per tracked step). Purposes: "work" for
    one pass's temporary (squares, deviations, |y|, |w|), "dense", a dense copy of a strided
    input that such a pass reads while it writes "work", and "fold", the block of all layers'
    per-sample statistics that `ChannelProbes._fold` sums."""

    # Views handed out are kept (by purpose, shape and strides): the same few shapes recur every
    # step, and making a view costs as much as a small kernel inside the model's forward.
    MAX_VIEWS = 512

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._views: dict[tuple[Any, ...], torch.Tensor] = {}

    def _buffer(self, purpose: str, like: torch.Tensor, numel: int) -> torch.Tensor:
        key = (purpose, like.device, like.dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._views.clear()  # views of the old buffer
        return buf

    def _view(self, key: tuple[Any, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self.MAX_VIEWS:
                self._views.clear()
            view = self._views[key] = make()
        return view

    def take(self, purpose: str, like: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """A contiguous tensor of `shape` (default: like's) with like's dtype and device."""
        shape = tuple(like.shape if shape is None else shape)
        numel = math.prod(shape)
        buf = self._buffer(purpose, like, numel)
        return self._view((purpose, like.device, like.dtype, shape), lambda: buf[:numel].view(shape))

    def like(self, t: torch.Tensor, purpose: str = "work") -> torch.Tensor:
        """A tensor with t's shape and strides (t dense, as conv and norm outputs are: contiguous
        or channels-last), so that elementwise ops run at full speed."""
        shape, stride = tuple(t.shape), t.stride()
        buf = self._buffer(purpose, t, t.numel())

        def make() -> torch.Tensor:
            flat = buf[: t.numel()]
            return flat.as_strided(shape, stride) if _dense(t) else flat.view(shape)

        return self._view((purpose, t.device, t.dtype, shape, stride), make)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def _dense(t: torch.Tensor) -> bool:
    """Whether t's strides are a permutation of a contiguous layout (no gaps, no overlap)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@torch.no_grad()
def near_zero_fractions(weights: Sequence[torch.Tensor], cfg: NearZeroConfig, scratch: Scratch | None = None) -> torch.Tensor:
    """Share of entries with |w| < threshold per weight, on the weights' device (no sync).
    absolute: abs_threshold; percent_of_mean: rel_threshold * mean|w|; both: either holds.
    (|w| is compared in place, 1/0, and counted: two passes fewer than a boolean mask.)"""
    scratch = scratch or Scratch()
    out = []
    for w in weights:
        a = torch.abs(w.detach(), out=scratch.take("work", w))
        if cfg.mode == "absolute":
            thr: torch.Tensor | float = cfg.abs_threshold
        else:
            rel = a.mean() * cfg.rel_threshold
            thr = rel if cfg.mode == "percent_of_mean" else torch.clamp(rel, min=cfg.abs_threshold)
        out.append(torch.count_nonzero(a.lt_(thr)).to(torch.float64) / a.numel())
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(out)


@torch.no_grad()
def out_weight_norm(readers: Sequence[nn.Module], channels: int, scratch: Scratch | None = None) -> torch.Tensor | None:
    """Per input channel, the L2 norm of the readers' weights taken together (dim 1 of a conv or
    linear weight is its input channel); None without readers. Squares summed over the output
    channels (the outer dimension, a vectorised reduction; a norm over dims (0, 2, 3) is 2.5x slower)."""
    scratch = scratch or Scratch()
    total = None
    for r in readers:
        w = getattr(r, "weight", None)
        if w is None or w.ndim < 2 or w.shape[1] != channels:
            return None
        w = w.detach() if w.dtype in (torch.float32, torch.float64) else w.detach().float()
        sq = torch.mul(w, w, out=scratch.take("work", w)).reshape(w.shape[0], -1).sum(0)
        sq = sq.view(channels, -1).sum(1)
        total = sq if total is None else total + sq
    return None if total is None else total.sqrt()


# ---------------------------------------------------------------------------------------------
# the probes


def _per_sample_view(t: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) as (B, C, L): spatial positions (or the attention norm's length) flattened.
    Called under no_grad (hooks), so no detach is needed."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t if t.ndim == 3 else t.flatten(2)


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a (B, C, L) tensor is laid out as a contiguous (B, L, C) (what t.transpose(1, 2)
    .is_contiguous() says, without making the view)."""
    b, c, n = t.shape
    sb, sc, sn = t.stride()
    return (c == 1 or sc == 1) and (n == 1 or sn == c) and (b == 1 or sb == c * n)


# One-pass moments (float32 sum and sum of squares) keep about 6 digits of the std while
# mean^2 <= 4 var (measured: relative std error 1e-6 at |mean| = 2 std, 2e-5 at 10 std); rows
# beyond that (near-constant channels above all) are recomputed two-pass.
ONE_PASS_MAX_MEAN_SQ_OVER_VAR = 4.0
# Up to this many elements (1 MiB of float32, which stays in the cores' L2 caches between passes)
# the moments are two-pass: fewer kernels than one pass and its conditioning check.
TWO_PASS_MAX_NUMEL = 1 << 18


def _moments(t: torch.Tensor, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) sum and sum of squared deviations from the mean (M2) of a (B, C, L)
    tensor; `_fold` divides them by L for all layers at once.

    On GPU var_mean (one kernel, no host sync). On CPU, where var_mean is slow, with few kernels and
    no activation-sized temporary (see `Scratch`): small tensors two-pass, the deviations in
    scratch; large ones from the sum and the sum of squares of each row, recomputed two-pass where
    the subtraction would cancel. Rows are summed in the tensor's own layout: a contiguous tensor by
    its rows (squares summed as a norm), a channels-last one (what oneDNN convolutions return, and
    the norms after them) along the middle axis of its (B, L, C) layout, squares in scratch
    (measured at width 1: a norm over its strided rows is 5x slower, copying it into rows first
    3x). Other layouts are copied into scratch."""
    n = t.shape[-1]
    if t.device.type != "cpu":
        var, mean = torch.var_mean(t, dim=-1, correction=0)
        return mean.mul_(n), var.mul_(n)
    if not t.is_contiguous() and not _channels_last(t):
        t = scratch.take("dense", t).copy_(t)
    s = t.sum(-1)
    if t.numel() > TWO_PASS_MAX_NUMEL:
        if t.is_contiguous():
            m2 = torch.linalg.vector_norm(t, 2, dim=-1).square_().addcmul_(s, s, value=-1 / n)
            idx = _ill_conditioned(s, m2, n).view(-1).nonzero().squeeze(1)  # a host sync: free on CPU
            if idx.numel():  # those rows gathered into scratch, two-pass
                rows = t.view(-1, n)
                rows = torch.index_select(rows, 0, idx, out=scratch.take("work", rows, (idx.numel(), n)))
                rows.sub_(s.view(-1)[idx].div_(n).unsqueeze(1))
                m2.view(-1).index_copy_(0, idx, torch.linalg.vector_norm(rows, 2, dim=-1).square_())
            return s, m2
        tl = t.transpose(1, 2)  # contiguous (B, L, C)
        m2 = torch.mul(tl, tl, out=scratch.take("work", tl)).sum(1).addcmul_(s, s, value=-1 / n)
        if not bool(_ill_conditioned(s, m2, n).any()):
            return s, m2
        # rare in large maps: all rows two-pass (gathering strided rows costs more than the pass)
    # the deviations from s / n (a constant row's mean exactly)
    if n & (n - 1) == 0:  # n a power of two, as spatial sizes are: 1 / n is exact, one kernel
        d = torch.sub(t, s.unsqueeze(-1), alpha=1 / n, out=scratch.like(t))
    else:
        d = torch.sub(t, s.div(n).unsqueeze(-1), out=scratch.like(t))
    return s, d.mul_(d).sum(-1)


def _ill_conditioned(s: torch.Tensor, m2: torch.Tensor, n: int) -> torch.Tensor:
    """Rows with mean^2 >= ONE_PASS_MAX_MEAN_SQ_OVER_VAR * var (M2 <= s^2 / (k n))."""
    return torch.addcmul(m2, s, s, value=-1 / (ONE_PASS_MAX_MEAN_SQ_OVER_VAR * n)).le_(0)


def _plain_group_norm(module: nn.Module) -> bool:
    """An nn.GroupNorm whose forward is GroupNorm's own (not a subclass that changes it)."""
    return isinstance(module, nn.GroupNorm) and type(module).forward is nn.GroupNorm.forward


def _abs_sum(t: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """Per (sample, channel) sum of |t| (on CPU |t| in scratch, then summed: measured 3 to 8x faster
    than an L1 norm)."""
    if t.device.type == "cpu":
        return torch.abs(t, out=scratch.like(t)).sum(-1)
    return torch.linalg.vector_norm(t, ord=1, dim=-1)


class _Snapshot:
    """A tracked step copied off the device; turned into a TraceRecord on the writer thread."""

    def __init__(self, step: int, host: torch.Tensor, event: Any, probes: ChannelProbes, scalars: dict[str, float]):
        self.step, self._host, self._event, self._probes, self._scalars = step, host, event, probes, scalars

    def resolve(self) -> TraceRecord:
        if self._event is not None:
            self._event.synchronize()
        return self._probes.finalize(self._host.numpy(), self.step, self._scalars)


class ChannelProbes:
    """Hooks and device buffers for the tracked layers of one model."""

    def __init__(self, model: nn.Module, cfg: TrackConfig, ring: int = 2):
        self.model = model
        self.cfg = cfg
        self.layers = select_layers(model, cfg)
        self.weights = weight_params(model) if cfg.near_zero.enabled else []
        self.n_channels = sum(layer.channels for layer in self.layers)
        self.layout = ChannelLayout.from_layers(
            ((layer.name, layer.channels, layer.part, layer.activation is not None) for layer in self.layers),
            [name for name, _ in self.weights],
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
        self._derivable = [_plain_group_norm(layer.module) for layer in self.layers]
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
        self._xy.clear()
        self._gn.clear()
        self._act.clear()

    def arm(self) -> None:
        """Register the hooks (statistics hooks first, so they run before a part's gate closes) and
        keep gamma and beta as the forward will use them (the optimizer changes them before `finish`)."""
        if self._handles:
            return
        self._snapshot_affine()
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._make_norm_hook(i)))
        seen: set[int] = set()
        for layer in self.layers:
            act = layer.activation
            if act is not None and id(act) not in seen:
                seen.add(id(act))
                self._handles.append(act.register_forward_hook(self._act_hook))
        for part in self._parts():
            self._handles.append(part.register_forward_pre_hook(self._open_gate))
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
                x, y = _per_sample_view(inputs[0]), _per_sample_view(output)
                xs, xm2 = _moments(x, self.scratch)  # (B, C)
                y1 = _abs_sum(y, self.scratch)
                if derive and output.dtype in (torch.float32, torch.float64):
                    self._gn.append((i, x.shape[-1], (xs, xm2, y1)))  # y's moments follow from x's (`_derive`)
                else:
                    ys, ym2 = _moments(y, self.scratch)
                    self._xy.append((i, x.shape[-1], (xs, xm2, ys, ym2, y1)))
            self._host_counts[0, i] += x.shape[0] * x.shape[-1]
            self._pending = (i, output) if has_act else None

        return hook

    def _act_hook(self, _module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        pending = self._pending
        if pending is None or self._depth <= 0 or not inputs or inputs[0] is not pending[1]:
            return
        self._pending = None
        i = pending[0]
        with torch.no_grad():
            a = _per_sample_view(output)
            a_s, a_m2 = _moments(a, self.scratch)
        self._act.append((i, a.shape[-1], (a_s, a_m2)))
        self._host_counts[1, i] += a.shape[0] * a.shape[-1]

    def _fold(self, entries: list[tuple[int, int, tuple[torch.Tensor, ...]]], first_row: int, derive: bool = False) -> None:
        """Add the per-(sample, channel) statistics collected by the hooks into the sums, all layers
        at once: moment triplets (sum of means, variances, squared means, times the spatial size)
        and, for the norm outputs, sum |y|. A few kernels per step instead of a few per layer: every
        statistic of every call goes side by side into one float64 block (one cat), and each
        moment pair is added with two index_adds."""
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
                self.sums[Y_ABS].index_add_(0, cols, stats[:, -1].sum(0))
        entries.clear()

    def _snapshot_affine(self) -> None:
        """gamma and beta of the derivable norms (1 and 0 where a norm has none)."""
        with torch.no_grad():
            self._affine[0].copy_(self._per_channel("weight", 1.0, self._derivable))
            self._affine[1].copy_(self._per_channel("bias", 0.0, self._derivable))

    def _per_channel(self, attr: str, fill: float, where: Sequence[bool] | None = None) -> torch.Tensor:
        """A norm parameter (weight or bias) of every tracked layer side by side, `fill` for layers
        without it (or not in `where`)."""
        vals = []
        for k, layer in enumerate(self.layers):
            p = getattr(layer.module, attr, None) if where is None or where[k] else None
            vals.append(p.detach().reshape(-1) if isinstance(p, torch.Tensor) else
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
        """gamma and beta (and, with `weights`, out_weight_norm and near_zero_frac) as they are now."""
        self.params[P_WEIGHT].copy_(self._per_channel("weight", math.nan))
        self.params[P_BIAS].copy_(self._per_channel("bias", math.nan))
        if not weights:
            return
        norms = []
        for layer in self.layers:
            v = out_weight_norm(layer.readers, layer.channels, self.scratch)
            norms.append(v if v is not None else self._nan(layer.channels))
        self.params[P_OUT_NORM].copy_(torch.cat(norms))
        if self.weights:
            self.near_zero.copy_(near_zero_fractions([w for _, w in self.weights], self.cfg.near_zero, self.scratch))

    @torch.no_grad()
    def capture_grads(self) -> None:
        """|d loss / d gamma| (NaN where gamma has no gradient)."""
        vals = []
        for layer in self.layers:
            w = getattr(layer.module, "weight", None)
            g = w.grad if isinstance(w, torch.Tensor) else None
            vals.append(g.detach().reshape(-1) if g is not None else self._nan(layer.channels))
        self.params[P_GRAD].copy_(torch.cat(vals).abs())

    def _nan(self, n: int) -> torch.Tensor:
        return torch.full((n,), math.nan, dtype=self._flat.dtype, device=self.device)

    # -- end of a tracked step ----------------------------------------------------------------

    def finish(self, accelerator: Any = None) -> None:
        """Close the step's sums: fold in what the hooks collected, put the element counts into the
        buffer and, under several processes, sum sums and counts over them (as if one process had
        seen the global batch)."""
        with torch.no_grad():
            self._fold(self._xy, X_M)
            self._fold(self._gn, X_M, derive=True)
            self._fold(self._act, A_M)
        self._stage_counts()
        if accelerator is not None and int(accelerator.num_processes) > 1:
            self.reduced.copy_(accelerator.reduce(self.reduced, reduction="sum"))

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
        channels = {
            "in_std": in_std,
            "mean": mean,
            "mean_abs": mean_abs,
            "std": std,
            "act_mean": act_mean,
            "act_std": act_std,
            "gn_weight": params[P_WEIGHT],
            "gn_bias": params[P_BIAS],
            "gn_weight_grad": params[P_GRAD],
            "out_weight_norm": params[P_OUT_NORM],
        }
        for key in ("in_std", "mean", "mean_abs", "std"):
            channels[key] = np.where(n_xy > 0, channels[key], np.nan)
        for key in ("act_mean", "act_std"):
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


def _model_config_json(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return json.dumps(dict(config) if config is not None else {}, default=str)


# ---------------------------------------------------------------------------------------------
# tracking while training


class Tracker(TrainHook):
    """The TrainHook that records a trace step every track.interval optimizer steps."""

    def __init__(self, ctx: Any):
        cfg: RunConfig = ctx.cfg
        self.cfg = cfg
        self.acc = ctx.accelerator
        self.model = self.acc.unwrap_model(ctx.model)
        self.main = bool(self.acc.is_main_process)
        self.probes = ChannelProbes(self.model, cfg.track, ring=cfg.track.queue_size + 2)
        self.probe_batch = load_probe_batch(cfg) if cfg.track.source == "probe" and self.main else None
        self.tracked = False
        self.writer: TraceWriter | None = None
        if self.main:
            path = Path(ctx.run_dir) / artifacts.TRACE_DIR
            attrs = store_mod.store_attrs("train", cfg.run_name, cfg.to_json(), _model_config_json(self.model))
            resume = ctx.resume_step
            self.writer = TraceWriter(
                path,
                self.probes.layout,
                attrs,
                mode="a" if resume is not None else "w",
                chunk_steps=cfg.track.chunk_steps,
                queue_size=cfg.track.queue_size,
                commit_interval_s=cfg.track.commit_interval_s,
                keep_recent=cfg.nudge.window,
            )
            if resume is not None:
                self.writer.truncate(resume)

    def begin_step(self, step: int) -> None:
        self.tracked = step % self.cfg.track.interval == 0
        if not self.tracked:
            return
        self.probes.reset()
        if self.cfg.track.source == "batch":
            self.probes.capture_params(weights=self._weights_due(step))
            self.probes.arm()

    def _weights_due(self, step: int) -> bool:
        """Weight statistics on the first tracked step (step `interval`) and then on the first tracked step
        of each window of `weight_interval` steps after it (every such window holds exactly one step
        (step - interval) % weight_interval < interval that is a multiple of interval)."""
        interval = self.cfg.track.interval
        return (step - interval) % self.cfg.track.weight_interval < interval

    def after_backward(self, step: int) -> None:
        """The step's forwards are over: |grad gamma|, and the hooks' results folded now, before the
        optimizer allocates its temporaries (see `ChannelProbes.finish`)."""
        if not self.tracked:
            return
        if self.cfg.track.gradients:
            self.probes.capture_grads()
        if self.cfg.track.source == "batch":
            self.probes.disarm()
            self.probes.finish(self.acc)

    def end_step(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.tracked:
            return
        self.tracked = False
        if self.cfg.track.source == "batch":
            if self.probes.armed:  # a loop that does not call after_backward
                self.probes.disarm()
                self.probes.finish(self.acc)
        elif self.main:
            assert self.probe_batch is not None
            self.probes.capture_params(weights=self._weights_due(step))
            self.probes.arm()
            try:
                run_probe(self.model, self.probe_batch, self.cfg.data.validation_batch_size, self.acc.autocast)
            finally:
                self.probes.disarm()
            self.probes.finish()
        values = self._global_scalars(scalars)
        if not math.isfinite(values.get("loss", 0.0)):
            # the forward (and, unless skipped, the update) went non-finite: its statistics are no
            # measurement, so the step is left out of the trace rather than stored as if valid
            if self.main:  # with on_nonfinite=error the run stops with its own message
                level = logging.WARNING if self.cfg.train.on_nonfinite == "skip" else logging.DEBUG
                log.log(level, "step %d: non-finite loss, not recorded in the trace", step)
            return
        if self.main and self.writer is not None:
            self.writer.append(self.probes.snapshot(step, values))

    def _global_scalars(self, scalars: Mapping[str, float]) -> dict[str, float]:
        """The step's training scalars; under several processes the mean over them (equal local
        batches: the global batch's mean), as the statistics are."""
        values = {k: float(scalars[k]) for k in store_mod.SCALAR_VARS if k in scalars}
        if int(self.acc.num_processes) > 1:
            keys = [k for k in ("loss", "rec_loss", "kl_loss") if k in values]
            t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.acc.device)
            values.update(zip(keys, self.acc.reduce(t, reduction="mean").tolist(), strict=True))
        return values

    def before_save(self, step: int) -> None:
        """Commit the trace up to the checkpoint's step: a run resumed from it continues a complete trace."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.probes.disarm()
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


def make_tracker(ctx: Any) -> Tracker | None:
    """HOOK_FACTORIES entry: a Tracker when track.enabled."""
    if not ctx.cfg.track.enabled:
        return None
    return Tracker(ctx)


# ---------------------------------------------------------------------------------------------
# `vaedyn track`: a trace from saved checkpoints


def _expand(sources: Sequence[str]) -> list[str]:
    """A run's `checkpoints/` folder (or any folder of step-* folders) stands for its checkpoints."""
    out: list[str] = []
    for src in sources:
        path = Path(src).expanduser()
        steps = []
        if path.is_dir() and not (path / artifacts.MODEL_CONFIG_FILE).is_file():
            steps = sorted(
                (s, p) for p in path.iterdir() if p.is_dir() and (s := artifacts.parse_step(p.name)) is not None
            )
        if steps:
            out.extend(str(p) for _, p in steps)
        elif path.is_dir() and path.name == artifacts.CHECKPOINTS_DIR:
            raise VaedynError(f"{path} holds no step-* checkpoints; train longer than train.save_interval steps")
        else:
            out.append(src)
    return out


def _resolve_config(cfg: RunConfig | None, overrides: Sequence[str], checkpoints: Sequence[Any]) -> RunConfig:
    if cfg is not None:
        return cfg
    stored = next((c.config for c in checkpoints if c.config is not None), None)
    if stored is None:
        raise VaedynError(
            "the checkpoints carry no vaedyn config (a hub id or a bare diffusers folder): pass -c CFG "
            "(it names the probe data: data.* and track.probe_*)"
        )
    if not overrides:
        return stored
    data = apply_overrides(stored.model_dump(mode="json"), list(overrides))
    return validate_config(data, "stored with the checkpoint, with --set " + " ".join(overrides))


def _default_out(checkpoints: Sequence[Any]) -> Path:
    runs = {c.run_dir.resolve() for c in checkpoints if c.run_dir is not None}
    if len(runs) != 1 or any(c.run_dir is None for c in checkpoints):
        raise VaedynError(
            "pass --out STORE: the checkpoints do not all belong to one run folder "
            f"(the default is <run>/{artifacts.TRACK_TRACE_DIR})"
        )
    return runs.pop() / artifacts.TRACK_TRACE_DIR


def _check_out(out: Path) -> None:
    if not out.exists():
        return
    if (out / store_mod.ZARR_JSON).is_file():
        attrs = store_mod.check_store(out)
        if attrs.get("source") != "track":
            raise VaedynError(
                f"{out} is a trace written by `vaedyn {attrs.get('source')}`; `vaedyn track` replaces only its own "
                "stores: choose another --out"
            )
    elif out.is_dir() and any(out.iterdir()) or out.is_file():
        raise VaedynError(f"--out {out} exists and is not a trace store; choose another path")


# Fields of a diffusers config.json that decide which channels a trace holds.
ARCHITECTURE_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "latent_channels", "norm_num_groups", "mid_block_add_attention",
)


def _check_same_architecture(checkpoints: Sequence[Any]) -> None:
    """Checkpoints with a config.json on disk must describe one architecture, checked before any is loaded
    (hub ids and single files are checked when loaded)."""
    first: tuple[Any, dict[str, Any]] | None = None
    for ckpt in checkpoints:
        file = Path(ckpt.path) / artifacts.MODEL_CONFIG_FILE if ckpt.path is not None else None
        if file is None or not file.is_file():
            continue
        try:
            arch = {k: json.loads(file.read_text()).get(k) for k in ARCHITECTURE_KEYS}
        except ValueError:
            raise VaedynError(f"{file} is not valid JSON: checkpoint {ckpt.source} is damaged") from None
        if first is None:
            first = (ckpt, arch)
            continue
        diff = next((k for k in ARCHITECTURE_KEYS if arch[k] != first[1][k]), None)
        if diff is not None:
            raise VaedynError(
                f"checkpoint {ckpt.source} has another architecture than {first[0].source} ({diff} {arch[diff]} vs "
                f"{first[1][diff]}); track them into separate stores"
            )


def _device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def track_checkpoints(
    cfg: RunConfig | None,
    checkpoints: Sequence[str],
    out: Path | None = None,
    overrides: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> Path:
    """Evaluate each checkpoint on the fixed probe set (eval mode, no grad) and write one trace step
    per checkpoint at its global step (0 for a pretrained model); returns the store path."""
    from vaedyn_cli import model as model_mod

    if not checkpoints:
        raise VaedynError("no checkpoint given: pass --checkpoint CKPT (a run folder, step folder, diffusers folder or hub id)")
    ckpts = [model_mod.resolve_checkpoint(src) for src in _expand(checkpoints)]
    ckpts.sort(key=lambda c: c.step)
    for a, b in zip(ckpts, ckpts[1:], strict=False):
        if a.step == b.step:
            raise VaedynError(f"two checkpoints at step {a.step} ({a.source}, {b.source}): a trace has one entry per step")
    _check_same_architecture(ckpts)
    cfg = _resolve_config(cfg, overrides, ckpts)
    out = Path(out) if out is not None else _default_out(ckpts)
    _check_out(out)
    batch = load_probe_batch(cfg)
    dev = torch.device(device) if device is not None else _device()
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    writer: TraceWriter | None = None
    try:
        for ckpt in ckpts:
            log.info("tracking %s (step %d)", ckpt.source, ckpt.step)
            model = ckpt.load().to(dev)
            probes = ChannelProbes(model, cfg.track)
            if writer is None:
                layout = probes.layout
                attrs = store_mod.store_attrs("track", cfg.run_name, cfg.to_json(), _model_config_json(model))
                attrs["checkpoints"] = json.dumps([{"source": c.source, "step": c.step} for c in ckpts])
                attrs["probe"] = json.dumps(
                    {"split": probe_split(cfg), "samples": int(batch.shape[0]), "dataset": cfg.data.dataset_name}
                )
                writer = TraceWriter(tmp, layout, attrs, mode="w", chunk_steps=cfg.track.chunk_steps)
            elif probes.layout != writer.layout:
                raise VaedynError(
                    f"checkpoint {ckpt.source} has another architecture than {ckpts[0].source}; track them into separate stores"
                )
            probes.reset()
            probes.capture_params()
            probes.arm()
            try:
                run_probe(model, batch, cfg.data.validation_batch_size)
            finally:
                probes.disarm()
            probes.finish()
            writer.append(probes.snapshot(ckpt.step).resolve())
            del model, probes
        assert writer is not None
        writer.close()
        writer = None
        artifacts.replace_dir(tmp, out)
    finally:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return out
