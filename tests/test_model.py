"""Model: the sdxl preset, every way of loading weights, checkpoint resolution, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vaedyn_cli import artifacts
from vaedyn_cli import model as mm
from vaedyn_cli.anatomy import flow_order, groupnorm_layers
from vaedyn_cli.config import ModelConfig, RunConfig
from vaedyn_cli.errors import VaedynError

from .conftest import TINY_WIDTH


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sdxl_preset_matches_the_real_architecture() -> None:
    m = mm.build_preset(1.0, seed=0)
    norms = groupnorm_layers(m)
    assert sum(p.numel() for p in m.parameters()) == 83_653_863
    assert len(norms) == 52
    assert sum(n.num_channels for _, n in norms) == 19_840
    assert m.config.scaling_factor == 0.13025 and m.config.latent_channels == 4
    assert {n.num_groups for _, n in norms} == {32}


def test_width_scales_channels_and_groups_together() -> None:
    m = mm.build_preset(0.25, seed=0)
    assert list(m.config.block_out_channels) == [32, 64, 128, 128]
    norms = groupnorm_layers(m)
    assert {n.num_groups for _, n in norms} == {8}
    assert {n.num_channels // n.num_groups for _, n in norms} == {4, 8, 16}  # as in the full model
    full = {n.num_channels // n.num_groups for _, n in groupnorm_layers(mm.build_preset(1.0, 0))}
    assert full == {4, 8, 16}


def test_preset_is_seeded_and_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = mm.build_preset(TINY_WIDTH, seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert _same_weights(a, mm.build_preset(TINY_WIDTH, seed=5))
    assert not _same_weights(a, mm.build_preset(TINY_WIDTH, seed=6))


def test_load_local_diffusers_folder_with_subfolder(tmp_path: Path) -> None:
    m = mm.build_preset(TINY_WIDTH, seed=1)
    m.save_pretrained(tmp_path / "repo" / "vae")
    loaded = mm.build_model(ModelConfig(pretrained=str(tmp_path / "repo"), subfolder="vae"), seed=0)
    assert _same_weights(m, loaded)


def test_hub_id_resolves_from_a_local_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real hub code path (`stabilityai/sdxl-vae`) against a cache laid out as the hub client writes it."""
    m = mm.build_preset(TINY_WIDTH, seed=2)
    hub = tmp_path / "hub"
    repo = hub / "models--stabilityai--sdxl-vae"
    snap = repo / "snapshots" / ("a" * 40)
    m.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    loaded = mm.build_model(ModelConfig(pretrained=mm.DEFAULT_HUB_ID), seed=0)
    assert _same_weights(m, loaded)


def test_unreachable_hub_gives_one_line_with_the_ways_out() -> None:
    with pytest.raises(VaedynError) as e:
        mm.build_model(ModelConfig(pretrained="someone/not-cached-vae"), seed=0)
    msg = str(e.value)
    assert "someone/not-cached-vae" in msg and "local diffusers folder" in msg and "architecture: sdxl" in msg
    assert "\n" not in msg


def test_single_file_diffusers_layout(tmp_path: Path) -> None:
    m = mm.build_preset(TINY_WIDTH, seed=3)
    f = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(f))
    assert _same_weights(m, mm.build_model(ModelConfig(pretrained=str(f)), seed=0))


def _to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original (LDM / sdxl_vae.safetensors) key layout, the inverse of diffusers' converter."""
    out = {}
    for k, v in state.items():
        n = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for i in range(4):
            n = n.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            n = n.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            n = n.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{3 - i}.block.")
            n = n.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{3 - i}.upsample.")
        for i in range(2):
            n = n.replace(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.")
        if "mid_block.attentions.0." in n:
            n = n.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            n = n.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
            if v.ndim == 2:
                v = v[:, :, None, None]
        out["first_stage_model." + n] = v.contiguous()
    return out


def test_single_file_original_layout_converts_without_network(tmp_path: Path) -> None:
    m = mm.build_preset(TINY_WIDTH, seed=4)
    f = tmp_path / "sdxl_vae.safetensors"
    save_file(_to_ldm(m.state_dict()), str(f))
    loaded = mm.build_model(ModelConfig(pretrained=str(f)), seed=0)
    assert _same_weights(m, loaded)


def test_bad_model_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaedynError, match="not a diffusers model folder"):
        mm.load_pretrained(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(VaedynError, match="not a .safetensors file"):
        mm.load_pretrained(str(tmp_path / "w.bin"))
    (tmp_path / "w.safetensors").write_bytes(b"garbage")
    with pytest.raises(VaedynError, match="cannot read weights file"):
        mm.load_pretrained(str(tmp_path / "w.safetensors"))
    with pytest.raises(VaedynError, match="does not exist"):
        mm.load_pretrained("./nope/vae")


def test_resolve_checkpoint_kinds(tmp_path: Path, tiny_cfg: RunConfig) -> None:
    m = mm.build_preset(TINY_WIDTH, seed=0)
    run = tmp_path / "run"
    run.mkdir()
    (run / artifacts.CONFIG_FILE).write_text(tiny_cfg.to_yaml())
    with pytest.raises(VaedynError, match="did not finish"):
        mm.resolve_checkpoint(run)
    mm.save_model(m, run / artifacts.FINAL_DIR, tiny_cfg, step=6)
    ck = mm.resolve_checkpoint(run)
    assert (ck.kind, ck.step, ck.run_dir, ck.config) == ("diffusers", 6, run, tiny_cfg)
    assert _same_weights(m, ck.load())

    step = run / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(3)
    step.mkdir(parents=True)
    with pytest.raises(VaedynError, match="lacks model.safetensors, config.json"):
        mm.resolve_checkpoint(step)
    save_file(m.state_dict(), str(step / artifacts.ACCELERATE_MODEL_FILE))
    (step / artifacts.MODEL_CONFIG_FILE).write_text(json.dumps(dict(m.config)))
    ck = mm.resolve_checkpoint(step)
    assert (ck.kind, ck.step, ck.run_dir, ck.config) == ("step", 3, run, tiny_cfg)
    assert _same_weights(m, ck.load())
    assert artifacts.latest_checkpoint(run) == step

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(VaedynError, match="no weights"):
        mm.resolve_checkpoint(bare)
    with pytest.raises(VaedynError, match="is not a checkpoint"):
        mm.resolve_checkpoint(tmp_path)
    assert mm.resolve_checkpoint("stabilityai/sdxl-vae").kind == "hub"


def test_fp16_warns_about_overflow() -> None:
    with pytest.warns(UserWarning, match="overflows in fp16"):
        mm.warn_fp16("fp16")


def test_step_names_sort_and_parse() -> None:
    assert artifacts.step_dir_name(200) == "step-000200"
    assert artifacts.parse_step("step-000200") == 200
    assert artifacts.parse_step("step-1234567") == 1234567
    assert artifacts.parse_step(".tmp-step-000200") is None
    assert artifacts.parse_step("step-12") is None


def test_flow_order_is_the_order_of_the_forward_pass() -> None:
    """The order GroupNorms run in a forward pass of the model: the decoder's mid block before its up blocks
    and a mid block's attention between its two resnets, though module registration says otherwise."""
    model = mm.build_preset(TINY_WIDTH, 0)
    names = [n for n, _ in groupnorm_layers(model)]
    ran: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: ran.append(n)) for n, m in groupnorm_layers(model)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 16, 16), sample_posterior=False)
    for h in handles:
        h.remove()
    assert len(ran) == len(names) == 52 and ran != names
    assert flow_order(names) == ran
    assert flow_order(list(reversed(names))) == ran
    assert flow_order(["decoder.unknown", "decoder.up_blocks.0.resnets.0.norm1", "x"]) == [
        "decoder.up_blocks.0.resnets.0.norm1", "decoder.unknown", "x"]
