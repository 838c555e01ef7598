"""Nudge strategies, target selection and `vaedyn nudge`, on the width-1/16 model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import TINY_WIDTH
from vaedyn_cli import artifacts
from vaedyn_cli.anatomy import groupnorm_layers
from vaedyn_cli.config import NudgeConfig, RunConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.model import build_preset, resolve_checkpoint, save_model
from vaedyn_cli.randomness import channel_generator
from vaedyn_cli.selection import Target, check_classification_fits, parse_classification, parse_select, select_targets
from vaedyn_cli.strategies import STRATEGIES, apply, channel_wiring

# One target of each wiring kind: producer+consumer, upsampler producer, attention, conv_norm_out,
# and a norm1 reading a residual sum (no producer).
TARGETS = [
    Target("encoder.down_blocks.0.resnets.1.norm1", 0),
    Target("encoder.mid_block.attentions.0.group_norm", 7),
    Target("decoder.up_blocks.1.resnets.0.norm1", 5),
    Target("decoder.up_blocks.1.resnets.1.norm2", 3),
    Target("decoder.conv_norm_out", 2),
]
PRODUCER = {
    "encoder.down_blocks.0.resnets.1.norm1": None,
    "encoder.mid_block.attentions.0.group_norm": None,
    "decoder.up_blocks.1.resnets.0.norm1": "decoder.up_blocks.0.upsamplers.0.conv",
    "decoder.up_blocks.1.resnets.1.norm2": "decoder.up_blocks.1.resnets.1.conv1",
    "decoder.conv_norm_out": None,
}
CONSUMERS = {
    "encoder.down_blocks.0.resnets.1.norm1": ["encoder.down_blocks.0.resnets.1.conv1"],
    "encoder.mid_block.attentions.0.group_norm": [
        f"encoder.mid_block.attentions.0.{q}" for q in ("to_q", "to_k", "to_v")
    ],
    "decoder.up_blocks.1.resnets.0.norm1": ["decoder.up_blocks.1.resnets.0.conv1"],
    "decoder.up_blocks.1.resnets.1.norm2": ["decoder.up_blocks.1.resnets.1.conv2"],
    "decoder.conv_norm_out": ["decoder.conv_out"],
}


def planted_model(seed: int = 0) -> torch.nn.Module:
    """The tiny model with gammas in +-[0.2, 2] and betas away from 0, so that every strategy changes them."""
    model = build_preset(TINY_WIDTH, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, norm in groupnorm_layers(model):
            n = norm.num_channels
            sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
            norm.weight.copy_(sign * (0.2 + 1.8 * torch.rand(n, generator=gen)))
            norm.bias.copy_(0.1 + torch.rand(n, generator=gen))
    return model


def expected_slices(strategy: str, targets: list[Target]) -> list[tuple[str, tuple]]:
    slices = []
    for t in targets:
        c, prod = t.channel_index, PRODUCER[t.layer]
        gamma, beta = (f"{t.layer}.weight", (c,)), (f"{t.layer}.bias", (c,))
        incoming = [(f"{prod}.weight", (c,)), (f"{prod}.bias", (c,))] if prod else []
        if strategy.startswith("gn_scale"):
            slices += [gamma]
        elif strategy == "redo":
            slices += [gamma, beta, *incoming, *[(f"{m}.weight", (slice(None), c)) for m in CONSUMERS[t.layer]]]
        else:
            slices += [gamma, beta, *incoming]
    return slices


def masks(shapes: dict[str, torch.Size], slices: list[tuple[str, tuple]]) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
    for name, index in slices:
        out[name][index] = True
    return out


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# wiring and registry


def test_registry_matches_config_choices() -> None:
    assert list(STRATEGIES) == list(NudgeConfig.model_fields["strategy"].annotation.__args__)


def test_channel_wiring_of_the_sdxl_layout() -> None:
    model = build_preset(TINY_WIDTH, 0)
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for _, m in groupnorm_layers(model)]
    wiring = channel_wiring(model)
    assert calls == []  # traced on a weightless twin: probes on the live model see nothing
    for h in handles:
        h.remove()
    norms = dict(groupnorm_layers(model))
    assert list(wiring) == list(norms)
    unique_inputs = {
        "encoder.down_blocks.0.resnets.0.norm1": "encoder.conv_in",
        "encoder.down_blocks.1.resnets.0.norm1": "encoder.down_blocks.0.downsamplers.0.conv",
        "encoder.down_blocks.2.resnets.0.norm1": "encoder.down_blocks.1.downsamplers.0.conv",
        "encoder.down_blocks.3.resnets.0.norm1": "encoder.down_blocks.2.downsamplers.0.conv",
        "decoder.mid_block.resnets.0.norm1": "decoder.conv_in",
        "decoder.up_blocks.1.resnets.0.norm1": "decoder.up_blocks.0.upsamplers.0.conv",
        "decoder.up_blocks.2.resnets.0.norm1": "decoder.up_blocks.1.upsamplers.0.conv",
        "decoder.up_blocks.3.resnets.0.norm1": "decoder.up_blocks.2.upsamplers.0.conv",
    }
    modules = dict(model.named_modules())
    for name, w in wiring.items():
        parent = name.rpartition(".")[0]
        if name.endswith("norm2"):
            assert w.producer == f"{parent}.conv1"
        else:
            assert w.producer == unique_inputs.get(name), name
        assert w.consumers, name  # every GroupNorm of the VAE feeds some layer
        for consumer in w.consumers:
            assert modules[consumer].weight.shape[1] == norms[name].num_channels
    assert sum(w.producer is not None for w in wiring.values()) == 24 + 8  # 24 resnets (norm2) and 8 norm1 after a conv
    for layer, consumers in CONSUMERS.items():
        assert list(wiring[layer].consumers) == consumers
        assert wiring[layer].producer == PRODUCER[layer]


# ---------------------------------------------------------------------------------------------
# strategies: exactly the targeted slices change


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_changes_exactly_the_targeted_slices(strategy: str) -> None:
    model = planted_model()
    before = snapshot(model)
    events = apply(model, TARGETS, strategy, NudgeConfig(), step=7, seed=3)
    after = snapshot(model)
    slices = expected_slices(strategy, TARGETS)
    expected = masks({k: v.shape for k, v in before.items()}, slices)
    for name in before:
        changed = before[name] != after[name]
        assert torch.equal(changed, expected[name]), f"{strategy} changed {name} outside/inside its slices"
    assert len(events) == len(slices)
    assert {e["strategy"] for e in events} == {strategy} and {e["step"] for e in events} == {7}


def test_gn_scale_nudge_keeps_the_original_semantics() -> None:
    model = planted_model()
    layer = "decoder.up_blocks.3.resnets.2.norm2"
    norm = dict(model.named_modules())[layer]
    with torch.no_grad():
        norm.weight[:4] = torch.tensor([0.0, 0.5, -0.5, 2.0])
    events = apply(model, [Target(layer, i) for i in range(4)], "gn_scale_nudge", NudgeConfig(factor=1.1, max_scale=1.5))
    assert norm.weight[:4].tolist() == pytest.approx([0.0, 0.55, -0.55, 1.5])
    assert [(e["param"], e["channel_index"]) for e in events] == [(f"{layer}.weight", i) for i in range(4)]
    assert [e["before"] for e in events] == pytest.approx([0.0, 0.5, -0.5, 2.0])
    assert [e["after"] for e in events] == pytest.approx([0.0, 0.55, -0.55, 1.5])


# The original's gentle nudge as float32 bit patterns: the Python double of gamma times 1.1, min with
# 1.5, rounded once to float32 (a float32 product is one ulp higher for the first four).
ORIGINAL_NUDGE_BITS = [
    (0x3DCCCCCD, 0x3DE147AE),  # 0.1 -> 0.11
    (0x3E4CCCCD, 0x3E6147AE),  # 0.2 -> 0.22
    (0x3D4CCCCD, 0x3D6147AE),  # 0.05 -> 0.055
    (0x358637BD, 0x3593A3B6),  # 1e-6 -> 1.1e-6
    (0x3E99999A, 0x3EA8F5C3),  # 0.3 -> 0.33
    (0x3F333333, 0x3F451EB8),  # 0.7 -> 0.77
    (0x3F800000, 0x3F8CCCCD),  # 1.0 -> 1.1
    (0x3DFCD680, 0x3E0B0F93),  # 0.123456 -> 0.1358016
    (0x3F99999A, 0x3FA8F5C3),  # 1.2 -> 1.32
    (0x3FB33333, 0x3FC00000),  # 1.4 -> 1.5, the cap
    (0x3FCCCCCD, 0x3FC00000),  # 1.6 -> lowered to 1.5
    (0xBE99999A, 0xBEA8F5C3),  # -0.3 -> -0.33
    (0x00000000, 0x00000000),  # 0 stays 0
]


@pytest.mark.parametrize(("factor", "cap"), [(1.1, 1.5), (1.05, 1.5), (1.2, 2.0)])
def test_gn_scale_nudge_is_the_float64_product_rounded_once(factor: float, cap: float) -> None:
    model = build_preset(TINY_WIDTH, 0)
    norms = groupnorm_layers(model)
    n = sum(norm.num_channels for _, norm in norms)
    table = np.array([g for g, _ in ORIGINAL_NUDGE_BITS], dtype=np.uint32).view(np.float32)
    gammas = np.concatenate([table, np.random.default_rng(0).uniform(-0.5, 1.7, n - len(table)).astype(np.float32)])
    targets, offset = [], 0
    with torch.no_grad():
        for name, norm in norms:
            norm.weight.copy_(torch.from_numpy(gammas[offset : offset + norm.num_channels]))
            targets += [Target(name, i) for i in range(norm.num_channels)]
            offset += norm.num_channels
    events = apply(model, targets, "gn_scale_nudge", NudgeConfig(factor=factor, max_scale=cap))
    got = torch.cat([norm.weight.detach() for _, norm in norms]).numpy()
    expected = np.minimum(gammas.astype(np.float64) * factor, cap).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert [e["after"] for e in events] == expected.astype(np.float64).tolist()
    # a float32 product (the factor rounded first) is one ulp off for a good part of them
    in_float32 = np.minimum(gammas * np.float32(factor), np.float32(cap))
    assert np.mean(in_float32.view(np.uint32) != expected.view(np.uint32)) > 0.1
    if (factor, cap) == (1.1, 1.5):
        assert got[: len(table)].view(np.uint32).tolist() == [r for _, r in ORIGINAL_NUDGE_BITS]


def test_gn_scale_reset_and_to_layer_use_the_layer_before_the_change() -> None:
    model = planted_model()
    layer = "encoder.down_blocks.0.resnets.0.norm1"  # 8 channels
    norm = dict(model.named_modules())[layer]
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.0, -0.2, 0.4, -0.6, 0.8, 1.0, -1.2, 1.4]))
    # median |gamma| = (0.6 + 0.8) / 2 = 0.7; recomputed after channel 0 changed it would be 0.75
    apply(model, [Target(layer, i) for i in (0, 1, 2)], "gn_scale_to_layer", NudgeConfig())
    assert norm.weight.tolist() == pytest.approx([0.7, -0.7, 0.7, -0.6, 0.8, 1.0, -1.2, 1.4])
    apply(model, [Target(layer, 6)], "gn_scale_reset", NudgeConfig())
    assert norm.weight[6].item() == 1.0


def test_redo_redraws_filter_zeroes_readers_and_records_norms() -> None:
    model = planted_model()
    params = dict(model.named_parameters())
    layer, c = "decoder.up_blocks.1.resnets.1.norm2", 3
    conv1, conv2 = "decoder.up_blocks.1.resnets.1.conv1", "decoder.up_blocks.1.resnets.1.conv2"
    old_row = params[f"{conv1}.weight"][c].detach().clone()
    old_cols = params[f"{conv2}.weight"][:, c].detach().clone()
    old_bias = params[f"{conv1}.bias"][c].item()
    events = apply(model, [Target(layer, c)], "redo", NudgeConfig(), step=40, seed=1)
    bound = 1 / math.sqrt(params[f"{conv1}.weight"][0].numel())
    row = params[f"{conv1}.weight"][c]
    assert row.abs().max() <= bound and not torch.equal(row, old_row)
    assert row.std() > bound / 4  # a fresh uniform draw, not a constant
    assert torch.count_nonzero(params[f"{conv2}.weight"][:, c]) == 0
    assert params[f"{layer}.weight"][c].item() == 1.0 and params[f"{layer}.bias"][c].item() == 0.0
    by_param = {e["param"]: e for e in events}
    assert list(by_param) == [f"{conv1}.weight[3]", f"{conv1}.bias", f"{conv2}.weight[:, 3]", f"{layer}.weight",
                              f"{layer}.bias"]
    assert by_param[f"{conv1}.weight[3]"]["before"] == pytest.approx(old_row.norm().item())
    assert by_param[f"{conv1}.weight[3]"]["after"] == pytest.approx(row.norm().item())
    assert by_param[f"{conv1}.bias"]["before"] == pytest.approx(old_bias)
    assert by_param[f"{conv2}.weight[:, 3]"]["before"] == pytest.approx(old_cols.norm().item())
    assert by_param[f"{conv2}.weight[:, 3]"]["after"] == 0.0
    assert by_param[f"{layer}.weight"]["after"] == 1.0 and by_param[f"{layer}.bias"]["after"] == 0.0
    for e in events:
        assert set(e) == {"step", "layer", "channel_index", "strategy", "param", "before", "after"}
        assert (e["step"], e["layer"], e["channel_index"], e["strategy"]) == (40, layer, 3, "redo")


def test_random_strategies_are_seeded_per_channel() -> None:
    layer = "decoder.up_blocks.1.resnets.1.norm2"
    conv1 = "decoder.up_blocks.1.resnets.1.conv1.weight"

    def row_after(targets: list[int], seed: int, step: int) -> torch.Tensor:
        model = planted_model()
        apply(model, [Target(layer, i) for i in targets], "redo", NudgeConfig(), step=step, seed=seed)
        return dict(model.named_parameters())[conv1][3].detach().clone()

    first = row_after([3], seed=1, step=5)
    assert torch.equal(first, row_after([3, 4], seed=1, step=5))  # independent of the other targets
    assert not torch.equal(first, row_after([3], seed=2, step=5))
    assert not torch.equal(first, row_after([3], seed=1, step=6))


def test_shrink_perturb_shrinks_exactly_without_noise() -> None:
    model = planted_model()
    before = snapshot(model)
    t = Target("decoder.up_blocks.1.resnets.1.norm2", 3)
    apply(model, [t], "shrink_perturb", NudgeConfig(shrink=0.5, perturb_std=0.0))
    after = snapshot(model)
    for name, index in expected_slices("shrink_perturb", [t]):
        assert torch.allclose(after[name][index], 0.5 * before[name][index])
    noisy = planted_model()
    apply(noisy, [t], "shrink_perturb", NudgeConfig(shrink=1.0, perturb_std=0.1))
    delta = noisy.state_dict()["decoder.up_blocks.1.resnets.1.conv1.weight"][3] - before[
        "decoder.up_blocks.1.resnets.1.conv1.weight"][3]
    assert 0.05 < delta.std().item() < 0.15  # 288 draws of N(0, 0.1^2)


def test_shrink_perturb_is_the_float64_formula_rounded_once() -> None:
    model = planted_model()
    before = snapshot(model)
    t = Target("decoder.up_blocks.1.resnets.1.norm2", 3)
    apply(model, [t], "shrink_perturb", NudgeConfig(shrink=0.3, perturb_std=0.01), step=5, seed=2)
    after = snapshot(model)
    gen = channel_generator(2, 5, t.layer, 3)  # the draws, in the order of the slices: gamma, beta, filter, bias
    for name, index in expected_slices("shrink_perturb", [t]):
        old = before[name][index].numpy().astype(np.float64)
        noise = torch.randn(old.shape, dtype=torch.float32, generator=gen).numpy().astype(np.float64)
        expected = np.asarray(0.3 * old + 0.01 * noise).astype(np.float32)
        assert np.array_equal(after[name][index].numpy().view(np.uint32), expected.view(np.uint32)), name


# ---------------------------------------------------------------------------------------------
# optimizer state


def stepped_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model(x).sample.pow(2).mean().backward()
    opt.step()
    return opt


def moments(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[tuple[str, str], torch.Tensor]:
    return {(n, k): opt.state[p][k].clone() for n, p in model.named_parameters() for k in ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_moments_of_exactly_the_touched_slices_reset(reset: bool) -> None:
    model = planted_model()
    opt = stepped_adamw(model)
    before = moments(model, opt)
    apply(model, TARGETS, "redo", NudgeConfig(reset_optimizer_state=reset), optimizer=opt, step=1)
    after = moments(model, opt)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    touched = masks(shapes, expected_slices("redo", TARGETS))
    for (name, key), old in before.items():
        new = after[(name, key)]
        if not reset:
            assert torch.equal(new, old)
            continue
        mask = touched[name]
        assert torch.equal(new[~mask], old[~mask]), (name, key)
        assert torch.count_nonzero(new[mask]) == 0, (name, key)
        if key == "exp_avg_sq" and mask.any():
            assert torch.count_nonzero(old[mask]) > 0  # there was something to reset


# ---------------------------------------------------------------------------------------------
# targets: selection and validation


def classification(model: torch.nn.Module, planted: dict[tuple[str, int], dict] | None = None) -> dict:
    """A classify JSON for the model: every channel active except the planted records."""
    layers = {n: m.num_channels for n, m in groupnorm_layers(model)}
    channels = []
    for layer, n in layers.items():
        for i in range(n):
            rec = {
                "layer": layer, "channel_index": i, "part": layer.split(".")[0], "state": "active",
                "trajectory": "active", "mechanism": None, "unused": False, "input_collapsed": False,
                "score": 1.0, "onset_step": None, "revival_step": None, "n_transitions": 0,
            }
            rec.update((planted or {}).get((layer, i), {}))
            channels.append(rec)
    return {"store": "runs/tiny/trace.zarr", "method": "dormancy", "params": {"tau": 0.1}, "steps": [0, 6],
            "layers": layers, "channels": channels}


DORMANT = {"state": "dormant", "trajectory": "died", "mechanism": "gn_scale", "onset_step": 4}
PLANTED = {
    ("encoder.down_blocks.0.resnets.0.norm1", 1): {**DORMANT, "score": 0.05},
    ("encoder.down_blocks.0.resnets.0.norm1", 4): {**DORMANT, "score": 0.01},
    ("encoder.down_blocks.0.resnets.0.norm1", 5): {**DORMANT, "score": 0.0, "mechanism": "saturated"},
    ("encoder.down_blocks.0.resnets.0.norm1", 6): {**DORMANT, "score": 0.09},
    ("decoder.conv_norm_out", 2): {"state": "dead", "trajectory": "born_dormant", "mechanism": "other",
                                   "score": 0.0, "unused": True},
    ("decoder.up_blocks.1.resnets.1.norm2", 3): {**DORMANT, "score": 0.02},
    ("decoder.up_blocks.1.resnets.1.norm2", 9): {"state": "active", "trajectory": "revived", "score": 0.8,
                                                 "revival_step": 6, "n_transitions": 2},
}


@pytest.fixture(scope="module")
def tiny_classification() -> dict:
    return classification(build_preset(TINY_WIDTH, 0), PLANTED)


def chosen(data: dict, select: list[str], max_fraction: float = 1.0) -> list[tuple[str, int]]:
    return [(t.layer, t.channel_index) for t in select_targets(data["channels"], select, max_fraction, data["layers"])]


def test_select_filters(tiny_classification: dict) -> None:
    d = tiny_classification
    enc = "encoder.down_blocks.0.resnets.0.norm1"
    dec = "decoder.up_blocks.1.resnets.1.norm2"
    assert chosen(d, ["mechanism=gn_scale"]) == [(enc, 1), (enc, 4), (enc, 6), (dec, 3)]
    assert chosen(d, ["state=dormant,dead", "layer=decoder.*"]) == [(dec, 3), ("decoder.conv_norm_out", 2)]
    assert chosen(d, ["unused=true"]) == [("decoder.conv_norm_out", 2)]
    assert chosen(d, ["trajectory=revived"]) == [(dec, 9)]
    assert chosen(d, ["state!=active", "mechanism!=gn_scale,other"]) == [(enc, 5)]
    assert chosen(d, ["n_transitions=2"]) == [(dec, 9)]
    assert len(chosen(d, [])) == 1240


def test_max_fraction_keeps_the_lowest_scores_per_layer(tiny_classification: dict) -> None:
    enc = "encoder.down_blocks.0.resnets.0.norm1"  # 8 channels: 0.25 -> at most 2
    dec = "decoder.up_blocks.1.resnets.1.norm2"  # 32 channels: 0.25 -> at most 8
    assert chosen(tiny_classification, ["state=dormant"], 0.25) == [(enc, 4), (enc, 5), (dec, 3)]
    assert chosen(tiny_classification, ["state=dormant"], 0.1) == [(dec, 3)]  # floor(0.8) = 0 in enc


@pytest.mark.parametrize(
    ("select", "message"),
    [
        (["colour=red"], "unknown field 'colour'"),
        (["state=sleepy"], "'sleepy' is not a value of state"),
        (["state"], "expected FIELD=VALUE"),
    ],
)
def test_bad_select_is_one_clear_error(select: list[str], message: str) -> None:
    with pytest.raises(VaedynError, match=message):
        parse_select(select)


def test_targets_must_fit_the_model(tiny_classification: dict) -> None:
    model = build_preset(TINY_WIDTH, 0)
    check_classification_fits(tiny_classification, model, "t.json", "ckpt")
    wider = classification(build_preset(0.125, 0))
    with pytest.raises(VaedynError, match="another architecture: encoder.down_blocks.0.resnets.0.norm1 has 16"):
        check_classification_fits(wider, model, "t.json", "ckpt")
    with pytest.raises(VaedynError, match="out of range"):
        apply(model, [Target("decoder.conv_norm_out", 8)], "redo", NudgeConfig())
    with pytest.raises(VaedynError, match="unknown layer 'decoder.conv_out'"):
        apply(model, [Target("decoder.conv_out", 0)], "redo", NudgeConfig())


def test_malformed_classification_is_rejected() -> None:
    with pytest.raises(VaedynError, match="not valid JSON"):
        parse_classification("{oops", "t.json")
    with pytest.raises(VaedynError, match="lack a 'layers' mapping"):
        parse_classification(json.dumps({"channels": []}), "t.json")
    with pytest.raises(VaedynError, match="integer 'channel_index'"):
        parse_classification(json.dumps({"layers": {"a": 2}, "channels": [{"layer": "a", "channel_index": "1"}]}), "t")


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    """A run folder holding config.yaml and final/ (a diffusers folder saved at step 6)."""
    from tests.conftest import tiny_config_dict

    root = tmp_path_factory.mktemp("nudge-run")
    cfg = RunConfig.model_validate(tiny_config_dict(root))
    run = root / "run"
    run.mkdir()
    (run / artifacts.CONFIG_FILE).write_text(cfg.to_yaml())
    save_model(planted_model(), run / artifacts.FINAL_DIR, cfg, step=6)
    return run, cfg


@pytest.fixture
def run(saved_run: tuple[Path, RunConfig], tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved_run[0], copy)
    return copy


@pytest.fixture
def targets_file(tmp_path: Path, tiny_classification: dict) -> Path:
    path = tmp_path / "targets.json"
    path.write_text(json.dumps(tiny_classification))
    return path


def test_cli_nudge_end_to_end(cli, run: Path, targets_file: Path, saved_run: tuple[Path, RunConfig]) -> None:
    res = cli("nudge", "--checkpoint", run, "--targets", targets_file, "--strategy", "gn_scale_reset")
    assert res.exit_code == 0, res.stderr
    out = run / "nudged-gn_scale_reset"
    assert res.stdout == f"{out}\n"
    assert sorted(p.name for p in run.iterdir()) == [artifacts.CONFIG_FILE, artifacts.FINAL_DIR, out.name]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        artifacts.MODEL_CONFIG_FILE, "diffusion_pytorch_model.safetensors", artifacts.RUN_CONFIG_IN_CHECKPOINT,
        artifacts.STEP_FILE, artifacts.NUDGE_FILE, artifacts.MARKER_FILE,
    ])
    assert artifacts.marker_kind(out) == "nudged"
    record = json.loads((out / artifacts.NUDGE_FILE).read_text())
    dormant = [k for k, v in PLANTED.items() if v["state"] in ("dormant", "dead")]  # default select
    assert record["checkpoint"] == str(run) and record["strategy"] == "gn_scale_reset"
    assert record["select"] == ["state=dormant,dead"] and record["n_targets"] == len(dormant) == 6
    assert record["params"] == {"max_fraction": 1.0} and record["step"] == 6
    assert sorted((e["layer"], e["channel_index"]) for e in record["events"]) == sorted(dormant)
    assert all(e["after"] == 1.0 and e["param"] == f"{e['layer']}.weight" for e in record["events"])

    nudged = resolve_checkpoint(out)
    assert nudged.step == 6 and nudged.config is not None
    assert nudged.config.model_dump() == {**saved_run[1].model_dump(), "nudge": {
        **saved_run[1].nudge.model_dump(), "strategy": "gn_scale_reset"}}
    before = resolve_checkpoint(run).load().state_dict()
    after = nudged.load().state_dict()
    expected = masks({k: v.shape for k, v in before.items()},
                     [(f"{layer}.weight", (i,)) for layer, i in dormant])
    for name in before:
        assert torch.equal(before[name] != after[name], expected[name]), name


def test_cli_nudge_from_stdin_with_select(cli, run: Path, tiny_classification: dict, tmp_path: Path) -> None:
    out = tmp_path / "redone"
    res = cli("nudge", "--checkpoint", run / "final", "--targets", "-", "--strategy", "redo",
              "--select", "mechanism=gn_scale", "--select", "layer=decoder.*", "--out", out,
              input=json.dumps(tiny_classification))
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == str(out)
    record = json.loads((out / artifacts.NUDGE_FILE).read_text())
    assert record["n_targets"] == 1 and record["params"] == {"max_fraction": 1.0, "seed": 0}
    assert [e["param"] for e in record["events"]] == [
        "decoder.up_blocks.1.resnets.1.conv1.weight[3]", "decoder.up_blocks.1.resnets.1.conv1.bias",
        "decoder.up_blocks.1.resnets.1.conv2.weight[:, 3]", "decoder.up_blocks.1.resnets.1.norm2.weight",
        "decoder.up_blocks.1.resnets.1.norm2.bias",
    ]


def test_cli_nudge_options_and_outside_a_run(cli, run: Path, targets_file: Path) -> None:
    folder = run.parent / "plain"
    shutil.copytree(run / "final", folder)
    (folder / artifacts.RUN_CONFIG_IN_CHECKPOINT).unlink()
    res = cli("nudge", "--checkpoint", folder, "--targets", targets_file, "--factor", "2", "--max-scale", "3",
              "--max-fraction", "0.25", "--set", "nudge.select=[state=dormant]")
    assert res.exit_code == 0, res.stderr
    out = run.parent / "plain-nudged-gn_scale_nudge"
    assert res.stdout.strip() == str(out)
    record = json.loads((out / artifacts.NUDGE_FILE).read_text())
    assert record["params"] == {"factor": 2.0, "max_scale": 3.0, "max_fraction": 0.25}
    assert [(e["layer"], e["channel_index"]) for e in record["events"]] == [
        ("encoder.down_blocks.0.resnets.0.norm1", 4), ("encoder.down_blocks.0.resnets.0.norm1", 5),
        ("decoder.up_blocks.1.resnets.1.norm2", 3)]
    for e in record["events"]:
        assert e["after"] == pytest.approx(min(2 * e["before"], 3.0))
    assert yaml.safe_load((out / artifacts.RUN_CONFIG_IN_CHECKPOINT).read_text())["nudge"]["factor"] == 2.0


def test_cli_nudge_existing_output(cli, run: Path, targets_file: Path) -> None:
    args = ("nudge", "--checkpoint", run, "--targets", targets_file, "--strategy", "gn_scale_to_layer")
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert cli(*args, "--overwrite").exit_code == 0
    assert sorted(p.name for p in run.iterdir()) == [artifacts.CONFIG_FILE, artifacts.FINAL_DIR,
                                                     "nudged-gn_scale_to_layer"]
    refused = cli("nudge", "--checkpoint", run, "--targets", targets_file, "--out", run / "final", "--overwrite")
    assert refused.exit_code == 2 and "not a vaedyn nudged checkpoint" in refused.stderr


def _bad_targets(kind: str, good: dict) -> str:
    data = json.loads(json.dumps(good))
    if kind == "malformed":
        return json.dumps(good)[:-10]
    if kind == "architecture":
        return json.dumps(classification(build_preset(0.125, 0)))
    if kind == "unknown_layer":
        data["layers"]["decoder.not_a_norm"] = 4
    if kind == "out_of_range":
        data["channels"][0]["channel_index"] = 99
    return json.dumps(data)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("malformed", "not valid JSON"),
        ("architecture", "another architecture"),
        ("unknown_layer", "unknown layer 'decoder.not_a_norm'"),
        ("out_of_range", "out of range"),
    ],
)
def test_cli_rejects_targets_that_do_not_fit(cli, run: Path, tiny_classification: dict, kind: str,
                                             message: str) -> None:
    res = cli("nudge", "--checkpoint", run, "--targets", "-", "--strategy", "redo",
              input=_bad_targets(kind, tiny_classification))
    assert res.exit_code == 2
    assert message in res.stderr and res.stderr.count("\n") == 1 and res.stdout == ""
    assert sorted(p.name for p in run.iterdir()) == [artifacts.CONFIG_FILE, artifacts.FINAL_DIR]


def test_cli_unknown_strategy(cli, run: Path, targets_file: Path) -> None:
    res = cli("nudge", "--checkpoint", run, "--targets", targets_file, "--strategy", "redoo")
    assert res.exit_code == 2 and "did you mean 'redo'" in res.stderr


# ---------------------------------------------------------------------------------------------
# track -> classify -> nudge -> track -> classify

SILENCED = [
    ("encoder.down_blocks.1.resnets.0.norm2", 2),
    ("decoder.up_blocks.0.resnets.0.norm1", 3),
    ("decoder.up_blocks.0.resnets.0.norm1", 5),
    ("decoder.up_blocks.2.resnets.1.norm2", 1),
]


def test_planted_gn_scale_channels_are_active_after_gn_scale_reset(cli, tmp_path: Path) -> None:
    """gamma = 0 planted in a few channels: `track` + `classify` label them dead by gn_scale; `vaedyn nudge
    --strategy gn_scale_reset --select mechanism=gn_scale` touches exactly them; the nudged weights,
    tracked after the silenced ones, classify them as revived and active."""
    from tests.conftest import tiny_config_dict
    from vaedyn_cli import track

    cfg = RunConfig.model_validate(tiny_config_dict(tmp_path))
    model = build_preset(TINY_WIDTH, 0)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, c in SILENCED:
            modules[layer].weight[c] = 0.0
    silenced = [save_model(model, tmp_path / f"silenced-{s}", cfg, step=s) for s in (1, 2, 3)]
    store = track.track_checkpoints(cfg, [str(p) for p in silenced], out=tmp_path / "before.zarr", device="cpu")
    res = cli("classify", store, "--format", "json")
    assert res.exit_code == 0, res.stderr
    labels = {(r["layer"], r["channel_index"]): r for r in json.loads(res.stdout)["channels"]}
    gn_scale = sorted(k for k, r in labels.items() if r["mechanism"] == "gn_scale")
    assert gn_scale == sorted(SILENCED) and all(labels[k]["state"] == "dead" for k in SILENCED)

    res = cli("nudge", "--checkpoint", silenced[-1], "--targets", "-", "--strategy", "gn_scale_reset",
              "--select", "mechanism=gn_scale", "--out", tmp_path / "nudged", input=res.stdout)
    assert res.exit_code == 0, res.stderr
    record = json.loads((tmp_path / "nudged" / artifacts.NUDGE_FILE).read_text())
    assert sorted((e["layer"], e["channel_index"], e["before"], e["after"]) for e in record["events"]) == sorted(
        (layer, c, 0.0, 1.0) for layer, c in SILENCED)
    woken = []
    for step in (4, 5, 6):  # the nudged weights, saved as three later steps (persistence filter: 3)
        woken.append(shutil.copytree(tmp_path / "nudged", tmp_path / f"nudged-{step}"))
        (woken[-1] / artifacts.STEP_FILE).write_text(json.dumps({"step": step}))
    store = track.track_checkpoints(cfg, [str(p) for p in silenced + woken], out=tmp_path / "after.zarr", device="cpu")
    res = cli("classify", store, "--format", "json")
    assert res.exit_code == 0, res.stderr
    after = {(r["layer"], r["channel_index"]): r for r in json.loads(res.stdout)["channels"]}
    for key in SILENCED:
        assert (after[key]["state"], after[key]["trajectory"], after[key]["revival_step"]) == ("active", "revived", 4)
        assert after[key]["mechanism"] is None


def test_reset_moments_zeroes_the_touched_slices_of_every_adam_moment_only():
    """A slice of a parameter the optimizer has not stepped yet is skipped, and the next one is still
    reset; with amsgrad the running maximum goes too; other entries keep their values."""
    from vaedyn_cli.strategies import reset_moments

    fresh, gamma = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([fresh, gamma], lr=0.1, amsgrad=True)
    gamma.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])  # `fresh` gets no gradient: no state
    opt.step()
    before = {k: opt.state[gamma][k].clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    assert all(bool((v != 0).all()) for v in before.values())
    reset_moments(opt, [(fresh, [0]), (gamma, [1, 3])])
    for key, was in before.items():
        now = opt.state[gamma][key]
        assert now[[1, 3]].tolist() == [0.0, 0.0], key
        assert now[[0, 2]].tolist() == was[[0, 2]].tolist(), key
    assert fresh not in opt.state or not opt.state[fresh]


HINT = "pass the output of `vaedyn classify STORE --format json`"


@pytest.mark.parametrize(("text", "problem"), [
    ("{oops", "targets in t.json is not valid JSON (line 1, column 2)"),
    ('{"layers": {}}', "targets in t.json lack a 'layers' mapping and a 'channels' list"),
    ('{"layers": {"a": 0}, "channels": []}', "targets in t.json: layers['a'] must be a channel count, got 0"),
    ('{"layers": {"a": true}, "channels": []}', "targets in t.json: layers['a'] must be a channel count, got True"),
    ('{"layers": {"a": 2.0}, "channels": []}', "targets in t.json: layers['a'] must be a channel count, got 2.0"),
    ('{"layers": {"a": 1}, "channels": [{"layer": "a", "channel_index": 0}, {"layer": "a", "channel_index": 0}]}',
     "targets in t.json: channel a[0] is listed twice"),
    ('{"layers": {"a": 1}, "channels": [5]}', "targets in t.json: channels[0] has no 'layer' string"),
])
def test_bad_targets_are_one_error_with_the_fix(text: str, problem: str) -> None:
    from vaedyn_cli.selection import parse_classification

    with pytest.raises(VaedynError) as err:
        parse_classification(text, "in t.json")
    assert str(err.value) == f"{problem}; {HINT}"


def test_a_one_channel_layer_is_a_valid_target() -> None:
    from vaedyn_cli.selection import parse_classification

    data = parse_classification('{"layers": {"a": 1}, "channels": [{"layer": "a", "channel_index": 0}]}', "x")
    assert data["layers"] == {"a": 1} and len(data["channels"]) == 1


def test_targets_must_fit_the_models_modules_and_channel_counts() -> None:
    """A conv's targets may count its output or its input channels; a GroupNorm's its own; an index
    must be below the count; layers that are none of the model's modules come from another model."""
    from vaedyn_cli.model import build_preset
    from vaedyn_cli.selection import check_classification_fits

    model = build_preset(TINY_WIDTH, seed=0)
    conv = model.get_submodule("encoder.down_blocks.1.resnets.0.conv1")  # 8 -> 16 channels at width 1/16
    norm = "encoder.down_blocks.0.resnets.0.norm1"
    n_norm = model.get_submodule(norm).num_channels
    fix = "classify a trace recorded from this model"

    def fits(layers: dict, channels: list) -> None:
        check_classification_fits({"layers": layers, "channels": channels}, model, "in t.json", "the tiny VAE")

    for n in (conv.out_channels, conv.in_channels):
        fits({"encoder.down_blocks.1.resnets.0.conv1": n}, [{"layer": "encoder.down_blocks.1.resnets.0.conv1",
                                                             "channel_index": n - 1}])
    with pytest.raises(VaedynError) as err:
        fits({"encoder.down_blocks.1.resnets.0.conv1": 5}, [])
    assert str(err.value) == ("targets in t.json come from another architecture: encoder.down_blocks.1.resnets.0.conv1 "
                              f"has 5 channels there and {conv.out_channels} or {conv.in_channels} in the tiny VAE; {fix}")
    with pytest.raises(VaedynError) as err:
        fits({norm: n_norm}, [{"layer": norm, "channel_index": n_norm}])
    assert str(err.value) == (f"targets in t.json: channels[0] has channel_index {n_norm}, out of range for {norm} "
                              f"({n_norm} channels); {fix}")
    with pytest.raises(VaedynError) as err:
        fits({"mid.norm": 4, "up.norm": 4}, [])
    assert str(err.value) == ("targets in t.json come from another architecture: none of their 2 layers is a module "
                              f"of the tiny VAE (e.g. 'mid.norm'); {fix}")
    with pytest.raises(VaedynError) as err:
        fits({norm: n_norm, "up.norm": 4}, [])
    assert str(err.value) == f"targets in t.json: unknown layer 'up.norm' (not a module of the tiny VAE); {fix}"


def test_the_cap_keeps_the_lowest_scores_and_a_missing_score_comes_last() -> None:
    """Cap 2 of a 4-channel layer (max_fraction 0.5): scores 0.3, NaN, none, 0.1, -0.0 ... the two lowest
    finite scores are kept (0.1 and 0.3; a missing one, NaN or absent or true, only when nothing else is
    left); targets carry the score as a float, or None where it was missing."""
    from vaedyn_cli.selection import select_targets

    def rec(i: int, score) -> dict:  # noqa: ANN001
        return {"layer": "a", "channel_index": i, "state": "dormant", "score": score, "mechanism": None, "unused": False}

    recs = [rec(0, 0.3), rec(1, float("nan")), rec(2, None), rec(3, 0.1)]
    assert [(t.channel_index, t.score) for t in select_targets(recs, ["state=dormant"], 0.5, {"a": 4})] == \
        [(0, 0.3), (3, 0.1)]
    # only missing scores left: kept by channel index, with no score
    rest = [rec(5, True), rec(1, float("nan")), rec(2, None)]
    assert [(t.channel_index, t.score) for t in select_targets(rest, ["state=dormant"], 0.5, {"a": 4})] == \
        [(1, None), (2, None)]
    # integers count as scores; None and False are matched by their JSON spelling
    assert [t.score for t in select_targets([rec(4, 2)], ["mechanism=null", "unused=false"], 1.0, {"a": 4})] == [2.0]
    assert select_targets([rec(4, 2)], ["unused=true"], 1.0, {"a": 4}) == []


@pytest.mark.parametrize("expr", ["state=", "=dormant", "state= ", "state"])
def test_a_selector_needs_a_field_and_a_value(expr: str) -> None:
    from vaedyn_cli.selection import parse_select

    with pytest.raises(VaedynError, match=f"--select '{expr}'"):
        parse_select([expr])


def test_selector_values_of_a_vocabulary_ignore_case_and_other_values_keep_it() -> None:
    from vaedyn_cli.selection import parse_select

    (state,) = parse_select(["state=DORMANT,Dead"])
    assert state.matches({"state": "dormant"}) and state.matches({"state": "dead"}) and not state.matches({"state": "active"})
    (layer,) = parse_select(["layer=Encoder.*"])
    assert not layer.matches({"layer": "encoder.down.norm1"}) and layer.matches({"layer": "Encoder.x"})
    (glob,) = parse_select(["mechanism=gn_*"])  # a glob is not checked against the vocabulary
    assert glob.matches({"mechanism": "gn_scale"}) and not glob.matches({"mechanism": "other"})
