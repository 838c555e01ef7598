"""Interventions on GroupNorm channels: the strategy registry and `apply`, the plumbing they share.

A strategy is a small function registered by name (`@strategy`). It receives a `Site` (one
target channel of a live model) and the config's `nudge` section, and edits parameter slices
through `Site.update`, which records one event per touched slice. A strategy's formula is evaluated
in float64 and rounded once, to the parameter's dtype (as the original study's Python-float
arithmetic: gamma * factor is not rounded to float32 step by step). `apply` checks the targets,
snapshots layer statistics before any change, runs the strategy per channel in module order and,
given an optimizer, zeroes the Adam moments of exactly the touched slices. What a channel's
incoming filter and readers are comes from `vaedyn_cli.anatomy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vaedyn_cli import anatomy
from vaedyn_cli.config import NudgeConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.randomness import channel_generator
from vaedyn_cli.selection import Target

Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class Wiring:
    """Module paths of the incoming filter's layer (None when not unique) and of the layers reading it."""

    producer: str | None
    consumers: tuple[str, ...]


def channel_wiring(model: nn.Module) -> dict[str, Wiring]:
    """Producer and readers of every GroupNorm of the model, in module order (see `vaedyn_cli.anatomy`)."""
    return {name: Wiring(anatomy.producer(model, name), anatomy.readers(model, name))
            for name, _ in anatomy.groupnorm_layers(model)}


def _slice_label(name: str, index: Index, ndim: int) -> str:
    """`norm2.weight` for a scalar, `conv1.weight[3]` for a filter, `conv2.weight[:, 3]` for input columns."""
    if ndim == 1 and len(index) == 1:
        return name
    parts = [":" if isinstance(i, slice) else str(i) for i in index]
    return f"{name}[{', '.join(parts)}]"


@dataclass
class Site:
    """One target channel of a live model; strategies edit it through `update`, which records events."""

    layer: str
    index: int
    wiring: Wiring
    layer_gamma: torch.Tensor  # the layer's gamma before any change of this `apply` call
    generator: torch.Generator  # seeded per (seed, step, layer, channel)
    strategy: str
    step: int
    params: dict[str, nn.Parameter]
    events: list[dict[str, Any]] = field(default_factory=list)
    touched: list[tuple[nn.Parameter, Index]] = field(default_factory=list)

    @property
    def gamma(self) -> str:
        return f"{self.layer}.weight"

    @property
    def beta(self) -> str:
        return f"{self.layer}.bias"

    def incoming(self) -> list[tuple[str, Index]]:
        """The producer's filter of this channel (weight[c] and bias[c]); empty when not unique."""
        if self.wiring.producer is None:
            return []
        names = [f"{self.wiring.producer}.weight", f"{self.wiring.producer}.bias"]
        return [(n, (self.index,)) for n in names if n in self.params]

    def outgoing(self) -> list[tuple[str, Index]]:
        """The consumers' weights reading this channel (weight[:, c])."""
        return [(f"{c}.weight", (slice(None), self.index)) for c in self.wiring.consumers]

    def init_bound(self) -> float:
        """PyTorch's default init of the producer, U(-b, b) with b = 1/sqrt(fan_in), for weight and bias
        alike (kaiming_uniform with a=sqrt(5) reduces to this bound)."""
        assert self.wiring.producer is not None
        weight = self.params[f"{self.wiring.producer}.weight"]
        return 1.0 / math.sqrt(weight[0].numel())

    def update(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], index: Index | None = None) -> None:
        """Replace param[index] (default: this channel's element) by fn(old); record the event.

        `fn` gets the old values in float64 (exact) and should compute in float64; its result is
        rounded once, to the parameter's dtype."""
        index = (self.index,) if index is None else index
        param = self.params[name]
        with torch.no_grad():
            old = param[index].detach().to(device="cpu", dtype=torch.float64)
            new = fn(old.clone())
            param[index] = new.to(device=param.device, dtype=param.dtype)
            after = param[index].detach().to(device="cpu", dtype=torch.float64)
        scalar = old.ndim == 0
        self.events.append(
            {
                "step": int(self.step),
                "layer": self.layer,
                "channel_index": int(self.index),
                "strategy": self.strategy,
                "param": _slice_label(name, index, param.ndim),
                "before": float(old) if scalar else float(old.norm()),
                "after": float(after) if scalar else float(after.norm()),
            }
        )
        self.touched.append((param, index))


StrategyFn = Callable[[Site, NudgeConfig], None]


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: StrategyFn
    params: tuple[str, ...]  # NudgeConfig fields it reads (recorded in nudge.json)
    random: bool  # draws from the seeded generator
    needs_affine: bool


STRATEGIES: dict[str, Strategy] = {}


def strategy(
    name: str, params: Sequence[str] = (), random: bool = False, needs_affine: bool = True
) -> Callable[[StrategyFn], StrategyFn]:
    """Register a strategy under `name` (also list it in NudgeConfig.strategy)."""

    def register(fn: StrategyFn) -> StrategyFn:
        STRATEGIES[name] = Strategy(name, fn, tuple(params), random, needs_affine)
        return fn

    return register


def _uniform(shape: torch.Size, bound: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


def _normal(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32, generator=gen)


@strategy("gn_scale_nudge", params=("factor", "max_scale"))
def gn_scale_nudge(site: Site, cfg: NudgeConfig) -> None:
    """The gentle nudge: gamma <- min(gamma * factor, max_scale), in float64 and rounded once (the
    original's arithmetic, bit for bit). Being a product, gamma = 0 stays 0 and a negative gamma grows
    in magnitude; a gamma above max_scale is lowered to it."""
    site.update(site.gamma, lambda g: torch.clamp(g * cfg.factor, max=cfg.max_scale))


@strategy("gn_scale_reset")
def gn_scale_reset(site: Site, cfg: NudgeConfig) -> None:
    """Reset: gamma <- 1."""
    site.update(site.gamma, torch.ones_like)


@strategy("gn_scale_to_layer")
def gn_scale_to_layer(site: Site, cfg: NudgeConfig) -> None:
    """gamma <- median |gamma| of its layer (before this nudge), keeping gamma's sign (0 counts as +)."""
    median = float(site.layer_gamma.abs().double().quantile(0.5))
    site.update(site.gamma, lambda g: torch.where(g < 0, -median, median))


@strategy("redo", random=True)
def redo(site: Site, cfg: NudgeConfig) -> None:
    """ReDo (Sokar et al. 2023) for GroupNorm: re-draw the incoming filter with the producer's default
    init, zero the consumers' weights reading the channel, gamma <- 1, beta <- 0."""
    for name, index in site.incoming():
        site.update(name, lambda t: _uniform(t.shape, site.init_bound(), site.generator), index)
    for name, index in site.outgoing():
        site.update(name, torch.zeros_like, index)
    site.update(site.gamma, torch.ones_like)
    site.update(site.beta, torch.zeros_like)


@strategy("shrink_perturb", params=("shrink", "perturb_std"), random=True)
def shrink_perturb(site: Site, cfg: NudgeConfig) -> None:
    """Shrink and perturb (Ash & Adams 2020) on the channel's own parameters: theta <- shrink * theta +
    perturb_std * N(0, 1), for gamma, beta and the incoming filter where it is unique (the float32 draw
    enters the float64 formula, which is rounded once)."""
    for name, index in [(site.gamma, None), (site.beta, None), *site.incoming()]:
        site.update(name, lambda t: cfg.shrink * t + cfg.perturb_std * _normal(t.shape, site.generator).double(),
                    index)


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        import difflib

        close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise VaedynError(f"unknown nudge strategy '{name}': {hint}choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]



def check_targets_fit(model: nn.Module, targets: Iterable[Target], where: str = "targets") -> None:
    """Every target names a GroupNorm of the model and a channel inside it."""
    counts = anatomy.channel_counts(model)
    for t in targets:
        n = counts.get(t.layer)
        if n is None:
            raise VaedynError(
                f"{where}: unknown layer '{t.layer}' (not a GroupNorm of this model); "
                "classify a trace recorded from this model"
            )
        if not 0 <= t.channel_index < n:
            raise VaedynError(
                f"{where}: channel_index {t.channel_index} is out of range for {t.layer} "
                f"({n} channels); classify a trace recorded from this model"
            )


def reset_moments(optimizer: torch.optim.Optimizer, touched: Iterable[tuple[nn.Parameter, Index]]) -> None:
    """Zero Adam's moments (exp_avg, exp_avg_sq, max_exp_avg_sq) of the given slices."""
    for param, index in touched:
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            moment = state.get(key)
            if torch.is_tensor(moment) and moment.shape == param.shape:
                moment[index] = 0


def apply(
    model: nn.Module,
    targets: Sequence[Target],
    strategy: str,
    cfg: NudgeConfig,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Nudge `targets` of `model` in place with `strategy`; returns one event per touched parameter slice.

    Given an optimizer and cfg.reset_optimizer_state, the Adam moments of exactly the touched slices
    are zeroed. Random strategies draw from a generator seeded by (seed, step, layer, channel).
    """
    spec = get_strategy(strategy)
    check_targets_fit(model, targets)
    modules = dict(model.named_modules())
    if spec.needs_affine:
        for layer in {t.layer for t in targets}:
            if modules[layer].weight is None:
                raise VaedynError(f"layer {layer} has no affine gamma/beta: strategy {strategy} cannot act on it")
    wiring = channel_wiring(model) if targets else {}
    params = dict(model.named_parameters())
    gammas = {
        t.layer: modules[t.layer].weight.detach().float().cpu().clone()
        for t in targets
        if modules[t.layer].weight is not None
    }
    order = {name: i for i, name in enumerate(modules)}
    events: list[dict[str, Any]] = []
    touched: list[tuple[nn.Parameter, Index]] = []
    for t in sorted(targets, key=lambda t: (order[t.layer], t.channel_index)):
        site = Site(
            layer=t.layer,
            index=t.channel_index,
            wiring=wiring[t.layer],
            layer_gamma=gammas.get(t.layer, torch.ones(0)),
            generator=channel_generator(seed, step, t.layer, t.channel_index),
            strategy=strategy,
            step=step,
            params=params,
        )
        spec.fn(site, cfg)
        events.extend(site.events)
        touched.extend(site.touched)
    if optimizer is not None and cfg.reset_optimizer_state:
        reset_moments(optimizer, touched)
    return events

