"""`vaedyn eval --ablate`: mean ablation of labelled channels against a random active control."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_WIDTH, tiny_config_dict
from vaedyn_cli import ablation, artifacts
from vaedyn_cli import metrics as ev
from vaedyn_cli.config import RunConfig
from vaedyn_cli.model import build_preset, save_model
from vaedyn_cli.selection import Target, store_classification

# gamma <- 0 and beta <- BETA: the channel outputs the constant BETA (dead, mechanism gn_scale).
PLANTED = [
    ("encoder.down_blocks.1.resnets.0.norm2", 2),
    ("decoder.up_blocks.0.resnets.0.norm1", 3),
    ("decoder.up_blocks.0.resnets.0.norm1", 5),
    ("decoder.up_blocks.2.resnets.1.norm2", 1),
]
BETA = 0.3


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (config.yaml, final/) whose model has PLANTED dead channels, and its trace.zarr
    (written by `track` from two saves of the same weights)."""
    from vaedyn_cli import track

    root = tmp_path_factory.mktemp("ablate")
    cfg = RunConfig.model_validate(tiny_config_dict(root))
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / artifacts.CONFIG_FILE).write_text(cfg.to_yaml())
    model = build_preset(TINY_WIDTH, seed=0)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, c in PLANTED:
            modules[layer].weight[c] = 0.0
            modules[layer].bias[c] = BETA
    save_model(model, run / artifacts.FINAL_DIR, cfg, step=6)
    save_model(model, root / "step-3", cfg, step=3)
    track.track_checkpoints(cfg, [str(root / "step-3"), str(run)], out=run / artifacts.TRACE_DIR, device="cpu")
    return run


@pytest.fixture
def run(tracked_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tracked_run, copy)
    return copy


def test_ablating_planted_dead_channels_changes_nothing_the_control_does(cli, run: Path) -> None:
    res = cli("eval", "--checkpoint", run, "--ablate", "mechanism=gn_scale")
    assert res.exit_code == 0, res.stderr
    path = run / "eval" / "test" / artifacts.METRICS_FILE
    assert res.stdout == f"{path}\n"
    record = json.loads(path.read_text())
    ab = record["ablation"]
    assert ab["select"] == ["mechanism=gn_scale"] and ab["store"] == str(run / artifacts.TRACE_DIR)
    assert ab["classification_steps"] == [3, 6]
    assert ab["n_channels"] == len(PLANTED) == ab["n_control"]
    assert [(r["layer"], r["channel_index"]) for r in ab["channels"]] == PLANTED
    # a dead channel's mean output is its constant output, beta
    assert all(r["mean"] == pytest.approx(BETA, abs=1e-7) for r in ab["channels"])
    assert ab["baseline"] == record["metrics"]
    for key in ("ablated", "control", "delta_ablated", "delta_control"):
        assert set(ab[key]) == set(ev.METRICS)
    base = ab["baseline"]["mse"]
    assert abs(ab["delta_ablated"]["mse"]) <= 1e-6 * base
    assert abs(ab["delta_control"]["mse"]) >= 1e-3 * base, ab["delta_control"]
    assert ab["delta_control"]["mse"] == pytest.approx(ab["control"]["mse"] - base)

    # the control: as many channels per layer, all active in the labels, none of the planted ones
    labels = {(r["layer"], r["channel_index"]): r for r in store_classification(run)["channels"]}
    control = [(r["layer"], r["channel_index"]) for r in ab["control_channels"]]
    assert sorted(layer for layer, _ in control) == sorted(layer for layer, _ in PLANTED)
    assert all(labels[k]["state"] == "active" for k in control) and not set(control) & set(PLANTED)
    assert "ablation mechanism=gn_scale: 4 channels" in res.stderr


def test_labels_from_the_classification_group_or_in_memory_agree(cli, run: Path, tmp_path: Path) -> None:
    """Without a classification group the store is classified in memory; with one (written by
    `vaedyn classify`), the group is read; --store names the store explicitly."""
    store = run / artifacts.TRACE_DIR
    in_memory = store_classification(run)
    assert not (store / "classification").exists()
    res = cli("classify", store, "--format", "json")
    assert res.exit_code == 0, res.stderr
    assert store_classification(store) == in_memory == json.loads(res.stdout)

    # a copy of the model outside the run needs --store
    outside = tmp_path / "bare"
    shutil.copytree(run / artifacts.FINAL_DIR, outside)
    res = cli("eval", "--checkpoint", outside, "--out", tmp_path / "ev", "--ablate", "state=dead")
    assert res.exit_code == 2 and "--store" in res.stderr and not (tmp_path / "ev").exists()
    res = cli("eval", "--checkpoint", outside, "--out", tmp_path / "ev", "--ablate", "state=dead",
              "--ablate", "layer=decoder.*", "--store", run, "--num-samples-to-save", "0")
    assert res.exit_code == 0, res.stderr
    ab = json.loads((tmp_path / "ev" / artifacts.METRICS_FILE).read_text())["ablation"]
    assert [(r["layer"], r["channel_index"]) for r in ab["channels"]] == PLANTED[1:]
    assert ab["select"] == ["state=dead", "layer=decoder.*"]


def test_bad_ablation_input_writes_nothing(cli, run: Path) -> None:
    for args, message in [
        (["--ablate", "colour=red"], "unknown field 'colour'"),
        (["--ablate", "state=sleepy"], "'sleepy' is not a value of state"),
        (["--store", run], "--store only serves --ablate"),
        (["--ablate", "state=dead", "--store", run / "nowhere"], "nowhere"),
    ]:
        res = cli("eval", "--checkpoint", run, *args)
        assert res.exit_code == 2, (args, res.stderr)
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = cli("eval", "--checkpoint", run, "--ablate", "state=dormnt")  # the option the user gave is named
    assert res.stderr.startswith("error: --ablate 'state=dormnt': 'dormnt' is not a value of state")
    assert "--select" not in res.stderr
    assert not (run / "eval").exists()


def test_nothing_selected_says_so_in_one_line_and_runs_no_pass(cli, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passes = []
    real = ablation.reconstruction_metrics
    monkeypatch.setattr(ablation, "reconstruction_metrics", lambda *a, **k: passes.append(1) or real(*a, **k))
    res = cli("eval", "--checkpoint", run, "--ablate", "state=dead", "--ablate", "layer=encoder.conv_norm_out",
              "--num-samples-to-save", "0")
    assert res.exit_code == 0, res.stderr
    ab = json.loads((run / "eval" / "test" / artifacts.METRICS_FILE).read_text())["ablation"]
    assert ab == {"select": ["state=dead", "layer=encoder.conv_norm_out"], "store": str(run / artifacts.TRACE_DIR),
                  "classification_steps": [3, 6], "n_channels": 0, "channels": [], "n_control": 0,
                  "control_channels": [], "skipped": "the selection matches no channel: no ablation pass was run"}
    assert passes == []
    said = [line for line in res.stderr.splitlines() if "ablat" in line]
    assert said == [f"--ablate state=dead layer=encoder.conv_norm_out selects no channel of {run / artifacts.TRACE_DIR}: "
                    "nothing ablated, no ablation pass run"]


def test_separate_invocations_add_to_one_evaluation(cli, run: Path) -> None:
    """`eval --grids` after `eval --ablate` on the same checkpoint, split and images keeps the ablation (and
    earlier grids of other layers, with their pictures); an evaluation on other images replaces it all, saying so."""
    folder = run / "eval" / "test"
    first, second = "decoder.up_blocks.0.resnets.0.norm1", "encoder.down_blocks.1.resnets.0.norm2"
    quiet = ["--num-samples-to-save", "0"]
    assert cli("eval", "--checkpoint", run, "--ablate", "mechanism=gn_scale", *quiet).exit_code == 0
    ablated = json.loads((folder / artifacts.METRICS_FILE).read_text())["ablation"]
    assert ablated["n_channels"] == len(PLANTED)
    res = cli("eval", "--checkpoint", run, "--grids", first, *quiet)
    assert res.exit_code == 0 and f"kept from the earlier evaluation in {folder}: the ablation section" in res.stderr
    assert "baseline" not in res.stderr  # the kept ablation is not printed as if it had been run again
    res = cli("eval", "--checkpoint", run, "--grids", second, *quiet)
    assert res.exit_code == 0 and "replacing" not in res.stderr
    assert f"kept from the earlier evaluation in {folder}: the ablation section, grids of {first}" in res.stderr
    record = json.loads((folder / artifacts.METRICS_FILE).read_text())
    assert record["ablation"] == ablated
    assert list(record["grids"]) == [first, second]
    assert all((folder / f"{kind}-{layer}.png").is_file() for kind in ("grid", "lens") for layer in (first, second))
    # a new ablation replaces the old one; the grids stay
    assert cli("eval", "--checkpoint", run, "--ablate", "state=dead", "--ablate", "layer=decoder.*", *quiet).exit_code == 0
    record = json.loads((folder / artifacts.METRICS_FILE).read_text())
    assert record["ablation"]["select"] == ["state=dead", "layer=decoder.*"] and list(record["grids"]) == [first, second]
    # other images (max_samples): the sections no longer describe these metrics
    res = cli("eval", "--checkpoint", run, "--max-samples", "4", *quiet)
    assert res.exit_code == 0
    assert (f"replacing the evaluation in {folder}, which was of another checkpoint, split or set of images: "
            "its ablation and grids sections are dropped") in res.stderr
    record = json.loads((folder / artifacts.METRICS_FILE).read_text())
    assert "ablation" not in record and "grids" not in record and record["num_images"] == 4
    assert sorted(p.name for p in folder.iterdir()) == [artifacts.MARKER_FILE, "grid.png", artifacts.METRICS_FILE]


def test_piped_stderr_lines_are_not_wrapped(cli, run: Path) -> None:
    """CliRunner's stderr is not a terminal (rich would wrap at 80 columns): every line stays whole."""
    layer = "decoder.up_blocks.0.resnets.0.norm1"
    res = cli("eval", "--checkpoint", run, "--grids", layer, "--ablate", "mechanism=gn_scale", "--num-samples-to-save", "0")
    assert res.exit_code == 0
    lines = res.stderr.splitlines()
    assert f"{run} · step 6 · split test · 8 images" in lines
    assert any(line.startswith(f"grids {layer}: grid-{layer}.png, lens-{layer}.png (lens R^2 all ") for line in lines)
    assert len(f"grids {layer}: grid-{layer}.png, lens-{layer}.png") > 80


def test_channel_means_are_the_mean_output_over_batch_and_space() -> None:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        norm.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    model = torch.nn.Sequential(norm)
    batches = [torch.randn(3, 4, 5, 6) * 2 + torch.arange(4.0).view(1, 4, 1, 1), torch.randn(2, 4, 5, 6)]
    with torch.no_grad(), ablation.ChannelMeans(model, ["0"]) as means:
        outputs = [model(x) for x in batches]
    expected = torch.cat(outputs).double().mean(dim=(0, 2, 3))
    for c in range(4):
        assert means.mean("0", c) == pytest.approx(float(expected[c]), rel=1e-12, abs=1e-12)
    # ablation with that mean: the channel outputs its average, everywhere
    with torch.no_grad():
        norm.weight[1], norm.bias[1] = 0.0, means.mean("0", 1)
        y = model(batches[0])
    assert torch.all(y[:, 1] == torch.tensor(means.mean("0", 1), dtype=torch.float32))


def test_control_is_seeded_active_and_per_layer(caplog: pytest.LogCaptureFixture) -> None:
    channels = [{"layer": "a", "channel_index": i, "state": "active" if i % 3 else "dormant"} for i in range(30)]
    channels += [{"layer": "b", "channel_index": i, "state": "active" if i < 2 else "dead"} for i in range(8)]
    targets = [Target("a", 0), Target("a", 3), Target("a", 6), Target("b", 5), Target("b", 6), Target("b", 7)]
    first = ablation.control_targets(channels, targets, seed=1)
    assert first == ablation.control_targets(channels, targets, seed=1)
    assert [t.layer for t in first] == ["a"] * 3 + ["b"] * 2  # b has only 2 active channels
    assert all(t.channel_index % 3 for t in first if t.layer == "a")
    assert [t.channel_index for t in first if t.layer == "b"] == [0, 1]
    assert "b has 2 active channels for 3 ablated ones" in caplog.text
    draws = {tuple(t.channel_index for t in ablation.control_targets(channels, targets, seed=s) if t.layer == "a")
             for s in range(6)}
    assert len(draws) > 1
    assert np.all([len(set(d)) == 3 for d in draws])
