"""Safe by default (issue 16), where a table of bad inputs (tests/test_bad_input.py) cannot show it:
which folders vaedyn may replace, which settings a resume may change, an earlier vaedyn's
checkpoint resumed without unpickling anything unsafely, one trainer per run folder, and Ctrl-C or
SIGTERM at any point ending in one line that says how to go on."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_config_dict
from tests.test_bad_input import Planted, tree
from vaedyn_cli import artifacts, store
from vaedyn_cli.config import RunConfig, resume_changes
from vaedyn_cli.errors import VaedynError

SETTINGS = {"data": {"max_samples": 8}, "train": {"max_steps": 4, "save_interval": 2, "validation_interval": 2},
            "track": {"interval": 1}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: 4 steps, checkpoints at 2 and 4, tracked every step."""
    from vaedyn_cli.train import train

    root = tmp_path_factory.mktemp("safety")
    return train(RunConfig.model_validate(tiny_config_dict(root, **SETTINGS)))


def copy_of(finished: Path, tmp_path: Path, **train: object) -> tuple[Path, Path]:
    """A copy of the finished run at tmp_path/runs/tiny and its config file (train settings merged in)."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(finished, run)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, **{**SETTINGS, "train": {**SETTINGS["train"], **train}})))
    return run, cfg


def test_the_planted_pickle_runs_code_when_loaded_unsafely(tmp_path: Path) -> None:
    """What the resume cases of test_bad_input plant would run if unpickled as accelerate does its
    custom states (weights_only=False), and does not with weights_only=True."""
    torch.save({"state": Planted(tmp_path / "ran")}, tmp_path / "planted.pkl")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "planted.pkl", weights_only=True)
    assert not (tmp_path / "ran").exists()
    torch.load(tmp_path / "planted.pkl", weights_only=False)
    assert (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------------
# which settings a resume may change (config.RESUME_MAY_CHANGE)


@pytest.mark.parametrize(("field", "value", "nudging", "allowed"), [
    ("train.max_steps", 12, False, True),
    ("train.num_train_epochs", 3, False, True),
    ("train.save_interval", 7, False, True),
    ("train.validation_interval", 5, False, True),
    ("log.log_interval", 5, False, True),
    ("eval.split", "validation", False, True),
    ("track.commit_interval_s", 5.0, False, True),
    ("run_name", "elsewhere", False, True),
    ("classify.tau", 0.2, False, True),  # offline labels only ...
    ("classify.tau", 0.2, True, False),  # ... unless in-training nudges choose channels by them
    ("nudge.factor", 1.3, False, True),
    ("nudge.factor", 1.3, True, False),
    ("nudge.enabled", True, False, False),
    ("seed", 1, False, False),
    ("model.width", 0.125, False, False),
    ("data.batch_size", 2, False, False),
    ("data.resolution", 32, False, False),
    ("data.validation_split_name", "test", False, False),
    ("train.learning_rate", 1e-4, False, False),
    ("train.lr_scheduler_type", "cosine", False, False),
    ("train.kl_weight", 0.0, False, False),
    ("train.gradient_accumulation_steps", 2, False, False),
    ("train.mixed_precision", "bf16", False, False),
    ("train.max_grad_norm", 0.5, False, False),
    ("track.interval", 1, False, False),
    ("track.layers", ["decoder.*"], False, False),
    ("track.gradients", False, False, False),
])
def test_resume_rules(tmp_path: Path, field: str, value: object, nudging: bool, allowed: bool) -> None:
    base = tiny_config_dict(tmp_path, nudge={"enabled": nudging, "every": 2}) if nudging else tiny_config_dict(tmp_path)
    stored = RunConfig.model_validate(base)
    given = stored.model_copy(deep=True)
    section, _, name = field.rpartition(".")
    setattr(getattr(given, section) if section else given, name, value)
    refused, free = resume_changes(stored, given)
    old = stored.model_dump(mode="json")
    for part in field.split("."):
        old = old[part]
    assert (free if allowed else refused) == {field: (old, value)}
    assert (refused if allowed else free) == {}


def test_an_earlier_vaedyns_checkpoint_resumes_and_changed_settings_are_recorded(finished, tmp_path, cli):
    """A checkpoint whose training state is accelerate's pickle (vaedyn before 0.2) resumes (read with
    weights_only=True); a longer max_steps and another log interval are applied, said and recorded."""
    run, cfg = copy_of(finished, tmp_path, max_steps=6)
    step = run / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(4)
    state = json.loads((step / artifacts.TRAINING_STATE_FILE).read_text())
    (step / artifacts.TRAINING_STATE_FILE).unlink()
    torch.save(state, step / artifacts.LEGACY_TRAINING_STATE_FILE)
    (run / artifacts.MARKER_FILE).unlink()  # and its run folder has no marker yet
    result = cli("train", "-c", cfg, "--resume", "latest", "--set", "log.log_interval=3")
    assert result.exit_code == 0, result.stderr
    assert store.open_trace(run / artifacts.TRACE_DIR)["step"].values.tolist() == [1, 2, 3, 4, 5, 6]
    records = artifacts.read_jsonl(run / artifacts.RESUMES_FILE)  # (the copy lives elsewhere: output_dir too)
    assert records == [{"step": 4, "changed": {"log.log_interval": [2, 3], "output_dir": [str(finished.parent),
                                                                                           str(run.parent)],
                                               "train.max_steps": [4, 6]}}]
    saved = yaml.safe_load((run / artifacts.CONFIG_FILE).read_text())
    assert (saved["train"]["max_steps"], saved["log"]["log_interval"]) == (6, 3)  # what the run does now
    assert "resuming at step 4 with changed settings: log.log_interval 2 -> 3, output_dir" in result.stderr
    assert "train.max_steps 4 -> 6 (recorded in resumes.jsonl)" in result.stderr
    assert "schedule now spans" not in result.stderr  # a constant schedule does not depend on the length
    assert artifacts.marker_kind(run) == "run"
    assert json.loads((run / artifacts.CHECKPOINTS_DIR / "step-000006" / artifacts.TRAINING_STATE_FILE).read_text()) \
        == {"global_step": 6, "epoch": 3, "batch_in_epoch": 0}


def test_a_tilde_in_output_dir_is_the_home_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = RunConfig.model_validate(tiny_config_dict(tmp_path, output_dir="~/runs"))
    assert cfg.run_dir == tmp_path / "runs" / "tiny" and cfg.output_dir == "~/runs"  # the config keeps what was given


# ---------------------------------------------------------------------------------------------
# which folders vaedyn may replace (artifacts.check_replaceable)


def _folder(path: Path, kind: artifacts.Kind | None, *names: str) -> Path:
    path.mkdir(parents=True)
    if kind is not None:
        artifacts.write_marker(path, kind)
    for name in names:
        (path / name.rstrip("/")).mkdir() if name.endswith("/") else (path / name).write_text("x")
    return path


@pytest.mark.parametrize(("kind", "marker", "names", "refused"), [
    (artifacts.REPORT, None, None, None),  # nothing there
    (artifacts.REPORT, None, (), None),  # an empty folder
    (artifacts.REPORT, artifacts.REPORT, ("index.html", "summary.json", "loss_curves.png"), None),
    (artifacts.REPORT, None, ("index.html", "summary.json", "loss_curves.png"), None),  # an earlier vaedyn's
    (artifacts.REPORT, None, ("index.html", "photo.png"), "not a vaedyn report (no .vaedyn marker)"),
    (artifacts.REPORT, artifacts.REPORT, ("index.html", "notes.md"), "holds 'notes.md'"),
    (artifacts.REPORT, artifacts.EVALUATION, ("metrics.json",), "is a vaedyn evaluation, not a place for a report"),
    (artifacts.EVALUATION, artifacts.EVALUATION, ("metrics.json", "grid.png", "samples/", "lens-x.png"), None),
    (artifacts.EVALUATION, artifacts.EVALUATION, ("metrics.json", "thesis/"), "holds 'thesis'"),
    (artifacts.NUDGED, None, ("config.json", "diffusion_pytorch_model.safetensors", "nudge.json"), None),
    (artifacts.RUN, artifacts.RUN, ("config.yaml", "trace.zarr/", "checkpoints/", "nudged-redo/", ".vaedyn-train.lock"),
     None),
    (artifacts.RUN, None, ("config.yaml", "checkpoints/", "final/"), None),  # an earlier vaedyn's run
    (artifacts.RUN, None, ("config.yaml", "logs/"), "not a vaedyn run folder"),
    (artifacts.RUN, artifacts.RUN, ("config.yaml", "trace.zarr"), "holds 'trace.zarr'"),  # a file, not the store
    (artifacts.TRACE, artifacts.TRACE, ("zarr.json", "std/", ".vaedyn-commit.lock"), None),
    (artifacts.TRACE, artifacts.TRACE, ("zarr.json", "README.txt"), "holds 'README.txt'"),
])
def test_what_vaedyn_may_replace(tmp_path: Path, kind, marker, names, refused) -> None:
    path = tmp_path / "target"
    if names is not None:
        _folder(path, marker, *names)
    before = tree(tmp_path)
    if refused is None:
        artifacts.check_replaceable(path, kind, "--out")
    else:
        with pytest.raises(VaedynError, match=f"^--out {re.escape(str(path))} .*{re.escape(refused)}"):
            artifacts.check_replaceable(path, kind, "--out")
    assert tree(tmp_path) == before


def test_links_files_and_paths_under_files_are_never_replaced(tmp_path: Path) -> None:
    _folder(tmp_path / "real", artifacts.REPORT, "index.html")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("mine")
    for path, message in ((tmp_path / "link", "is a symbolic link"), (tmp_path / "file", "is a file"),
                          (tmp_path / "file" / "sub", "lies under")):
        with pytest.raises(VaedynError, match=message):
            artifacts.check_replaceable(path, artifacts.REPORT, "--out")


# ---------------------------------------------------------------------------------------------
# one trainer per run folder; Ctrl-C and SIGTERM


@pytest.mark.other_processes
@pytest.mark.long
def test_a_second_trainer_is_refused_and_sigterm_says_how_to_resume(finished, tmp_path, cli):
    """A real `vaedyn train` holds the run folder: a second one (resume or overwrite) exits 2 naming
    its pid and touches nothing; SIGTERM ends the first with one line saying how to resume, and the
    resume it names works (the lock went with the process)."""
    run, cfg = copy_of(finished, tmp_path, max_steps=100_000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log_file = tmp_path / "holder.log"  # (a pipe nobody reads would stall its progress lines)
    with open(log_file, "w") as log:
        holder = subprocess.Popen([sys.executable, "-m", "vaedyn_cli", "train", "-c", str(cfg), "--resume", "latest"],
                                  env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 240
        pid_file = run / artifacts.TRAIN_PID_FILE
        while not (pid_file.is_file() and pid_file.read_text().split()[:1] == [str(holder.pid)]):
            assert holder.poll() is None and time.monotonic() < deadline, log_file.read_text()[-2000:]
            time.sleep(0.1)
        checkpoints = [s for s, _ in artifacts.list_checkpoints(run)]
        for extra in (["--resume", "latest"], ["--overwrite"]):
            result = cli("train", "-c", cfg, *extra)
            assert result.exit_code == 2 and result.stdout == ""
            assert result.stderr.splitlines() == [
                f"error: run folder {run} is being trained by process {holder.pid} on {socket.gethostname()} (it holds "
                f"{artifacts.TRAIN_LOCK_FILE}); wait for it to end or stop it, then continue with --resume latest"]
            assert [s for s, _ in artifacts.list_checkpoints(run)][: len(checkpoints)] == checkpoints
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=120)
    stderr = log_file.read_text()
    assert holder.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    last = artifacts.parse_step(artifacts.latest_checkpoint(run).name)
    assert stderr.splitlines()[-1] == (f"interrupted; resume with: vaedyn train -c {cfg} --resume latest (continues "
                                       f"from step {last})")
    assert "Traceback" not in stderr
    result = cli("train", "-c", cfg, "--resume", "latest", "--set", f"train.max_steps={last + 1}")
    assert result.exit_code == 0, result.stderr
    assert store.open_trace(run / artifacts.TRACE_DIR)["step"].values.tolist() == list(range(1, last + 2))


def test_an_error_raised_while_interrupted_reads_as_the_interruption(tmp_path, cli, hooks):
    """Ctrl-C inside a library can surface as another error (a half-imported module's AttributeError):
    still one line, exit 130, saying that nothing was written, and nothing was."""

    def interrupted_factory(ctx):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise AttributeError("partially initialized module 'diffusers' has no attribute 'x'") from None

    hooks.insert(0, interrupted_factory)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(tmp_path)))
    result = cli("train", "-c", cfg)
    assert result.exit_code == 130 and result.stdout == ""
    assert result.stderr.splitlines() == [f"interrupted; nothing was written: start again with: vaedyn train -c {cfg}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "runs"] and not any((tmp_path / "runs").iterdir())


SETTLE_SCRIPT = """
import asyncio, os, signal, sys, threading, time
from pathlib import Path
from zarr.core.sync import sync
from vaedyn_cli import errors

errors.catch_signals()
errors.SETTLE_TIMEOUT_S = float(sys.argv[3])
written = Path(sys.argv[1])

async def slow_write():
    await asyncio.sleep(float(sys.argv[2]))
    written.write_text("done")

threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
start = time.monotonic()
try:
    sync(slow_write())
except KeyboardInterrupt:
    print("written" if written.exists() else "in-flight", time.monotonic() - start, flush=True)
    sys.exit(130)
"""


@pytest.mark.other_processes
def test_a_signal_waits_for_the_store_write_in_flight(tmp_path):
    """Ctrl-C while the main thread waits on a zarr operation: the handler lets the operation finish
    before raising (the cleanup that follows never races a write still going on zarr's thread, and
    nothing is left pending on zarr's loop to be reported at exit), but waits no longer than
    SETTLE_TIMEOUT_S for one that hangs."""

    def interrupted(sleep_s: float, cap_s: float) -> tuple[int, str, float, str]:
        """exit code, whether the write was done when the interrupt arrived, seconds until then, stderr"""
        r = subprocess.run([sys.executable, "-c", SETTLE_SCRIPT, str(tmp_path / f"w{sleep_s}"), str(sleep_s), str(cap_s)],
                           capture_output=True, text=True, timeout=120)
        state, seconds = r.stdout.split()
        return r.returncode, state, float(seconds), r.stderr

    code, state, seconds, stderr = interrupted(1.5, 30.0)  # the write takes 1.5 s; the signal comes after 0.1 s
    assert (code, state, stderr) == (130, "written", "") and 1.4 < seconds < 15
    code, state, seconds, _ = interrupted(60.0, 0.5)  # a write that hangs: the signal is raised after the 0.5 s cap
    assert (code, state) == (130, "in-flight") and 0.5 < seconds < 15


# ---------------------------------------------------------------------------------------------
# vaedyn store check


def test_store_check_passes_a_sound_store_and_says_what_it_checked(finished, cli):
    store = finished / artifacts.TRACE_DIR
    result = cli("store", "check", finished)
    n = sum(p.is_file() for p in store.glob("*/c/**/*"))  # every chunk file (one chunk along step here)
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == f"OK: trace store {store}: 4 steps, 0 events, {n} chunks decode\n"


def test_an_older_store_without_every_chunk_reads_as_before(finished, tmp_path, cli):
    """Stores written before vaedyn wrote chunks of fill values only cannot tell a missing chunk from
    one: their weight statistics between weight_interval steps were such chunks. They still read."""
    run, _ = copy_of(finished, tmp_path)
    store_dir = run / artifacts.TRACE_DIR
    meta = json.loads((store_dir / "zarr.json").read_text())
    del meta["attributes"]["all_chunks_written"]
    (store_dir / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(store_dir / "out_weight_norm" / "c")  # as such a store had it: NaN everywhere
    assert store.open_trace(store_dir)["out_weight_norm"].isnull().all()
    result = cli("store", "check", store_dir)
    assert result.exit_code == 0 and result.stdout.startswith(f"OK: trace store {store_dir}: 4 steps")
    assert "a missing chunk cannot be told from one" in result.stdout


# ---------------------------------------------------------------------------------------------
# images: 16-bit PNGs, unreadable files, decompression bombs; names with `$` in the report


def _folder_config(tmp_path: Path, **data: object):
    from vaedyn_cli.config import DataConfig

    return DataConfig.model_validate({"dataset_name": str(tmp_path / "images"), "resolution": 16, **data})


def test_16bit_grey_pngs_are_scaled_not_saturated(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from vaedyn_cli.data import image_dataset

    (tmp_path / "images").mkdir()
    for i, value in enumerate((0, 32768, 65535)):
        Image.fromarray(np.full((16, 16), value, np.uint16)).save(tmp_path / "images" / f"{i}.png")
    assert Image.open(tmp_path / "images" / "1.png").mode == "I;16"
    ds = image_dataset(_folder_config(tmp_path), "train", max_samples=None, seed=0)
    values = [float(ds[i].mean()) for i in range(3)]  # 65535 -> 255; 32768 -> 128 (127.5 rounded to even)
    assert values == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)


def test_unreadable_images_are_an_error_naming_them_or_skipped_and_counted(tmp_path: Path, caplog) -> None:
    from PIL import Image

    from vaedyn_cli.data import image_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    colours = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (16, 16), colour).save(folder / name)
    whole = (folder / "c.png").read_bytes()
    (folder / "c.png").write_bytes(whole[: len(whole) // 2])  # its header reads, its pixels do not
    (folder / "d.png").write_bytes(b"not an image")  # not even a header
    (folder / "e.jpg").mkdir()  # a folder, not an image

    with pytest.raises(VaedynError, match=r"cannot read image .*d\.png .*1 of 4 files .*data\.on_bad_image=skip$"):
        image_dataset(_folder_config(tmp_path), "train", max_samples=None, seed=0)

    caplog.set_level("WARNING", logger="vaedyn_cli.data")
    ds = image_dataset(_folder_config(tmp_path, on_bad_image="skip"), "train", max_samples=None, seed=0)
    assert len(ds) == 3 and "skipping 1 unreadable image(s) of 4" in caplog.text and "d.png" in caplog.text
    red = ds[0]
    assert torch.equal(ds[2], red)  # c.png fails when read: the next readable image (wrapping round) stands in
    assert ds.skipped == {2} and "skipping unreadable image 2 of dataset" in caplog.text
    (folder / "d.png").unlink()
    strict = image_dataset(_folder_config(tmp_path), "train", max_samples=None, seed=0)
    with pytest.raises(VaedynError, match=r"^cannot read image 2 of dataset .*set data.on_bad_image=skip$"):
        strict[2]


def test_a_very_large_image_is_one_log_line_and_a_bomb_an_error(tmp_path: Path, monkeypatch, caplog) -> None:
    import warnings

    from PIL import Image

    from vaedyn_cli.data import image_dataset

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # PIL warns above this many pixels, refuses above twice that
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "big.png")  # 256 pixels
    caplog.set_level("WARNING", logger="vaedyn_cli.data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = image_dataset(_folder_config(tmp_path), "train", max_samples=None, seed=0)
        ds[0]
    assert [str(w.message) for w in caught] == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("very large image" in line for line in lines)  # the check before, the read
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "bomb.png")  # 1024 pixels
    with pytest.raises(VaedynError, match=r"cannot read image .*bomb\.png \(Image size \(1024 pixels\) exceeds"):
        image_dataset(_folder_config(tmp_path), "train", max_samples=None, seed=0)


def test_layer_names_with_dollars_are_drawn_as_text(tmp_path: Path, monkeypatch) -> None:
    """matplotlib reads `$...$` as math; a store's names are data (here a parse error it would raise)."""
    from tests import test_report
    from vaedyn_cli import figures
    from vaedyn_cli.report import build_report

    monkeypatch.setattr(test_report, "LAYERS", [(n + "$\\frac{$", p, a) for n, p, a in test_report.LAYERS])
    monkeypatch.setattr(test_report, "PARAMS", [p + "$\\frac{$" for p in test_report.PARAMS])
    named = ("dormant_by_layer.png", "near_zero_weights.png")  # the figures that write layer and weight names
    monkeypatch.setattr(figures, "FIGURE_FUNCS", {k: v for k, v in figures.FIGURE_FUNCS.items() if k in named})
    out = build_report(test_report.write_store(tmp_path / "t.zarr", tmp_path), tmp_path / "report")
    summary = json.loads((out / artifacts.SUMMARY_FILE).read_text())
    assert summary["figures"] == dict.fromkeys(named, "written")
    assert any("$\\frac{$" in r["layer"] for r in summary["most_affected_layers"])


def test_the_readme_lists_the_settings_a_resume_may_change() -> None:
    from vaedyn_cli.config import RESUME_MAY_CHANGE, RESUME_MAY_CHANGE_WITHOUT_NUDGE

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("| may change on resume |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z_.]+)`", table))
    assert RESUME_MAY_CHANGE <= named
    assert {f.split(".")[0] for f in RESUME_MAY_CHANGE_WITHOUT_NUDGE} <= named


@pytest.mark.parametrize(("planted", "named"), [
    ("random_states_0.pkl", "random_states_0.pkl (random number generator states) does not load as plain data"),
    ("scheduler.bin", "scheduler.bin (learning rate schedule) does not load as plain data"),
    ("optimizer.bin", "the optimizer state does not load as plain data"),
    (artifacts.LEGACY_TRAINING_STATE_FILE, f"{artifacts.LEGACY_TRAINING_STATE_FILE} (training state of an earlier "
                                           "vaedyn) does not load as plain data"),
])
def test_a_checkpoint_with_code_planted_in_a_pickle_is_refused_before_it_runs(finished, tmp_path, cli, planted, named):
    """Each pickle a checkpoint holds is read as plain data only: a planted object that would run code
    when unpickled stops the resume (exit 2, one line naming the checkpoint and the file) before any of
    it runs, and the run folder is left as it was."""
    run, cfg = copy_of(finished, tmp_path, max_steps=6)
    step = run / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(4)
    if planted == artifacts.LEGACY_TRAINING_STATE_FILE:
        (step / artifacts.TRAINING_STATE_FILE).unlink()  # as an earlier vaedyn wrote it: a pickle
    torch.save({"state": Planted(tmp_path / "planted-code-ran")}, step / planted)
    before = tree(run)
    result = cli("train", "-c", cfg, "--resume", str(step))
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot resume from {step}: {named} (UnpicklingError: "), line
    assert line.endswith("it is damaged or holds objects that would run code, which vaedyn never loads: resume "
                         "from another checkpoint")
    assert not (tmp_path / "planted-code-ran").exists()
    assert tree(run) == before
