"""Probes on any module (convs, linears, inputs) and the optional statistics:
statistics against torch computed directly on the tensors the modules saw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import TINY_WIDTH
from vaedyn_cli.config import NearZeroConfig, TrackConfig
from vaedyn_cli.model import build_preset
from vaedyn_cli.probes import ChannelProbes

RTOL, ATOL = 1e-5, 1e-6
OFF = NearZeroConfig(enabled=False)


class Net(nn.Module):
    """conv (3 -> 4, 1x1, hand-set) -> SiLU -> conv2 (4 -> 2, 1x1): conv's channels 0-2 copy the
    input's, channel 3 is the constant 2 (its bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("conv", nn.Conv2d(3, 4, 1))
        self.body.add_module("act", nn.SiLU())
        self.body.add_module("conv2", nn.Conv2d(4, 2, 1))
        with torch.no_grad():
            self.body.conv.weight.zero_()
            for c in range(3):
                self.body.conv.weight[c, c] = 1.0
            self.body.conv.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
            self.body.conv2.weight.copy_(torch.tensor([[1.0, -2.0, 0.0, 0.5], [3.0, 0.0, 0.0, 0.0]]).view(2, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def measure(model: nn.Module, cfg: TrackConfig, *batches: torch.Tensor, backward: bool = False):  # noqa: ANN201
    probes = ChannelProbes(model, cfg)
    probes.reset()
    probes.capture_params()
    probes.arm()
    for x in batches:
        out = model(x)
        if backward:
            (out.sample if hasattr(out, "sample") else out).square().mean().backward()
    probes.disarm()
    if backward:
        probes.capture_grads()
    probes.finish()
    return probes, probes.snapshot(1).resolve()


def per_channel(t: torch.Tensor) -> torch.Tensor:
    """(C, everything) of a (B, C, H, W) tensor."""
    return t.double().transpose(0, 1).reshape(t.shape[1], -1)


def test_a_conv_output_its_activation_and_its_readers():
    torch.manual_seed(0)
    model = Net()
    x1, x2 = torch.randn(2, 3, 4, 5), torch.randn(3, 3, 4, 5)
    probes, rec = measure(model, TrackConfig(layers=["body.conv"], module_types=["Conv2d"], near_zero=OFF,
                                             extra_statistics=["act_mean_abs"]), x1, x2)
    (layer,) = probes.layers
    assert (layer.module_type, layer.channels, layer.capture, layer.norm) == ("Conv2d", 4, "output", False)
    assert layer.activation is model.body.act and layer.readers == [model.body.conv2]
    assert probes.layout.module_type == ("Conv2d",) * 4 and probes.layout.has_activation == (True,) * 4
    # the conv output is the input's channels 0-2 and a constant 2: its statistics by hand
    x = torch.cat([per_channel(x1), per_channel(x2)], dim=1)
    y = torch.cat([x, torch.full((1, x.shape[1]), 2.0, dtype=torch.float64)])
    a = nn.functional.silu(y)
    np.testing.assert_allclose(rec.channels["mean"], y.mean(1).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["mean_abs"], y.abs().mean(1).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["std"], y.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["act_std"], a.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["act_mean_abs"], a.abs().mean(1).numpy(), rtol=RTOL, atol=ATOL)
    assert rec.channels["std"][3] == 0.0 and rec.channels["act_mean_abs"][3] == pytest.approx(2 / (1 + np.exp(-2.0)))
    assert np.isnan(rec.channels["in_std"]).all()  # not a norm: no input statistics
    assert np.isnan(rec.channels["gn_weight"]).all()  # a 4-D weight is no per-channel scale
    assert rec.channels["gn_bias"].tolist() == [0.0, 0.0, 0.0, 2.0]  # its bias is a per-channel shift
    # conv2 reads conv's channels through the SiLU: L2 and L1 of its weight columns
    assert rec.channels["out_weight_norm"].tolist() == pytest.approx([np.sqrt(10.0), 2.0, 0.0, 0.5])
    assert rec.channels["out_weight_l1"].tolist() == [4.0, 2.0, 0.0, 0.5]


def test_an_input_capture():
    torch.manual_seed(1)
    model = Net()
    x = torch.randn(2, 3, 4, 4)
    probes, rec = measure(model, TrackConfig(layers=["body.conv2"], module_types=["Conv2d"], capture="input",
                                             near_zero=OFF), x)
    (layer,) = probes.layers
    assert (layer.channels, layer.activation, probes.layout.capture) == (4, None, ("input",) * 4)
    a = nn.functional.silu(torch.cat([per_channel(x), torch.full((1, 32), 2.0, dtype=torch.float64)]))
    np.testing.assert_allclose(rec.channels["mean_abs"], a.abs().mean(1).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["std"], a.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    for key in ("in_std", "act_std", "gn_weight", "gn_bias"):
        assert np.isnan(rec.channels[key]).all(), key
    # the input channels of a conv are read by the conv itself
    assert rec.channels["out_weight_l1"].tolist() == [4.0, 2.0, 0.0, 0.5]


def test_conv_in_conv_shortcut_and_a_linear_of_the_vae():
    """The original project's extra hooks (conv_in; conv_shortcut in its grids) and a linear's
    channels-last (batch, length, channels) output, pooled over two micro-batches."""
    model = build_preset(TINY_WIDTH, 0)
    names = ["encoder.conv_in", "encoder.down_blocks.1.resnets.0.conv_shortcut", "decoder.mid_block.attentions.0.to_q"]
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: seen.setdefault(n, []).append(out.detach().double())) for n in names]
    x1, x2 = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    probes, rec = measure(model, TrackConfig(layers=names, module_types=["Conv2d", "Linear"], near_zero=OFF,
                                             extra_statistics=["in_weight_grad"]), x1, x2, backward=True)
    for h in handles:
        h.remove()
    assert [(la.name, la.channels, la.part) for la in probes.layers] == [
        (names[0], 8, "encoder"), (names[1], 16, "encoder"), (names[2], 32, "decoder")]
    for layer in probes.layers:
        outs = seen[layer.name]
        if layer.channel_last:  # (B, L, C) -> (C, B * L)
            flat = torch.cat([o.reshape(-1, o.shape[-1]).T for o in outs], dim=1)
        else:
            flat = torch.cat([per_channel(o) for o in outs], dim=1)
        cols = slice(layer.offset, layer.offset + layer.channels)
        np.testing.assert_allclose(rec.channels["mean_abs"][cols], flat.abs().mean(1).numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(rec.channels["std"][cols], flat.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
        # GraMa's incoming filter of a conv's or linear's channel c is its own weight[c]
        g = layer.module.weight.grad.detach().double()
        np.testing.assert_allclose(rec.channels["in_weight_grad"][cols], g.abs().reshape(g.shape[0], -1).mean(1).numpy(),
                                   rtol=1e-6)
        np.testing.assert_array_equal(rec.channels["gn_bias"][cols], layer.module.bias.detach().double().numpy())
    assert probes.layout.extra == ("in_weight_grad",)


def test_in_weight_grad_of_a_norm_is_its_producers_filter():
    model = build_preset(TINY_WIDTH, 0)
    names = ["encoder.down_blocks.0.resnets.0.norm2", "encoder.down_blocks.0.resnets.1.norm1"]
    probes, rec = measure(model, TrackConfig(layers=names, near_zero=OFF, extra_statistics=["in_weight_grad"]),
                          torch.rand(2, 3, 16, 16) * 2 - 1, backward=True)
    first, second = probes.layers
    g = model.get_submodule("encoder.down_blocks.0.resnets.0.conv1").weight.grad.double()  # norm2 reads conv1
    np.testing.assert_allclose(rec.channels["in_weight_grad"][: first.channels], g.abs().mean((1, 2, 3)).numpy(),
                               rtol=1e-6)
    assert np.isnan(rec.channels["in_weight_grad"][second.offset:]).all()  # reads a residual sum: no filter
