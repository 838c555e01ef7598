"""Channel probes against direct computations, tracking while training, and `vaedyn track`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

from tests.conftest import TINY_WIDTH, Crash, crash_at, tiny_config_dict
from vaedyn_cli import artifacts, store
from vaedyn_cli import train as train_mod
from vaedyn_cli.config import NearZeroConfig, RunConfig, TrackConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.kernels import Scratch, abs_sum, channels_last, dense, near_zero_fractions
from vaedyn_cli.model import build_preset, save_model
from vaedyn_cli.probes import ChannelProbes, load_probe_batch, run_probe
from vaedyn_cli.track import track_checkpoints

pytestmark = pytest.mark.filterwarnings("error::UserWarning", "error::RuntimeWarning")

RTOL, ATOL = 1e-5, 1e-6


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return build_preset(TINY_WIDTH, seed)


class Capture:
    """Independent hooks: the input and output of every GroupNorm, as float64 copies."""

    def __init__(self, model: torch.nn.Module):
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles = [
            m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)
        ]

    def _hook(self, name: str):  # noqa: ANN202
        def hook(_m, inputs, output) -> None:  # noqa: ANN001
            self.seen.setdefault(name, []).append((inputs[0].detach().double().clone(), output.detach().double().clone()))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def pooled(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, everything) for input and output: batch, space and micro-batches pooled."""
        def flat(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in ts], dim=1)

        pairs = self.seen[name]
        return flat([x.cpu() for x, _ in pairs]), flat([y.cpu() for _, y in pairs])


def expected_stats(cap: Capture, name: str, has_act: bool) -> dict[str, np.ndarray]:
    x, y = cap.pooled(name)
    a = torch.nn.functional.silu(y)
    nan = np.full(y.shape[0], np.nan)
    return {
        "in_std": x.std(1, unbiased=False).numpy(),
        "mean": y.mean(1).numpy(),
        "mean_abs": y.abs().mean(1).numpy(),
        "std": y.std(1, unbiased=False).numpy(),
        "act_mean": a.mean(1).numpy() if has_act else nan,
        "act_std": a.std(1, unbiased=False).numpy() if has_act else nan,
    }


def test_every_statistic_equals_a_direct_computation():
    torch.manual_seed(0)
    model = tiny_model()
    # planted: a dead channel (gamma = beta = 0) and a conv weight that is exactly half zeros
    dead = model.decoder.up_blocks[3].resnets[2].norm2
    with torch.no_grad():
        dead.weight[5] = 0.0
        dead.bias[5] = 0.0
        w = model.encoder.conv_in.weight
        w.copy_(torch.where(torch.arange(w.numel()).reshape(w.shape) % 2 == 0, torch.zeros_like(w), torch.ones_like(w)))
    probes = ChannelProbes(model, TrackConfig(near_zero=NearZeroConfig(mode="absolute", abs_threshold=1e-5)))
    cap = Capture(model)
    probes.reset()
    probes.capture_params()
    gamma_before = {layer.name: layer.module.weight.detach().clone() for layer in probes.layers}
    probes.arm()
    # two micro-batches of different sizes, gradients accumulated as in training
    for x in (torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1):
        model(x).sample.square().mean().backward()
    probes.disarm()
    probes.capture_grads()
    probes.finish()
    rec = probes.snapshot(7, {"loss": 0.5}).resolve()
    cap.remove()

    assert rec.step == 7 and rec.scalars == {"loss": 0.5}
    assert len(probes.layers) == 52 and probes.n_channels == 1240
    attention = [layer for layer in probes.layers if layer.name.endswith("attentions.0.group_norm")]
    assert len(attention) == 2 and all(cap.seen[layer.name][0][0].ndim == 3 for layer in attention)
    for layer in probes.layers:
        cols = slice(layer.offset, layer.offset + layer.channels)
        has_act = not layer.name.endswith("group_norm")
        assert (layer.activation is not None) == has_act
        for key, want in expected_stats(cap, layer.name, has_act).items():
            np.testing.assert_allclose(rec.channels[key][cols], want, rtol=RTOL, atol=ATOL, err_msg=f"{layer.name} {key}")
        m = layer.module
        np.testing.assert_array_equal(rec.channels["gn_weight"][cols], gamma_before[layer.name].double().numpy())
        np.testing.assert_array_equal(rec.channels["gn_bias"][cols], m.bias.detach().double().numpy())
        np.testing.assert_allclose(rec.channels["gn_weight_grad"][cols], m.weight.grad.abs().double().numpy(), rtol=1e-7)
        parent = model.get_submodule(layer.name.rpartition(".")[0])
        attr = layer.name.rpartition(".")[2]
        if attr == "group_norm":
            reader = torch.cat([parent.to_q.weight, parent.to_k.weight, parent.to_v.weight]).detach().double()
            want, want_l1 = reader.square().sum(0).sqrt(), reader.abs().sum(0)
        else:
            conv = {"norm1": "conv1", "norm2": "conv2", "conv_norm_out": "conv_out"}[attr]
            reader = getattr(parent, conv).weight.detach().double()
            want, want_l1 = reader.square().sum((0, 2, 3)).sqrt(), reader.abs().sum((0, 2, 3))
        np.testing.assert_allclose(rec.channels["out_weight_norm"][cols], want.numpy(), rtol=RTOL)
        np.testing.assert_allclose(rec.channels["out_weight_l1"][cols], want_l1.numpy(), rtol=RTOL)

    off = next(layer.offset for layer in probes.layers if layer.module is dead) + 5
    assert rec.channels["std"][off] == 0 and rec.channels["mean"][off] == 0 and rec.channels["mean_abs"][off] == 0
    assert rec.channels["act_std"][off] == 0
    names = list(probes.layout.params)
    assert names[0] == "encoder.conv_in.weight" and rec.near_zero_frac[0] == 0.5
    for i, (name, weight) in enumerate(probes.weights):
        assert names[i] == name
        assert rec.near_zero_frac[i] == pytest.approx((weight.detach().abs() < 1e-5).double().mean().item(), abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_statistics_and_a_single_device_to_host_copy():
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model().cuda()
    probes = ChannelProbes(model, TrackConfig())
    cap = Capture(model)
    x = (torch.rand(3, 3, 16, 16) * 2 - 1).cuda()
    for _ in range(2):  # warm up (pinned ring, index cache), then profile one tracked step
        cap.seen.clear()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            probes.reset()
            probes.capture_params()
            probes.arm()
            model(x).sample.mean().backward()
            probes.disarm()
            probes.capture_grads()
            probes.finish()
            snap = probes.snapshot(1)
            torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "DtoH" in e.name.replace(" ", "") or "DeviceToHost" in e.name]
    assert len(copies) == 1, copies
    rec = snap.resolve()
    cap.remove()
    for layer in probes.layers:
        cols = slice(layer.offset, layer.offset + layer.channels)
        want = expected_stats(cap, layer.name, layer.activation is not None)
        for key in ("in_std", "std", "mean_abs", "act_std"):
            np.testing.assert_allclose(rec.channels[key][cols], want[key], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{layer.name} {key}")


def test_near_zero_modes_on_known_weights():
    w = torch.tensor([0.0, 1e-7, -5e-6, 2e-4, -1e-3, 0.5, -1.0, 2.0])  # mean |w| = 0.43765
    absolute = near_zero_fractions([w], NearZeroConfig(mode="absolute", abs_threshold=1e-5))
    relative = near_zero_fractions([w], NearZeroConfig(mode="percent_of_mean", rel_threshold=0.01))
    both = near_zero_fractions([w], NearZeroConfig(mode="both", abs_threshold=1e-6, rel_threshold=1e-3))
    assert absolute.tolist() == [3 / 8]  # 0, 1e-7, -5e-6
    assert relative.tolist() == [5 / 8]  # below 4.4e-3: also 2e-4 and -1e-3
    assert both.tolist() == [2 / 8]  # below 1e-6 AND below 4.4e-4: 0 and 1e-7 (the original project's AND)


# The original project's settings of cifar10_test (abs 1e-3, rel 0.1) on hand-made tensors: share of
# near-zero entries per mode, worked out by hand (SPEC: the original's deadneuron.py).
NEAR_ZERO_VECTORS = [
    # tensor, absolute, percent_of_mean, both
    ([0.0, 0.0, 0.0, 0.0], 1.0, 1.0, 1.0),  # all zero: all near zero in every mode
    ([0.0, 1e-4, 0.5, 1.0], 0.5, 0.5, 0.5),  # m = 0.375025, 0.1 m = 0.0375: 0 and 1e-4
    ([1e-6] * 4, 1.0, 0.0, 0.0),  # 1e-6 < 1e-3, but not < 0.1 m = 1e-7: AND gives 0
    ([0.0, 0.0, 0.0, 1e-10], 1.0, 1.0, 1.0),  # m = 2.5e-11 < 1e-9: entries < 1e-9 count
    ([0.0, 0.0, 0.0, 2e-9], 1.0, 0.75, 0.75),  # m = 5e-10 < 1e-9: 3 entries < 1e-9 (the original: 0 for pom)
    ([0.001, 0.002, 1.0, 1.0], 0.0, 0.5, 0.0),  # 0.001 is not < 1e-3 (strict); 0.1 m = 0.050075
]


@pytest.mark.parametrize(("values", "absolute", "relative", "both"), NEAR_ZERO_VECTORS)
def test_near_zero_vectors_of_the_original_settings(values, absolute, relative, both):
    w = torch.tensor(values)
    got = [near_zero_fractions([w], NearZeroConfig(mode=m, abs_threshold=1e-3, rel_threshold=0.1)).item()
           for m in ("absolute", "percent_of_mean", "both")]
    assert got == [absolute, relative, both]


def test_near_zero_comparisons_are_strict_at_the_threshold():
    # thresholds exact in float32: an entry equal to the threshold is not near zero
    assert near_zero_fractions([torch.tensor([0.5, 0.25, 1.0, 2.0])],
                               NearZeroConfig(mode="absolute", abs_threshold=0.5)).item() == 0.25
    # m = 1, rel 0.5: threshold 0.5; 0.5 is not below it, 0.25 is
    pom = NearZeroConfig(mode="percent_of_mean", rel_threshold=0.5)
    assert near_zero_fractions([torch.tensor([0.5, 1.5])], pom).item() == 0.0
    assert near_zero_fractions([torch.tensor([0.25, 1.75])], pom).item() == 0.5


def test_near_zero_tracks_every_parameter_or_the_weights():
    model = tiny_model()
    all_params = ChannelProbes(model, TrackConfig()).layout.params
    weights = ChannelProbes(model, TrackConfig(near_zero=NearZeroConfig(params="weights"))).layout.params
    # the SDXL VAE: 64 conv weights + 64 conv biases, 52 GroupNorm weights + biases, 8 linear weights + biases
    assert len(all_params) == 248 and len(weights) == 72
    assert all_params == tuple(n for n, _ in model.named_parameters())
    assert {"decoder.conv_norm_out.weight", "decoder.conv_norm_out.bias", "encoder.conv_in.bias"} <= set(all_params)
    assert all(n.endswith(".weight") and "norm" not in n for n in weights)


def test_hooks_exist_only_while_armed():
    model = tiny_model()
    probes = ChannelProbes(model, TrackConfig())

    def hook_count() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    assert hook_count() == 0
    probes.reset()
    model(torch.rand(1, 3, 16, 16))
    probes.finish()
    assert not probes.sums.any() and not probes.counts.any()
    probes.arm()
    # 52 norms, 26 activations (one SiLU per resnet block, 24, plus 2 conv_act), gates on encoder and decoder
    assert hook_count() == 52 + 26 + 2 * 2
    probes.disarm()
    assert hook_count() == 0


def test_gradient_checkpointing_recompute_is_not_counted():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    records = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        probes = ChannelProbes(model, TrackConfig())
        probes.reset()
        probes.arm()
        model(x).sample.mean().backward()  # recomputes blocks in backward when checkpointing
        probes.disarm()
        probes.finish()
        records.append((probes.counts.clone(), probes.snapshot(1).resolve()))
    (c0, r0), (c1, r1) = records
    assert torch.equal(c0, c1)
    for key in ("in_std", "mean", "std", "act_std"):
        np.testing.assert_allclose(r1.channels[key], r0.channels[key], rtol=1e-6, atol=1e-7)


class SumWith:
    """An accelerator stand-in for two processes: reduce(sum) adds the other process's buffer."""

    num_processes = 2

    def __init__(self, other: torch.Tensor):
        self.other = other

    def reduce(self, t: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return t + self.other


def test_processes_pool_like_one_process_seeing_the_global_batch():
    model = tiny_model()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    parts = []
    for m, xs in ((model, x[:2]), (copy.deepcopy(model), x[2:])):
        p = ChannelProbes(m, TrackConfig())
        p.reset()
        p.arm()
        m(xs)
        p.disarm()
        parts.append(p)
    parts[1].finish()
    parts[0].finish(SumWith(parts[1].reduced.clone()))
    pooled = parts[0].snapshot(1).resolve()
    single = ChannelProbes(model, TrackConfig())
    single.reset()
    single.arm()
    model(x)
    single.disarm()
    single.finish()
    whole = single.snapshot(1).resolve()
    for key in ("in_std", "mean", "mean_abs", "std", "act_mean", "act_std"):
        np.testing.assert_allclose(pooled.channels[key], whole.channels[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_layer_selection():
    model = tiny_model()
    probes = ChannelProbes(model, TrackConfig(layers=["decoder.up_blocks.3.*", "encoder.conv_norm_out"]))
    names = [layer.name for layer in probes.layers]  # module order: the encoder first
    assert names[:3] == ["encoder.conv_norm_out", "decoder.up_blocks.3.resnets.0.norm1",
                         "decoder.up_blocks.3.resnets.0.norm2"]
    assert len(names) == 7 and probes.n_channels == 32 + 16 + 5 * 8
    assert probes.layout.part[0] == "encoder" and probes.layout.part[-1] == "decoder"
    with pytest.raises(VaedynError, match="match no module"):
        ChannelProbes(model, TrackConfig(layers=["decoder.nothing.*"]))
    convs = ChannelProbes(model, TrackConfig(module_types=["Conv2d"]))  # any module with channels
    assert len(convs.layers) == 64 and {layer.module_type for layer in convs.layers} == {"Conv2d"}
    # a SiLU shared by norm1 (8 channels) and norm2 (16 channels) of a widening resnet has no fixed width
    with pytest.raises(VaedynError, match="no fixed channel count"):
        ChannelProbes(model, TrackConfig(layers=["encoder.down_blocks.1.resnets.0.nonlinearity"], module_types=["SiLU"]))


# ---------------------------------------------------------------------------------------------
# tracking while training


def train_cfg(root: Path, name: str, **track) -> RunConfig:
    return RunConfig.model_validate(tiny_config_dict(root, run_name=name, track={"interval": 2, **track}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run: 6 steps, tracked every 2, checkpoints at 3 and 6."""
    return train_mod.train(train_cfg(tmp_path_factory.mktemp("train"), "tiny"))


def test_train_run_trace_has_one_step_per_interval(trained):
    tree = xr.open_datatree(trained / artifacts.TRACE_DIR, engine="zarr")
    ds = tree.to_dataset()
    assert ds["step"].values.tolist() == [2, 4, 6]
    assert ds.attrs["source"] == "train" and ds.attrs["run_name"] == "tiny" and ds.attrs["committed_steps"] == 3
    assert json.loads(ds.attrs["config"])["track"]["interval"] == 2
    assert json.loads(ds.attrs["model_config"])["norm_num_groups"] == 2
    assert ds.sizes["channel"] == 1240 and ds.sizes["param"] == 248  # every parameter tensor
    assert ds["lr"].values.tolist() == [1e-3] * 3  # constant schedule
    assert np.isfinite(ds["loss"].values).all() and np.isfinite(ds["kl_loss"].values).all()
    for name in ("in_std", "mean", "std", "gn_weight", "gn_weight_grad"):
        assert np.isfinite(ds[name].values).all(), name
    # the forward of step 4 used the weights after 3 updates, i.e. those of checkpoint step 3
    saved = load_file(str(trained / artifacts.CHECKPOINTS_DIR / "step-000003" / artifacts.ACCELERATE_MODEL_FILE))
    layers = ds["layer"].values
    gamma = np.concatenate([saved[f"{name}.weight"].numpy() for name in dict.fromkeys(layers.tolist())])
    np.testing.assert_array_equal(ds["gn_weight"].sel(step=4).values, gamma)
    assert not np.array_equal(ds["gn_weight"].sel(step=2).values, gamma)
    # weight statistics on the first tracked step, then once per track.weight_interval (100) steps
    assert np.isfinite(ds["out_weight_norm"].sel(step=2).values).all()
    assert np.isnan(ds["out_weight_norm"].sel(step=[4, 6]).values).all()
    assert np.isnan(ds["near_zero_frac"].sel(step=[4, 6]).values).all()


def test_resume_truncates_the_trace_to_the_checkpoint(trained, tmp_path):
    cfg = train_cfg(tmp_path, "crashed")
    with pytest.raises(Crash):
        train_mod.train(cfg, hooks=(*train_mod.DEFAULT_HOOKS, crash_at(5)))
    trace = cfg.run_dir / artifacts.TRACE_DIR
    assert store.open_trace(trace)["step"].values.tolist() == [2, 4]  # step 4 lies after checkpoint 3
    train_mod.train(cfg, resume="latest")
    resumed, ref = store.open_trace(trace), store.open_trace(trained)
    assert resumed["step"].values.tolist() == [2, 4, 6]
    for name in ("mean", "std", "act_std", "gn_weight", "gn_weight_grad", "loss"):
        np.testing.assert_allclose(resumed[name].values, ref[name].values, rtol=1e-6, err_msg=name)


def test_probe_source_equals_track_of_the_final_weights(tmp_path):
    cfg = train_cfg(tmp_path, "probe", source="probe")
    run = train_mod.train(cfg)
    trace = store.open_trace(run / artifacts.TRACE_DIR)
    assert trace["step"].values.tolist() == [2, 4, 6]
    tracked = store.open_trace(track_checkpoints(None, [str(run)], tmp_path / "final.zarr"))
    assert tracked["step"].values.tolist() == [6]  # final/ carries its global step
    for name in ("in_std", "mean", "mean_abs", "std", "act_mean", "act_std", "gn_weight"):
        np.testing.assert_allclose(trace[name].sel(step=6).values, tracked[name].sel(step=6).values,
                                   rtol=RTOL, atol=ATOL, err_msg=name)
    assert np.isfinite(trace["gn_weight_grad"].sel(step=6).values).all()
    assert np.isnan(tracked["gn_weight_grad"].values).all() and np.isnan(tracked["loss"].values).all()


# ---------------------------------------------------------------------------------------------
# `vaedyn track`


def test_track_three_checkpoints_at_their_steps(tmp_path, tiny_cfg, cli):
    folders = {}
    for step, seed in ((30, 1), (0, 2), (10, 3)):  # given out of order
        folders[step] = save_model(tiny_model(seed), tmp_path / f"ckpt-{step}", tiny_cfg, step=step)
    out = tmp_path / "snap.zarr"
    result = cli("track", "--checkpoint", folders[30], folders[0], folders[10], "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    ds = xr.open_datatree(out, engine="zarr").to_dataset()
    assert ds["step"].values.tolist() == [0, 10, 30] and ds.attrs["source"] == "track"
    assert [c["step"] for c in json.loads(ds.attrs["checkpoints"])] == [0, 10, 30]

    # step 10 holds exactly what the probes give on that model with the probe set
    model = tiny_model(3)
    probes = ChannelProbes(model, tiny_cfg.track)
    probes.reset()
    probes.capture_params()
    probes.arm()
    run_probe(model, load_probe_batch(tiny_cfg), tiny_cfg.data.validation_batch_size)
    probes.disarm()
    probes.finish()
    want = probes.snapshot(10).resolve()
    for name in ("in_std", "mean", "mean_abs", "std", "act_mean", "act_std", "gn_weight", "out_weight_norm"):
        np.testing.assert_allclose(ds[name].sel(step=10).values, want.channels[name], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ds["near_zero_frac"].sel(step=10).values, want.near_zero_frac, rtol=RTOL)

    result = cli("store", "info", out, "--json")
    info = json.loads(result.stdout)
    assert (info["steps"], info["first_step"], info["last_step"], info["source"]) == (3, 0, 30, "track")


def test_track_a_runs_checkpoints_folder_into_the_run(trained, cli):
    result = cli("track", "--checkpoint", trained / artifacts.CHECKPOINTS_DIR)
    assert result.exit_code == 0, result.stderr
    out = Path(result.stdout.strip())
    assert out == trained / artifacts.TRACK_TRACE_DIR
    assert store.open_trace(out)["step"].values.tolist() == [3, 6]
    # rerunning replaces its own store; the training trace is never overwritten
    assert cli("track", "--checkpoint", trained / artifacts.CHECKPOINTS_DIR).exit_code == 0
    result = cli("track", "--checkpoint", trained, "--out", trained / artifacts.TRACE_DIR)
    assert result.exit_code == 2 and "vaedyn train" in result.stderr
    assert store.open_trace(trained)["step"].values.tolist() == [2, 4, 6]


def test_track_bad_inputs(tmp_path, tiny_config_file, cli):
    bare = tmp_path / "bare"
    tiny_model().save_pretrained(str(bare))
    result = cli("track", "--checkpoint", bare, "--out", tmp_path / "x.zarr")
    assert result.exit_code == 2 and "pass -c CFG" in result.stderr
    result = cli("track", "-c", tiny_config_file, "--checkpoint", bare)
    assert result.exit_code == 2 and "--out" in result.stderr
    result = cli("track", "-c", tiny_config_file, "--checkpoint", tmp_path / "missing")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    result = cli("track", "-c", tiny_config_file, "--checkpoint", bare, "--out", tmp_path / "busy")
    assert result.exit_code == 2 and "not a vaedyn trace store" in result.stderr
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written
    a = save_model(tiny_model(), tmp_path / "a", step=5)
    b = save_model(tiny_model(), tmp_path / "b", step=5)
    result = cli("track", "-c", tiny_config_file, "--checkpoint", a, b, "--out", tmp_path / "y.zarr")
    assert result.exit_code == 2 and "two checkpoints at step 5" in result.stderr
    assert not (tmp_path / "y.zarr").exists()



class _ShiftedGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm subclass with its own forward: its output moments must be measured, not derived."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0 + 0.5


class _Norms(torch.nn.Module):
    """Four norms side by side on one input: grouped with a small eps, with eps = 1 (which then
    matters), without affine parameters, and a subclass that changes the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.ModuleDict({
            "grouped": torch.nn.GroupNorm(4, 16, eps=1e-6),
            "large_eps": torch.nn.GroupNorm(2, 16, eps=1.0),
            "plain": torch.nn.GroupNorm(8, 16, affine=False),
            "subclass": _ShiftedGroupNorm(4, 16),
        })
        with torch.no_grad():
            for m in self.body.values():
                if m.affine:
                    m.weight.copy_(torch.randn(16) * 2)
                    m.bias.copy_(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(m(x) for m in self.body.values())


def test_group_norm_output_moments_derived_from_the_input_equal_direct_ones(monkeypatch):
    """A plain GroupNorm's output mean and std come from its input's moments (one pass fewer);
    planted: channels with large offsets, a group whose channels are constant, one gamma = 0."""
    from vaedyn_cli import probes as probes_mod

    torch.manual_seed(0)
    model = _Norms()
    with torch.no_grad():
        model.body["grouped"].weight[3] = 0.0
    x = torch.randn(3, 16, 5, 7)
    x[:, 0:4] += torch.tensor([20.0, -20.0, 5.0, 0.0]).view(1, 4, 1, 1)  # offsets, within a group
    x[:, 4:8] = torch.arange(4.0).view(1, 4, 1, 1) * 0.5 + 3.0  # a group of constant channels
    calls = []
    real = probes_mod.moments
    monkeypatch.setattr(probes_mod, "moments", lambda t, scratch: calls.append(t.shape) or real(t, scratch))
    probes = ChannelProbes(model, TrackConfig(module_types=["GroupNorm", "_ShiftedGroupNorm"]))
    assert [layer.name for layer in probes.layers] == [f"body.{k}" for k in model.body]
    cap = Capture(model)
    probes.reset()
    probes.arm()
    model(x)
    model(x[:2] * 0.5)  # a second micro-batch of another size
    probes.disarm()
    probes.finish()
    rec = probes.snapshot(1).resolve()
    cap.remove()
    # four inputs moments each call, and output moments only for the subclass
    assert len(calls) == 2 * (4 + 1)
    for layer in probes.layers:
        cols = slice(layer.offset, layer.offset + layer.channels)
        for key, want in expected_stats(cap, layer.name, False).items():
            if key in ("in_std", "mean", "mean_abs", "std"):
                np.testing.assert_allclose(rec.channels[key][cols], want, rtol=RTOL, atol=ATOL, err_msg=f"{layer.name} {key}")
    grouped = next(layer for layer in probes.layers if layer.name == "body.grouped")
    assert rec.channels["std"][grouped.offset + 3] == 0.0  # gamma = 0: exactly constant output


@pytest.mark.parametrize(("interval", "weight_interval", "due"), [
    (10, 100, [10, 110, 210]),  # the defaults: every tenth tracked step
    (1, 100, [1, 101, 201]),  # tracking every step does not make the weight passes more frequent
    (7, 100, [7, 112, 210]),  # not a multiple: the first tracked step of each 100-step window after step 7
    (10, 5, list(range(10, 301, 10))),  # shorter than the interval: every tracked step
])
def test_weight_statistics_once_per_weight_interval(interval, weight_interval, due):
    from types import SimpleNamespace

    from vaedyn_cli.tracker import Tracker

    cfg = RunConfig.model_validate({"track": {"interval": interval, "weight_interval": weight_interval}})
    tracked = [s for s in range(1, 301) if s % interval == 0]
    assert [s for s in tracked if Tracker._weights_due(SimpleNamespace(cfg=cfg), s)] == due


def _planted_rows(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """(b, c, h, w) float32 with per-channel offsets of 0, 3, 100 and 1000 std (one pass would
    cancel at the last two), a constant channel and an all-zero one."""
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    t += torch.tensor([0.0, 3.0, 100.0, 1000.0]).repeat(c // 4).view(1, c, 1, 1)
    t[:, 5] = 7.25
    t[:, 6] = 0.0
    return t.float()


def test_channels_last_says_what_torch_says_of_the_transposed_view() -> None:
    """`channels_last(t)` is `t.transpose(1, 2).is_contiguous()`, for every (B, C, L) of sizes 1 to 3
    in each of four layouts: contiguous, channels-last (from (B, L, C)), C outermost, and every other
    channel of a contiguous tensor."""
    seen = set()
    for b in (1, 2, 3):
        for c in (1, 2, 3):
            for n in (1, 2, 3):
                base = torch.zeros(b, c, n)
                for t in (base, torch.zeros(b, n, c).transpose(1, 2), torch.zeros(c, b, n).transpose(0, 1),
                          torch.zeros(b, 2 * c, n)[:, ::2]):
                    want = t.transpose(1, 2).is_contiguous()
                    assert channels_last(t) == want, (t.shape, t.stride())
                    seen.add(want)
    assert seen == {True, False}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(("h", "w"), [(4, 4), (3, 5), (64, 80)], ids=["two-pass size", "two-pass odd size", "one-pass size"])
def test_moments_in_every_layout_and_size_equal_float64(layout, h, w):
    """`_moments` (sum and M2 per sample and channel) on every CPU path: small tensors two-pass,
    large ones one-pass with ill-conditioned rows redone, contiguous rows, a channels-last layout
    and one that is neither (copied)."""
    from vaedyn_cli import kernels as track_mod

    b, c = 2, 32
    assert (b * c * 4 * 4 <= track_mod.TWO_PASS_MAX_NUMEL) and (b * c * 64 * 80 > track_mod.TWO_PASS_MAX_NUMEL)
    t4 = _planted_rows(b, c, h, w)
    if layout == "channels_last":
        t = t4.contiguous(memory_format=torch.channels_last).reshape(b, c, h * w)
        assert not t.is_contiguous() and t.transpose(1, 2).is_contiguous()
    elif layout == "strided":
        t = t4.reshape(b, c, h * w).transpose(0, 1).contiguous().transpose(0, 1)  # (B, C, L) with C outermost
        assert not t.is_contiguous() and not t.transpose(1, 2).is_contiguous()
    else:
        t = t4.reshape(b, c, h * w)
    before = t.clone()
    s, m2 = track_mod.moments(t, track_mod.Scratch())
    torch.testing.assert_close(t, before, rtol=0, atol=0)  # the input is left alone
    ref = t.double()
    n = ref.shape[-1]
    np.testing.assert_allclose((s.double() / n).numpy(), ref.mean(-1).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose((m2.double() / n).sqrt().numpy(), ref.std(-1, correction=0).numpy(), rtol=1e-5, atol=1e-6)
    assert torch.all(m2[:, 5:7] == 0)  # constant channels: exactly no spread


@pytest.mark.parametrize("ratios", [(0.0, 1e-4, 0.5, 0.8), (0.0, 1e-4, 1e-4, 0.0)], ids=["spread", "centred"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_one_pass_moments_of_well_conditioned_rows_equal_float64(layout, ratios):
    """A one-pass-size tensor whose every row is well conditioned (mean / std of `ratios`), so that no
    row is redone two-pass: the one-pass sum of squares, corrected by s^2 / n, is the answer (to 1e-5),
    in both the contiguous and the channels-last path (where one ill-conditioned row would redo all)."""
    from vaedyn_cli import kernels as track_mod

    b, c, h, w = 2, 32, 64, 80
    assert b * c * h * w > track_mod.TWO_PASS_MAX_NUMEL
    z = torch.randn(b, c, h * w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, correction=0, keepdim=True)  # mean 0, std 1 exactly
    z = (z * 2.0 + 2.0 * torch.tensor(ratios, dtype=torch.float64).repeat(c // 4).view(1, c, 1)).float()
    t = z if layout == "contiguous" else z.transpose(1, 2).contiguous().transpose(1, 2)
    assert t.is_contiguous() == (layout == "contiguous") and track_mod.channels_last(t) == (layout != "contiguous")
    s, m2 = track_mod.moments(t, track_mod.Scratch())
    assert not track_mod.ill_conditioned(s, m2, h * w).any()
    ref = z.double()
    n = h * w
    np.testing.assert_allclose((s.double() / n).numpy(), ref.mean(-1).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose((m2.double() / n).sqrt().numpy(), ref.std(-1, correction=0).numpy(), rtol=1e-5)


def test_tracker_folds_after_the_backward_and_without_that_call(tmp_path):
    """In the training loop the probes are disarmed and folded at after_backward (their results are
    released before the optimizer allocates); a loop that never calls after_backward records the
    same statistics at end_step."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from vaedyn_cli.tracker import Tracker

    model = tiny_model()
    cfg = RunConfig.model_validate(tiny_config_dict(tmp_path, track={"interval": 1}))
    ctx = SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True), model=model, optimizer=None,
                          run_dir=tmp_path / "run", resume_step=None, train_loader=None)
    tracker = Tracker(ctx)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    for step, calls_after_backward in ((1, True), (2, False)):
        tracker.begin_step(step)
        assert hooks() > 0
        loss = model(x).sample.square().mean()
        loss.backward()
        if calls_after_backward:
            tracker.after_backward(step)
            assert hooks() == 0 and tracker.probes.counts.any()  # folded before an optimizer would run
        tracker.end_step(step, {"loss": float(loss.detach())})
        assert hooks() == 0
        model.zero_grad(set_to_none=True)  # same weights, same batch: the same statistics
    tracker.close()
    stats = xr.open_datatree(tmp_path / "run" / artifacts.TRACE_DIR, engine="zarr").to_dataset()
    assert stats["step"].values.tolist() == [1, 2]
    for name in ("in_std", "mean", "mean_abs", "std", "act_mean", "act_std", "gn_weight"):
        first, second = stats[name].sel(step=1).values, stats[name].sel(step=2).values
        np.testing.assert_allclose(first, second, rtol=1e-6, err_msg=name)
        assert np.isfinite(first).any()
    # |grad gamma| is read at after_backward only
    assert np.isfinite(stats["gn_weight_grad"].sel(step=1).values).all()
    assert np.isnan(stats["gn_weight_grad"].sel(step=2).values).all()


def test_scratch_views_follow_the_buffer_when_it_grows():
    """Scratch hands out cached views; after a larger request replaces the buffer, a view of a
    shape asked for before is a view of the new buffer (a stale view would let two passes write
    into different memory than they read), and it has the strides of the tensor it mimics."""
    from vaedyn_cli.kernels import Scratch

    scratch = Scratch()
    small = torch.zeros(2, 3, 4)
    cl = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).flatten(2)
    first = scratch.like(small)
    assert scratch.like(small) is first  # cached
    grown = scratch.take("work", small, (1000,))
    again = scratch.like(small)
    assert again.data_ptr() == grown.data_ptr() != first.data_ptr()
    view = scratch.like(cl)
    assert view.stride() == cl.stride() and view.data_ptr() == grown.data_ptr()
    assert scratch.nbytes == 1000 * 4


def test_fold_of_mixed_precision_statistics_keeps_the_double_precision():
    """The fold concatenates the hooks' float32 results before converting them (cat's fast path);
    a call whose statistics are float64 (a layer run in double) must not be rounded to float32 on
    the way: the sums equal those of an all-float64 fold of the same values."""
    model = build_preset(TINY_WIDTH, 0)
    probes = ChannelProbes(model, TrackConfig())
    probes.reset()
    probes.arm()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32) * 2 - 1)
    probes.disarm()
    saved = [list(probes._xy), list(probes._gn), list(probes._act)]
    assert all(t.dtype == torch.float32 for entries in saved for _, _, stats in entries for t in stats)
    i, n, stats = saved[1][1]  # not the first call: the first one's dtype picks the path
    fine = (i, n, tuple(t.double() * (1 + 2**-40) for t in stats))  # not representable in float32

    def fold(entries: list[list]) -> torch.Tensor:
        probes.sums.zero_()
        probes._xy[:], probes._gn[:], probes._act[:] = (list(v) for v in entries)
        probes.finish()
        return probes.sums.clone()

    as_double = [[(j, m, tuple(t.double() for t in st)) for j, m, st in v] for v in saved]
    as_double[1][1] = fine
    mixed = [list(v) for v in saved]
    mixed[1][1] = fine
    assert torch.equal(fold(mixed), fold(as_double))


def test_dense_is_a_permutation_of_a_contiguous_layout_and_scratch_copies_only_dense_strides() -> None:
    """dense(): contiguous, channels-last and transposed tensors are dense (size-1 dims' strides do not
    matter); strided slices (a gap, also along a size-2 dim), a slice of the channels (a gap between
    samples) and an expanded dim (stride 0) are not.
    Scratch.like keeps a dense tensor's strides and lays a non-dense one out contiguously, and abs_sum
    on each is the plain sum of |t| over the last dim."""
    base = torch.randn(2, 3, 4, 5)
    is_dense = [base, base.to(memory_format=torch.channels_last), base.transpose(1, 3), base[:1],
                torch.randn(6).as_strided((2, 1, 3), (3, 7, 1))]
    not_dense = [base[..., ::2], base[:, :1], base[:, :, :2, :][..., :1].expand(2, 3, 2, 3),
                 torch.randn(4, 6)[:, ::2], torch.randn(2, 6)[:, ::3], torch.randn(3, 1).expand(3, 4)]
    assert [dense(t) for t in is_dense] == [True] * 5
    assert [dense(t) for t in not_dense] == [False] * 6
    scratch = Scratch()
    for t in is_dense + not_dense:
        out = scratch.like(t, purpose=f"p{t.stride()}")
        assert out.shape == t.shape
        assert out.stride() == (t.stride() if dense(t) else torch.empty(t.shape).stride())
        torch.testing.assert_close(abs_sum(t, scratch), t.abs().sum(-1), rtol=1e-6, atol=1e-6)
