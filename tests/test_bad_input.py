"""Bad input across all commands (issue 8): each case builds one bad input in tmp_path and runs the CLI.

Every case must give exit code 2 (bad input) or 1 (runtime failure), exactly one line on stderr that
says what is wrong and where (and no warning a console run would print), no traceback, no data on
stdout, and no file or folder created or changed anywhere under tmp_path (the cwd too, so default
output folders such as `stores/` count) or in the shared finished run the cases copy from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_WIDTH, tiny_config_dict
from vaedyn_cli import artifacts
from vaedyn_cli.config import RunConfig

HUB_MODEL = "nobody-offline/some-vae"
HUB_DATASET = "nobody-offline/some-images"


@dataclass
class Bad:
    """What a case runs and what its one error line must contain."""

    argv: list[str]
    expect: list[str]
    stdin: str | None = None
    code: int = 2
    stdout: str = ""


@dataclass
class Base:
    """A finished tiny run (tracked, one step checkpoint, final/) and its classify JSON, built once."""

    root: Path
    run: Path
    targets: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    from vaedyn_cli import classify
    from vaedyn_cli.train import train

    root = tmp_path_factory.mktemp("bad-input-base")
    cfg = RunConfig.model_validate(tiny_config_dict(
        root,
        data={"max_samples": 8},
        train={"max_steps": 2, "save_interval": 2, "validation_interval": 2},
        track={"interval": 1},
    ))
    run = train(cfg)
    targets = json.loads(classify.run(str(run), write=False, fmt="json"))
    return Base(root, run, targets)


# ---------------------------------------------------------------------------------------------
# helpers that build inputs


def write_cfg(tmp: Path, name: str = "cfg.yaml", **sections: dict) -> Path:
    """The tiny config (runs under tmp/runs) with `sections` merged in, as YAML."""
    path = tmp / name
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp, **sections)))
    return path


def copy_run(tmp: Path, base: Base) -> Path:
    run = tmp / "run"
    shutil.copytree(base.run, run)
    return run


def bad_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")
    return path


def saved_dataset(path: Path, column: str, n: int) -> Path:
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(n)]
    features = datasets.Features({column: datasets.Image()})
    datasets.Dataset.from_dict({column: images}, features=features).save_to_disk(str(path))
    return path


def edit_root_attrs(store: Path, **attrs: object) -> None:
    """Change attributes of a store's root zarr.json (as an old or hand-edited store would have them)."""
    meta_file = store / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"].update(attrs)
    meta_file.write_text(json.dumps(meta))


def other_width_classification(width: float) -> dict:
    """A classify JSON of the preset at another width: same layer names, other channel counts."""
    from vaedyn_cli.anatomy import groupnorm_layers
    from vaedyn_cli.model import build_preset

    layers = {n: m.num_channels for n, m in groupnorm_layers(build_preset(width, 0))}
    channels = [{"layer": n, "channel_index": 0, "state": "dormant", "trajectory": "died", "mechanism": "gn_scale",
                 "unused": False, "input_collapsed": False, "score": 0.0} for n in layers]
    return {"store": "elsewhere/trace.zarr", "method": "dormancy", "steps": [0, 2], "layers": layers,
            "channels": channels}


def metrics_file(path: Path, **metrics: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {"mse": 0.01, "kl": 100.0, "psnr": 20.0, "ssim": 0.5, **metrics}
    path.write_text(json.dumps({"checkpoint": "x", "step": 1, "split": "test", "num_images": 8, "metrics": values}))
    return path


# ---------------------------------------------------------------------------------------------
# the cases: each builds its bad input under tmp and returns what to run and what to expect

CASES: list[tuple[str, Callable[[Path, Base], Bad]]] = []


def case(fn: Callable[[Path, Base], Bad]) -> Callable[[Path, Base], Bad]:
    CASES.append((fn.__name__, fn))
    return fn


# -- config show / validate


@case
def config_yaml_syntax_error(tmp: Path, base: Base) -> Bad:
    path = tmp / "broken.yaml"
    path.write_text("train:\n  max_steps: [1, 2\n  learning_rate: 1e-4\n")
    return Bad(["config", "validate", path], ["YAML syntax error", str(path), "line"])


@case
def config_unknown_key(tmp: Path, base: Base) -> Bad:
    path = tmp / "typo.yaml"
    path.write_text("train:\n  learning_rat: 1.0e-4\n")
    return Bad(["config", "validate", path], [str(path), "unknown key 'train.learning_rat'", "train.learning_rate"])


@case
def config_wrong_type(tmp: Path, base: Base) -> Bad:
    path = tmp / "type.yaml"
    path.write_text("data:\n  batch_size: four\n")
    return Bad(["config", "show", "-c", path], [str(path), "data.batch_size", "'four'"])


@case
def config_out_of_range(tmp: Path, base: Base) -> Bad:
    path = tmp / "range.yaml"
    path.write_text("train:\n  learning_rate: -0.1\n")
    return Bad(["config", "show", "-c", path], [str(path), "train.learning_rate", "greater than 0"])


@case
def config_fields_disagree(tmp: Path, base: Base) -> Bad:
    path = tmp / "res.yaml"
    path.write_text("data:\n  resolution: 20\n")
    return Bad(["config", "validate", path], [str(path), "data", "resolution 20 is not a multiple of 8"])


@case
def config_missing_file(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "validate", tmp / "nowhere.yaml"], ["config file not found", str(tmp / "nowhere.yaml")])


@case
def config_not_a_mapping(tmp: Path, base: Base) -> Bad:
    path = tmp / "list.yaml"
    path.write_text("- train\n- data\n")
    return Bad(["config", "validate", path], [str(path), "must be a YAML mapping"])


@case
def config_second_file_invalid(tmp: Path, base: Base) -> Bad:
    good = write_cfg(tmp, "good.yaml")
    bad = tmp / "bad.yaml"
    bad.write_text("seed: [1]\n")
    return Bad(["config", "validate", good, bad], [str(bad), "seed"], stdout=f"{good}\n")


@case
def config_set_without_value(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "show", "--set", "train.max_steps"], ["--set 'train.max_steps'", "KEY=VALUE"])


@case
def config_set_unknown_key(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "show", "--set", "train.max_stepz=3"], ["--set train.max_stepz=3", "train.max_steps"])


@case
def config_run_name_with_slash(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "show", "--set", "run_name=a/b"], ["run_name", "'a/b'", "plain folder name"])


# -- train


@case
def train_run_folder_exists(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    (tmp / "runs" / "tiny").mkdir(parents=True)
    (tmp / "runs" / "tiny" / "notes.txt").write_text("mine")
    return Bad(["train", "-c", cfg], [str(tmp / "runs" / "tiny"), "already exists", "--overwrite"])


@case
def train_resume_without_run(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    return Bad(["train", "-c", cfg, "--resume", "latest"], ["--resume latest", str(tmp / "runs" / "tiny"), "does not exist"])


@case
def train_resume_without_checkpoint(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    run = tmp / "runs" / "tiny"
    (run / artifacts.CHECKPOINTS_DIR).mkdir(parents=True)
    (run / artifacts.CONFIG_FILE).write_text(cfg.read_text())
    return Bad(["train", "-c", cfg, "--resume", "latest"], [str(run / artifacts.CHECKPOINTS_DIR), "no step-* checkpoint"])


@case
def train_resume_not_a_step_folder(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    (tmp / "elsewhere").mkdir()
    return Bad(["train", "-c", cfg, "--resume", tmp / "elsewhere"], [str(tmp / "elsewhere"), "checkpoints/step-NNNNNN"])


@case
def train_resume_and_overwrite(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    return Bad(["train", "-c", cfg, "--resume", "latest", "--overwrite"], ["--resume and --overwrite"])


@case
def train_empty_image_folder(tmp: Path, base: Base) -> Bad:
    (tmp / "images").mkdir()
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "images")})
    return Bad(["train", "-c", cfg], ["no images", str(tmp / "images")])


@case
def train_empty_saved_dataset(tmp: Path, base: Base) -> Bad:
    saved_dataset(tmp / "saved", "image", 0)
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "saved")})
    return Bad(["train", "-c", cfg], [str(tmp / "saved"), "is empty"])


@case
def train_missing_image_column(tmp: Path, base: Base) -> Bad:
    saved_dataset(tmp / "saved", "img", 4)
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "saved")})
    return Bad(["train", "-c", cfg], ["column 'image' not found", str(tmp / "saved"), "img", "data.image_column"])


@case
def train_unreadable_image(tmp: Path, base: Base) -> Bad:
    bad_png(tmp / "images" / "broken.png")
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "images"), "do_validation": False})
    return Bad(["train", "-c", cfg], ["cannot read image", "broken.png"])


@case
def train_nonexistent_split(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    return Bad(["train", "-c", cfg, "--set", "data.train_split_name=trian"], ["split 'trian' not found", "builtin:natural"])


@case
def train_missing_data_path(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "no-such-folder")})
    return Bad(["train", "-c", cfg], [str(tmp / "no-such-folder"), "does not exist"])


@case
def train_dataset_hub_unreachable(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp, data={"dataset_name": HUB_DATASET})
    return Bad(["train", "-c", cfg], [f"cannot load dataset '{HUB_DATASET}'", "HF_HUB_OFFLINE=1"])


@case
def train_model_hub_unreachable(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp, model={"pretrained": HUB_MODEL, "width": 1.0})
    return Bad(["train", "-c", cfg], [f"cannot load model '{HUB_MODEL}'", "HF_HUB_OFFLINE=1"])


@case
def train_pretrained_folder_without_weights(tmp: Path, base: Base) -> Bad:
    folder = tmp / "vae"
    folder.mkdir()
    shutil.copy(base.run / artifacts.FINAL_DIR / artifacts.MODEL_CONFIG_FILE, folder)
    cfg = write_cfg(tmp, model={"pretrained": str(folder), "width": 1.0})
    return Bad(["train", "-c", cfg], [str(folder), "no weights"])


@case
def train_column_without_images(tmp: Path, base: Base) -> Bad:
    import datasets

    datasets.Dataset.from_dict({"label": [0, 1, 2]}).save_to_disk(str(tmp / "labels"))
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "labels"), "image_column": "label", "do_validation": False})
    return Bad(["train", "-c", cfg], ["column 'label'", str(tmp / "labels"), "not images", "data.image_column"])


@case
def train_streamed_dataset_with_epochs(tmp: Path, base: Base) -> Bad:
    import datasets
    from PIL import Image

    data = tmp / "data"
    data.mkdir()
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (16, 16))] * 4},
                                    features=datasets.Features({"image": datasets.Image()}))
    ds.to_parquet(str(data / "train-00000-of-00001.parquet"))
    cfg = write_cfg(
        tmp,
        data={"dataset_name": str(data), "streaming": True, "do_validation": False},
        train={"max_steps": None, "num_train_epochs": 1},
        log={"report_to": "tensorboard"},
    )
    return Bad(["train", "-c", cfg], ["streamed dataset", "train.max_steps"])


@case
def train_output_dir_is_a_file(tmp: Path, base: Base) -> Bad:
    (tmp / "outputs").write_text("not a folder")
    cfg = write_cfg(tmp, output_dir=str(tmp / "outputs"))
    return Bad(["train", "-c", cfg], [str(tmp / "outputs"), "output_dir"])


@case
def train_resume_from_another_architecture(tmp: Path, base: Base) -> Bad:
    step = copy_run(tmp, base) / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(2)
    cfg = write_cfg(tmp, model={"width": 2 * TINY_WIDTH})
    return Bad(["train", "-c", cfg, "--resume", step], [f"--resume {step}", "do not fit the model of this config"])


@case
def train_resume_at_max_steps(tmp: Path, base: Base) -> Bad:
    copy_run(tmp, base)
    cfg = write_cfg(tmp, output_dir=str(tmp), run_name="run", train={"max_steps": 2})
    step = tmp / "run" / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(2)
    return Bad(["train", "-c", cfg, "--resume", "latest"], [str(step), "already at train.max_steps (2)"])


@case
def train_set_out_of_range(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    return Bad(["train", "-c", cfg, "--set", "train.max_steps=0"], [str(cfg), "train.max_steps", "greater than or equal to 1"])


# -- eval


@case
def eval_checkpoint_without_weights(tmp: Path, base: Base) -> Bad:
    folder = tmp / "vae"
    folder.mkdir()
    shutil.copy(base.run / artifacts.FINAL_DIR / artifacts.MODEL_CONFIG_FILE, folder)
    return Bad(["eval", "--checkpoint", folder, "-c", write_cfg(tmp), "--out", tmp / "out"], [str(folder), "no weights"])


@case
def eval_missing_checkpoint(tmp: Path, base: Base) -> Bad:
    return Bad(["eval", "--checkpoint", tmp / "gone"], [str(tmp / "gone"), "does not exist"])


@case
def eval_step_folder_of_another_width(tmp: Path, base: Base) -> Bad:
    from vaedyn_cli.model import sdxl_config

    run = copy_run(tmp, base)
    step = run / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(2)
    (step / artifacts.MODEL_CONFIG_FILE).write_text(json.dumps({"_class_name": "AutoencoderKL", **sdxl_config(0.125)}))
    return Bad(["eval", "--checkpoint", step], [str(step), "do not fit the architecture"])


@case
def eval_diffusers_folder_of_another_width(tmp: Path, base: Base) -> Bad:
    from vaedyn_cli.model import sdxl_config

    run = copy_run(tmp, base)
    final = run / artifacts.FINAL_DIR
    (final / artifacts.MODEL_CONFIG_FILE).write_text(json.dumps({"_class_name": "AutoencoderKL", **sdxl_config(0.125)}))
    return Bad(["eval", "--checkpoint", run], [str(final), "do not fit its config.json"])


@case
def eval_step_folder_with_damaged_weights(tmp: Path, base: Base) -> Bad:
    step = copy_run(tmp, base) / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(2)
    (step / artifacts.ACCELERATE_MODEL_FILE).write_bytes(b"garbage, not safetensors")
    return Bad(["eval", "--checkpoint", step], [f"cannot read checkpoint {step}", "damaged"])


@case
def eval_checkpoint_without_config(tmp: Path, base: Base) -> Bad:
    folder = tmp / "bare"
    shutil.copytree(base.run / artifacts.FINAL_DIR, folder)
    (folder / artifacts.RUN_CONFIG_IN_CHECKPOINT).unlink()
    return Bad(["eval", "--checkpoint", folder, "--out", tmp / "out"], [str(folder), "carries no vaedyn config", "-c"])


@case
def eval_model_hub_unreachable(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    return Bad(["eval", "--checkpoint", HUB_MODEL, "-c", cfg, "--out", tmp / "out"],
               [f"cannot load model '{HUB_MODEL}'", "HF_HUB_OFFLINE=1"])


@case
def eval_nonexistent_split(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    return Bad(["eval", "--checkpoint", run, "--split", "tset"], ["split 'tset' not found"])


@case
def eval_unreadable_image(tmp: Path, base: Base) -> Bad:
    from PIL import Image

    (tmp / "images" / "test").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp / "images" / "test" / "a.png")
    bad_png(tmp / "images" / "test" / "b.png")
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "images")})
    return Bad(["eval", "--checkpoint", copy_run(tmp, base), "-c", cfg], ["cannot read image", "b.png"])


@case
def eval_out_is_a_file(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    (tmp / "results.txt").write_text("my notes")
    return Bad(["eval", "--checkpoint", run, "--out", tmp / "results.txt"], [str(tmp / "results.txt"), "is a file"])


@case
def eval_out_is_a_foreign_folder(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("my notes")
    return Bad(["eval", "--checkpoint", run, "--out", tmp / "mine"], [str(tmp / "mine"), "not an evaluation"])


@case
def eval_invalid_stored_config(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    stored = run / artifacts.FINAL_DIR / artifacts.RUN_CONFIG_IN_CHECKPOINT
    stored.write_text(stored.read_text().replace("batch_size:", "batch_sise:", 1))
    return Bad(["eval", "--checkpoint", run], [str(stored), "batch_sise"])


@case
def eval_zero_batch_size(tmp: Path, base: Base) -> Bad:
    return Bad(["eval", "--checkpoint", copy_run(tmp, base), "--batch-size", "0"], ["--batch-size"])


@case
def eval_compare_missing_metrics(tmp: Path, base: Base) -> Bad:
    good = metrics_file(tmp / "a" / "metrics.json")
    (tmp / "b").mkdir()
    return Bad(["eval", "--compare", good, tmp / "b"], [str(tmp / "b"), "no metrics.json"])


@case
def eval_compare_malformed_metrics(tmp: Path, base: Base) -> Bad:
    good = metrics_file(tmp / "a" / "metrics.json")
    bad = tmp / "b" / "metrics.json"
    bad.parent.mkdir()
    bad.write_text('{"metrics": ')
    return Bad(["eval", "--compare", good, bad], [str(bad), "not a metrics file"])


@case
def eval_compare_unknown_format(tmp: Path, base: Base) -> Bad:
    a, b = metrics_file(tmp / "a" / "metrics.json"), metrics_file(tmp / "b" / "metrics.json", mse=0.02)
    return Bad(["eval", "--compare", a, b, "--format", "xml"], ["--format 'xml'", "table or json"])


@case
def eval_ablate_unknown_field(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    return Bad(["eval", "--checkpoint", run, "--ablate", "colour=red"], ["--select 'colour=red'", "unknown field"])


# -- track


@case
def track_out_is_not_a_store(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")
    return Bad(["track", "--checkpoint", run, "--out", tmp / "mine"], [str(tmp / "mine"), "not a trace store"])


@case
def track_out_is_a_training_trace(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    store = run / artifacts.TRACE_DIR
    return Bad(["track", "--checkpoint", run, "--out", store], [str(store), "vaedyn train", "another --out"])


@case
def track_checkpoints_of_two_architectures(tmp: Path, base: Base) -> Bad:
    from vaedyn_cli.model import build_preset, save_model

    run = copy_run(tmp, base)
    wide = save_model(build_preset(2 * TINY_WIDTH, 0), tmp / "wide", RunConfig.model_validate(tiny_config_dict(tmp)), step=5)
    return Bad(["track", "--checkpoint", run, "--checkpoint", wide, "--out", tmp / "t.zarr"],
               [str(wide), "another architecture"])


@case
def track_step_folder_without_weights(tmp: Path, base: Base) -> Bad:
    step = copy_run(tmp, base) / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(2)
    (step / artifacts.ACCELERATE_MODEL_FILE).unlink()
    return Bad(["track", "--checkpoint", step], [str(step), artifacts.ACCELERATE_MODEL_FILE])


@case
def track_empty_checkpoints_folder(tmp: Path, base: Base) -> Bad:
    (tmp / "run" / artifacts.CHECKPOINTS_DIR).mkdir(parents=True)
    return Bad(["track", "--checkpoint", tmp / "run" / artifacts.CHECKPOINTS_DIR],
               [str(tmp / "run" / artifacts.CHECKPOINTS_DIR), "no step-* checkpoints"])


# -- classify


@case
def classify_not_a_store(tmp: Path, base: Base) -> Bad:
    (tmp / "folder").mkdir()
    (tmp / "folder" / "x.txt").write_text("x")
    return Bad(["classify", tmp / "folder"], [str(tmp / "folder"), "not a trace store"])


@case
def classify_missing_store(tmp: Path, base: Base) -> Bad:
    return Bad(["classify", tmp / "gone.zarr"], [str(tmp / "gone.zarr"), "not found"])


@case
def classify_other_schema_version(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    edit_root_attrs(store, schema_version=3)
    return Bad(["classify", store], [str(store), "schema_version 3", "reads versions 1 and 2"])


@case
def classify_foreign_zarr_store(tmp: Path, base: Base) -> Bad:
    import numpy as np
    import xarray as xr

    store = tmp / "other.zarr"
    xr.Dataset({"x": ("t", np.arange(3.0))}).to_zarr(store, zarr_format=3, consolidated=False)
    return Bad(["classify", store], [str(store), "not a vaedyn.trace store"])


@case
def classify_store_with_deleted_array_metadata(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    (store / "std" / "zarr.json").unlink()
    return Bad(["classify", store], [str(store), "std"])


@case
def classify_store_with_deleted_array(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    shutil.rmtree(store / "act_std")
    return Bad(["classify", store], [str(store), "act_std"])


@case
def classify_committed_beyond_arrays(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    edit_root_attrs(store, committed_steps=10)
    return Bad(["classify", store], [str(store), "committed_steps 10"])


@case
def classify_unknown_format(tmp: Path, base: Base) -> Bad:
    return Bad(["classify", copy_run(tmp, base), "--format", "nonsense"], ["--format 'nonsense'", "json"])


@case
def classify_empty_stdin(tmp: Path, base: Base) -> Bad:
    return Bad(["classify", "-"], ["stdin is empty"], stdin="")


@case
def classify_set_outside_classify(tmp: Path, base: Base) -> Bad:
    return Bad(["classify", copy_run(tmp, base), "--set", "train.max_steps=3"], ["--set 'train.max_steps=3'", "classify.FIELD"])


@case
def classify_out_of_range_tau(tmp: Path, base: Base) -> Bad:
    return Bad(["classify", copy_run(tmp, base), "--tau", "-1"], ["tau", "greater than or equal to 0"])


@case
def classify_run_without_trace(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    shutil.rmtree(run / artifacts.TRACE_DIR)
    return Bad(["classify", run], [str(run), "has no trace store", "vaedyn track"])


@case
def classify_empty_step_window(tmp: Path, base: Base) -> Bad:
    return Bad(["classify", copy_run(tmp, base), "--from-step", "100"],
               ["no tracked step in the window --from-step 100 (trace steps: 1..2)"])


# -- nudge


@case
def nudge_malformed_targets(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_text('{"layers": {"decoder.conv_norm_out": 8}, "channels": [')
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", targets],
               [str(targets), "not valid JSON", "vaedyn classify"])


@case
def nudge_targets_of_another_architecture(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_text(json.dumps(other_width_classification(2 * TINY_WIDTH)))
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", targets],
               [str(targets), "another architecture", "16 channels there and 8"])


@case
def nudge_targets_missing(tmp: Path, base: Base) -> Bad:
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", tmp / "none.json"],
               [str(tmp / "none.json"), "not found"])


@case
def nudge_targets_empty_stdin(tmp: Path, base: Base) -> Bad:
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", "-"], ["no targets on stdin"], stdin="")


@case
def nudge_unknown_strategy(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_text(json.dumps(base.targets))
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", targets, "--strategy", "gn_scale_nudg"],
               ["unknown nudge strategy 'gn_scale_nudg'", "gn_scale_nudge"])


@case
def nudge_out_exists(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_text(json.dumps(base.targets))
    (tmp / "nudged").mkdir()
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", targets, "--out", tmp / "nudged"],
               [str(tmp / "nudged"), "already exists", "--overwrite"])


@case
def nudge_overwrite_of_a_foreign_folder(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_text(json.dumps(base.targets))
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", targets, "--out", tmp / "mine", "--overwrite"],
               [str(tmp / "mine"), "not a nudged checkpoint"])


@case
def nudge_checkpoint_without_weights(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_text(json.dumps(base.targets))
    run = copy_run(tmp, base)
    (run / artifacts.FINAL_DIR / "diffusion_pytorch_model.safetensors").unlink()
    return Bad(["nudge", "--checkpoint", run / artifacts.FINAL_DIR, "--targets", targets],
               [str(run / artifacts.FINAL_DIR), "no weights"])


@case
def nudge_bad_select(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_text(json.dumps(base.targets))
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", targets, "--select", "state=sleepy"],
               ["--select 'state=sleepy'", "'sleepy' is not a value of state"])


# -- report and store info


@case
def report_not_a_store(tmp: Path, base: Base) -> Bad:
    (tmp / "folder").mkdir()
    return Bad(["report", tmp / "folder"], [str(tmp / "folder"), "not a trace store"])


@case
def report_empty_stdin(tmp: Path, base: Base) -> Bad:
    return Bad(["report", "-"], ["stdin is empty"], stdin="")


@case
def report_out_is_a_file(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    (tmp / "report.html").write_text("<html></html>")
    return Bad(["report", run, "--out", tmp / "report.html"], [str(tmp / "report.html"), "is a file"])


@case
def report_out_is_a_foreign_folder(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    (run / "report").mkdir()
    (run / "report" / "notes.txt").write_text("mine")
    return Bad(["report", run], [str(run / "report"), "not a vaedyn report"])


@case
def report_other_schema_version(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    edit_root_attrs(store, schema_version=0)
    return Bad(["report", store], [str(store), "schema_version 0"])


@case
def store_info_not_a_store(tmp: Path, base: Base) -> Bad:
    (tmp / "folder").mkdir()
    return Bad(["store", "info", tmp / "folder"], [str(tmp / "folder"), "not a trace store"])


@case
def store_info_empty_stdin(tmp: Path, base: Base) -> Bad:
    return Bad(["store", "info", "-"], ["stdin is empty"], stdin="")


@case
def store_info_damaged_root_metadata(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_')
    return Bad(["store", "info", store], [str(store / "zarr.json"), "not valid JSON"])


@case
def store_info_committed_beyond_arrays(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    edit_root_attrs(store, committed_steps=3)
    return Bad(["store", "info", "--json", store], [str(store), "committed_steps 3"])


# ---------------------------------------------------------------------------------------------
# the test


def tree(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every file and folder below root: (is folder, size, mtime in ns)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            found[str(p.relative_to(root))] = (p.is_dir(), 0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    found["."] = (True, 0, root.stat().st_mtime_ns)
    return found


def changes(before: dict, after: dict) -> list[str]:
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return [f"created {k}" for k in created] + [f"removed {k}" for k in removed] + [f"changed {k}" for k in changed]


def test_enough_cases_across_all_commands() -> None:
    commands = {name.split("_")[0] for name, _ in CASES}
    assert len(CASES) >= 30
    assert {"config", "train", "eval", "track", "classify", "nudge", "report", "store"} <= commands


@pytest.mark.parametrize("build", [fn for _, fn in CASES], ids=[name for name, _ in CASES])
def test_bad_input(build: Callable[[Path, Base], Bad], base: Base, tmp_path: Path, cli,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # default output folders (e.g. `stores/`) land here, where they are seen
    bad = build(tmp_path, base)
    before, base_before = tree(tmp_path), tree(base.root)
    with warnings.catch_warnings(record=True) as caught:  # what the console script would print to stderr
        warnings.resetwarnings()
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)  # Python's defaults outside __main__
        result = cli(*bad.argv, input=bad.stdin)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    lines = result.stderr.splitlines()
    assert result.exit_code == bad.code, result.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in line
    missing = [s for s in bad.expect if s not in line]
    assert not missing, f"{missing} not in: {line}"
    assert result.stdout == bad.stdout
    assert changes(before, tree(tmp_path)) == []
    assert changes(base_before, tree(base.root)) == []


# ---------------------------------------------------------------------------------------------
# the console script itself (stdin, exit codes, tracebacks only with --debug)

VAEDYN = str(Path(sys.executable).with_name("vaedyn"))


def run_script(*args: str, stdin: str = "", cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([VAEDYN, *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_console_script_empty_stdin_is_one_line(tmp_path: Path) -> None:
    res = run_script("classify", "-", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["error: STORE is '-' but stdin is empty; pipe a store or run folder path into it"]
    assert res.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_console_script_train_with_bad_data_is_one_line(tmp_path: Path) -> None:
    """The heavy imports (torch, diffusers, accelerate, datasets) add no warning lines to the error."""
    cfg = write_cfg(tmp_path, data={"dataset_name": str(tmp_path / "missing")})
    res = run_script("train", "-c", str(cfg), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"error: data source {tmp_path / 'missing'} does not exist; pass an existing folder or a hub dataset id"
    ]
    assert res.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.yaml"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    plain = run_script("config", "validate", str(missing), cwd=tmp_path)
    debug = run_script("--debug", "config", "validate", str(missing), cwd=tmp_path)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert f"VaedynError: config file not found: {missing}" in debug.stderr
