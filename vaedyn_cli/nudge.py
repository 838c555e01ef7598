"""Interventions that wake inactive GroupNorm channels: strategies, target selection, offline nudge.

A strategy is a small function registered by name (`@strategy`). It receives a `Site` (one
target channel of a live model) and the config's `nudge` section, and edits parameter slices
through `Site.update`, which records one event per touched slice. `apply` is the plumbing shared
by the offline command and the in-training nudge: it checks the targets, snapshots layer
statistics before any change, runs the strategy per channel in module order and, given an
optimizer, zeroes the Adam moments of exactly the touched slices. `TrainingNudge` is the
in-training form (a TrainHook after the tracker: classify the live trace's recent window, select,
apply, record events); `store_classification` gives the labels of a store to `vaedyn eval --ablate`.

Wiring of a GroupNorm channel c (what `redo` and `shrink_perturb` touch besides gamma and beta):

- incoming filter (producer): the conv/linear whose output tensor is the very tensor the norm
  reads, found by an 8x8 forward pass with hooks through a weightless (meta-device) twin of the
  model. In the SDXL VAE: `norm2` <- `conv1` of its resnet; the first `norm1` after `conv_in`,
  a downsampler or an upsampler <- that conv. Every other norm reads a residual sum (or, for
  attention, a reshaped view of one): no unique producer, so no filter is re-drawn or perturbed.
  The filter is `weight[c]` and `bias[c]`.
- outgoing weights (consumers), by the diffusers block layout: `norm1` -> `conv1`, `norm2` ->
  `conv2`, `conv_norm_out` -> `conv_out`, attention `group_norm` -> `to_q`, `to_k`, `to_v`;
  the slice is `weight[:, c]`.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
import shutil
import sys
import tempfile
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaedyn_cli import artifacts
from vaedyn_cli.config import NudgeConfig, RunConfig, apply_overrides, read_yaml, validate_config
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.train import TrainHook

log = logging.getLogger(__name__)

Index = tuple[int | slice, ...]

# ---------------------------------------------------------------------------------------------
# wiring: which parameters read or write a GroupNorm channel

_CONSUMERS = {
    "norm1": ("conv1",),
    "norm2": ("conv2",),
    "conv_norm_out": ("conv_out",),
    "group_norm": ("to_q", "to_k", "to_v"),
}


@dataclass(frozen=True)
class Wiring:
    """Module paths of the incoming filter's layer (None when not unique) and of the layers reading it."""

    producer: str | None
    consumers: tuple[str, ...]


_WIRING_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, Wiring]] = weakref.WeakKeyDictionary()


def _trace_producers(model: nn.Module) -> dict[str, str | None]:
    """For each GroupNorm of a meta-device model, the conv/linear whose output tensor it reads directly."""
    outputs: dict[int, str] = {}
    found: dict[str, str | None] = {}
    alive: list[torch.Tensor] = []  # keeps tensors alive so that their ids stay unique

    def on_output(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
            outputs[id(output)] = name
            alive.append(output)

        return hook

    def on_input(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            found[name] = outputs.get(id(args[0]))
            alive.append(args[0])

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(on_output(name)))
        elif isinstance(module, nn.GroupNorm):
            handles.append(module.register_forward_pre_hook(on_input(name)))
    in_channels = getattr(getattr(model, "config", None), "in_channels", 3)
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, 8, 8, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return found


def _meta_twin(model: nn.Module) -> nn.Module:
    """The same architecture without weights: tracing it costs nothing and fires none of the model's hooks."""
    if hasattr(model, "config") and hasattr(type(model), "from_config"):
        with torch.device("meta"):
            return type(model).from_config(model.config)
    return copy.deepcopy(model).to("meta")


def channel_wiring(model: nn.Module) -> dict[str, Wiring]:
    """Producer and consumers of every GroupNorm of the model (see the module docstring); cached per model."""
    cached = _WIRING_CACHE.get(model)
    if cached is not None:
        return cached
    modules = dict(model.named_modules())
    producers = _trace_producers(_meta_twin(model))
    wiring = {}
    for name, norm in modules.items():
        if not isinstance(norm, nn.GroupNorm):
            continue
        parent, _, leaf = name.rpartition(".")
        producer = producers.get(name)
        if producer is not None and modules[producer].weight.shape[0] != norm.num_channels:
            producer = None
        consumers = tuple(
            f"{parent}.{c}" if parent else c
            for c in _CONSUMERS.get(leaf, ())
            if (f"{parent}.{c}" if parent else c) in modules
        )
        wiring[name] = Wiring(producer, consumers)
    _WIRING_CACHE[model] = wiring
    return wiring


# ---------------------------------------------------------------------------------------------
# sites and the strategy registry


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
        """Replace param[index] (default: this channel's element) by fn(old), in float32; record the event."""
        index = (self.index,) if index is None else index
        param = self.params[name]
        with torch.no_grad():
            old = param[index].detach().float().cpu().clone()
            new = fn(old.clone()).to(torch.float32)
            param[index] = new.to(device=param.device, dtype=param.dtype)
            after = param[index].detach().float().cpu()
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
    """The original gentle nudge, exactly: gamma <- min(gamma * factor, max_scale). Being a product,
    gamma = 0 stays 0 and a negative gamma grows in magnitude; a gamma above max_scale is lowered to it."""
    site.update(site.gamma, lambda g: torch.clamp(g * cfg.factor, max=cfg.max_scale))


@strategy("gn_scale_reset")
def gn_scale_reset(site: Site, cfg: NudgeConfig) -> None:
    """The original reset: gamma <- 1."""
    site.update(site.gamma, torch.ones_like)


@strategy("gn_scale_to_layer")
def gn_scale_to_layer(site: Site, cfg: NudgeConfig) -> None:
    """gamma <- median |gamma| of its layer (before this nudge), keeping gamma's sign (0 counts as +)."""
    median = float(site.layer_gamma.abs().float().quantile(0.5))
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
    perturb_std * N(0, 1), for gamma, beta and the incoming filter where it is unique."""
    for name, index in [(site.gamma, None), (site.beta, None), *site.incoming()]:
        site.update(name, lambda t: cfg.shrink * t + cfg.perturb_std * _normal(t.shape, site.generator), index)


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        import difflib

        close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise VaedynError(f"unknown nudge strategy '{name}': {hint}choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


# ---------------------------------------------------------------------------------------------
# apply


@dataclass(frozen=True)
class Target:
    """One channel to nudge; `score` orders channels when a layer is capped (lowest first)."""

    layer: str
    channel_index: int
    score: float | None = None


def _generator(seed: int, step: int, layer: str, index: int) -> torch.Generator:
    """A generator per channel, so that a channel's draw does not depend on which others are nudged."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step, zlib.crc32(layer.encode()), index])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))


def check_targets_fit(model: nn.Module, targets: Iterable[Target], where: str = "targets") -> None:
    """Every target names a GroupNorm of the model and a channel inside it."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    for t in targets:
        norm = norms.get(t.layer)
        if norm is None:
            raise VaedynError(
                f"{where}: unknown layer '{t.layer}' (not a GroupNorm of this model); "
                "classify a trace recorded from this model"
            )
        if not 0 <= t.channel_index < norm.num_channels:
            raise VaedynError(
                f"{where}: channel_index {t.channel_index} is out of range for {t.layer} "
                f"({norm.num_channels} channels); classify a trace recorded from this model"
            )


def reset_moments(optimizer: torch.optim.Optimizer, touched: Iterable[tuple[nn.Parameter, Index]]) -> int:
    """Zero Adam's moments (exp_avg, exp_avg_sq, max_exp_avg_sq) of the given slices; returns how many."""
    count = 0
    for param, index in touched:
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            moment = state.get(key)
            if torch.is_tensor(moment) and moment.shape == param.shape:
                moment[index] = 0
                count += 1
    return count


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
            generator=_generator(seed, step, t.layer, t.channel_index),
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


# ---------------------------------------------------------------------------------------------
# targets: the classify JSON, --select filters, the per-layer cap

CHANNEL_FIELDS = (
    "layer", "channel_index", "part", "state", "trajectory", "mechanism", "unused", "input_collapsed",
    "score", "onset_step", "revival_step", "n_transitions",
)
VOCABULARY = {
    "part": ("encoder", "decoder"),
    "state": ("active", "dormant", "dead"),
    "trajectory": ("active", "born_dormant", "died", "revived", "intermittent"),
    "mechanism": ("gn_scale", "saturated", "input_collapse", "other", "null"),
    "unused": ("true", "false"),
    "input_collapsed": ("true", "false"),
}


def _as_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Selector:
    """`field=a,b` (any alternative matches; globs allowed) or `field!=a,b` (none matches)."""

    field: str
    patterns: tuple[str, ...]
    negate: bool

    def matches(self, record: dict[str, Any]) -> bool:
        text = _as_text(record.get(self.field))
        hit = any(fnmatch.fnmatchcase(text, p) for p in self.patterns)
        return hit != self.negate


def parse_select(exprs: Sequence[str]) -> list[Selector]:
    """Parse `--select` expressions; unknown fields and impossible values are errors."""
    selectors = []
    for expr in exprs:
        key, sep, value = expr.partition("=")
        negate = key.endswith("!")
        key = key.removesuffix("!").strip()
        if not sep or not key or not value.strip():
            raise VaedynError(
                f"--select {expr!r}: expected FIELD=VALUE (or FIELD!=VALUE), e.g. mechanism=gn_scale, "
                "layer=decoder.*, state=dormant,dead"
            )
        if key not in CHANNEL_FIELDS:
            raise VaedynError(f"--select {expr!r}: unknown field '{key}'; fields: {', '.join(CHANNEL_FIELDS)}")
        patterns = tuple(p.strip() for p in value.split(","))
        for p in patterns:
            vocab = VOCABULARY.get(key)
            if vocab and not any(ch in p for ch in "*?[") and p.lower() not in vocab:
                raise VaedynError(f"--select {expr!r}: '{p}' is not a value of {key}; values: {', '.join(vocab)}")
        patterns = tuple(p.lower() if key in VOCABULARY else p for p in patterns)
        selectors.append(Selector(key, patterns, negate))
    return selectors


def _priority(record: dict[str, Any]) -> tuple[bool, float, int]:
    score = record.get("score")
    missing = not isinstance(score, int | float) or isinstance(score, bool) or math.isnan(score)
    return (missing, 0.0 if missing else float(score), int(record["channel_index"]))


def select_targets(
    channels: Sequence[dict[str, Any]],
    select: Sequence[str],
    max_fraction: float,
    layer_sizes: dict[str, int],
) -> list[Target]:
    """Channel records that match every selector, at most floor(max_fraction * channels) per layer,
    lowest score first; returned in layer order (of `layer_sizes`), then channel index."""
    selectors = parse_select(select)
    chosen: dict[str, list[dict[str, Any]]] = {}
    for rec in channels:
        if all(s.matches(rec) for s in selectors):
            chosen.setdefault(rec["layer"], []).append(rec)
    targets = []
    for layer, size in layer_sizes.items():
        cap = math.floor(max_fraction * size + 1e-9)
        kept = sorted(chosen.get(layer, []), key=_priority)[:cap]
        for rec in sorted(kept, key=lambda r: int(r["channel_index"])):
            score = None if _priority(rec)[0] else float(rec["score"])
            targets.append(Target(layer, int(rec["channel_index"]), score))
    return targets


def parse_classification(text: str, where: str) -> dict[str, Any]:
    """The classify JSON, checked for the fields nudge needs (layers map, channel records)."""
    hint = "pass the output of `vaedyn classify STORE --format json`"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise VaedynError(f"targets {where} are not valid JSON (line {e.lineno}, column {e.colno}); {hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict) or not isinstance(
        data.get("channels"), list
    ):
        raise VaedynError(f"targets {where} lack a 'layers' mapping and a 'channels' list; {hint}")
    for layer, n in data["layers"].items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise VaedynError(f"targets {where}: layers['{layer}'] must be a channel count, got {n!r}; {hint}")
    seen = set()
    for i, rec in enumerate(data["channels"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("layer"), str):
            raise VaedynError(f"targets {where}: channels[{i}] has no 'layer' string; {hint}")
        idx = rec.get("channel_index")
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise VaedynError(f"targets {where}: channels[{i}] has no integer 'channel_index'; {hint}")
        if (rec["layer"], idx) in seen:
            raise VaedynError(f"targets {where}: channel {rec['layer']}[{idx}] is listed twice; {hint}")
        seen.add((rec["layer"], idx))
    return data


def check_classification_fits(data: dict[str, Any], model: nn.Module, where: str, model_name: str) -> None:
    """The classification was made on this architecture: same GroupNorms, same channel counts, indices in range."""
    norms = {n: m.num_channels for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    layers: dict[str, int] = data["layers"]
    fix = "classify a trace recorded from this model"
    if layers and not set(layers) & set(norms):
        raise VaedynError(
            f"targets {where} come from another architecture: none of their {len(layers)} layers is a "
            f"GroupNorm of {model_name} (e.g. '{next(iter(layers))}'); {fix}"
        )
    for layer, n in layers.items():
        if layer not in norms:
            raise VaedynError(f"targets {where}: unknown layer '{layer}' (not a GroupNorm of {model_name}); {fix}")
        if n != norms[layer]:
            raise VaedynError(
                f"targets {where} come from another architecture: {layer} has {n} channels there and "
                f"{norms[layer]} in {model_name}; {fix}"
            )
    for i, rec in enumerate(data["channels"]):
        layer, idx = rec["layer"], rec["channel_index"]
        if layer not in layers:
            raise VaedynError(f"targets {where}: channels[{i}] names layer '{layer}', absent from 'layers'; {fix}")
        if not 0 <= idx < layers[layer]:
            raise VaedynError(
                f"targets {where}: channels[{i}] has channel_index {idx}, out of range for {layer} "
                f"({layers[layer]} channels); {fix}"
            )


def store_classification(store: str | Path) -> dict[str, Any]:
    """The classify JSON (as `vaedyn classify --format json` prints it) of a trace store or run folder:
    its `classification` group when `vaedyn classify` wrote one, else classified in memory with the
    store's own classify settings (nothing is written)."""
    from vaedyn_cli import classify
    from vaedyn_cli import store as store_mod

    path = store_mod.resolve_store_path(str(store))
    group = classify.read_classification(path)
    if group is None:
        log.info("%s has no classification group: classifying it in memory with its stored settings", path)
        return classify.to_json(classify.classify_store(path, write=False), path)
    trace = store_mod.open_trace(path)
    keep = np.flatnonzero(np.asarray(group["classified"].values, dtype=bool))
    coords = {k: ("channel", np.asarray(trace[k].values)[keep]) for k in ("layer", "channel_index", "part")}
    labels = group.isel(channel=keep).assign_coords(coords)
    return classify.to_json(labels, path)


# ---------------------------------------------------------------------------------------------
# during training: a TrainHook that runs right after the tracker


class TrainingNudge(TrainHook):
    """Every `nudge.every` steps: classify the last `nudge.window` tracked steps of the live trace
    with `classify_trace` and the config's classify section (exactly what `vaedyn classify
    --from-step A --to-step B` gives on the store), select targets with `nudge.select` and
    `nudge.max_fraction`, apply the strategy in place to the unwrapped model, zero the Adam moments
    of the touched slices (`nudge.reset_optimizer_state`), and record the events in the store's
    `events` group and as `nudge/n_targets`, `nudge/n_events` scalars.

    The window comes from the tracker writer's recent records (cast to the store's dtypes, so the
    numbers equal the store's), or from the store itself when a resumed run has fewer recent
    records than the window. Random strategies draw from generators seeded by (seed, step, layer,
    channel) and the optimizer state is checkpointed, so a resumed run repeats an uninterrupted one.
    Under several processes the main process classifies (its tracker holds the all-reduced
    statistics) and broadcasts the targets; every process applies them; the main one records.
    """

    def __init__(self, ctx: Any, tracker: Any):
        from vaedyn_cli import store as store_mod

        self.cfg: RunConfig = ctx.cfg
        self.acc = ctx.accelerator
        self.model = self.acc.unwrap_model(ctx.model)
        self.optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)  # the torch optimizer under accelerate
        self.tracker = tracker
        self.spec = get_strategy(self.cfg.nudge.strategy)
        parse_select(self.cfg.nudge.select)
        self.sizes = {n: m.num_channels for n, m in self.model.named_modules() if isinstance(m, nn.GroupNorm)}
        self.main = bool(self.acc.is_main_process)
        writer = tracker.writer
        self.attrs = store_mod.check_store(writer.path) if self.main and writer is not None else {}

    def end_step(self, step: int, scalars: Any) -> None:
        if step % self.cfg.nudge.every:
            return
        targets = self._share(self.targets(step) if self.main else None)
        events = apply(
            self.model, targets, self.spec.name, self.cfg.nudge, optimizer=self.optimizer, step=step, seed=self.cfg.seed
        )
        if self.main and self.tracker.writer is not None:
            self.tracker.writer.add_events(events)
        self.acc.log({"nudge/n_targets": len(targets), "nudge/n_events": len(events)}, step=step)
        if self.main:
            log.info("step %d: %s on %d channels in %d layers (%d parameter slices)", step, self.spec.name,
                     len(targets), len({t.layer for t in targets}), len(events))

    def window(self, step: int) -> Any:
        """The last nudge.window tracked steps up to `step` as an in-memory trace Dataset (main process)."""
        from vaedyn_cli import store as store_mod

        writer = self.tracker.writer
        if writer is None:
            raise RuntimeError("the tracker's trace writer is closed")
        writer.flush()  # the writer thread has turned every queued step into a record
        n = self.cfg.nudge.window
        recent = [r for r in writer.recent() if r.step <= step][-n:]
        if len(recent) < n and writer.committed_steps > len(recent):  # resumed: older steps are in the store only
            trace = store_mod.open_trace(writer.path)
            hi = int(np.searchsorted(np.asarray(trace["step"].values), step, side="right"))
            return trace.isel(step=slice(max(0, hi - n), hi)).load()
        return store_mod.records_to_dataset(recent, writer.layout, self.attrs)

    def targets(self, step: int) -> list[Target]:
        """Classify the window and select the channels to nudge (main process)."""
        from vaedyn_cli.classify import classify_trace, to_records

        labels = classify_trace(self.window(step), self.cfg.classify)
        layers = {name: self.sizes[name] for name in dict.fromkeys(labels["layer"].values.tolist())}
        return select_targets(to_records(labels), self.cfg.nudge.select, self.cfg.nudge.max_fraction, layers)

    def _share(self, targets: list[Target] | None) -> list[Target]:
        """The main process's targets on every process."""
        if int(self.acc.num_processes) <= 1:
            return targets or []
        from accelerate.utils import broadcast_object_list

        box = [[(t.layer, t.channel_index, t.score) for t in targets] if targets is not None else None]
        broadcast_object_list(box, from_process=0)
        return [Target(*t) for t in box[0] or []]


def make_training_nudge(ctx: Any) -> TrainingNudge | None:
    """HOOK_FACTORIES entry: a TrainingNudge when nudge.enabled (it reads the tracker built before it)."""
    if not ctx.cfg.nudge.enabled:
        return None
    from vaedyn_cli.track import Tracker

    tracker = next((h for h in getattr(ctx, "hooks", []) if isinstance(h, Tracker)), None)
    if tracker is None:
        raise VaedynError("nudge.enabled needs the live trace: set track.enabled=true (in-training nudges classify it)")
    return TrainingNudge(ctx, tracker)


# ---------------------------------------------------------------------------------------------
# offline: checkpoint -> nudged diffusers folder


def _read_targets_text(targets: str | Path) -> tuple[str, str]:
    if str(targets) == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise VaedynError("no targets on stdin; pipe in `vaedyn classify STORE --format json`")
        return text, "from stdin"
    path = Path(targets)
    if not path.is_file():
        raise VaedynError(f"targets file {path} not found; write it with `vaedyn classify STORE --format json > FILE`")
    return path.read_text(), str(path)


def resolve_config(
    stored: RunConfig | None, config_path: Path | None, overrides: Sequence[str], nudge_options: dict[str, Any]
) -> RunConfig:
    """-c FILE (else the checkpoint's stored config, else defaults), then --set, then the command's options."""
    if config_path is not None:
        data, where = read_yaml(Path(config_path)), f"in {config_path}"
    elif stored is not None:
        data, where = stored.model_dump(mode="json"), "stored with the checkpoint"
    else:
        data, where = {}, "(defaults)"
    apply_overrides(data, list(overrides))
    given = {k: v for k, v in nudge_options.items() if v is not None}
    if given:
        node = data.get("nudge")
        data["nudge"] = {**(node if isinstance(node, dict) else {}), **given}
    return validate_config(data, where)


def default_out(ckpt: Any, strategy: str) -> Path:
    """<run>/nudged-<strategy> inside a run, else <checkpoint>-nudged-<strategy> beside it."""
    name = f"nudged-{strategy}"
    if ckpt.run_dir is not None:
        return Path(ckpt.run_dir) / name
    if ckpt.path is not None:
        base = Path(ckpt.path)
        stem = base.stem if base.is_file() else base.name
        return base.parent / f"{stem}-{name}"
    return Path(f"{ckpt.source.replace('/', '--')}-{name}")


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise VaedynError(f"output {out} already exists; pass --overwrite to replace it or choose --out")
    if not out.is_dir() or (any(out.iterdir()) and not (out / artifacts.NUDGE_FILE).is_file()):
        raise VaedynError(
            f"output {out} exists and is not a nudged checkpoint (no {artifacts.NUDGE_FILE}); "
            "--overwrite only replaces folders written by `vaedyn nudge`: choose another --out"
        )


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Write into a temporary sibling folder, then swap it in (an existing output is replaced last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def nudge_checkpoint(
    checkpoint: str,
    targets: str | Path,
    *,
    out: Path | None = None,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    nudge_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Nudge a checkpoint's target channels; writes a diffusers folder with nudge.json and returns its path.

    Everything is checked (checkpoint, targets, config, output) before anything is written.
    """
    from vaedyn_cli.model import resolve_checkpoint, save_model

    if (nudge_options or {}).get("strategy") is not None:
        get_strategy(nudge_options["strategy"])  # a did-you-mean answer before pydantic's
    # Targets first: in `vaedyn train | vaedyn classify - | vaedyn nudge --checkpoint RUN --targets -`
    # the run folder exists only once stdin is complete.
    text, where = _read_targets_text(targets)
    ckpt = resolve_checkpoint(checkpoint)
    cfg = resolve_config(ckpt.config, config_path, overrides, nudge_options or {})
    spec = get_strategy(cfg.nudge.strategy)
    data = parse_classification(text, where)
    parse_select(cfg.nudge.select)
    out = Path(out) if out is not None else default_out(ckpt, spec.name)
    _check_out(out, overwrite)

    model = ckpt.load()
    check_classification_fits(data, model, where, f"checkpoint {checkpoint}")
    chosen = select_targets(data["channels"], cfg.nudge.select, cfg.nudge.max_fraction, data["layers"])
    if not chosen:
        log.warning("no channel matches --select %s: writing an unchanged copy", " ".join(cfg.nudge.select))
    events = apply(model, chosen, spec.name, cfg.nudge, step=ckpt.step, seed=cfg.seed)

    params: dict[str, Any] = {p: getattr(cfg.nudge, p) for p in spec.params}
    params["max_fraction"] = cfg.nudge.max_fraction
    if spec.random:
        params["seed"] = cfg.seed
    record = {
        "checkpoint": str(checkpoint),
        "step": ckpt.step,
        "strategy": spec.name,
        "params": params,
        "select": list(cfg.nudge.select),
        "classification": {k: data.get(k) for k in ("store", "method", "steps")},
        "n_targets": len(chosen),
        "events": events,
    }
    # The folder carries the config the weights came from; its nudge section says what was done.
    carried = ckpt.config.model_copy(update={"nudge": cfg.nudge}) if ckpt.config and config_path else cfg

    def write(folder: Path) -> None:
        save_model(model, folder, carried, step=ckpt.step)
        (folder / artifacts.NUDGE_FILE).write_text(json.dumps(record, indent=2) + "\n")

    _write_atomically(out, write)
    log.info(
        "%s: %d channels in %d layers, %d parameter slices -> %s",
        spec.name, len(chosen), len({t.layer for t in chosen}), len(events), out,
    )
    return out
