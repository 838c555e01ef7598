"""The VAE's anatomy: for a normalisation layer, the activation that follows it, the module that
produces its input (its incoming filter) and the modules whose weights read its channels.

Every stage that asks these questions (tracking, nudges, ablation, the lens, TensorBoard) asks
here. For diffusers' AutoencoderKL:

- activation: resnet `norm1` -> the resnet's `nonlinearity` -> `conv1`, `norm2` -> `nonlinearity`
  -> `conv2`; encoder/decoder `conv_norm_out` -> `conv_act` -> `conv_out`; attention `group_norm`
  has none (it feeds `to_q`/`to_k`/`to_v` directly).
- readers: `norm1` -> `conv1`, `norm2` -> `conv2`, `conv_norm_out` -> `conv_out`, `group_norm` ->
  `to_q`, `to_k`, `to_v`; a reader's slice for channel c is `weight[:, c]`.
- producer: the conv/linear whose output tensor is the very tensor the norm reads, found by an 8x8
  forward pass with hooks through a weightless (meta-device) twin of the model. In the SDXL VAE:
  `norm2` <- `conv1` of its resnet; the first `norm1` after `conv_in`, a downsampler or an upsampler
  <- that conv. Every other norm reads a residual sum (or, for attention, a reshaped view of one):
  no unique producer. The producer's slice for channel c is `weight[c]` and `bias[c]`.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PARTS = ("encoder", "decoder")
# The module names, next to a norm, of the layers reading its output.
_READERS = {
    "norm1": ("conv1",),
    "norm2": ("conv2",),
    "conv_norm_out": ("conv_out",),
    "group_norm": ("to_q", "to_k", "to_v"),
}
_PRODUCERS: weakref.WeakKeyDictionary[nn.Module, dict[str, str | None]] = weakref.WeakKeyDictionary()


def channel_count(module: nn.Module) -> int | None:
    """Channels of a normalisation layer (None for a module that has no such count)."""
    for attr in ("num_channels", "num_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def part_of(name: str) -> str:
    """`encoder` or `decoder`: the top-level part a module path lies in."""
    return name.split(".", 1)[0]


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
    else:
        act = None
    return act if isinstance(act, nn.Module) else None


def readers(model: nn.Module, name: str) -> tuple[str, ...]:
    """Module paths of the layers whose weights read this layer's output channels."""
    parent, leaf = _parent(model, name)
    prefix = name.rpartition(".")[0]
    found = []
    for attr in _READERS.get(leaf, ()):
        if isinstance(getattr(parent, attr, None), nn.Module):
            found.append(f"{prefix}.{attr}" if prefix else attr)
    return tuple(found)


def producer(model: nn.Module, name: str) -> str | None:
    """Module path of the conv/linear whose output this norm reads directly, with one filter per
    channel (None when the norm reads a residual sum or anything else)."""
    found = _PRODUCERS.get(model)
    if found is None:
        found = _PRODUCERS[model] = _trace_producers(model)
    return found.get(name)


def _trace_producers(model: nn.Module) -> dict[str, str | None]:
    """For each GroupNorm, the conv/linear whose output tensor it reads (traced on a meta twin)."""
    twin = _meta_twin(model)
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
    modules = dict(twin.named_modules())
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(on_output(name)))
        elif isinstance(module, nn.GroupNorm):
            handles.append(module.register_forward_pre_hook(on_input(name)))
    in_channels = getattr(getattr(twin, "config", None), "in_channels", 3)
    try:
        with torch.no_grad():
            twin(torch.zeros(1, in_channels, 8, 8, device="meta"))
    finally:
        for h in handles:
            h.remove()
    for name, prod in found.items():  # a producer must have one output filter per channel of the norm
        if prod is not None and modules[prod].weight.shape[0] != modules[name].num_channels:
            found[name] = None
    return found


def _meta_twin(model: nn.Module) -> nn.Module:
    """The same architecture without weights: tracing it costs nothing and fires none of the model's hooks."""
    if hasattr(model, "config") and hasattr(type(model), "from_config"):
        with torch.device("meta"):
            return type(model).from_config(model.config)
    return copy.deepcopy(model).to("meta")
