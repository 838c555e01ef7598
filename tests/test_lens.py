"""Activation grids and the linear lens: known maps, planted dead channels, one tile per channel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_WIDTH
from vaedyn_cli import lens
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.model import build_preset

LAYER = "decoder.up_blocks.3.resnets.0.norm2"  # 8 channels at full resolution, SiLU follows
DEAD = 3


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The tiny preset with channel 3 of LAYER silenced (gamma = beta = 0): its output is 0 everywhere."""
    m = build_preset(TINY_WIDTH, seed=0)
    norm = dict(m.named_modules())[LAYER]
    with torch.no_grad():
        norm.weight[DEAD] = 0.0
        norm.bias[DEAD] = 0.0
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_lens_recovers_a_known_linear_map() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 6, generator=g)
    x = torch.cat([x, torch.zeros(3000, 1)], dim=1)  # a dead channel: a constant column
    w_true = torch.randn(7, 3, generator=g)
    b_true = torch.tensor([0.3, -0.2, 0.1])
    y = x @ w_true + b_true + 1e-3 * torch.randn(3000, 3, generator=g)
    w, r2 = lens.fit_linear_lens(x, y)
    assert w.shape == (8, 3)
    assert r2 > 0.9999
    torch.testing.assert_close(w[:6].float(), w_true[:6], atol=2e-3, rtol=0)
    torch.testing.assert_close(w[7].float(), b_true, atol=2e-3, rtol=0)
    assert float(w[6].abs().max()) < 1e-9  # the minimum-norm solution gives the dead column no weight


def test_lens_r2_is_near_zero_for_random_targets() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5000, 8, generator=g), torch.randn(5000, 3, generator=g)
    _, r2_fit = lens.fit_linear_lens(x, y)
    assert 0 <= r2_fit < 0.01  # expected about C / N = 0.0016
    w, _ = lens.fit_linear_lens(x[:2500], y[:2500])
    assert abs(lens.r2_score(lens.lens_predict(w, x[2500:]), y[2500:])) < 0.01


def test_ridge_shrinks_the_weights() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 4, generator=g)
    y = x @ torch.ones(4, 3)
    w0, r0 = lens.fit_linear_lens(x, y)
    w1, r1 = lens.fit_linear_lens(x, y, ridge=1.0)
    assert w1[:4].norm() < 0.7 * w0[:4].norm() and r1 < r0


def test_lens_fits_split_active_and_dormant_channels() -> None:
    """Three channels are a linear image of the input (at the layer's resolution), one is dead: all and
    active reconstruct the held-out images (R^2 ~ 1), the dormant set expresses nothing (R^2 <= ~0)."""
    g = torch.Generator().manual_seed(4)
    imgs = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    small = F.adaptive_avg_pool2d(imgs, (8, 8))
    mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0]])
    maps = torch.cat([torch.einsum("ij,njhw->nihw", mix, small), torch.zeros(4, 1, 8, 8)], dim=1)
    fits = lens.lens_fits(maps, imgs, ["active"] * 3 + ["dead"])
    assert fits["r2_on"] == "held-out pixels"
    assert fits["subsets"] == {"all": [0, 1, 2, 3], "active": [0, 1, 2], "dormant": [3]}
    assert fits["r2"]["all"] > 0.999 and fits["r2"]["active"] > 0.999
    assert fits["r2"]["dormant"] < 0.01 and fits["r2_fit"]["dormant"] == pytest.approx(0.0, abs=1e-9)


def test_layer_activations_shape_and_label(model: torch.nn.Module, images: torch.Tensor) -> None:
    acts = lens.layer_activations(model, images[:2], "encoder.down_blocks.1.resnets.0.norm2")
    assert acts.maps.shape == (2, 16, 8, 8) and acts.what == "silu(GroupNorm output)"
    attn = lens.layer_activations(model, images[:2], "encoder.mid_block.attentions.0.group_norm")
    assert attn.maps.shape == (2, 32, 2, 2) and attn.what == "GroupNorm output"
    conv = lens.layer_activations(model, images[:2], "decoder.conv_out")  # any module: its raw output
    assert conv.maps.shape == (2, 3, 16, 16) and conv.what == "Conv2d output"
    shortcut = lens.layer_activations(model, images[:2], "encoder.down_blocks.1.resnets.0.conv_shortcut", "input")
    assert shortcut.maps.shape == (2, 8, 8, 8) and shortcut.what == "Conv2d input"
    with pytest.raises(VaedynError, match="not a module of the model"):
        lens.layer_activations(model, images[:2], "decoder.nope")


def test_grid_has_one_tile_per_channel_and_a_flat_dead_tile(model: torch.nn.Module, images: torch.Tensor,
                                                            tmp_path: Path) -> None:
    acts = lens.layer_activations(model, images, LAYER)
    tiles, flat = lens.normalise_tiles(acts.maps)
    assert tiles.shape == (4, 8, 16, 16) and float(tiles.min()) >= 0 and float(tiles.max()) <= 1
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[:, DEAD] = True
    assert torch.equal(flat, expected)
    mosaic, boxes = lens.tile_mosaic(tiles[0])
    assert len(boxes) == 8  # one tile per channel, in channel order
    for ch, (r0, c0, h, w) in enumerate(boxes):
        assert torch.equal(torch.from_numpy(mosaic[r0 : r0 + h, c0 : c0 + w]), tiles[0, ch])
    assert len({(r0, c0) for r0, c0, _, _ in boxes}) == 8
    labels = ["active"] * 8
    labels[DEAD] = "dead"
    png = lens.activation_grid(model, images[:2], LAYER, labels=labels, out_png=tmp_path / "g" / "grid.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and sorted(p.name for p in png.parent.iterdir()) == ["grid.png"]
    with pytest.raises(VaedynError, match="7 channel labels for a layer of 8"):
        lens.activation_grid(model, images[:2], LAYER, labels=labels[:7], out_png=tmp_path / "x.png")


def test_a_shared_layer_scale_keeps_a_quiet_tile_flat_and_each_tile_shows_its_spread() -> None:
    ramp = torch.linspace(0, 1, 16).reshape(4, 4)
    maps = torch.stack([ramp, 0.5 + 0.01 * ramp, torch.full((4, 4), 0.3)])[None]  # busy, quiet, constant
    own, flat = lens.normalise_tiles(maps, "tile")
    shared, flat_shared = lens.normalise_tiles(maps, "layer")
    assert flat.tolist() == flat_shared.tolist() == [[False, False, True]]
    # on its own range the quiet channel fills black to white like the busy one; on the layer's it stays grey
    assert float(own[0, 1].max() - own[0, 1].min()) == pytest.approx(1.0)
    lo, hi = lens.layer_range(maps)  # black at the lowest value, white at the 99.5th percentile
    assert float(lo) == 0.0 and float(hi) == pytest.approx(float(torch.quantile(maps.flatten(), 0.995)))
    assert float(shared[0, 1].max() - shared[0, 1].min()) == pytest.approx(0.01 / float(hi), rel=1e-4)
    assert float(shared[0, 1].mean()) == pytest.approx(0.505 / float(hi), rel=1e-4)
    torch.testing.assert_close(shared[0, 0], (ramp / hi).clamp(0, 1))
    spread = lens.tile_spread(maps)
    torch.testing.assert_close(spread[0], torch.stack([ramp.std(unbiased=False), 0.01 * ramp.std(unbiased=False),
                                                       torch.tensor(0.0)]))
    assert lens.quiet_tiles(spread).tolist() == [[False, True, True]]
    with pytest.raises(VaedynError, match="grid scale 'pixel'"):
        lens.normalise_tiles(maps, "pixel")


def test_grid_summary_names_the_quiet_channels(model: torch.nn.Module, images: torch.Tensor, tmp_path: Path) -> None:
    summary = lens.grid_figure(model, images[:2], LAYER, out_png=tmp_path / "grid.png")
    assert summary["scale"] == "layer" and DEAD in summary["quiet_channels"] and summary["flat_channels"] == [DEAD]
    spread = lens.tile_spread(lens.layer_activations(model, images[:2], LAYER).maps)
    assert summary["quiet_channels"] == torch.nonzero(lens.quiet_tiles(spread).all(dim=0)).flatten().tolist()
    assert lens.grid_figure(model, images[:2], LAYER, out_png=tmp_path / "own.png", scale="tile")["scale"] == "tile"


def test_lens_figure_on_a_layer(model: torch.nn.Module, images: torch.Tensor, tmp_path: Path) -> None:
    result = lens.lens_figure(model, images, LAYER, out_png=tmp_path / "lens.png")
    assert result["channels"]["all"] == 8 and result["labels_from"] == "probe images"
    assert result["channels"]["dormant"] >= 1  # at least the silenced channel, found from the probes
    assert result["resolution"] == [16, 16] and result["r2_on"] == "held-out pixels"
    assert set(result["r2"]) == {"all", "active", "dormant"} and Path(result["png"]).is_file()
    states = lens.probe_states(lens.layer_activations(model, images, LAYER).maps)
    assert states[DEAD] == "dead"
    given = lens.lens_figure(model, images, LAYER, labels={DEAD: "dead"}, out_png=tmp_path / "lens2.png")
    assert given["channels"] == {"all": 8, "active": 7, "dormant": 1} and given["labels_from"] == "given"
