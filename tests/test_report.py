"""`vaedyn report`: figures and page from small trace stores with planted dynamics."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import tiny_config_dict
from vaedyn_cli import artifacts
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.report import FIGURES, INDEX_FILE, SUMMARY_FILE, build_report, reconciliation_text

LAYERS = [  # (name, part, has_activation), 8 channels each
    ("encoder.down_blocks.0.resnets.0.norm1", "encoder", True),
    ("encoder.mid_block.attentions.0.group_norm", "encoder", False),
    ("decoder.up_blocks.0.resnets.0.norm2", "decoder", True),
    ("decoder.conv_norm_out", "decoder", True),
]
WIDTH = 8
N_STEPS = 20
STEPS = np.arange(N_STEPS, dtype=np.int64) * 2  # tracked every 2 steps: 0 .. 38
PARAMS = ["encoder.conv_in.weight", "decoder.conv_out.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"]
ALL_FILES = sorted([*FIGURES, INDEX_FILE, SUMMARY_FILE, artifacts.MARKER_FILE])


def planted(source: str = "train", steps: int = N_STEPS) -> dict[str, np.ndarray]:
    """Statistics with planted dynamics, (steps, 32 channels) each:

    encoder layer 0 channels 0, 1 die at step 10 (activity 1e-3, gamma 1e-3): dormant, `died`, gn_scale;
    encoder attention channel 2 has std 0.05 throughout: dormant, `born_dormant`;
    decoder conv_norm_out channel 3 has activity 0 throughout: dead, `born_dormant`;
    decoder up0 channel 5 is at 0.01 until step 18, then active: `revived`.
    """
    rng = np.random.default_rng(0)
    n_ch = WIDTH * len(LAYERS)
    has_act = np.array([a for _, _, a in LAYERS for _ in range(WIDTH)])
    base = 1.0 + 0.01 * rng.standard_normal((steps, n_ch))
    std = base.copy()
    act_std = np.where(has_act, base * 0.6, np.nan)
    gamma = np.ones((steps, n_ch))
    act_std[5:, [0, 1]] = 1e-3
    gamma[5:, [0, 1]] = 1e-3
    std[:, WIDTH + 2] = 0.05
    act_std[:, 3 * WIDTH + 3] = 0.0
    act_std[:9, 2 * WIDTH + 5] = 0.01
    out = {
        "in_std": base, "mean": np.zeros_like(base), "mean_abs": 0.8 * std, "std": std,
        "act_mean": 0.3 * act_std, "act_std": act_std, "gn_weight": gamma, "gn_bias": np.zeros_like(base),
        "gn_weight_grad": np.full_like(base, 1e-3 if source == "train" else np.nan),
        "out_weight_norm": np.ones_like(base),
    }
    return out


def write_store(path: Path, tmp_path: Path, *, source: str = "train", events: bool = False, near_zero: bool = True,
                uncommitted: int = 0, stats: dict[str, np.ndarray] | None = None) -> Path:
    """A trace store written by the project's own TraceWriter (docs/design.md schema), 32 channels x 20 steps
    (`stats`, default `planted()`); `uncommitted` more steps are written but not committed (as a crash between
    write and commit leaves)."""
    from vaedyn_cli import store

    n = N_STEPS + uncommitted
    stats = planted(source, n) if stats is None else stats
    layout = store.ChannelLayout.from_layers([(name, WIDTH, part, act) for name, part, act in LAYERS],
                                             params=PARAMS if near_zero else ())
    cfg = RunConfig.model_validate(tiny_config_dict(tmp_path))
    model_config = json.dumps({"norm_num_groups": 2, "block_out_channels": [8, 16, 32, 32]})
    train = source == "train"
    records = [
        store.TraceRecord(
            step=2 * i,
            channels={k: v[i] for k, v in stats.items()},
            scalars={"loss": 0.5 - 0.02 * i, "rec_loss": 0.49 - 0.02 * i, "kl_loss": 200.0 + 35 * i, "lr": 1e-3}
            if train else {},
            near_zero_frac=np.array([0.001, 0.002, 0.003]) * i if near_zero else None,
        )
        for i in range(n)
    ]
    with store.TraceWriter(path, layout, store.store_attrs(source, "tiny", cfg.model_dump_json(), model_config),
                           mode="w", chunk_steps=8) as writer:
        for r in records:
            writer.append(r)
        if events:
            writer.add_events([
                {"step": s, "layer": "decoder.up_blocks.0.resnets.0.norm2", "channel_index": 5,
                 "strategy": "gn_scale_nudge", "param": p, "before": b, "after": a}
                for s, p, b, a in ((20, "weight[5]", 0.5, 0.55), (20, "bias[5]", 0.0, 0.0), (30, "weight[5]", 0.55, 0.6))
            ])
    if uncommitted:
        meta = json.loads((path / "zarr.json").read_text())
        meta["attributes"]["committed_steps"] = N_STEPS
        (path / "zarr.json").write_text(json.dumps(meta))
    return path


def make_run(tmp_path: Path, events: bool = True, validation: bool = True) -> Path:
    """A run folder with config.yaml, trace.zarr (with events) and validation.jsonl."""
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    cfg = RunConfig.model_validate(tiny_config_dict(tmp_path))
    (run / artifacts.CONFIG_FILE).write_text(cfg.to_yaml())
    write_store(run / artifacts.TRACE_DIR, tmp_path, events=events)
    if validation:
        lines = [{"step": s, "epoch": 0, "val_rec_loss": 0.3 - 0.01 * s, "val_kl": 500.0 + s, "val_psnr": 20.0 + s / 10}
                 for s in (6, 18, 30)]
        (run / artifacts.VALIDATION_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3')
    return run


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _png_ok(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """`vaedyn report RUN` on a run folder with events and validation lines (shared by two tests)."""
    from typer.testing import CliRunner

    from vaedyn_cli.cli import app

    run = make_run(tmp_path_factory.mktemp("report"))
    return run, CliRunner().invoke(app, ["report", str(run)], catch_exceptions=False)


def test_report_of_run_writes_every_file_with_known_counts(run_report: tuple[Path, Any]) -> None:
    run, result = run_report
    assert result.exit_code == 0, result.stderr
    out = Path(result.stdout.strip())
    assert out == run / artifacts.REPORT_DIR
    assert _listing(out) == ALL_FILES
    assert all(_png_ok(out / f) for f in FIGURES)
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert s["steps"] == {"count": 20, "first": 0, "last": 38, "shown_in_lines": 20, "shown_in_heatmap": 20}
    assert s["channels"] == {"total": 32, "encoder": 16, "decoder": 16}
    assert s["last_step"] == {"encoder": {"inactive": 3, "dead": 0, "channels": 16},
                              "decoder": {"inactive": 1, "dead": 1, "channels": 16}}
    counts = s["classification"]["counts"]
    assert s["classification"]["from"].startswith("computed in memory")
    assert counts["trajectory"]["died"] == {"encoder": 2, "decoder": 0}
    assert counts["trajectory"]["born_dormant"] == {"encoder": 1, "decoder": 1}
    assert counts["trajectory"]["revived"] == {"encoder": 0, "decoder": 1}
    assert counts["trajectory"]["active"] == {"encoder": 13, "decoder": 14}
    assert counts["mechanism"]["gn_scale"] == {"encoder": 2, "decoder": 0}
    top = s["most_affected_layers"]
    assert [(r["layer"], r["dormant"], r["dead"]) for r in top] == [
        ("encoder.down_blocks.0.resnets.0.norm1", 2, 0),
        ("encoder.mid_block.attentions.0.group_norm", 1, 0),
        ("decoder.conv_norm_out", 0, 1),
    ]
    assert s["events"] == {"events": 3, "steps": 2, "first_step": 20, "last_step": 30, "channels_touched": 1,
                           "by_strategy": {"gn_scale_nudge": 3}}
    assert s["validation_records"] == 3  # the torn last line is ignored
    assert all(v == "written" for v in s["figures"].values())
    page = (out / INDEX_FILE).read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(FIGURES)
    assert "Not drawn" not in page and "encoder.down_blocks.0.resnets.0.norm1" in page
    assert '"run_name": "tiny"' in html.unescape(page)  # the run's config is on the page


def test_the_page_opens_with_the_channels_that_died_and_how(run_report: tuple[Path, Any]) -> None:
    """The planted encoder channels 0 and 1 die at step 10 by their GroupNorm scale: the summary, the
    page's first sentence and its first figure (before the summary table) say so."""
    run, result = run_report
    out = run / artifacts.REPORT_DIR
    died = json.loads((out / SUMMARY_FILE).read_text())["died"]
    assert died == {"total": 2, "channels": 32, "by_mechanism": {"gn_scale": 2, "saturated": 0, "input_collapse": 0,
                                                                 "other": 0},
                    "onsets": {"gn_scale": [10, 10], "saturated": [], "input_collapse": [], "other": []},
                    "first_onset": 10, "median_onset": 10.0, "last_onset": 10}
    page = (out / INDEX_FILE).read_text()
    lead = re.search(r'<p class="lead">(.*?)</p>', page).group(1)
    assert lead == ("2 of 32 channels (6.2 %) died during training: active at first, inactive for good from step 10 "
                    "to 10 (median 10) by the classification; by mechanism: 2 gn scale.")
    assert page.index('<p class="lead">') < page.index('src="died_over_training.png"') < page.index('id="summary"')
    assert page.count('src="died_over_training.png"') == 1


def test_the_died_figure_stacks_onsets_by_mechanism(tmp_path: Path) -> None:
    from vaedyn_cli import figures, report_data, store

    path = write_store(tmp_path / "t.zarr", tmp_path)
    fig = figures.fig_died(report_data.gather(path, store.open_trace(path)))
    ax = fig.axes[0]
    assert ax.get_title() == "2 of 32 channels (6.2 %) died during training, onsets at steps 10-10"
    (band,) = ax.collections  # one mechanism: gn_scale, red
    top = band.get_paths()[0].vertices
    assert {(x, y) for x, y in top if y > 0} >= {(10.0, 2.0), (38.0, 2.0)}  # 2 channels from step 10 on
    assert max(y for x, y in top if x < 10) == 0.0
    assert [t.get_text() for t in ax.get_legend().get_texts()][0] == "gn scale (2)"


def test_stored_classification_replacing_an_old_report_and_subsampled_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vaedyn_cli import report_data
    from vaedyn_cli.classify import classify_store

    store = write_store(tmp_path / "bare.zarr", tmp_path)
    classify_store(store)
    out = build_report(store)
    assert out == tmp_path / "bare.zarr.report"
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert s["classification"]["from"] == "stored by `vaedyn classify`"
    assert s["classification"]["counts"]["state"]["dead"] == {"encoder": 0, "decoder": 1}
    # a long trace: line plots and heatmap read evenly spaced steps, always with the last one
    monkeypatch.setattr(report_data, "MAX_LINE_STEPS", 8)
    monkeypatch.setattr(report_data, "MAX_HEATMAP_STEPS", 5)
    (out / "stale.png").write_bytes(b"x")
    assert build_report(store) == out and not (out / "stale.png").exists()
    assert _listing(tmp_path) == ["bare.zarr", "bare.zarr.report"]  # no temporary or old folder left
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert s["steps"] == {"count": 20, "first": 0, "last": 38, "shown_in_lines": 8, "shown_in_heatmap": 5}
    assert s["last_step"]["encoder"] == {"inactive": 3, "dead": 0, "channels": 16}
    assert report_data.spread(20, 8).tolist() == [0, 3, 5, 8, 11, 14, 16, 19]


def _summary_and_page(store: Path) -> tuple[dict[str, Any], str]:
    """summary.json's numbers and index.html of a store as `build_report` makes them, without the figures."""
    from vaedyn_cli import store as store_mod
    from vaedyn_cli.report import build_summary, render_html
    from vaedyn_cli.report_data import gather

    d = gather(store, store_mod.open_trace(store))
    summary = json.loads(json.dumps(build_summary(d, {}), default=lambda v: v.item()))
    return summary, render_html(d, summary, {})


def test_counts_say_their_rule_and_one_sentence_reconciles_them(tmp_path: Path) -> None:
    """Beside planted(): encoder layer-0 channel 4 turns inactive at step 36 (2 of the 3 tracked steps the
    persistence filter needs) and decoder up0 channel 6, inactive from the start, is active again at step
    38 alone. Both rules count 5 inactive channels at step 38, but not the same ones."""
    stats = planted()
    stats["act_std"][18:, 4] = 1e-3
    stats["act_std"][:19, 2 * WIDTH + 6] = 0.01
    s, page = _summary_and_page(write_store(tmp_path / "s.zarr", tmp_path, stats=stats))
    assert s["last_step_rule"].startswith("per-step rule: dormancy score <= 0.1")
    assert s["classification"]["rule"].startswith("classification: dormancy, a change counts once it holds 3 tracked")
    rec = s["reconciliation"]
    assert rec["per_step"] == {"encoder": 4, "decoder": 1} and rec["classified"] == {"encoder": 3, "decoder": 2}
    assert rec["only_per_step"] == [{"layer": "encoder.down_blocks.0.resnets.0.norm1", "channel_index": 4,
                                     "part": "encoder", "state": "active", "since_step": 36, "held": 2,
                                     "at_least": False}]
    assert rec["only_classified"] == [{"layer": "decoder.up_blocks.0.resnets.0.norm2", "channel_index": 6,
                                       "part": "decoder", "state": "dormant", "since_step": 38, "held": 1,
                                       "at_least": False}]
    sentence = ("5 channels are inactive at step 38 by the per-step rule; 5 by the classification (persistence 3 "
                "steps): encoder.down_blocks.0.resnets.0.norm1 #4 became inactive at step 36 and has held 2 of 3 "
                "steps; decoder.up_blocks.0.resnets.0.norm2 #6 is active again since step 38 (1 of 3 steps), so the "
                "classification still counts it dormant.")
    page = html.unescape(page)
    assert page.count(sentence) == 2  # in the summary and above the class counts
    assert "inactive at step 38, per-step rule</td><td class=\"l\">encoder 4 of 16 (0 dead), decoder 1 of 16" in page
    assert "inactive at step 38, classification</td><td class=\"l\">encoder 3, decoder 2 [classification" in page
    assert "Most affected layers at step 38 (per-step rule)" in page and "Class counts (classification)" in page
    import torch

    assert f"({s['source']}), torch {torch.__version__}, {torch.get_num_threads()} threads</td>" in page
    # where both rules agree, the page says so in as many words
    s, _ = _summary_and_page(write_store(tmp_path / "same.zarr", tmp_path))
    assert reconciliation_text(s["reconciliation"]) == (
        "4 channels are inactive at step 38 by the per-step rule; 4 by the classification (persistence 3 steps): "
        "the same channels.")


def test_store_without_classification_events_or_validation_skips_with_notes(tmp_path: Path) -> None:
    store = write_store(tmp_path / "plain.zarr", tmp_path, near_zero=False, uncommitted=3)
    out = build_report(store, tmp_path / "rep")
    assert _listing(out) == sorted([*(f for f in FIGURES if f != "near_zero_weights.png"), INDEX_FILE, SUMMARY_FILE,
                                    artifacts.MARKER_FILE])
    assert artifacts.marker_kind(out) == "report"
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert s["steps"]["count"] == 20  # the 3 uncommitted steps are not shown
    assert s["events"] == {"events": 0}
    assert s["figures"]["near_zero_weights.png"].startswith("skipped: the trace has no near_zero_frac")
    page = (out / INDEX_FILE).read_text()
    assert page.count('class="note">Not drawn') == 1
    assert "interventions</td><td class=\"l\">none recorded" in page


def test_track_store_with_nan_losses_reports(tmp_path: Path, cli) -> None:
    store = write_store(tmp_path / "track.zarr", tmp_path, source="track")
    result = cli("report", "-", "--out", str(tmp_path / "r"), input=f"{store}\n")
    assert result.exit_code == 0, result.stderr
    out = Path(result.stdout.strip())
    s = json.loads((out / SUMMARY_FILE).read_text())
    assert s["source"] == "track"
    assert s["figures"]["loss_curves.png"] == "skipped: a `track` store has no training scalars and no validation " \
                                              "metrics were recorded"
    assert not (out / "loss_curves.png").exists()
    assert _png_ok(out / "dormant_counts.png")


def test_bad_inputs_exit_2_and_write_nothing(tmp_path: Path, cli) -> None:
    result = cli("report", str(tmp_path / "missing.zarr"))
    assert result.exit_code == 2 and "missing.zarr not found" in result.stderr
    store = write_store(tmp_path / "s.zarr", tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = cli("report", str(store), "--out", str(busy))
    assert result.exit_code == 2 and "is not a vaedyn report" in result.stderr
    assert _listing(busy) == ["notes.txt"]
    assert _listing(tmp_path) == ["busy", "s.zarr"]
    with pytest.raises(VaedynError, match="is a file"):
        build_report(store, tmp_path / "busy" / "notes.txt")


def test_step_states_by_hand() -> None:
    import xarray as xr

    from vaedyn_cli.classification import step_states
    from vaedyn_cli.config import ClassifyConfig
    from vaedyn_cli.labels import ACTIVE, DEAD, DORMANT, UNOBSERVED

    activity = np.array([[1.0, 1.0, 0.05, 0.0, 2.0, np.nan, 0.0, 0.0]])
    ds = xr.Dataset({"act_std": (("step", "channel"), activity), "mean_abs": (("step", "channel"), activity),
                     "layer": ("channel", ["a"] * 4 + ["b"] * 2 + ["c"] * 2),
                     "channel_index": ("channel", [0, 1, 2, 3, 0, 1, 0, 1]),
                     "part": ("channel", ["encoder"] * 4 + ["decoder"] * 4), "has_activation": ("channel", [True] * 8)},
                    coords={"step": [0]})
    codes, score = step_states(ds, ClassifyConfig(tau=0.1, dead_threshold=1e-6), slice(None))
    # layer a: mean 0.5125 -> scores 1.95, 1.95, 0.098 (dormant), 0 (dead); b: NaN is unobserved, the
    # mean is over the finite values; c: a silent layer scores 0 and is dead
    np.testing.assert_allclose(score[0, :5], [1 / 0.5125, 1 / 0.5125, 0.05 / 0.5125, 0.0, 1.0], rtol=1e-6)
    assert np.isnan(score[0, 5]) and (score[0, 6:] == 0).all()
    assert codes[0].tolist() == [ACTIVE, ACTIVE, DORMANT, DEAD, ACTIVE, UNOBSERVED, DEAD, DEAD]
    codes, score = step_states(ds, ClassifyConfig(method="mean_abs_threshold", threshold=0.2), [0])
    assert codes[0].tolist() == [ACTIVE, ACTIVE, DORMANT, DORMANT, ACTIVE, UNOBSERVED, DORMANT, DORMANT]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


_CHECK = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(e.target && e.target.tagName ? "failed to load " + (e.target.src || e.target.href) : String(e.message));
}, true);
var _ce = console.error;
console.error = function () { window.__errors.push(Array.from(arguments).join(" ")); _ce.apply(console, arguments); };
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.src; });
  var v = document.createElement("pre"); v.id = "verdict";
  v.textContent = JSON.stringify({images: imgs.length, bad: bad, errors: window.__errors});
  document.body.appendChild(v);
});
</script>"""


def test_html_opens_in_headless_chromium_with_every_image(run_report: tuple[Path, Any], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (the CI script installs it)")
    out = Path(shutil.copytree(run_report[0] / artifacts.REPORT_DIR, tmp_path / "report"))
    page = (out / INDEX_FILE).read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    check = out / "_check.html"  # beside index.html so that relative image paths resolve the same way
    check.write_text(page.replace("<head>", "<head>" + _CHECK, 1))
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-dev-shm-usage", "--virtual-time-budget=5000", "--dump-dom", check.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    m = re.search(r'<pre id="verdict">(.*?)</pre>', proc.stdout)
    assert m, f"no verdict in the DOM; chromium said: {proc.stderr[-2000:]}"
    verdict = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert verdict == {"images": len(FIGURES), "bad": [], "errors": []}


# ---------------------------------------------------------------------------------------------
# TensorBoard during training


def test_channel_activity_counts_a_planted_dead_channel_and_matches_torch() -> None:
    import torch

    from vaedyn_cli.config import ClassifyConfig
    from vaedyn_cli.model import build_preset
    from vaedyn_cli.tb import ChannelActivity, gamma_by_part

    model = build_preset(0.0625, seed=0).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    activity = ChannelActivity(model)

    def counts() -> dict:
        activity.attach()
        with torch.no_grad():
            model(x, sample_posterior=False)
        activity.detach()
        return activity.counts(ClassifyConfig())

    before = counts()
    layer = "encoder.down_blocks.1.resnets.0.norm2"
    norm = dict(model.named_modules())[layer]
    seen = []
    handle = norm.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        norm.weight[:3] = 0.0
        norm.bias[:3] = 0.0
    after = counts()
    handle.remove()
    assert before["encoder"]["dead"] == 0 and before["decoder"]["dead"] == 0
    ds = activity.trace()
    activity_ = np.where(ds["has_activation"].values, ds["act_std"].values[0], ds["std"].values[0])
    layers = ds["layer"].values
    score = activity_ / np.array([activity_[layers == n].mean() for n in layers])
    inactive = (score <= 0.1) | (activity_ <= 1e-6)
    part = ds["part"].values
    assert after == {p: {"inactive": int(inactive[part == p].sum()), "dead": int((activity_[part == p] <= 1e-6).sum())}
                     for p in ("encoder", "decoder")}
    assert after["encoder"]["dead"] == 3 and after["decoder"]["dead"] == 0
    sel = (ds["layer"].values == layer)
    y = seen[0].double()
    torch.testing.assert_close(torch.from_numpy(ds["std"].values[0, sel]).double(),
                               y.transpose(0, 1).reshape(16, -1).std(dim=1, unbiased=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(ds["act_std"].values[0, sel]).double(),
                               torch.nn.functional.silu(y).transpose(0, 1).reshape(16, -1).std(dim=1, unbiased=False),
                               atol=1e-5, rtol=1e-5)
    gammas = gamma_by_part(model)
    assert gammas["encoder"].numel() == 520 and gammas["decoder"].numel() == 720  # 1,240 GN channels
    assert int((gammas["encoder"] == 0).sum()) == 3


def test_training_writes_dormant_counts_gamma_histograms_and_reconstructions(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vaedyn_cli.train import train

    cfg = RunConfig.model_validate(tiny_config_dict(
        tmp_path, log={"report_to": "tensorboard", "log_interval": 2}, track={"enabled": False},
        train={"max_steps": 4, "save_interval": 100, "validation_interval": 2},
    ))
    run = train(cfg)
    ea = EventAccumulator(str(run / artifacts.LOGS_DIR), size_guidance={"images": 0, "histograms": 0})
    ea.Reload()
    for part in ("encoder", "decoder"):
        for kind in ("inactive", "dead"):
            assert [e.step for e in ea.Scalars(f"channels/{kind}_{part}")] == [2, 4]
        hist = ea.Histograms(f"gamma_abs/{part}")
        assert [h.step for h in hist] == [2, 4] and hist[0].histogram_value.num == {"encoder": 520, "decoder": 720}[part]
    images = ea.Images("validation/reconstruction")
    assert [(i.step, i.width, i.height) for i in images] == [(2, 64, 32), (4, 64, 32)]  # 4 images over 4 reconstructions
