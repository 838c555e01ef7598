"""`vaedyn eval --grids LAYER`: activation grids and the linear lens of chosen layers, labelled by
the classification of the checkpoint's run, written next to metrics.json."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_WIDTH, tiny_config_dict
from vaedyn_cli import artifacts
from vaedyn_cli.config import RunConfig
from vaedyn_cli.model import build_preset, save_model
from vaedyn_cli.selection import store_classification

LAYER = "decoder.up_blocks.3.resnets.0.norm2"  # 8 channels at 16x16, SiLU follows
ATTENTION = "encoder.mid_block.attentions.0.group_norm"  # 32 channels at 2x2, no activation
DEAD = 3  # gamma = beta = 0: its output is 0 everywhere


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (config.yaml, final/) whose model has channel DEAD of LAYER silenced, and its
    trace.zarr written by `track` from the final model."""
    from vaedyn_cli import track

    root = tmp_path_factory.mktemp("grids")
    cfg = RunConfig.model_validate(tiny_config_dict(root))
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / artifacts.CONFIG_FILE).write_text(cfg.to_yaml())
    model = build_preset(TINY_WIDTH, seed=0)
    norm = dict(model.named_modules())[LAYER]
    with torch.no_grad():
        norm.weight[DEAD] = 0.0
        norm.bias[DEAD] = 0.0
    save_model(model, run / artifacts.FINAL_DIR, cfg, step=6)
    track.track_checkpoints(cfg, [str(run)], out=run / artifacts.TRACE_DIR, device="cpu")
    return run


@pytest.fixture
def run(tracked_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tracked_run, copy)
    return copy


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_grids_and_lens_per_layer_labelled_by_the_run_classification(cli, run: Path) -> None:
    res = cli("eval", "--checkpoint", run, "--grids", LAYER, "--grids", "encoder.mid_block.attentions.*",
              "--num-samples-to-save", "0")
    assert res.exit_code == 0, res.stderr
    folder = run / "eval" / "test"
    assert res.stdout == f"{folder / artifacts.METRICS_FILE}\n"
    files = [f"{kind}-{layer}.png" for layer in (ATTENTION, LAYER) for kind in ("grid", "lens")]
    assert _listing(folder) == sorted([artifacts.MARKER_FILE, artifacts.METRICS_FILE, "grid.png", *files])
    assert all((folder / f).read_bytes()[:4] == b"\x89PNG" for f in files)
    grids = json.loads((folder / artifacts.METRICS_FILE).read_text())["grids"]
    assert list(grids) == [ATTENTION, LAYER]  # the glob expanded, in module order
    g = grids[LAYER]
    assert (g["grid"], g["lens"]) == (f"grid-{LAYER}.png", f"lens-{LAYER}.png")
    assert g["tiles"] == 8 and g["flat_channels"] == [DEAD]  # one tile per channel; the silenced one is flat
    assert g["scale"] == "layer" and DEAD in g["quiet_channels"]  # eval.grid_scale's default: one scale per layer
    assert (g["grid_images"], g["lens_images"], g["resolution"]) == (2, 8, [16, 16])  # eval.grid_samples; 8 evaluated
    # outlines and lens subsets are the stored classification's states of that layer
    states = Counter(r["state"] for r in store_classification(run)["channels"] if r["layer"] == LAYER)
    assert states["dead"] == 1 and g["outlines"] == {k: v for k, v in states.items() if k != "unknown"}
    assert g["channels"] == {"all": 8, "active": states["active"], "dormant": states["dormant"] + states["dead"]}
    assert g["labels_from"] == f"classification of {run / artifacts.TRACE_DIR}"
    assert g["r2_on"] == "held-out pixels"
    for layer, tiles in ((LAYER, 8), (ATTENTION, 32)):
        assert grids[layer]["tiles"] == grids[layer]["channels"]["all"] == tiles
        r2 = grids[layer]["r2"]
        assert set(r2) == {"all", "active", "dormant"}
        assert all(v is None or (isinstance(v, float) and v <= 1.0) for v in r2.values()), r2
    assert grids[ATTENTION]["resolution"] == [2, 2] and grids[ATTENTION]["what"] == "GroupNorm output"
    assert "grids " + LAYER in res.stderr


def test_unknown_layer_exits_2_before_writing_and_unlabelled_grids(cli, run: Path, tmp_path: Path) -> None:
    for args in (["--grids", "decoder.nope"], ["--grids", LAYER, "--grids", "decoder.*.conv1"]):
        res = cli("eval", "--checkpoint", run, *args)
        assert res.exit_code == 2, res.stderr
        line = res.stderr.strip()
        assert len(line.splitlines()) == 1 and "matches no GroupNorm layer of the model (52 layers" in line
        assert "encoder.down_blocks.0.resnets.0.norm1" in line  # names valid layers
    assert _listing(run) == [artifacts.CONFIG_FILE, artifacts.FINAL_DIR, artifacts.TRACE_DIR]
    # a model folder outside any run: no labels, so no outlines; the lens finds the silenced channel itself
    model = tmp_path / "model"
    shutil.copytree(run / artifacts.FINAL_DIR, model)
    res = cli("eval", "--checkpoint", model, "--grids", LAYER, "--out", tmp_path / "ev", "--num-samples-to-save", "0",
              "--max-samples", "3")
    assert res.exit_code == 0, res.stderr
    g = json.loads((tmp_path / "ev" / artifacts.METRICS_FILE).read_text())["grids"][LAYER]
    assert g["outlines"] == {} and g["labels_from"] == "activity on the lens images (no classification)"
    assert g["flat_channels"] == [DEAD] and g["lens_images"] == 3 and g["channels"]["dormant"] >= 1
    assert _listing(tmp_path / "ev") == sorted([artifacts.MARKER_FILE, artifacts.METRICS_FILE, "grid.png",
                                                f"grid-{LAYER}.png", f"lens-{LAYER}.png"])
