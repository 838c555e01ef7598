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


def test_known_answer_metrics_both_psnrs():
    # 6 images in batches of 4 and 2, alternating dark (-0.2 -> unit 0.4) and bright (0.2 -> unit 0.6)
    values = [-0.2, 0.2, -0.2, 0.2, -0.2, 0.2]
    images = torch.stack([torch.full((3, 16, 16), v) for v in values])
    loader = torch.utils.data.DataLoader(images, batch_size=4)
    result = metrics.reconstruction_metrics(ShiftModel(), loader, device="cpu", keep=3)

    assert result.num_images == 6
    # [-1, 1] errors 0.2 and 0.1 -> MSE 0.04 and 0.01; mean 0.025
    assert result.metrics["mse"] == pytest.approx(0.025, rel=1e-6)
    assert result.metrics["kl"] == pytest.approx(8.0, rel=1e-6)
    # on [0, 1] the errors are 0.1 and 0.05: PSNR 20 dB and 26.0206 dB, mean 23.0103 per image; the
    # pooled MSE (0.01 + 0.0025) / 2 = 0.00625 gives 22.0412 dB
    assert result.metrics["psnr_per_image_mean"] == pytest.approx((20.0 + 10 * math.log10(1 / 0.0025)) / 2, abs=1e-5)
    assert result.metrics["psnr_pooled"] == pytest.approx(10 * math.log10(1 / 0.00625), abs=1e-5)
    expected_ssim = (ssim_of_constants(0.4, 0.5) + ssim_of_constants(0.6, 0.65)) / 2
    assert result.metrics["ssim"] == pytest.approx(expected_ssim, abs=1e-5)
    # the kept pictures are the first images, mapped to [0, 1]
    assert result.originals.shape == (3, 3, 16, 16)
    assert torch.allclose(result.originals[:, 0, 0, 0], torch.tensor([0.4, 0.6, 0.4]))
    assert torch.allclose(result.reconstructions[:, 0, 0, 0], torch.tensor([0.5, 0.65, 0.5]))


def test_psnr_of_a_known_perturbation_20db():
    images = torch.full((2, 3, 16, 16), -0.4)  # +0.2 on [-1, 1] is +0.1 on [0, 1]: MSE 0.01 -> 20 dB
    result = metrics.reconstruction_metrics(ShiftModel(), [images], device="cpu")
    assert result.metrics["psnr_pooled"] == pytest.approx(20.0, abs=1e-5)
    assert result.metrics["psnr_per_image_mean"] == pytest.approx(20.0, abs=1e-5)


class ReplayModel(ShiftModel):
    """A fake VAE whose reconstruction of each batch is the next of the given tensors (on [-1, 1])."""

    def __init__(self, reconstructions: list[torch.Tensor]):
        super().__init__()
        self.reconstructions = list(reconstructions)

    def decode(self, z):
        return SimpleNamespace(sample=self.reconstructions.pop(0))


def unit_pairs_metrics(targets: torch.Tensor, predictions: torch.Tensor, batch: int) -> dict[str, float]:
    """vaedyn's metrics of predictions against targets, both given on [0, 1], fed in batches."""
    loader = torch.utils.data.DataLoader(targets * 2 - 1, batch_size=batch)
    model = ReplayModel(list((predictions * 2 - 1).split(batch)))
    return metrics.reconstruction_metrics(model, loader, device="cpu").metrics


def test_psnr_pooled_and_per_image_mean_are_torchmetrics_defaults_and_dim():
    # two constant images at 0.5 with errors 0.01 and 0.10 (MSE 1e-4 and 1e-2):
    # pooled -10 log10((1e-4 + 1e-2) / 2) = 22.967086 dB; per-image (40 + 20) / 2 = 30 dB
    target = torch.full((2, 3, 8, 8), 0.5)
    prediction = target + torch.tensor([0.01, 0.10]).view(2, 1, 1, 1)
    m = unit_pairs_metrics(target, prediction, batch=1)
    assert m["psnr_pooled"] == pytest.approx(22.967086, abs=1e-5)
    assert m["psnr_per_image_mean"] == pytest.approx(30.0, abs=1e-5)

    # textured images, batches of 2 (the recipe of the original's check): torchmetrics' own objects
    # as the original called them (defaults: dim=None, pooled) and per image (dim=(1, 2, 3))
    from torchmetrics.image import PeakSignalNoiseRatio

    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 3, 64, 64, generator=g)
    noise = torch.randn(4, 3, 64, 64, generator=g) * torch.tensor([0.01, 0.02, 0.05, 0.1]).view(4, 1, 1, 1)
    prediction = (target + noise).clamp(0, 1)
    m = unit_pairs_metrics(target, prediction, batch=2)
    pooled = PeakSignalNoiseRatio(data_range=1.0)
    per_image = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    for i in (0, 2):
        pooled.update(prediction[i : i + 2], target[i : i + 2])
        per_image.update(prediction[i : i + 2], target[i : i + 2])
    assert m["psnr_pooled"] == pytest.approx(25.2148, abs=1e-4)
    assert m["psnr_pooled"] == pytest.approx(float(pooled.compute()), abs=1e-4)
    assert m["psnr_per_image_mean"] == pytest.approx(30.1898, abs=1e-4)
    assert m["psnr_per_image_mean"] == pytest.approx(float(per_image.compute()), abs=1e-4)
    squared = (prediction.double() - target.double()) ** 2
    assert m["psnr_pooled"] == pytest.approx(-10 * math.log10(squared.mean().item()), abs=1e-5)
    assert m["ssim"] == pytest.approx(np.mean([0.999389, 0.997537, 0.985139, 0.943717]), abs=1e-6)


def gaussian_window() -> np.ndarray:
    """SSIM's window for sigma 1.5: 11 taps (radius int(3.5 * 1.5 + 0.5) = 5), normalised."""
    taps = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    return taps / taps.sum()


def blur(img: np.ndarray, mode: str | None) -> np.ndarray:
    """Separable Gaussian blur of (H, W); mode: np.pad mode for a 5-px border, None for the valid part only."""
    w = gaussian_window()
    a = np.pad(img, 5, mode=mode) if mode else img
    rows = sum(w[k] * a[k : a.shape[0] - 10 + k, :] for k in range(11))
    return sum(w[k] * rows[:, k : a.shape[1] - 10 + k] for k in range(11))


def ssim_map(x: np.ndarray, y: np.ndarray, mode: str | None = "reflect") -> np.ndarray:
    """SSIM map of two (H, W) float64 images with data range 1 (population variances, C1 = 0.01^2, C2 = 0.03^2)."""
    mx, my = blur(x, mode), blur(y, mode)
    vx = np.maximum(blur(x * x, mode) - mx * mx, 0)
    vy = np.maximum(blur(y * y, mode) - my * my, 0)
    cxy = blur(x * y, mode) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))


@pytest.mark.parametrize("side", [8, 32])  # 8: smaller than the 11-px window, reflect padding reaches across
def test_ssim_of_textured_images_by_hand_and_by_scikit_image(side: int):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(side)
    # values on a 1/1024 grid, so that the [-1, 1] round trip is exact in float32
    target = rng.integers(0, 1025, (3, 3, side, side)) / 1024
    smooth = np.cumsum(rng.normal(0, 60, (3, 3, side, side)), axis=-1).round() / 1024  # correlated error
    prediction = np.clip(target + smooth, 0, 1)
    m = unit_pairs_metrics(torch.tensor(target, dtype=torch.float32), torch.tensor(prediction, dtype=torch.float32), 2)
    # torchmetrics' SSIM: reflect-pad 5 px, SSIM map over every pixel, mean over channels and pixels, then images
    by_hand = np.mean([np.mean([ssim_map(p[c], t[c]).mean() for c in range(3)]) for p, t in zip(prediction, target, strict=True)])
    assert m["ssim"] == pytest.approx(by_hand, abs=1e-12)
    assert 0.2 < by_hand < 0.95  # textured, neither identical nor unrelated
    if side > 11:  # where the window stays inside the image, the map is scikit-image's
        for p, t in zip(prediction, target, strict=True):
            _, full = structural_similarity(p, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            data_range=1.0, channel_axis=0, full=True)
            ours = np.stack([ssim_map(p[c], t[c]) for c in range(3)])
            np.testing.assert_allclose(ours[:, 5:-5, 5:-5], full[:, 5:-5, 5:-5], atol=1e-10)


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
    assert artifacts.marker_kind(out) == "eval"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        artifacts.MARKER_FILE, "grid.png", "metrics.json", "samples", "samples/0000_original.png",
        "samples/0000_reconstruction.png",
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


def write_metrics(folder: Path, run_name: str, mse: float, kl: float, psnr: float, ssim: float,
                  psnr_per_image: float | None = None, *, split: str = "test", num_images: int = 100,
                  dataset: str = "builtin:natural", checkpoint: Path | None = None) -> Path:
    """A metrics.json; without psnr_per_image an older vaedyn's (`psnr`, the per-image mean, only)."""
    folder.mkdir(parents=True)
    values = {"mse": mse, "kl": kl, "psnr": psnr, "ssim": ssim}
    if psnr_per_image is not None:
        values = {"mse": mse, "kl": kl, "psnr_pooled": psnr, "psnr_per_image_mean": psnr_per_image, "ssim": ssim}
    record = {"checkpoint": str(checkpoint or folder), "step": 10, "split": split, "num_images": num_images,
              "metrics": values, "config": {"run_name": run_name, "data": {"dataset_name": dataset, "resolution": 32}}}
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def test_compare_table1_layout(tmp_path, cli):
    # the original study's CIFAR-10 row pair (its PSNR is the pooled one), with per-image means beside
    a = write_metrics(tmp_path / "a", "cifar10_baseline", 2.879e-3, 994.63, 31.429, 0.9195, psnr_per_image=31.802)
    b = write_metrics(tmp_path / "b", "cifar10_nudge", 2.826e-3, 997.53, 31.509, 0.9210, psnr_per_image=31.874)
    result = cli("eval", "--compare", a, b / "metrics.json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # same split, data and image count, current files: nothing to warn about
    lines = result.stdout.splitlines()
    assert lines[0] == "| metric                     | cifar10_baseline | cifar10_nudge |   delta | better |"
    assert lines[1] == "|----------------------------|-----------------:|--------------:|--------:|--------|"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:7]}
    assert rows == {
        "MSE (x1e-3)": ["2.879", "2.826", "-0.053", "n/a"],
        "KL": ["994.63", "997.53", "+2.90", "n/a"],
        "PSNR (dB) pooled [Table 1]": ["31.429", "31.509", "+0.080", "n/a"],
        "PSNR (dB) per-image mean": ["31.802", "31.874", "+0.072", "n/a"],
        "SSIM": ["0.9195", "0.9210", "+0.0015", "n/a"],
    }
    assert list(rows)[2:4] == ["PSNR (dB) pooled [Table 1]", "PSNR (dB) per-image mean"]
    # single runs name no winner, however large the difference
    assert lines[7:] == ["", "better: n/a (single runs: see `vaedyn study`); a difference between two single runs may "
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
    a = write_metrics(tmp_path / "a", "quickstart", 1e-3, 5.0, 30.0, 0.9, psnr_per_image=30.5)
    b = write_metrics(tmp_path / "b", "quickstart", 1e-3, 5.0, 30.0, 0.9, psnr_per_image=30.5, checkpoint=nudged)
    c = write_metrics(tmp_path / "c", "quickstart", 2e-3, 5.0, 30.0, 0.9, psnr_per_image=30.5)
    data = json.loads(compare.compare([a, b, c], fmt="json"))
    assert [r["label"] for r in data["runs"]] == ["quickstart #1", "quickstart nudged gn_scale_reset", "quickstart #3"]
    assert [r["nudge"] for r in data["runs"]] == [None, "gn_scale_reset", None]
    # metrics.json written by `vaedyn eval` carries the strategy itself (the folder may be gone)
    (nudged / artifacts.NUDGE_FILE).unlink()
    record = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**record, "nudge": {"strategy": "redo"}}))
    assert compare.run_label(metrics.load_metrics(b)) == "quickstart nudged redo"


def test_compare_warns_when_the_evaluations_are_not_like_for_like(tmp_path, cli):
    a = write_metrics(tmp_path / "a", "base", 1e-3, 5.0, 30.0, 0.9, psnr_per_image=30.5)
    b = write_metrics(tmp_path / "b", "other", 1e-3, 5.0, 30.0, 0.9, psnr_per_image=30.5, split="validation",
                      num_images=64, dataset="builtin:glyphs")
    result = cli("eval", "--compare", a, b)
    assert result.exit_code == 0
    warnings = result.stderr.strip().splitlines()
    assert warnings == [
        "warning: the evaluations differ in split (base: test, other: validation); the comparison is not like for like",
        'warning: the evaluations differ in dataset (base: {"dataset_name": "builtin:natural", "resolution": 32}, '
        'other: {"dataset_name": "builtin:glyphs", "resolution": 32}); the comparison is not like for like',
        "warning: the evaluations differ in number of images (base: 100, other: 64); the comparison is not like for like",
    ]
    c = write_metrics(tmp_path / "c", "third", 1e-3, 5.0, 30.0, 0.9, psnr_per_image=30.5, num_images=64)
    assert json.loads(compare.compare([a, c], fmt="json"))["warnings"] == [
        "warning: the evaluations differ in number of images (base: 100, third: 64); the comparison is not like for like"]


def test_compare_labels_and_errors(tmp_path, cli):
    a = write_metrics(tmp_path / "a", "same", 1e-3, 5.0, 30.0, 0.9, psnr_per_image=30.5)
    b = write_metrics(tmp_path / "b", "same", 1e-3, 4.0, 30.0, 0.8, psnr_per_image=30.6)
    c = write_metrics(tmp_path / "c", "same", 1e-3, 4.0, 31.0, 0.8, psnr_per_image=30.6)
    data = json.loads(compare.compare([a, b, c], fmt="json"))
    assert [r["label"] for r in data["runs"]] == ["same #1", "same #2", "same #3"]  # same step and split
    assert {r["better"] for r in data["rows"]} == {None}
    record = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**record, "step": 20}))
    assert [r["label"] for r in json.loads(compare.compare([a, b], fmt="json"))["runs"]] == ["same step 10",
                                                                                          "same step 20"]

    result = cli("eval", "--compare", a)
    assert result.exit_code == 2 and "at least two" in result.stderr
    result = cli("eval", "--compare", a, tmp_path / "nothing")
    assert result.exit_code == 2 and "has no metrics.json" in result.stderr
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(VaedynError, match="not a metrics file"):
        compare.compare([a, tmp_path / "broken.json"])
    result = cli("eval", a)
    assert result.exit_code == 2 and "PATHS are for --compare" in result.stderr


def test_compare_reads_older_metrics_files(tmp_path, cli):
    # vaedyn before both PSNRs wrote `psnr`, the per-image mean; its pooled PSNR is unknown (n/a)
    old = write_metrics(tmp_path / "old", "before", 2.9e-3, 990.0, 31.80, 0.92)
    new = write_metrics(tmp_path / "new", "after", 2.8e-3, 995.0, 31.45, 0.93, psnr_per_image=31.85)
    result = cli("eval", "--compare", old, new)
    assert result.exit_code == 0, result.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines()[2:7]}
    assert rows["PSNR (dB) pooled [Table 1]"] == ["n/a", "31.450", "n/a", "n/a"]
    assert rows["PSNR (dB) per-image mean"] == ["31.800", "31.850", "+0.050", "n/a"]
    assert rows["SSIM"] == ["0.9200", "0.9300", "+0.0100", "n/a"]
    warning = [line for line in result.stderr.splitlines() if "older vaedyn" in line]
    assert len(warning) == 1 and str(old / "metrics.json") in warning[0]
    assert "psnr is shown as psnr_per_image_mean" in warning[0] and "psnr_pooled" in warning[0]
    data = json.loads(compare.compare([old, new], fmt="json"))
    pooled = next(r for r in data["rows"] if r["metric"] == "psnr_pooled")
    assert pooled == {"metric": "psnr_pooled", "values": {"before": None, "after": 31.45}, "delta": None,
                      "better": None, "lower_is_better": False}
    # an old file lacking another metric is still refused
    (tmp_path / "partial.json").write_text(json.dumps({"metrics": {"mse": 1.0, "kl": 1.0, "psnr": 20.0}}))
    with pytest.raises(VaedynError, match="lacks metrics ssim"):
        compare.compare([new, tmp_path / "partial.json"])


GOOD = {"mse": 0.01, "kl": 3.5, "psnr_pooled": 20.0, "psnr_per_image_mean": 21.0, "ssim": 0.8}


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "it is not a metrics file written by `vaedyn eval`; rerun `vaedyn eval`"),
    ('{"metrics": [1, 2]}', "is not a metrics file written by `vaedyn eval` (no 'metrics' mapping); rerun `vaedyn eval`"),
    ('[{"metrics": {}}]', "(no 'metrics' mapping); rerun `vaedyn eval`"),
    (json.dumps({"metrics": {**GOOD, "ssim": "0.8"}}), "metric 'ssim' is \"0.8\", not a number; rerun `vaedyn eval`"),
    (json.dumps({"metrics": {**GOOD, "kl": True}}), "metric 'kl' is true, not a number; rerun `vaedyn eval`"),
    (json.dumps({"metrics": {k: v for k, v in GOOD.items() if k != "kl"}}), "lacks metrics kl; rerun `vaedyn eval`"),
    (json.dumps({"metrics": {"mse": 0.01, "kl": 3.5, "ssim": 0.8}}), "lacks metrics psnr_pooled, psnr_per_image_mean;"),
    # an older file (psnr, no pooled PSNR): the n/a is skipped, the metrics after it are still checked
    (json.dumps({"metrics": {"mse": 0.01, "kl": 3.5, "psnr": 21.0, "ssim": None}}), "metric 'ssim' is null"),
])
def test_a_bad_metrics_file_is_one_error_naming_it_and_the_fix(tmp_path, content, message):
    file = tmp_path / "metrics.json"
    file.write_text(content)
    with pytest.raises(VaedynError) as err:
        metrics.load_metrics(tmp_path)
    assert message in str(err.value) and str(file) in str(err.value)


def test_load_metrics_reads_a_file_or_its_folder_and_renames_an_older_files_psnr(tmp_path):
    file = tmp_path / "metrics.json"
    file.write_text(json.dumps({"checkpoint": "run", "metrics": {**GOOD, "extra": 1}}))
    for where in (tmp_path, file):
        record = metrics.load_metrics(where)
        assert record["metrics"] == GOOD and record["path"] == str(file) and record["checkpoint"] == "run"
    file.write_text(json.dumps({"metrics": {"mse": 0.01, "kl": 3.5, "psnr": 21.0, "ssim": 0.8}}))
    record = metrics.load_metrics(file)
    assert record["metrics"] == {"mse": 0.01, "kl": 3.5, "psnr_pooled": None, "psnr_per_image_mean": 21.0, "ssim": 0.8}
    # a file that has both names keeps its own per-image mean and is not an older one
    both = {**GOOD, "psnr": 99.0}
    file.write_text(json.dumps({"metrics": both}))
    assert metrics.load_metrics(file)["metrics"] == GOOD


def test_image_helpers_clamp_scale_and_enlarge_by_hand_values():
    """Reconstructions overshoot [-1, 1]: to_unit clamps to [0, 1]; pictures map [0, 1] to 0..255 and
    clamp; the grid enlarges the longer side to at least 128 px by a whole factor (never below 1);
    the PSNR is computed in float64."""
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 1.25])
    assert metrics.to_unit(x).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    img = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5, 0.2]).reshape(3, 1, 2)  # (3, H=1, W=2)
    assert metrics._to_uint8(img).tolist() == [[[0, 128, 255], [0, 255, 51]]]
    assert [metrics.grid_zoom(h, w) for h, w in ((32, 32), (16, 40), (40, 16), (100, 1), (128, 128), (300, 64))] == \
        [4, 4, 4, 2, 1, 1]
    assert metrics.psnr_db(0.001234567).item() == pytest.approx(-10.0 * math.log10(0.001234567), rel=1e-14, abs=0)
    assert metrics.psnr_db(0.001234567).dtype == torch.float64


@pytest.mark.parametrize(("n", "num_pairs", "grid_k", "pairs"), [(10, 3, 8, 3), (5, 12, 5, 5), (9, 0, 8, 0)])
def test_pictures_show_the_first_eight_in_the_grid_and_num_pairs_pairs(tmp_path, n, num_pairs, grid_k, pairs):
    """grid.png holds the first min(8, n) images (16x16, enlarged 8x) over their reconstructions;
    samples/ holds exactly min(num_pairs, n) numbered pairs, each the image itself, and no folder at 0."""
    g = torch.Generator().manual_seed(n)
    originals, reconstructions = torch.rand(n, 3, 16, 16, generator=g), torch.rand(n, 3, 16, 16, generator=g)
    metrics.write_pictures(tmp_path, metrics.EvalResult({}, n, originals, reconstructions), num_pairs)
    grid = np.asarray(Image.open(tmp_path / artifacts.EVAL_GRID_FILE))
    assert grid.shape == (2 * 128 + 3 * 4, grid_k * 128 + (grid_k + 1) * 4, 3)
    last = 4 + (grid_k - 1) * (128 + 4)  # the last tile of the top row is image grid_k - 1
    np.testing.assert_array_equal(grid[4:4 + 128:8, last:last + 128:8], metrics._to_uint8(originals[grid_k - 1]))
    samples = tmp_path / artifacts.SAMPLES_DIR
    if not num_pairs:
        assert not samples.exists()
        return
    names = sorted(p.name for p in samples.iterdir())
    assert names == sorted(f"{i:04d}_{kind}.png" for i in range(pairs) for kind in ("original", "reconstruction"))
    for i in range(pairs):
        np.testing.assert_array_equal(np.asarray(Image.open(samples / f"{i:04d}_original.png")),
                                      metrics._to_uint8(originals[i]))
        np.testing.assert_array_equal(np.asarray(Image.open(samples / f"{i:04d}_reconstruction.png")),
                                      metrics._to_uint8(reconstructions[i]))


def test_no_kept_images_write_no_pictures(tmp_path):
    """An evaluation that kept no images (keep=0) writes neither grid.png nor samples/."""
    metrics.write_pictures(tmp_path, metrics.EvalResult({}, 0), num_pairs=4)
    assert list(tmp_path.iterdir()) == []
