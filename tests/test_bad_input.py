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
    stdin: str | bytes | None = None
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
        train={"max_steps": 4, "save_interval": 2, "validation_interval": 2},
        track={"interval": 1, "chunk_steps": 2},  # two chunks along step: 1..2 and 3..4
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


def write_targets(tmp: Path, base: Base) -> Path:
    """The base run's classify JSON as a targets file."""
    targets = tmp / "targets.json"
    targets.write_text(json.dumps(base.targets))
    return targets


def metrics_file(path: Path, **metrics: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {"mse": 0.01, "kl": 100.0, "psnr_pooled": 20.0, "psnr_per_image_mean": 20.5, "ssim": 0.5, **metrics}
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
    cfg = write_cfg(tmp, output_dir=str(tmp), run_name="run", train={"max_steps": 4})
    step = tmp / "run" / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(4)
    return Bad(["train", "-c", cfg, "--resume", "latest"], [str(step), "already at train.max_steps (4)"])


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
    return Bad(["eval", "--checkpoint", run, "--out", tmp / "mine"],
               [str(tmp / "mine"), "not a vaedyn evaluation", "no .vaedyn marker"])


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
    return Bad(["eval", "--checkpoint", run, "--ablate", "colour=red"], ["--ablate 'colour=red'", "unknown field"])


# -- track


@case
def track_out_is_not_a_store(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")
    return Bad(["track", "--checkpoint", run, "--out", tmp / "mine"],
               [str(tmp / "mine"), "not a vaedyn trace store", "no .vaedyn marker"])


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
               ["no tracked step in the window --from-step 100 (trace steps: 1..4)"])


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
               [str(tmp / "mine"), "not a vaedyn nudged checkpoint", "no .vaedyn marker"])


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
    edit_root_attrs(store, committed_steps=5)
    return Bad(["store", "info", "--json", store], [str(store), "committed_steps 5"])


# -- issue 16: input classes that escaped the contract (text encodings, stdin, nesting, small
#    files inside artifacts, numbers out of range, names that become paths)

NOT_UTF8 = b"\xff\xfe"  # a UTF-16 byte-order mark: what an editor on another system may write
DEEP = 200_000  # nesting levels of hostile JSON (Python's parsers recurse per level)


@case
def config_not_utf8(tmp: Path, base: Base) -> Bad:
    path = tmp / "latin1.yaml"
    path.write_bytes(b"train:\n  max_steps: 3  # r\xe9glage\n")
    return Bad(["config", "validate", path], [f"config file {path}", "not UTF-8", "0xe9"])


@case
def config_nested_too_deeply(tmp: Path, base: Base) -> Bad:
    path = tmp / "deep.yaml"
    path.write_text("train: " + "[" * 5000)
    return Bad(["config", "validate", path], [str(path), "nested too deeply"])


@case
def config_seed_negative(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "show", "--set", "seed=-1"], ["seed", "greater than or equal to 0", "(got -1)"])


@case
def config_seed_too_large(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "show", "--set", f"seed={2**32}"], ["seed", "less than or equal to 4294967295"])


@case
def config_infinite_learning_rate(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "show", "--set", "train.learning_rate=.inf"], ["train.learning_rate", "finite number"])


@case
def config_boolean_for_a_count(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "show", "--set", "train.max_steps=true"], ["train.max_steps", "not a boolean"])


@case
def config_set_value_nested_too_deeply(tmp: Path, base: Base) -> Bad:
    return Bad(["config", "show", "--set", "seed=" + "[" * DEEP], ["seed", "(got '[[[", "...)"])


@case
def train_run_name_with_nul(tmp: Path, base: Base) -> Bad:
    cfg = write_cfg(tmp)
    cfg.write_text(cfg.read_text().replace("run_name: tiny", 'run_name: "ti\\0ny"'))
    return Bad(["train", "-c", cfg], [str(cfg), "run_name", "control character"])


@case
def train_run_name_too_long(tmp: Path, base: Base) -> Bad:
    return Bad(["train", "-c", write_cfg(tmp), "--set", "run_name=" + "r" * 300], ["run_name", "300 bytes", "at most 200"])


@case
def classify_stdin_not_utf8(tmp: Path, base: Base) -> Bad:
    return Bad(["classify", "-"], ["STORE is '-': stdin is not UTF-8"], stdin=NOT_UTF8)


@case
def nudge_targets_not_utf8(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_bytes(NOT_UTF8 + json.dumps(base.targets).encode("utf-16-le"))
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", targets],
               [f"targets file {targets}", "not UTF-8", "0xff"])


@case
def nudge_targets_nested_too_deeply(tmp: Path, base: Base) -> Bad:
    targets = tmp / "targets.json"
    targets.write_text("[" * DEEP)
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", targets], [str(targets), "nested too deeply"])


@case
def nudge_stdin_nested_too_deeply(tmp: Path, base: Base) -> Bad:
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", "-"], ["from stdin", "nested too deeply"],
               stdin='{"layers": ' * DEEP)


@case
def eval_malformed_step_file(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    step_file = run / artifacts.FINAL_DIR / artifacts.STEP_FILE
    step_file.write_text('{"step": "two"}')
    return Bad(["eval", "--checkpoint", run], [f"step file {step_file}", '"two"', "restore it"])


@case
def eval_step_file_not_json(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    step_file = run / artifacts.FINAL_DIR / artifacts.STEP_FILE
    step_file.write_text("{step: 2")
    return Bad(["nudge", "--checkpoint", run, "--targets", write_targets(tmp, base)], [str(step_file), "not valid JSON"])


@case
def eval_compare_metric_is_a_string(tmp: Path, base: Base) -> Bad:
    good = metrics_file(tmp / "a" / "metrics.json")
    bad = metrics_file(tmp / "b" / "metrics.json", psnr_pooled="21.5 dB")
    return Bad(["eval", "--compare", good, bad], [str(bad), "metric 'psnr_pooled'", '"21.5 dB"', "not a number"])


@case
def eval_compare_metrics_not_utf8(tmp: Path, base: Base) -> Bad:
    good = metrics_file(tmp / "a" / "metrics.json")
    bad = tmp / "b" / "metrics.json"
    bad.parent.mkdir()
    bad.write_bytes(b'{"metrics": {"mse": 0.1, "note": "\xe9"}}')
    return Bad(["eval", "--compare", good, bad], [f"metrics file {bad}", "not UTF-8"])


@case
def eval_stored_config_not_utf8(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    stored = run / artifacts.FINAL_DIR / artifacts.RUN_CONFIG_IN_CHECKPOINT
    stored.write_bytes(stored.read_bytes() + b"# \xff\n")
    return Bad(["eval", "--checkpoint", run], [str(stored), "not UTF-8"])


@case
def store_info_root_metadata_nested_too_deeply(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    (store / "zarr.json").write_text("[" * DEEP)
    return Bad(["store", "info", store], [str(store / "zarr.json"), "not valid JSON"])


# -- issue 16: vaedyn replaces or deletes only folders it made (a `.vaedyn` marker, nothing foreign inside)


def marked(folder: Path, kind: artifacts.Kind, *files: str) -> Path:
    """A folder as vaedyn makes one of `kind` (its marker) holding `files`."""
    folder.mkdir(parents=True)
    artifacts.write_marker(folder, kind)
    for name in files:
        (folder / name).write_text("x")
    return folder


@case
def train_overwrite_of_a_foreign_folder(tmp: Path, base: Base) -> Bad:
    run = tmp / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "thesis.tex").write_text("\\documentclass{article}")
    return Bad(["train", "-c", write_cfg(tmp), "--overwrite"], [f"run folder {run}", "not a vaedyn run folder",
                                                                 "no .vaedyn marker"])


@case
def train_overwrite_of_a_run_holding_a_foreign_file(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    (run / "notes.txt").write_text("what I saw at step 2")
    cfg = write_cfg(tmp, output_dir=str(tmp), run_name="run")
    return Bad(["train", "-c", cfg, "--overwrite"], [f"run folder {run}", "holds 'notes.txt'", "move it out first"])


@case
def train_overwrite_of_another_kind(tmp: Path, base: Base) -> Bad:
    marked(tmp / "runs" / "tiny", artifacts.REPORT, "index.html")
    return Bad(["train", "-c", write_cfg(tmp), "--overwrite"], ["is a vaedyn report, not a place for a run folder"])


@case
def train_resume_into_another_run(tmp: Path, base: Base) -> Bad:
    step = copy_run(tmp, base) / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(2)
    (tmp / "runs" / "tiny").mkdir(parents=True)
    return Bad(["train", "-c", write_cfg(tmp, train={"max_steps": 4}), "--resume", step],
               [f"belongs to {tmp / 'run'}", f"not to run folder {tmp / 'runs' / 'tiny'}", "cut that run's trace"])


@case
def report_out_is_a_website(tmp: Path, base: Base) -> Bad:
    site = tmp / "site"
    site.mkdir()
    for name in ("index.html", "about.html", "photo.jpg"):
        (site / name).write_text("mine")
    return Bad(["report", copy_run(tmp, base), "--out", site], [f"--out {site}", "not a vaedyn report"])


@case
def report_out_is_a_report_holding_a_foreign_file(tmp: Path, base: Base) -> Bad:
    out = marked(tmp / "figs", artifacts.REPORT, "index.html", "summary.json", "my-notes.md")
    return Bad(["report", copy_run(tmp, base), "--out", out], [f"--out {out}", "holds 'my-notes.md'"])


@case
def report_out_is_an_old_report_with_more_pages(tmp: Path, base: Base) -> Bad:
    out = tmp / "old"
    out.mkdir()
    for name in ("index.html", "summary.json", "loss_curves.png", "about.html"):
        (out / name).write_text("x")  # recognised as an earlier vaedyn's report, but about.html is not vaedyn's
    return Bad(["report", copy_run(tmp, base), "--out", out], [f"--out {out}", "holds 'about.html'"])


@case
def eval_out_is_a_run_folder(tmp: Path, base: Base) -> Bad:
    run = copy_run(tmp, base)
    return Bad(["eval", "--checkpoint", run, "--out", run], [f"--out {run}", "is a vaedyn run folder"])


@case
def eval_out_under_a_file(tmp: Path, base: Base) -> Bad:
    (tmp / "notes.txt").write_text("mine")
    out = tmp / "notes.txt" / "results"
    return Bad(["eval", "--checkpoint", copy_run(tmp, base), "--out", out], [str(out), "lies under", "which is a file"])


@case
def nudge_out_under_a_file(tmp: Path, base: Base) -> Bad:
    (tmp / "notes.txt").write_text("mine")
    out = tmp / "notes.txt" / "nudged"
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", write_targets(tmp, base), "--out", out],
               [str(out), "lies under", "which is a file"])


@case
def nudge_overwrite_of_an_evaluation(tmp: Path, base: Base) -> Bad:
    out = marked(tmp / "ev", artifacts.EVALUATION, "metrics.json")
    return Bad(["nudge", "--checkpoint", copy_run(tmp, base), "--targets", write_targets(tmp, base), "--out", out,
                "--overwrite"], ["is a vaedyn evaluation, not a place for a nudged checkpoint"])


@case
def track_out_is_a_foreign_zarr_store(tmp: Path, base: Base) -> Bad:
    import numpy as np
    import xarray as xr

    out = tmp / "other.zarr"
    xr.Dataset({"x": ("t", np.arange(3.0))}).to_zarr(out, zarr_format=3, consolidated=False)
    return Bad(["track", "--checkpoint", copy_run(tmp, base), "--out", out], [str(out), "not a vaedyn.trace store"])


@case
def config_schema_over_a_foreign_file(tmp: Path, base: Base) -> Bad:
    (tmp / "thesis.tex").write_text("\\documentclass{article}")
    return Bad(["config", "schema", "--out", tmp / "thesis.tex"], [str(tmp / "thesis.tex"), "not a vaedyn config schema"])


# -- issue 16: a resume loads nothing that can run code, refuses settings that change the run's
#    trajectory, and destroys nothing (later trace steps, checkpoints, validation records) unless
#    its checkpoint loaded completely. The base run has checkpoints 2 and 4; these resume from 2.


class Planted:
    """Unpickled without weights_only, this creates the file `path` (what a planted pickle could do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.touch, (self.path,))


def resumable(tmp: Path, base: Base) -> tuple[Path, Path]:
    """A copy of the base run, its config with train.max_steps 6 (a longer run may continue it), and
    the step-2 checkpoint of the copy."""
    run = copy_run(tmp, base)
    cfg = write_cfg(tmp, output_dir=str(tmp), run_name="run", data={"max_samples": 8},
                    train={"max_steps": 6, "save_interval": 2, "validation_interval": 2},
                    track={"interval": 1, "chunk_steps": 2})
    return cfg, run / artifacts.CHECKPOINTS_DIR / artifacts.step_dir_name(2)


def plant(step: Path, name: str, tmp: Path) -> None:
    import torch

    torch.save({"state": Planted(tmp / "planted-code-ran")}, step / name)


@case
def train_resume_from_damaged_optimizer_state(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    (step / "optimizer.bin").write_bytes(b"not a torch file")
    return Bad(["train", "-c", cfg, "--resume", step], [f"cannot resume from {step}"])


@case
def train_resume_with_planted_training_state(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    (step / artifacts.TRAINING_STATE_FILE).unlink()  # as an earlier vaedyn wrote it: a pickle
    plant(step, artifacts.LEGACY_TRAINING_STATE_FILE, tmp)
    return Bad(["train", "-c", cfg, "--resume", step],
               [f"cannot resume from {step}", "custom_checkpoint_0.pkl", "not load as plain data", "would run code"])


@case
def train_resume_with_planted_rng_state(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    plant(step, "random_states_0.pkl", tmp)
    return Bad(["train", "-c", cfg, "--resume", step], ["random_states_0.pkl", "not load as plain data"])


@case
def train_resume_with_planted_scheduler_state(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    plant(step, "scheduler.bin", tmp)
    return Bad(["train", "-c", cfg, "--resume", step], ["scheduler.bin", "not load as plain data"])


@case
def train_resume_with_planted_optimizer_state(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    plant(step, "optimizer.bin", tmp)
    return Bad(["train", "-c", cfg, "--resume", step], ["the optimizer state does not load as plain data"])


@case
def train_resume_with_a_pickle_beside_the_state(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    plant(step, artifacts.LEGACY_TRAINING_STATE_FILE, tmp)
    return Bad(["train", "-c", cfg, "--resume", step], ["holds custom_checkpoint_0.pkl", "vaedyn does not write"])


@case
def train_resume_with_damaged_training_state(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    (step / artifacts.TRAINING_STATE_FILE).write_text('{"global_step": "2", "epoch": 0, "batch_in_epoch": 4}')
    return Bad(["train", "-c", cfg, "--resume", step], [str(step / artifacts.TRAINING_STATE_FILE), "not a training state"])


@case
def train_resume_changing_the_trajectory(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    return Bad(["train", "-c", cfg, "--resume", step, "--set", "data.batch_size=2", "--set", "train.learning_rate=1e-4",
                "--set", "train.max_steps=8"],
               ["2 setting(s) differ", "data.batch_size 4 (trained) vs 2 (given)",
                "train.learning_rate 0.001 (trained) vs 0.0001 (given)", "start a new run"])


# -- issue 16: a damaged store is never read as data (every committed chunk there and sound)

DAMAGED = "restore the store from a copy, or re-create the trace with `vaedyn track`"


def chunk_of(tmp: Path, base: Base, array: str, *index: int) -> tuple[Path, Path]:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    return store, store / array / "c" / Path(*map(str, index))


@case
def classify_store_with_a_missing_chunk(tmp: Path, base: Base) -> Bad:
    store, chunk = chunk_of(tmp, base, "act_std", 1, 0)
    chunk.unlink()
    return Bad(["classify", store], [f"trace store {store} is damaged", "chunk act_std/c/1/0 of 'act_std' (steps 3..4)",
                                     "is missing", DAMAGED])


@case
def classify_store_with_a_chunk_of_random_bytes(tmp: Path, base: Base) -> Bad:
    import numpy as np

    store, chunk = chunk_of(tmp, base, "act_std", 0, 0)
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
    return Bad(["classify", store], ["chunk act_std/c/0/0 of 'act_std' (steps 1..2)", "does not hold a blosc chunk"])


@case
def report_store_with_a_cut_chunk(tmp: Path, base: Base) -> Bad:
    store, chunk = chunk_of(tmp, base, "gn_weight", 1, 0)
    chunk.write_bytes(chunk.read_bytes()[:10])
    return Bad(["report", store], ["chunk gn_weight/c/1/0 of 'gn_weight' (steps 3..4)", "shorter than its header"])


@case
def store_info_missing_channel_coordinate_chunk(tmp: Path, base: Base) -> Bad:
    store, chunk = chunk_of(tmp, base, "layer", 0)
    chunk.unlink()
    return Bad(["store", "info", store], ["chunk layer/c/0 of 'layer' (channels 0..1239) is missing"])


@case
def store_info_negative_committed_steps(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    edit_root_attrs(store, committed_steps=-1)
    return Bad(["store", "info", store], [f"trace store {store} is damaged", "committed_steps is -1, not a count"])


@case
def classify_committed_steps_not_a_number(tmp: Path, base: Base) -> Bad:
    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    edit_root_attrs(store, committed_steps="4")
    return Bad(["classify", store], ['committed_steps is "4", not a count'])


@case
def classify_steps_out_of_order(tmp: Path, base: Base) -> Bad:
    import zarr

    store = copy_run(tmp, base) / artifacts.TRACE_DIR
    steps = zarr.open_array(str(store / "step"), mode="r+")
    steps[2] = 1
    return Bad(["classify", store], ["step 1 (row 2) follows step 2", "steps must increase"])


@case
def store_check_chunk_that_does_not_decode(tmp: Path, base: Base) -> Bad:
    store, chunk = chunk_of(tmp, base, "act_std", 1, 0)
    data = chunk.read_bytes()
    chunk.write_bytes(data[:16] + bytes(len(data) - 16))  # a sound header over a payload of zeros
    return Bad(["store", "check", store], ["chunk act_std/c/1/0 of 'act_std' (steps 3..4) does not decode"])


@case
def store_check_not_a_store(tmp: Path, base: Base) -> Bad:
    (tmp / "folder").mkdir()
    return Bad(["store", "check", tmp / "folder"], [str(tmp / "folder"), "not a trace store"])


@case
def train_resume_onto_a_damaged_trace(tmp: Path, base: Base) -> Bad:
    cfg, step = resumable(tmp, base)
    (tmp / "run" / artifacts.TRACE_DIR / "std" / "c" / "0" / "0").unlink()
    return Bad(["train", "-c", cfg, "--resume", step], ["chunk std/c/0/0 of 'std'", "is missing"])


# -- issue 16: data checked before the run folder is made


@case
def train_folder_named_like_an_image(tmp: Path, base: Base) -> Bad:
    (tmp / "images" / "cat.jpg").mkdir(parents=True)  # a folder, not an image
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "images"), "do_validation": False})
    return Bad(["train", "-c", cfg], ["no images", str(tmp / "images")])


@case
def train_image_folder_with_an_unreadable_file(tmp: Path, base: Base) -> Bad:
    from PIL import Image

    (tmp / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16)).save(tmp / "images" / name)
    bad_png(tmp / "images" / "c.png")
    cfg = write_cfg(tmp, data={"dataset_name": str(tmp / "images"), "do_validation": False})
    return Bad(["train", "-c", cfg], [f"cannot read image {tmp / 'images' / 'c.png'}", "1 of 3 files",
                                      "data.on_bad_image=skip"])


# ---------------------------------------------------------------------------------------------
# the test


def tree(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every file and folder below root: (is folder, size, mtime in ns); not a run folder's lock and
    pid files (a trainer that is refused later, e.g. by a damaged checkpoint, has held its lock)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *(f for f in filenames if f not in (artifacts.TRAIN_LOCK_FILE, artifacts.TRAIN_PID_FILE))]:
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


def test_closed_stdin_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`<&-`: Python starts without sys.stdin; `classify -` (a real process) and `nudge --targets -`
    (in-process, as Python sets it up: sys.stdin is None) say so in one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([VAEDYN, "classify", "-"], stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0),
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert (res.returncode, res.stderr.splitlines(), res.stdout) == (
        2, ["error: STORE is '-': stdin is closed; pipe a store or run folder path into it"], "")
    from vaedyn_cli.errors import VaedynError
    from vaedyn_cli.nudge import nudge_checkpoint

    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(VaedynError, match=r"^--targets -: stdin is closed; pipe in `vaedyn classify"):
        nudge_checkpoint(str(tmp_path / "x"), "-")
    assert list(tmp_path.iterdir()) == []
