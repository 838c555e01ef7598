"""`vaedyn eval`: metrics with known answers, the results folder, checkpoint kinds, --compare, CLI contract."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import tiny_config_dict
from vaedyn_cli import artifacts, compare, metrics
from vaedyn_cli import evaluate as ev
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.model import build_preset, save_model


class ShiftModel(torch.nn.Module):
    """A fake VAE with known answers: the posterior has mean 1 and log-variance 0 over a 4x2x2
    latent (KL = 0.5 * 16 * 1 = 8 per image); the reconstruction is the input plus 0.2 where the
    image is negative and plus 0.1 elsewhere (on [-1, 1])."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        b = x.shape[0]
        params = torch.cat([torch.ones(b, 4, 2, 2), torch.zeros(b, 4, 2, 2)], dim=1)
        self._x = x
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(params))

    def decode(self, z):
        x = self._x
        return SimpleNamespace(sample=x + torch.where(x < 0, 0.2, 0.1))


def ssim_of_constants(a: float, b: float) -> float:
    """SSIM of two constant images (variances 0): only the luminance term remains."""
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    return (2 * a * b + c1) / (a * a + b * b + c1) * (c2 / c2)


def test_known_answer_metrics_are_per_image_means():
    # 6 images in batches of 4 and 2, alternating dark (-0.2 -> unit 0.4) and bright (0.2 -> unit 0.6)
    values = [-0.2, 0.2, -0.2, 0.2, -0.2, 0.2]
    images = torch.stack([torch.full((3, 16, 16), v) for v in values])
    loader = torch.utils.data.DataLoader(images, batch_size=4)
    result = metrics.reconstruction_metrics(ShiftModel(), loader, device="cpu", keep=3)

    assert result.num_images == 6
    # [-1, 1] errors 0.2 and 0.1 -> MSE 0.04 and 0.01; mean 0.025
    assert result.metrics["mse"] == pytest.approx(0.025, rel=1e-6)
    assert result.metrics["kl"] == pytest.approx(8.0, rel=1e-6)
    # on [0, 1] the errors are 0.1 and 0.05: PSNR 20 dB and 26.0206 dB, averaged per image (not of the mean MSE)
    expected_psnr = (20.0 + 10 * math.log10(1 / 0.0025)) / 2
    assert result.metrics["psnr"] == pytest.approx(expected_psnr, abs=1e-4)
    assert result.metrics["psnr"] != pytest.approx(10 * math.log10(1 / 0.00625), abs=0.1)
    expected_ssim = (ssim_of_constants(0.4, 0.5) + ssim_of_constants(0.6, 0.65)) / 2
    assert result.metrics["ssim"] == pytest.approx(expected_ssim, abs=1e-5)
    # the kept pictures are the first images, mapped to [0, 1]
    assert result.originals.shape == (3, 3, 16, 16)
    assert torch.allclose(result.originals[:, 0, 0, 0], torch.tensor([0.4, 0.6, 0.4]))
    assert torch.allclose(result.reconstructions[:, 0, 0, 0], torch.tensor([0.5, 0.65, 0.5]))


def test_psnr_of_a_known_perturbation_20db():
    images = torch.full((2, 3, 16, 16), -0.4)  # +0.2 on [-1, 1] is +0.1 on [0, 1]: MSE 0.01 -> 20 dB
    result = metrics.reconstruction_metrics(ShiftModel(), [images], device="cpu")
    assert result.metrics["psnr"] == pytest.approx(20.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# the stage on real checkpoints


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder as `vaedyn train` leaves it (config.yaml, final/, one step checkpoint), made directly."""
    cfg = RunConfig.model_validate(tiny_config_dict(tmp_path))
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    model = build_preset(0.0625, seed=1)
    save_model(model, run / "final", cfg, step=6)
    step = run / "checkpoints" / "step-000003"
    step.mkdir(parents=True)
    save_file(build_preset(0.0625, seed=2).state_dict(), str(step / "model.safetensors"))
    model.save_config(str(step))
    return run


def test_evaluate_run_writes_results_folder(run):
    path = ev.evaluate(str(run))
    out = run / "eval" / "test"
    assert path == out / "metrics.json"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "grid.png", "metrics.json", "samples", "samples/0000_original.png", "samples/0000_reconstruction.png",
        "samples/0001_original.png", "samples/0001_reconstruction.png",
    ]
    record = json.loads(path.read_text())
    assert record["checkpoint"] == str(run) and record["step"] == 6 and record["split"] == "test"
    assert record["num_images"] == 8  # eval.max_samples of the stored config
    assert record["config"]["eval"]["split"] == "test" and record["config"]["run_name"] == "tiny"
    # grid: 8 originals over 8 reconstructions, the 16 px images drawn 8x (128 px), 4 px gaps
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (8 * 128 + 9 * 4, 2 * 128 + 3 * 4)
        pixels = np.asarray(grid.convert("RGB"))

    # MSE recomputed by hand from the saved model and the same images
    from vaedyn_cli import data as data_mod
    from vaedyn_cli.model import resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    images = data_mod.probe_batch(ckpt.config.data, "test", 8, ckpt.config.seed)
    model = ckpt.load().eval()
    with torch.no_grad():
        posterior = model.encode(images).latent_dist
        recon = model.decode(posterior.mode()).sample
    assert record["metrics"]["mse"] == pytest.approx(((recon - images) ** 2).mean().item(), rel=1e-5)
    assert record["metrics"]["kl"] == pytest.approx(posterior.kl().mean().item(), rel=1e-5)
    with Image.open(out / "samples" / "0001_original.png") as im:
        expected = ((images[1] + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(im).astype(int) - expected.astype(int)).max() <= 1
    # in the grid, image 1 (top row, second column) is the same picture, each pixel an 8x8 square
    tile = pixels[4 : 4 + 128, 4 + 128 + 4 : 4 + 2 * 128 + 4]
    assert np.array_equal(tile, np.asarray(Image.open(out / "samples" / "0001_original.png")).repeat(8, 0).repeat(8, 1))


def test_evaluate_step_checkpoint_and_options(run, tmp_path):
    path = ev.evaluate(str(run / "checkpoints" / "step-000003"), split="validation", max_samples=4, num_samples_to_save=0,
                       batch_size=3)
    assert path == run / "eval" / "step-000003" / "validation" / "metrics.json"
    record = json.loads(path.read_text())
    assert record["step"] == 3 and record["num_images"] == 4
    assert not (path.parent / "samples").exists() and (path.parent / "grid.png").is_file()
    # the weights of step 3 differ from final's: so do the metrics
    final = json.loads(ev.evaluate(str(run), split="validation", max_samples=4).read_text())
    assert final["metrics"]["mse"] != record["metrics"]["mse"]
    # --set without -c applies to the stored config; rerunning replaces the previous result
    again = ev.evaluate(str(run), overrides=["eval.max_samples=2"], out=tmp_path / "elsewhere")
    assert json.loads(again.read_text())["num_images"] == 2 and again.parent == tmp_path / "elsewhere"
    again = ev.evaluate(str(run), overrides=["eval.max_samples=3"], out=tmp_path / "elsewhere")
    assert json.loads(again.read_text())["num_images"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bare_folder_needs_config_and_out(run, tmp_path, cli, tiny_config_file):
    bare = tmp_path / "bare"
    build_preset(0.0625, seed=3).save_pretrained(str(bare))
    result = cli("eval", "--checkpoint", bare)
    assert result.exit_code == 2 and "pass -c CONFIG" in result.stderr and result.stdout == ""
    result = cli("eval", "--checkpoint", bare, "-c", tiny_config_file)
    assert result.exit_code == 2 and "pass --out DIR" in result.stderr
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    out = tmp_path / "res"
    result = cli("eval", "--checkpoint", bare, "-c", tiny_config_file, "--out", out, "--max-samples", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out / 'metrics.json'}\n"
    assert json.loads((out / "metrics.json").read_text())["step"] == 0


def test_cli_eval_stdout_and_errors(run, cli):
    result = cli("eval", "--checkpoint", run, "--split", "validation", "--num-samples-to-save", "1", "--batch-size", "5")
    assert result.exit_code == 0, result.stderr
    metrics = run / "eval" / "validation" / "metrics.json"
    assert result.stdout == f"{metrics}\n"
    assert "PSNR (dB)" in result.stderr  # the table goes to stderr
    assert len(list((metrics.parent / "samples").iterdir())) == 2

    result = cli("eval", "--checkpoint", run, "--split", "nope")
    assert result.exit_code == 2 and "split 'nope' not found" in result.stderr
    assert not (run / "eval" / "nope").exists()
    result = cli("eval", "--checkpoint", run.parent / "missing")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = cli("eval")
    assert result.exit_code == 2 and "missing --checkpoint" in result.stderr


# ---------------------------------------------------------------------------------------------
# --compare


def write_metrics(folder: Path, run_name: str, mse: float, kl: float, psnr: float, ssim: float, *, split: str = "test",
                  num_images: int = 100, dataset: str = "builtin:natural", checkpoint: Path | None = None) -> Path:
    folder.mkdir(parents=True)
    record = {"checkpoint": str(checkpoint or folder), "step": 10, "split": split, "num_images": num_images,
              "metrics": {"mse": mse, "kl": kl, "psnr": psnr, "ssim": ssim},
              "config": {"run_name": run_name, "data": {"dataset_name": dataset, "resolution": 32}}}
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def test_compare_table1_layout(tmp_path, cli):
    # the original study's CIFAR-10 row pair
    a = write_metrics(tmp_path / "a", "cifar10_baseline", 2.879e-3, 994.63, 31.429, 0.9195)
    b = write_metrics(tmp_path / "b", "cifar10_nudge", 2.826e-3, 997.53, 31.509, 0.9210)
    result = cli("eval", "--compare", a, b / "metrics.json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # same split, data and image count: nothing to warn about
    lines = result.stdout.splitlines()
    assert lines[0] == "| metric      | cifar10_baseline | cifar10_nudge |   delta | better |"
    assert lines[1] == "|-------------|-----------------:|--------------:|--------:|--------|"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:6]}
    assert rows == {
        "MSE (x1e-3)": ["2.879", "2.826", "-0.053", "n/a"],
        "KL": ["994.63", "997.53", "+2.90", "n/a"],
        "PSNR (dB)": ["31.429", "31.509", "+0.080", "n/a"],
        "SSIM": ["0.9195", "0.9210", "+0.0015", "n/a"],
    }
    # single runs name no winner, however large the difference
    assert lines[6:] == ["", "better: n/a (single runs: see `vaedyn study`); a difference between two single runs may "
                         "be run-to-run noise."]

    result = cli("eval", "--compare", a, b, "--format", "json")
    data = json.loads(result.stdout)
    assert [r["label"] for r in data["runs"]] == ["cifar10_baseline", "cifar10_nudge"]
    kl = next(r for r in data["rows"] if r["metric"] == "kl")
    assert kl["values"] == {"cifar10_baseline": 994.63, "cifar10_nudge": 997.53}
    assert kl["delta"] == pytest.approx(2.90) and kl["better"] is None and kl["lower_is_better"] is True
    assert data["better"] == "n/a (single runs: see `vaedyn study`)" and data["warnings"] == []


def test_compare_names_nudged_checkpoints_by_their_strategy(tmp_path, cli):
    """A nudged checkpoint (a folder with nudge.json) is named by its strategy, not by its position."""
    nudged = tmp_path / "run" / "nudged-gn_scale_reset"
    nudged.mkdir(parents=True)
    (nudged / artifacts.NUDGE_FILE).write_text(json.dumps({"strategy": "gn_scale_reset", "n_targets": 2}))
    a = write_metrics(tmp_path / "a", "quickstart", 1e-3, 5.0, 30.0, 0.9)
    b = write_metrics(tmp_path / "b", "quickstart", 1e-3, 5.0, 30.0, 0.9, checkpoint=nudged)
    c = write_metrics(tmp_path / "c", "quickstart", 2e-3, 5.0, 30.0, 0.9)
    data = json.loads(compare.compare([a, b, c], fmt="json"))
    assert [r["label"] for r in data["runs"]] == ["quickstart #1", "quickstart nudged gn_scale_reset", "quickstart #3"]
    assert [r["nudge"] for r in data["runs"]] == [None, "gn_scale_reset", None]
    # metrics.json written by `vaedyn eval` carries the strategy itself (the folder may be gone)
    (nudged / artifacts.NUDGE_FILE).unlink()
    record = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**record, "nudge": {"strategy": "redo"}}))
    assert compare.run_label(compare.load_metrics(b)) == "quickstart nudged redo"


def test_compare_warns_when_the_evaluations_are_not_like_for_like(tmp_path, cli):
    a = write_metrics(tmp_path / "a", "base", 1e-3, 5.0, 30.0, 0.9)
    b = write_metrics(tmp_path / "b", "other", 1e-3, 5.0, 30.0, 0.9, split="validation", num_images=64,
                      dataset="builtin:glyphs")
    result = cli("eval", "--compare", a, b)
    assert result.exit_code == 0
    warnings = result.stderr.strip().splitlines()
    assert warnings == [
        "warning: the evaluations differ in split (base: test, other: validation); the comparison is not like for like",
        'warning: the evaluations differ in dataset (base: {"dataset_name": "builtin:natural", "resolution": 32}, '
        'other: {"dataset_name": "builtin:glyphs", "resolution": 32}); the comparison is not like for like',
        "warning: the evaluations differ in number of images (base: 100, other: 64); the comparison is not like for like",
    ]
    c = write_metrics(tmp_path / "c", "third", 1e-3, 5.0, 30.0, 0.9, num_images=64)
    assert json.loads(compare.compare([a, c], fmt="json"))["warnings"] == [
        "warning: the evaluations differ in number of images (base: 100, third: 64); the comparison is not like for like"]


def test_compare_labels_and_errors(tmp_path, cli):
    a = write_metrics(tmp_path / "a", "same", 1e-3, 5.0, 30.0, 0.9)
    b = write_metrics(tmp_path / "b", "same", 1e-3, 4.0, 30.0, 0.8)
    c = write_metrics(tmp_path / "c", "same", 1e-3, 4.0, 31.0, 0.8)
    data = json.loads(compare.compare([a, b, c], fmt="json"))
    assert [r["label"] for r in data["runs"]] == ["same #1", "same #2", "same #3"]  # same step and split
    record = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**record, "step": 20}))
    assert [r["label"] for r in json.loads(compare.compare([a, b], fmt="json"))["runs"]] == ["same step 10",
                                                                                          "same step 20"]
    assert {r["better"] for r in data["rows"]} == {None}

    result = cli("eval", "--compare", a)
    assert result.exit_code == 2 and "at least two" in result.stderr
    result = cli("eval", "--compare", a, tmp_path / "nothing")
    assert result.exit_code == 2 and "has no metrics.json" in result.stderr
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(VaedynError, match="not a metrics file"):
        compare.compare([a, tmp_path / "broken.json"])
    result = cli("eval", a)
    assert result.exit_code == 2 and "PATHS are for --compare" in result.stderr
