"""Probes on any module (convs, linears, inputs), the optional statistics, and interval pooling:
statistics against torch computed directly on the tensors the modules saw."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import TINY_WIDTH, Crash, crash_at, tiny_config_dict
from vaedyn_cli import artifacts, store
from vaedyn_cli import train as train_mod
from vaedyn_cli.config import NearZeroConfig, RunConfig, TrackConfig
from vaedyn_cli.model import build_preset
from vaedyn_cli.probes import ChannelProbes, model_config_json
from vaedyn_cli.tracker import Tracker

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


def measure(model: nn.Module, cfg: TrackConfig, *batches: torch.Tensor, backward: bool = False,  # noqa: ANN201
            exact: bool = False):
    probes = ChannelProbes(model, cfg, exact=exact)
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


# ---------------------------------------------------------------------------------------------
# interval pooling


class Loop:
    """The Tracker driven as vaedyn's loop drives it, with every forward's GroupNorm outputs kept."""

    def __init__(self, tmp_path: Path, **track) -> None:
        cfg = RunConfig.model_validate(tiny_config_dict(tmp_path, track={"interval": 2, **track}))
        self.model = build_preset(TINY_WIDTH, 0)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.5)
        from accelerate import Accelerator

        ctx = SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True), model=self.model, optimizer=self.opt,
                              run_dir=tmp_path / "run", resume_step=None, train_loader=None)
        self.tracker = Tracker(ctx)
        self.layer = "decoder.up_blocks.3.resnets.0.norm2"
        self.seen: list[tuple[str, torch.Tensor]] = []
        self.phase = "train"
        self.model.get_submodule(self.layer).register_forward_hook(
            lambda _m, _i, out: self.seen.append((self.phase, out.detach().double())))

    def step(self, step: int, *batches: torch.Tensor) -> None:
        t = self.tracker
        t.begin_step(step)
        for x in batches:
            self.model(x).sample.square().mean().backward()
        t.after_backward(step)
        self.opt.step()
        self.opt.zero_grad()
        t.end_step(step, {"loss": 0.0, "rec_loss": 0.0, "kl_loss": 0.0, "lr": 0.5})

    def validate(self, step: int, x: torch.Tensor) -> None:
        self.phase = "validation"
        self.tracker.before_validation(step)
        with torch.no_grad():
            self.model(x, sample_posterior=False)
        self.tracker.on_validation(step, {})
        self.phase = "train"

    def trace(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        path = self.tracker.writer.path
        self.tracker.close()
        ds = store.open_trace(path)
        cols = ds["layer"].values == self.layer
        return ds["step"].values.tolist(), ds["mean_abs"].values[:, cols], ds["std"].values[:, cols]


def batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2)]


@pytest.mark.parametrize("pool_validation", [False, True])
def test_interval_pooling_averages_every_forward_since_the_last_tracked_step(tmp_path, pool_validation):
    loop = Loop(tmp_path, pooling="interval", pool_validation=pool_validation)
    calls = []
    real = loop.tracker.probes.snapshot
    loop.tracker.probes.snapshot = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    b = batches(2, 0)
    loop.step(1, b[0], b[1][:1])  # two micro-batches of different sizes
    loop.step(2, b[1])
    loop.validate(2, b[0][:1])  # after tracked step 2: part of step 4's window (if pooled)
    loop.step(3, b[0])
    loop.step(4, b[1][:1])
    steps, mean_abs, std = loop.trace()
    assert steps == [2, 4] and calls == [2, 4]  # one host copy per tracked step
    windows = [[0, 1, 2], [4, 5]]  # indices into loop.seen: steps 1-2; steps 3-4 (3 is the validation)
    if pool_validation:
        windows[1] = [3, 4, 5]
    assert [p for p, _ in loop.seen] == ["train"] * 3 + ["validation"] + ["train"] * 2
    for row, idx in enumerate(windows):  # every element of every forward in the window counts once
        y = torch.cat([per_channel(loop.seen[i][1]) for i in idx], dim=1)
        np.testing.assert_allclose(mean_abs[row], y.abs().mean(1).numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(std[row], y.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)


def test_step_pooling_records_the_tracked_steps_forward_only(tmp_path):
    loop = Loop(tmp_path)
    b = batches(2, 0)
    loop.step(1, b[0])
    loop.step(2, b[1], b[0][:1])
    loop.validate(2, b[0])
    steps, mean_abs, _ = loop.trace()
    y = torch.cat([per_channel(loop.seen[i][1]) for i in (1, 2)], dim=1)
    assert steps == [2]
    np.testing.assert_allclose(mean_abs[0], y.abs().mean(1).numpy(), rtol=RTOL, atol=ATOL)


def test_a_pooled_run_resumed_mid_window_records_the_same_trace(tmp_path):
    """Checkpoint at step 3, inside the window of step 4 (its validation pooled too): the resumed
    run's trace equals the uninterrupted run's bit for bit."""
    track = {"interval": 2, "pooling": "interval", "pool_validation": True}

    def cfg(name: str) -> RunConfig:
        return RunConfig.model_validate(tiny_config_dict(tmp_path, run_name=name, track=track))

    whole = train_mod.train(cfg("whole"))
    crashed = cfg("crashed")
    with pytest.raises(Crash):
        train_mod.train(crashed, hooks=(*train_mod.DEFAULT_HOOKS, crash_at(5)))
    resumed = train_mod.train(crashed, resume="latest")
    a, b = store.open_trace(whole / artifacts.TRACE_DIR), store.open_trace(resumed / artifacts.TRACE_DIR)
    assert a["step"].values.tolist() == b["step"].values.tolist() == [2, 4, 6]
    for name in ("mean", "mean_abs", "std", "in_std", "act_std", "gn_weight", "gn_weight_grad"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert "every micro-batch pooled" in a.attrs["step_definition"]


class _TwoProcesses:
    """Stands in for accelerate under 2 processes: `reduce` returns the all-reduced sum (computed by
    the test from both processes' buffers, as the collective would)."""

    num_processes = 2

    def __init__(self, total: torch.Tensor, rank: int) -> None:
        self.total, self.is_main_process = total, rank == 0

    def reduce(self, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum" and t.shape == self.total.shape
        return self.total.clone()


def test_a_window_collected_at_a_checkpoint_sums_the_processes_onto_the_main_one():
    """A pooled window under several processes: at a checkpoint the open window is summed onto the main
    process (the others restart from zero), so the tracked step still holds all processes' forwards."""
    model = build_preset(TINY_WIDTH, 0)
    cfg = TrackConfig(layers=["decoder.up_blocks.3.*"], near_zero=OFF)
    single, ranks = ChannelProbes(model, cfg), [ChannelProbes(model, cfg), ChannelProbes(model, cfg)]
    xs = batches(2, 3) + batches(2, 4)  # forwards of process 0, 1 before the checkpoint, 0, 1 after it
    for p in (single, *ranks):
        p.reset()

    def forward(p: ChannelProbes, x: torch.Tensor) -> None:
        p.arm()
        with torch.no_grad():
            model(x)
        p.disarm()
        p.fold()

    for x in xs:
        forward(single, x)
    forward(ranks[0], xs[0])
    forward(ranks[1], xs[1])
    for p in ranks:  # what the all-reduce sums: both processes' sums and counts
        p._stage_counts()
    total = sum(p.reduced.clone() for p in ranks)
    for rank, p in enumerate(ranks):
        p.collect(_TwoProcesses(total, rank))
    assert ranks[1].host_counts.sum() == 0 and not ranks[1].sums.any()
    forward(ranks[0], xs[2])
    forward(ranks[1], xs[3])
    for p in ranks:
        p._stage_counts()
    summed = sum(p.reduced.clone() for p in ranks)
    single.finish()
    np.testing.assert_allclose(summed.numpy(), single.reduced.numpy(), rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pooled_steps_copy_nothing_to_the_host_between_tracked_steps():
    """An untracked step of a pooled interval (arm, forward, backward, disarm, fold) on the GPU makes
    no device-to-host copy; the tracked step copies once."""
    from torch.profiler import ProfilerActivity, profile

    model = build_preset(TINY_WIDTH, 0).cuda()
    probes = ChannelProbes(model, TrackConfig())
    x = (torch.rand(3, 3, 16, 16) * 2 - 1).cuda()

    def pooled_step() -> None:
        probes.arm()
        model(x).sample.mean().backward()
        probes.disarm()
        probes.fold()

    probes.reset()
    pooled_step()  # warm up the caches (columns, groups)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pooled_step()
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "DtoH" in e.name.replace(" ", "") or "DeviceToHost" in e.name]
    assert copies == []
    probes.finish()
    assert np.isfinite(probes.snapshot(2).resolve().channels["std"]).all()


class Lin(nn.Module):
    """A part `body` holding one linear (3 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("lin", nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_only_forwards_inside_a_part_and_with_a_batch_dim_are_measured():
    """A probed module counts only while its part (here `body`) runs, and only a tensor with a batch
    dim: the linear called directly, or inside the part on one unbatched (3,) vector, adds nothing."""
    torch.manual_seed(2)
    model = Lin()
    x = torch.randn(5, 3)
    probes = ChannelProbes(model, TrackConfig(layers=["body.lin"], module_types=["Linear"], near_zero=OFF))
    probes.reset()
    probes.arm()
    with torch.no_grad():
        y = model(x)  # measured: (5, 2)
        model.body.lin(torch.randn(7, 3))  # outside the part
        model.body(torch.randn(3))  # inside, unbatched
    probes.disarm()
    probes.finish()
    rec = probes.snapshot(1).resolve()
    assert probes.host_counts[0].tolist() == [5.0]  # elements per channel: the 5 samples
    np.testing.assert_allclose(rec.channels["std"], y.double().std(0, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["mean_abs"], y.double().abs().mean(0).numpy(), rtol=RTOL, atol=ATOL)


def test_a_single_observed_value_per_channel_is_measured_not_left_unobserved():
    """One sample through a linear: each channel has one value, its own mean and |.|, and std 0."""
    torch.manual_seed(6)
    model = Lin()
    x = torch.randn(1, 3)
    with torch.no_grad():
        probes, rec = measure(model, TrackConfig(layers=["body.lin"], module_types=["Linear"], near_zero=OFF), x)
        y = model(x).double()[0].numpy()
    assert probes.host_counts[0].tolist() == [1.0]
    np.testing.assert_allclose(rec.channels["mean"], y, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["mean_abs"], np.abs(y), rtol=RTOL, atol=ATOL)
    assert rec.channels["std"].tolist() == [0.0, 0.0]
    # and its activation: one value per channel too
    model = _LinAct()
    x = torch.randn(1, 8)
    with torch.no_grad():
        probes, rec = measure(model, TrackConfig(layers=["body.lin"], module_types=["Linear"], near_zero=OFF), x)
        a = model(x).double()[0].numpy()
    assert probes.host_counts[:, 0].tolist() == [1.0, 1.0]
    np.testing.assert_allclose(rec.channels["act_mean"], a, rtol=RTOL, atol=ATOL)
    assert rec.channels["act_std"].tolist() == [0.0, 0.0]


def test_bfloat16_outputs_are_measured_in_float32():
    """A bfloat16 model: the moments of its conv's (B, C, H, W) output and of its linear's (B, T, C) output
    are float32 moments of the bfloat16 values (bfloat16 sums would be off by about 1e-2)."""
    torch.manual_seed(7)
    for model, x, name, kind in ((Net(), 1 + torch.rand(4, 3, 8, 8), "body.conv", "Conv2d"),
                                 (Lin(), 1 + torch.rand(4, 64, 3), "body.lin", "Linear")):
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        with torch.no_grad():
            _, rec = measure(model, TrackConfig(layers=[name], module_types=[kind], near_zero=OFF), x)
            y = model.get_submodule(name)(x)
        ref = (per_channel(y) if y.ndim == 4 else y.double().reshape(-1, y.shape[-1]).T).numpy()
        np.testing.assert_allclose(rec.channels["std"], ref.std(1), rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(rec.channels["mean_abs"], np.abs(ref).mean(1), rtol=1e-5, err_msg=name)


def test_exact_probes_of_a_capture_are_exact_to_double_precision():
    """`exact` moments of a captured conv output with an offset (10 + N(0, 0.01)), where float32 sums
    lose digits (std off by 7e-7, mean |.| by 3e-8): NumPy's float64 moments of the same float32 values
    to 1e-9 and 1e-12, for the conv's output and for its SiLU's."""
    torch.manual_seed(3)
    model = Net()
    with torch.no_grad():
        model.body.conv.bias.copy_(torch.tensor([10.0, -10.0, 10 / 3, 2.0]))
    x = torch.randn(4, 3, 8, 8) * 0.01
    probes = ChannelProbes(model, TrackConfig(layers=["body.conv"], module_types=["Conv2d"], near_zero=OFF), exact=True)
    probes.reset()
    probes.arm()
    with torch.no_grad():
        y = model.body.conv(x)  # the values the probe sees (computed the same way inside the part)
        model(x)
    probes.disarm()
    probes.finish()
    rec = probes.snapshot(1).resolve()
    ref = y.double().transpose(0, 1).reshape(4, -1).numpy()
    np.testing.assert_allclose(rec.channels["std"], ref.std(1), rtol=1e-9)
    np.testing.assert_allclose(rec.channels["mean_abs"], np.abs(ref).mean(1), rtol=1e-12)
    # and the activation's statistics, of the float32 SiLU output the probe sees
    act = nn.functional.silu(y).double().transpose(0, 1).reshape(4, -1).numpy()
    np.testing.assert_allclose(rec.channels["act_std"], act.std(1), rtol=1e-9)


def test_exact_probes_of_a_linear_are_exact_to_double_precision():
    """`exact` moments of a linear's (B, T, C) output, channels last, with an offset (bias 10): NumPy's
    float64 moments of the same float32 values to 1e-9 and 1e-12 (float32 sums: std off by 3e-6)."""
    torch.manual_seed(8)
    model = Lin()
    with torch.no_grad():
        model.body.lin.bias.fill_(10.0)
        model.body.lin.weight.mul_(0.01)
    x = torch.randn(4, 256, 3)
    with torch.no_grad():
        _, rec = measure(model, TrackConfig(layers=["body.lin"], module_types=["Linear"], near_zero=OFF), x, exact=True)
        y = model(x).double().reshape(-1, 2).T.numpy()
    np.testing.assert_allclose(rec.channels["std"], y.std(1), rtol=1e-9)
    np.testing.assert_allclose(rec.channels["mean_abs"], np.abs(y).mean(1), rtol=1e-12)


class _Norm(nn.Module):
    """A part `body` holding one GroupNorm (2 groups of 2 channels) whose bias is 10."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("norm", nn.GroupNorm(2, 4))
        with torch.no_grad():
            self.body.norm.bias.fill_(10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_exact_probes_of_a_norm_are_exact_to_double_precision_on_its_input_and_output():
    """`exact` moments of a GroupNorm's input (10 + N(0, 0.01) per channel) and of its output (bias 10):
    NumPy's float64 moments of the same float32 values to 1e-9, where float32 sums are off by about 1e-6."""
    torch.manual_seed(5)
    model = _Norm()
    x = 10 + torch.randn(4, 4, 8, 8) * 0.01
    with torch.no_grad():
        _, rec = measure(model, TrackConfig(layers=["body.norm"], module_types=["GroupNorm"], near_zero=OFF), x,
                         exact=True)
        y = model(x)
    np.testing.assert_allclose(rec.channels["in_std"], per_channel(x).numpy().std(1), rtol=1e-9)
    np.testing.assert_allclose(rec.channels["std"], per_channel(y).numpy().std(1), rtol=1e-9)
    np.testing.assert_allclose(rec.channels["mean_abs"], np.abs(per_channel(y).numpy()).mean(1), rtol=1e-12)


def test_run_probe_forwards_the_batch_in_pieces_inside_autocast_without_gradients():
    """run_probe: 5 images at batch size 2 are 3 forwards (2, 2, 1) of the posterior mode, every one
    inside the autocast context and without gradients, in eval mode; the model's mode comes back."""
    from contextlib import contextmanager

    from vaedyn_cli.probes import run_probe

    model = build_preset(TINY_WIDTH, 0)
    seen: list[tuple[int, bool, bool, bool, bool]] = []
    inside = [False]

    @contextmanager
    def autocast():  # noqa: ANN202
        inside[0] = True
        yield
        inside[0] = False

    def record(module, args, kwargs):  # noqa: ANN001, ANN202
        seen.append((args[0].shape[0], inside[0], torch.is_grad_enabled(), module.training,
                     kwargs.get("sample_posterior", False)))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    model.train()
    run_probe(model, torch.rand(5, 3, 16, 16), 2, autocast=autocast)
    handle.remove()
    assert seen == [(2, True, False, False, False), (2, True, False, False, False), (1, True, False, False, False)]
    assert model.training and not inside[0]


def test_out_weight_norms_of_double_and_half_precision_readers():
    """A float64 reader's norms are computed in float64 (exact to 1e-13); a bfloat16 reader's in
    float32 from its bfloat16 values (to 1e-6; bfloat16 arithmetic would be off by ~1e-2)."""
    from vaedyn_cli.kernels import out_weight_l1, out_weight_norm

    torch.manual_seed(4)
    for dtype, rtol in ((torch.float64, 1e-13), (torch.bfloat16, 1e-6)):
        conv = nn.Conv2d(6, 5, 3).to(dtype)
        with torch.no_grad():
            conv.weight.mul_(1 + 1e-3 * torch.arange(6, dtype=dtype).view(1, 6, 1, 1))  # digits float32 lacks
        w = conv.weight.detach().double()
        norm, l1 = out_weight_norm([conv], 6), out_weight_l1([conv], 6)
        np.testing.assert_allclose(norm.double().numpy(), w.square().sum((0, 2, 3)).sqrt().numpy(), rtol=rtol)
        np.testing.assert_allclose(l1.double().numpy(), w.abs().sum((0, 2, 3)).numpy(), rtol=rtol)


def test_model_config_json_without_a_config_and_with_values_json_cannot_hold() -> None:
    """A module without `config` records {}; values JSON has no type for are recorded as their str."""
    assert model_config_json(nn.Linear(1, 1)) == "{}"
    m = nn.Linear(1, 1)
    m.config = {"norm_num_groups": 2, "dtype": torch.float16, "path": Path("a") / "b"}
    assert json.loads(model_config_json(m)) == {"norm_num_groups": 2, "dtype": "torch.float16", "path": "a/b"}


class _Resnet(nn.Module):
    """A resnet-like block whose shared `nonlinearity` first runs on another tensor (the skip), then on
    norm1's output; `outside`: the block returns norm1's output and the model applies the activation."""

    def __init__(self, outside: bool = False) -> None:
        super().__init__()
        self.norm1, self.nonlinearity, self.conv1 = nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 4, 1)
        self.outside = outside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.outside:
            return h
        skip = self.nonlinearity(x * 3.0 + 1.0)
        return self.conv1(self.nonlinearity(h)) + skip


class _Block(nn.Module):
    def __init__(self, outside: bool = False) -> None:
        super().__init__()
        self.body = _Resnet(outside)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.body.nonlinearity(h) if self.body.outside else h


def test_a_norms_activation_is_the_call_on_its_output_inside_its_part():
    """act statistics of norm1 come from the activation's call on norm1's own output: not from the
    shared module's earlier call on another tensor, and not from a call after the part has returned."""
    torch.manual_seed(4)
    x = torch.randn(3, 4, 5, 5)
    cfg = TrackConfig(layers=["body.norm1"], module_types=["GroupNorm"], near_zero=OFF)
    model = _Block()
    with torch.no_grad():
        want = per_channel(nn.functional.silu(model.body.norm1(x)))
        probes, rec = measure(model, cfg, x)
    assert probes.layers[0].activation is model.body.nonlinearity
    np.testing.assert_allclose(rec.channels["act_std"], want.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["act_mean"], want.mean(1).numpy(), rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        _, rec = measure(_Block(outside=True), cfg, x)
    assert np.isfinite(rec.channels["std"]).all() and np.isnan(rec.channels["act_std"]).all()


class _LinAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("lin", nn.Linear(8, 2))  # 8: the last dim of anatomy's traced (1, 3, 8, 8) image
        self.body.add_module("act", nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_the_activation_of_a_linear_on_tokens_is_measured_per_output_feature():
    """A linear on (B, T, 8) tokens followed by SiLU: its channels are the last dim of the activation's
    output too, so act statistics pool batch and tokens per output feature."""
    torch.manual_seed(5)
    model, x = _LinAct(), torch.randn(4, 6, 8)
    with torch.no_grad():
        a = nn.functional.silu(model.body.lin(x)).double().reshape(-1, 2)
        probes, rec = measure(model, TrackConfig(layers=["body.lin"], module_types=["Linear"], near_zero=OFF), x)
    assert probes.layers[0].activation is model.body.act
    np.testing.assert_allclose(rec.channels["act_std"], a.std(0, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["act_mean"], a.mean(0).numpy(), rtol=RTOL, atol=ATOL)


class _Shared(nn.Module):
    """A part `body` whose forward calls the model's other part `head` (one module, registered first at
    the top level) before its own conv: the parts' gates nest."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 3, 1)
        self.body = nn.Module()
        self.body.conv = nn.Conv2d(3, 2, 1)
        head = self.head
        body = self.body

        def body_forward(x: torch.Tensor) -> torch.Tensor:
            return body.conv(head(x))

        self.body.forward = body_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_part_called_inside_another_leaves_the_outer_part_measured_after_it_returns():
    torch.manual_seed(9)
    model = _Shared()
    x = torch.randn(2, 3, 4, 4)
    cfg = TrackConfig(layers=["head", "body.conv"], module_types=["Conv2d"], near_zero=OFF)
    with torch.no_grad():
        probes, rec = measure(model, cfg, x)
        want = torch.cat([per_channel(model.head(x)), per_channel(model.body.conv(model.head(x)))])
    assert [layer.name for layer in probes.layers] == ["head", "body.conv"]
    np.testing.assert_allclose(rec.channels["std"], want.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)


class _TopLinear(nn.Module):
    """A tracked linear that is a part of its own (a top-level module, like the VAE's post_quant_conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_the_input_of_a_top_level_module_is_captured_inside_its_own_part():
    """The part's gate opens before the module's own input pre-hook: its input is measured; an input
    capture records no per-channel parameters."""
    torch.manual_seed(10)
    x = torch.randn(6, 3)
    probes, rec = measure(_TopLinear(), TrackConfig(layers=["lin"], module_types=["Linear"], capture="input",
                                                    near_zero=OFF), x)
    assert probes.host_counts[0].tolist() == [6.0]
    np.testing.assert_allclose(rec.channels["std"], x.double().std(0, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    # a square linear's bias has one entry per input channel too, but it belongs to its outputs
    model = _TopLinear()
    model.lin = nn.Linear(3, 3)
    _, rec = measure(model, TrackConfig(layers=["lin"], module_types=["Linear"], capture="input", near_zero=OFF), x)
    assert np.isnan(rec.channels["gn_weight"]).all() and np.isnan(rec.channels["gn_bias"]).all()


class _Member(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 2, 1), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _Blocks(nn.Module):
    """A top-level ModuleList: its called member `blocks.0` is the part. After the member returns, the
    model calls the member's conv directly on another tensor, outside the part."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Member()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        return self.blocks[0].act(self.blocks[0].conv(x * 5.0)) + h.mean()


def test_the_called_member_of_a_top_level_module_list_is_the_part():
    torch.manual_seed(11)
    model = _Blocks()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        probes, rec = measure(model, TrackConfig(layers=["blocks.0.conv"], module_types=["Conv2d"], near_zero=OFF), x)
        y = model.blocks[0].conv(x)
        a = nn.functional.silu(y)
    assert probes.layers[0].activation is model.blocks[0].act
    assert probes.host_counts[:, 0].tolist() == [32.0, 32.0]  # one call of each, 2 samples x 16 positions
    np.testing.assert_allclose(rec.channels["std"], per_channel(y).std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["act_std"], per_channel(a).std(1, unbiased=False).numpy(), rtol=RTOL,
                               atol=ATOL)


class _SkipFirst(nn.Module):
    """A part `body` whose shared `nonlinearity` runs on the skip before norm1 runs at all."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.norm1, self.body.nonlinearity = nn.GroupNorm(2, 4, affine=affine), nn.SiLU()
        body = self.body

        def body_forward(x: torch.Tensor) -> torch.Tensor:
            skip = body.nonlinearity(x * 3.0 + 1.0)
            return body.nonlinearity(body.norm1(x)) + skip

        self.body.forward = body_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_probe_armed_again_without_a_reset_measures_like_a_new_one():
    """Pooled steps arm and disarm the probes around each forward, without a reset in between: after
    a disarm the gate is closed (norm1 called outside its part adds nothing) and no activation call
    is pending (the shared SiLU runs on the skip before norm1 has run)."""
    torch.manual_seed(12)
    model = _SkipFirst()
    x1, x2 = torch.randn(2, 4, 3, 3), torch.randn(3, 4, 3, 3)
    cfg = TrackConfig(layers=["body.norm1"], module_types=["GroupNorm"], near_zero=OFF)
    probes = ChannelProbes(model, cfg)
    probes.reset()
    probes.capture_params()
    with torch.no_grad():
        for i, x in enumerate((x1, x2)):
            probes.arm()
            model(x)
            probes.disarm()
            if i == 0:
                model.body.norm1(torch.randn(4, 4, 3, 3) * 9.0)  # disarmed, outside the part
                probes.arm()
                model.body.norm1(torch.randn(4, 4, 3, 3) * 9.0)  # armed, outside the part
                probes.disarm()
        y = torch.cat([per_channel(model.body.norm1(x)) for x in (x1, x2)], dim=1)
    probes.finish()
    rec = probes.snapshot(1).resolve()
    assert probes.host_counts[:, 0].tolist() == [45.0, 45.0]  # (2 + 3) samples x 9 positions, norm and act
    np.testing.assert_allclose(rec.channels["std"], y.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["act_mean"], nn.functional.silu(y).mean(1).numpy(), rtol=RTOL, atol=ATOL)


def test_a_model_without_parameters_is_measured_on_the_cpu():
    """A GroupNorm without affine parameters is the whole model: its probes live on the CPU, its
    statistics are measured, and it has no per-channel scale or shift."""
    torch.manual_seed(13)
    model = _SkipFirst(affine=False)
    assert list(model.parameters()) == []
    x = torch.randn(2, 4, 3, 3) * 5.0 + 2.0
    probes, rec = measure(model, TrackConfig(layers=["body.norm1"], module_types=["GroupNorm"], near_zero=OFF), x)
    assert probes.device == torch.device("cpu")
    with torch.no_grad():
        y = per_channel(model.body.norm1(x))
    np.testing.assert_allclose(rec.channels["std"], y.std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rec.channels["in_std"], per_channel(x).std(1, unbiased=False).numpy(), rtol=RTOL,
                               atol=ATOL)
    assert np.isnan(rec.channels["gn_weight"]).all() and np.isnan(rec.channels["gn_bias"]).all()


class _SquareAct(nn.Module):
    """A part `body`: a square conv (3 -> 3, 1x1) followed by SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("conv", nn.Conv2d(3, 3, 1))
        self.body.add_module("act", nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_an_input_capture_has_no_activation_and_no_incoming_filter():
    """The input of a square conv whose output goes through SiLU: the activation belongs to the conv's
    output, and the conv's weight[c] makes output channel c, not input channel c; so act_* and
    in_weight_grad stay unmeasured (NaN), though the shapes would fit."""
    torch.manual_seed(14)
    model, x = _SquareAct(), torch.randn(2, 3, 4, 4)
    cfg = TrackConfig(layers=["body.conv"], module_types=["Conv2d"], capture="input", near_zero=OFF,
                      extra_statistics=["act_mean_abs", "in_weight_grad"])
    probes, rec = measure(model, cfg, x, backward=True)
    assert model.body.conv.weight.grad is not None and probes.layout.has_activation == (False,) * 3
    np.testing.assert_allclose(rec.channels["std"], per_channel(x).std(1, unbiased=False).numpy(), rtol=RTOL, atol=ATOL)
    for key in ("act_mean", "act_std", "act_mean_abs", "in_weight_grad"):
        assert np.isnan(rec.channels[key]).all(), key
    # near-zero fractions are off: no parameter is listed, none is measured
    assert probes.weights == [] and probes.layout.params == ()
