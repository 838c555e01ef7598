"""`model.pretrained: BASE.yaml`: the model is the final/ of that vaedyn run, built by `vaedyn train`
on first use, reused after, resumed when interrupted, rebuilt when the base config changed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_config_dict
from vaedyn_cli import artifacts
from vaedyn_cli import train as train_mod
from vaedyn_cli.config import RunConfig, load_config
from vaedyn_cli.errors import VaedynError


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def configs(tmp_path: Path) -> tuple[Path, dict]:
    """A 2-step base config file and a fine-tune config (dict) naming it as model.pretrained."""
    base = tiny_config_dict(tmp_path, run_name="base", train={"max_steps": 2, "save_interval": 1},
                            track={"enabled": False}, data={"do_validation": False})
    base_file = _write(tmp_path / "base.yaml", base)
    tune = tiny_config_dict(tmp_path, run_name="tune", train={"max_steps": 2, "save_interval": 100},
                            data={"do_validation": False})
    tune["model"] = {"pretrained": str(base_file)}
    return base_file, tune


def test_the_base_is_built_once_then_reused(configs, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base_file, tune = configs
    base_final = tmp_path / "runs" / "base" / artifacts.FINAL_DIR
    caplog.set_level(logging.INFO)
    start: dict[str, torch.Tensor] = {}

    def record_start(ctx):  # noqa: ANN001, ANN202 - a hook factory: the model as the fine-tune begins
        start.update({k: v.detach().clone() for k, v in ctx.accelerator.unwrap_model(ctx.model).state_dict().items()})

    run = train_mod.train(RunConfig.model_validate(tune), hooks=(record_start, *train_mod.DEFAULT_HOOKS))
    assert "building the base model" in caplog.text
    assert artifacts.marker_kind(base_final.parent) == "run"
    assert (run / artifacts.TRACE_DIR).is_dir() and not (base_final.parent / artifacts.TRACE_DIR).exists()
    # the fine-tune began from the base's final weights, exactly, and trained on from there
    base_w, tuned = _weights(base_final), _weights(run / artifacts.FINAL_DIR)
    assert start.keys() == base_w.keys() and all(torch.equal(start[k], v) for k, v in base_w.items())
    assert any(not torch.equal(base_w[k], tuned[k]) for k in base_w)
    # the run records what it was asked for, the base config
    assert load_config(run / artifacts.CONFIG_FILE).model.pretrained == str(base_file)

    # a second fine-tune reuses the base: not trained again, the same weights
    stamp = (base_final / artifacts.STEP_FILE).stat().st_mtime_ns
    caplog.clear()
    again = RunConfig.model_validate({**tune, "run_name": "tune2"})
    run2 = train_mod.train(again)
    assert "building the base model" not in caplog.text and f"base model {base_final}" in caplog.text
    assert (base_final / artifacts.STEP_FILE).stat().st_mtime_ns == stamp
    assert all(torch.equal(_weights(run2 / artifacts.FINAL_DIR)[k], v) for k, v in tuned.items())  # same start, same run


def test_a_changed_base_config_is_rebuilt_and_an_interrupted_one_resumed(configs, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    base_file, tune = configs
    base_dir = tmp_path / "runs" / "base"
    # interrupted after its first checkpoint (step 1), before final/
    with pytest.raises(KeyboardInterrupt):
        from tests.conftest import crash_at

        train_mod.train(load_config(base_file), hooks=(crash_at(2, KeyboardInterrupt),))
    assert artifacts.latest_checkpoint(base_dir) is not None and not (base_dir / artifacts.FINAL_DIR).exists()
    caplog.set_level(logging.INFO)
    train_mod.train(RunConfig.model_validate(tune))
    assert "finishing the base model" in caplog.text and (base_dir / artifacts.FINAL_DIR).is_dir()
    first = _weights(base_dir / artifacts.FINAL_DIR)
    # the base config changes: the next fine-tune rebuilds it
    data = yaml.safe_load(base_file.read_text())
    data["train"]["max_steps"] = 3
    _write(base_file, data)
    caplog.clear()
    train_mod.train(RunConfig.model_validate({**tune, "run_name": "tune2"}))
    assert "was built from other settings" in caplog.text
    assert load_config(base_dir / artifacts.CONFIG_FILE).train.max_steps == 3
    assert any(not torch.equal(first[k], v) for k, v in _weights(base_dir / artifacts.FINAL_DIR).items())


def test_a_missing_or_nested_base_config_is_one_line(configs, tmp_path: Path, cli) -> None:
    base_file, tune = configs
    tune_file = _write(tmp_path / "tune.yaml", {**tune, "model": {"pretrained": str(tmp_path / "nope.yaml")}})
    res = cli("train", "-c", tune_file)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "nope.yaml: no such config file" in res.stderr
    nested = _write(tmp_path / "nested.yaml", {**yaml.safe_load(base_file.read_text()),
                                                "model": {"pretrained": str(base_file)}})
    with pytest.raises(VaedynError, match="whose model.pretrained is a config too"):
        train_mod.train(RunConfig.model_validate({**tune, "model": {"pretrained": str(nested)}}))
    assert not (tmp_path / "runs").exists()  # nothing was written
