"""The VAE's anatomy: for a tracked layer, the activation that follows it, the module that
produces its input (its incoming filter), the modules whose weights read its channels, and how
many channels its input and output have.

Every stage that asks these questions (tracking, nudges, ablation, the lens, TensorBoard) asks
here. For diffusers' AutoencoderKL:

- activation: resnet `norm1` -> the resnet's `nonlinearity` -> `conv1`, `norm2` -> `nonlinearity`
  -> `conv2`; encoder/decoder `conv_norm_out` -> `conv_act` -> `conv_out`; attention `group_norm`
  has none (it feeds `to_q`/`to_k`/`to_v` directly). Any other module: the activation module
  (SiLU, ReLU, GELU, ...) whose input is the very tensor the module outputs, if one is (in the
  SDXL VAE no conv or linear has one).
- readers: `norm1` -> `conv1`, `norm2` -> `conv2`, `conv_norm_out` -> `conv_out`, `group_norm` ->
  `to_q`, `to_k`, `to_v`; a reader's slice for channel c is `weight[:, c]`. Any other module: the
  convs and linears whose input is its output tensor (or its activation's), e.g. `encoder.conv_out`
  -> `quant_conv`, a downsampler's conv -> the next block's `conv_shortcut`. The input channels of
  a conv or linear are read by the module itself.
- producer: the conv/linear whose output tensor is the very tensor the norm reads. In the SDXL VAE:
  `norm2` <- `conv1` of its resnet; the first `norm1` after `conv_in`, a downsampler or an upsampler
  <- that conv. Every other norm reads a residual sum (or, for attention, a reshaped view of one):
  no unique producer. The producer's slice for channel c is `weight[c]` and `bias[c]`. The output
  channel c of a conv or linear is produced by its own `weight[c]` (`incoming_filter`).
- channels: a module's tensors hold their channels along dim 1 (convs, norms, the blocks), a
  linear's along its last dim (it reads (batch, length, channels) in attention).

Everything traced is found by one 8x8 forward pass with hooks through a weightless (meta-device)
twin of the model in eval mode, cached per model.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PARTS = ("encoder", "decoder")
# Top-level modules outside the two parts, and the part whose side of the latent they are on.
_SIDE = {"quant_conv": "encoder", "post_quant_conv": "decoder"}
# The module names, next to a norm, of the layers reading its output.
_READERS = {
    "norm1": ("conv1",),
    "norm2": ("conv2",),
    "conv_norm_out": ("conv_out",),
    "group_norm": ("to_q", "to_k", "to_v"),
}
_ACTIVATIONS = (nn.SiLU, nn.ReLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


@dataclass(frozen=True)
class _Graph:
    """What the meta trace saw: per module its first input's and its output's channel counts (None
    when not a tensor of 2+ dims, or different between calls), the modules whose first input is
    its output tensor, and each norm's producer."""

    in_channels: dict[str, int | None]
    out_channels: dict[str, int | None]
    consumers: dict[str, tuple[str, ...]]
    producers: dict[str, str | None]


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, _Graph] = weakref.WeakKeyDictionary()


def channel_count(module: nn.Module) -> int | None:
    """Channels of a normalisation layer (None for a module that has no such count)."""
    for attr in ("num_channels", "num_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with per-channel input and output (GroupNorm, BatchNorm, InstanceNorm)."""
    return channel_count(module) is not None


def channel_last(module: nn.Module) -> bool:
    """Whether the module's tensors hold their channels along the last dim (a linear), not dim 1."""
    return isinstance(module, nn.Linear)


def captured_channels(model: nn.Module, name: str, capture: str = "output") -> int | None:
    """Channels of a module's output (or input): from its definition where it says (norms, convs,
    linears), else from the traced pass; None when the module has no such tensor."""
    module = model.get_submodule(name)
    count = channel_count(module)
    if count is not None:
        return count
    if isinstance(module, _WEIGHTED):
        attrs = ("out_channels", "out_features") if capture == "output" else ("in_channels", "in_features")
        for attr in attrs:
            if isinstance(getattr(module, attr, None), int):
                return int(getattr(module, attr))
    graph = _graph(model)
    return (graph.out_channels if capture == "output" else graph.in_channels).get(name)


def part_of(name: str) -> str:
    """`encoder` or `decoder`: the part a module path lies in (quant_conv with the encoder,
    post_quant_conv with the decoder)."""
    top = name.split(".", 1)[0]
    return _SIDE.get(top, top)


def _flow_key(name: str) -> tuple[int, ...]:
    """Where a module path sits in the forward pass of AutoencoderKL (unknown paths: last of their part)."""
    parts = name.split(".")
    part = PARTS.index(parts[0]) if parts[0] in PARTS else len(PARTS)
    # stage of the part: the encoder runs down blocks, then its mid block; the decoder its mid block, then up blocks
    stages = {"conv_in": 0, "down_blocks": 1, "mid_block": 2, "conv_norm_out": 4} if part == 0 else \
        {"conv_in": 0, "mid_block": 1, "up_blocks": 2, "conv_norm_out": 4}
    if len(parts) < 2 or parts[1] not in stages:
        return (part, 9)
    key = [part, stages[parts[1]]]
    rest = parts[2:]
    if parts[1] in ("down_blocks", "up_blocks") and rest and rest[0].isdigit():
        key.append(int(rest[0]))
        rest = rest[1:]
    if len(rest) >= 2 and rest[1].isdigit():
        # resnet i, then attention i (a mid block runs resnets.0, attentions.0, resnets.1), then samplers
        kind = {"resnets": 0, "attentions": 1}.get(rest[0], 2)
        key += [int(rest[1]), kind, {"norm1": 0, "norm2": 1}.get(rest[2] if len(rest) > 2 else "", 2)]
    return tuple(key)


def flow_order(names: list[str]) -> list[str]:
    """Module paths in the order data flows through them: encoder down blocks, encoder mid block, then
    the decoder's mid block before its up blocks (module registration puts up_blocks first), and in a mid
    block resnets.0, attentions.0, resnets.1. Equal keys (and unknown paths) keep their given order."""
    return sorted(names, key=_flow_key)  # sorted is stable


def short_layer(name: str) -> str:
    """`decoder.up_blocks.0.resnets.1.norm2` -> `up0.r1.norm2` (the part is shown elsewhere)."""
    s = name.split(".", 1)[1] if name.startswith(PARTS) and "." in name else name
    for a, b in (("down_blocks.", "down"), ("up_blocks.", "up"), ("mid_block.", "mid."), ("resnets.", "r"),
                 ("attentions.", "attn"), (".group_norm", ".gn")):
        s = s.replace(a, b)
    return s


def groupnorm_layers(model: nn.Module) -> list[tuple[str, nn.GroupNorm]]:
    """Every GroupNorm of the model in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Channel count of every GroupNorm, in module order."""
    return {n: m.num_channels for n, m in groupnorm_layers(model)}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def activation(model: nn.Module, name: str) -> nn.Module | None:
    """The nonlinearity applied to this layer's output (None where the output is read as it is)."""
    parent, leaf = _parent(model, name)
    if leaf in ("norm1", "norm2"):
        act = getattr(parent, "nonlinearity", None)
    elif leaf == "conv_norm_out":
        act = getattr(parent, "conv_act", None)
    elif leaf in _READERS or is_norm(model.get_submodule(name)):
        act = None
    else:
        act = _traced_activation(model, name)
    return act if isinstance(act, nn.Module) else None


def _traced_activation(model: nn.Module, name: str) -> nn.Module | None:
    for consumer in _graph(model).consumers.get(name, ()):
        module = model.get_submodule(consumer)
        if isinstance(module, _ACTIVATIONS):
            return module
    return None


def readers(model: nn.Module, name: str, capture: str = "output") -> tuple[str, ...]:
    """Module paths of the layers whose weights read this layer's output (or input) channels."""
    module = model.get_submodule(name)
    if capture == "input":
        return (name,) if isinstance(module, _WEIGHTED) else ()
    parent, leaf = _parent(model, name)
    if leaf in _READERS or is_norm(module):
        prefix = name.rpartition(".")[0]
        found = []
        for attr in _READERS.get(leaf, ()):
            if isinstance(getattr(parent, attr, None), nn.Module):
                found.append(f"{prefix}.{attr}" if prefix else attr)
        return tuple(found)
    graph = _graph(model)
    source = name
    act = _traced_activation(model, name)
    if act is not None:
        source = next(c for c in graph.consumers.get(name, ()) if model.get_submodule(c) is act)
    return tuple(c for c in graph.consumers.get(source, ()) if isinstance(model.get_submodule(c), _WEIGHTED))


def producer(model: nn.Module, name: str) -> str | None:
    """Module path of the conv/linear whose output this norm reads directly, with one filter per
    channel (None when the norm reads a residual sum or anything else)."""
    return _graph(model).producers.get(name)


def incoming_filter(model: nn.Module, name: str, capture: str = "output") -> str | None:
    """The conv/linear whose `weight[c]` makes channel c of the captured tensor: the module itself
    for a conv or linear's output, a norm's producer; None for an input or anything else."""
    if capture != "output":
        return None
    if isinstance(model.get_submodule(name), _WEIGHTED):
        return name
    return producer(model, name)


def _graph(model: nn.Module) -> _Graph:
    found = _GRAPHS.get(model)
    if found is None:
        found = _GRAPHS[model] = _trace(model)
    return found


def _channels_of(value: Any, last: bool) -> int | None:
    if not isinstance(value, torch.Tensor) or value.ndim < 2:
        return None
    return int(value.shape[-1] if last else value.shape[1])


def _trace(model: nn.Module) -> _Graph:
    """One pass through a meta twin in eval mode, every module hooked: which module first output
    each tensor, which modules took it as their first input, and the channel counts."""
    twin = _meta_twin(model).eval()
    made_by: dict[int, str] = {}  # tensor id -> the innermost module that output it (hooks fire inner first)
    alive: list[torch.Tensor] = []  # keeps tensors alive so that their ids stay unique
    inputs: dict[str, list[int]] = {}
    in_ch: dict[str, set[int | None]] = {}
    out_ch: dict[str, set[int | None]] = {}

    def on_input(name: str, last: bool) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            first = args[0] if args else None
            in_ch.setdefault(name, set()).add(_channels_of(first, last))
            if isinstance(first, torch.Tensor):
                inputs.setdefault(name, []).append(id(first))
                alive.append(first)

        return hook

    def on_output(name: str, last: bool) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            out_ch.setdefault(name, set()).add(_channels_of(output, last))
            if isinstance(output, torch.Tensor):
                made_by.setdefault(id(output), name)
                alive.append(output)

        return hook

    handles = []
    modules = dict(twin.named_modules())
    for name, module in modules.items():
        if not name:
            continue
        last = channel_last(module)
        handles.append(module.register_forward_pre_hook(on_input(name, last)))
        handles.append(module.register_forward_hook(on_output(name, last)))
    in_channels = getattr(getattr(twin, "config", None), "in_channels", 3)
    try:
        with torch.no_grad():
            twin(torch.zeros(1, in_channels, 8, 8, device="meta"))
    except Exception as e:  # noqa: BLE001 - not an image model: nothing traced, every traced answer is None
        log.debug("anatomy: the traced pass failed (%s: %s); no producers, consumers or traced widths",
                  type(e).__name__, e)
        return _Graph({}, {}, {}, {})
    finally:
        for h in handles:
            h.remove()
    consumers: dict[str, list[str]] = {}
    producers: dict[str, str | None] = {}
    for name, ids in inputs.items():
        for source in dict.fromkeys(made_by.get(i) for i in ids):
            if source is not None and source != name:
                consumers.setdefault(source, []).append(name)
        if isinstance(modules[name], nn.GroupNorm):
            # a producer must be a conv/linear with one output filter per channel of the norm
            prod = made_by.get(ids[0])
            ok = prod is not None and isinstance(modules[prod], nn.Conv2d | nn.Linear) and \
                modules[prod].weight.shape[0] == modules[name].num_channels
            producers[name] = prod if ok else None

    def single(counts: dict[str, set[int | None]]) -> dict[str, int | None]:
        return {k: next(iter(v)) if len(v) == 1 else None for k, v in counts.items()}

    return _Graph(single(in_ch), single(out_ch), {k: tuple(v) for k, v in consumers.items()}, producers)


def _meta_twin(model: nn.Module) -> nn.Module:
    """The same architecture without weights: tracing it costs nothing and fires none of the model's hooks."""
    if hasattr(model, "config") and hasattr(type(model), "from_config"):
        with torch.device("meta"):
            return type(model).from_config(model.config)
    return copy.deepcopy(model).to("meta")
