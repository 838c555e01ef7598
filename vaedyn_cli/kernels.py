"""The reductions behind the probes: per (sample, channel) moments, sums of |y|, weight statistics.

On GPU one kernel each (var_mean, vector_norm), no host sync. On CPU, where var_mean is slow,
with few kernels and no activation-sized temporary: every temporary lives in reused scratch
memory (`Scratch`), so a tracked step allocates nothing activation-sized (measured at width 1:
such allocations made glibc trim and re-fault about 120k pages per tracked step). Small tensors
are two-pass; large ones take the sum and the sum of squares of each row, with ill-conditioned
rows recomputed two-pass; rows are summed in the tensor's own memory layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vaedyn_cli.config import NearZeroConfig

log = logging.getLogger(__name__)

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
            return flat.as_strided(shape, stride) if dense(t) else flat.view(shape)

        return self._view((purpose, t.device, t.dtype, shape, stride), make)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def dense(t: torch.Tensor) -> bool:
    """Whether t's strides are a permutation of a contiguous layout (no gaps, no overlap)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


# Below this mean |w| a tensor counts as numerically zero, and its relative threshold as this value
# (the original project's rule): a tensor of zeros is all near zero, not none of it.
ZERO_MEAN = 1e-9


@torch.no_grad()
def near_zero_fractions(weights: Sequence[torch.Tensor], cfg: NearZeroConfig, scratch: Scratch | None = None) -> torch.Tensor:
    """Share of near-zero entries per tensor (float64), on the tensors' device (no sync).

    absolute: |w| < abs_threshold. percent_of_mean: |w| < rel_threshold * m with m = mean |w| (in the
    tensor's precision), where a tensor with m < ZERO_MEAN uses |w| < ZERO_MEAN instead (all zeros:
    1; the original project returned all-or-nothing there). both: both tests (AND). Every
    comparison strict, in the tensor's dtype: the threshold rel * m is formed in float64 and
    rounded once to it, as a Python-float threshold would be. (|w| is compared in place, 1/0, and
    counted: two passes fewer than a boolean mask; `both` takes one mask more.)"""
    scratch = scratch or Scratch()
    out = []
    for w in weights:
        a = torch.abs(w.detach(), out=scratch.take("work", w))
        if cfg.mode == "absolute":
            hit = a.lt_(cfg.abs_threshold)
        else:
            m = a.mean(dtype=a.dtype).to(torch.float64)
            rel = torch.where(m < ZERO_MEAN, ZERO_MEAN, m * cfg.rel_threshold)
            if cfg.mode == "percent_of_mean":
                hit = a.lt_(rel)
            else:
                hit = torch.lt(a, cfg.abs_threshold).logical_and_(a.lt_(rel))
        out.append(torch.count_nonzero(hit).to(torch.float64) / a.numel())
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(out)


@torch.no_grad()
def out_weight_norm(readers: Sequence[nn.Module], channels: int, scratch: Scratch | None = None) -> torch.Tensor | None:
    """Per input channel, the L2 norm of the readers' weights taken together (dim 1 of a conv or
    linear weight is its input channel); None without readers."""
    return _reader_sums(readers, channels, scratch, lambda w, out: torch.mul(w, w, out=out), torch.sqrt)


@torch.no_grad()
def out_weight_l1(readers: Sequence[nn.Module], channels: int, scratch: Scratch | None = None) -> torch.Tensor | None:
    """Per input channel, the L1 norm (sum of |w|) of the readers' weights taken together; None without readers."""
    return _reader_sums(readers, channels, scratch, lambda w, out: torch.abs(w, out=out), None)


def _reader_sums(readers: Sequence[nn.Module], channels: int, scratch: Scratch | None,
                 elementwise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 finish: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor | None:
    """Sum over the readers' weights of elementwise(w) per input channel: summed over the output
    channels first (the outer dimension, a vectorised reduction; a norm over dims (0, 2, 3) is 2.5x
    slower), the temporary in scratch."""
    scratch = scratch or Scratch()
    total = None
    for r in readers:
        w = getattr(r, "weight", None)
        if w is None or w.ndim < 2 or w.shape[1] != channels:
            return None
        w = w.detach() if w.dtype in (torch.float32, torch.float64) else w.detach().float()
        sq = elementwise(w, scratch.take("work", w)).reshape(w.shape[0], -1).sum(0)
        sq = sq.view(channels, -1).sum(1)
        total = sq if total is None else total + sq
    if total is None:
        return None
    return finish(total) if finish is not None else total


# ---------------------------------------------------------------------------------------------
# the probes


def per_sample_view(t: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """(B, C, ...) as (B, C, L): spatial positions (or the attention norm's length) flattened, in
    float32 or float64 (`exact`: always float64). Called under no_grad (hooks), so no detach is needed."""
    if exact:
        t = t.double()
    elif t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t if t.ndim == 3 else t.flatten(2)


def capture_view(t: torch.Tensor, last: bool, exact: bool = False) -> torch.Tensor:
    """A captured tensor as (B, C, L) like `per_sample_view`; `last`: its channels are its last dim
    (a linear's (B, ..., C)), viewed without a copy as a channels-last (B, C, L)."""
    if not last:
        return per_sample_view(t, exact)
    if exact:
        t = t.double()
    elif t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if t.ndim == 2:
        return t.unsqueeze(-1)
    return t.flatten(1, -2).transpose(1, 2)


def channels_last(t: torch.Tensor) -> bool:
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


def moments(t: torch.Tensor, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
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
    if not t.is_contiguous() and not channels_last(t):
        t = scratch.take("dense", t).copy_(t)
    s = t.sum(-1)
    if t.numel() > TWO_PASS_MAX_NUMEL:
        if t.is_contiguous():
            m2 = torch.linalg.vector_norm(t, 2, dim=-1).square_().addcmul_(s, s, value=-1 / n)
            idx = ill_conditioned(s, m2, n).view(-1).nonzero().squeeze(1)  # a host sync: free on CPU
            if idx.numel():  # those rows gathered into scratch, two-pass
                rows = t.view(-1, n)
                rows = torch.index_select(rows, 0, idx, out=scratch.take("work", rows, (idx.numel(), n)))
                rows.sub_(s.view(-1)[idx].div_(n).unsqueeze(1))
                m2.view(-1).index_copy_(0, idx, torch.linalg.vector_norm(rows, 2, dim=-1).square_())
            return s, m2
        tl = t.transpose(1, 2)  # contiguous (B, L, C)
        m2 = torch.mul(tl, tl, out=scratch.take("work", tl)).sum(1).addcmul_(s, s, value=-1 / n)
        if not bool(ill_conditioned(s, m2, n).any()):
            return s, m2
        # rare in large maps: all rows two-pass (gathering strided rows costs more than the pass)
    # the deviations from s / n (a constant row's mean exactly)
    if n & (n - 1) == 0:  # n a power of two, as spatial sizes are: 1 / n is exact, one kernel
        d = torch.sub(t, s.unsqueeze(-1), alpha=1 / n, out=scratch.like(t))
    else:
        d = torch.sub(t, s.div(n).unsqueeze(-1), out=scratch.like(t))
    return s, d.mul_(d).sum(-1)


def ill_conditioned(s: torch.Tensor, m2: torch.Tensor, n: int) -> torch.Tensor:
    """Rows with mean^2 >= ONE_PASS_MAX_MEAN_SQ_OVER_VAR * var (M2 <= s^2 / (k n))."""
    return torch.addcmul(m2, s, s, value=-1 / (ONE_PASS_MAX_MEAN_SQ_OVER_VAR * n)).le_(0)



def abs_sum(t: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """Per (sample, channel) sum of |t| (on CPU |t| in scratch, then summed: measured 3 to 8x faster
    than an L1 norm)."""
    if t.device.type == "cpu":
        return torch.abs(t, out=scratch.like(t)).sum(-1)
    return torch.linalg.vector_norm(t, ord=1, dim=-1)

