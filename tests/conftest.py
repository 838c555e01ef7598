"""Shared fixtures: no network, tiny models, tiny data, temporary run folders."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vaedyn_cli.config import RunConfig, load_config  # noqa: E402

torch.set_num_threads(1)

# Width 1/16 of the SDXL VAE: 8/16/32/32 channels in 2 groups of 4 (the same channels per group as
# the real model), 52 GroupNorm layers, 1,240 GroupNorm channels, ~0.33M parameters.
TINY_WIDTH = 0.0625


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `nox -s mutate`: a test whose vaedyn runs in child processes cannot see the mutant (the
    children import the unmutated package) and only costs time, so it is left out (with no fixture
    built for it); the others run fastest first (by the durations mutmut measured), so that a killed
    mutant stops at its first cheap failing test.

    Everywhere else, the tests marked `long` (tens of seconds each) start first, in file order: with
    `pytest -n 2` they then alternate between the two workers, and the many short tests fill in
    behind them, so the workers finish together instead of one waiting on a long test begun last."""
    if os.environ.get("MUTANT_UNDER_TEST", "") in ("", "stats", "fail"):
        items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: file order otherwise
        return
    left_out = [item for item in items if item.get_closest_marker("other_processes") is not None]
    kept = [item for item in items if item.get_closest_marker("other_processes") is None]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
    stats = Path("mutmut-stats.json")  # mutmut runs the tests in mutants/, beside this file
    if stats.is_file():
        import json

        durations = json.loads(stats.read_text()).get("duration_by_test", {})
        kept.sort(key=lambda item: durations.get(item.nodeid, 0.0))
    items[:] = kept


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_config_dict(tmp_path: Path, **sections: dict) -> dict:
    """A config for a few-second run: tiny model, 16x16 builtin images, tracking every 2 steps."""
    data = {
        "run_name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"architecture": "sdxl", "width": TINY_WIDTH},
        "data": {
            "dataset_name": "builtin:natural",
            "resolution": 16,
            "batch_size": 4,
            "max_samples": 32,
            "validation_max_samples": 8,
            "validation_batch_size": 4,
        },
        "train": {
            "max_steps": 6,
            "learning_rate": 1e-3,
            "lr_warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "save_interval": 3,
            "validation_unit": "step",
            "validation_interval": 3,
        },
        "track": {"interval": 2, "probe_samples": 4},
        "eval": {"max_samples": 8, "batch_size": 4, "num_samples_to_save": 2},
        "log": {"report_to": "none", "log_interval": 2},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return data


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> RunConfig:
    return RunConfig.model_validate(tiny_config_dict(tmp_path))


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    """The tiny config written as YAML (for CLI tests)."""
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path)))
    load_config(path)  # fail early if the fixture itself is invalid
    return path


@pytest.fixture
def cli():
    """Run `vaedyn ARGS` in-process; returns click's Result with .exit_code, .stdout, .stderr."""
    from vaedyn_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):  # noqa: A002
        handlers, level = logging.root.handlers[:], logging.root.level
        try:
            return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)
        finally:  # the command pointed logging at the runner's stderr, which closes with the invocation
            logging.root.handlers[:], logging.root.level = handlers, level

    return invoke


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> list:
    """The hook factories that `train()` and `vaedyn train` build in this test: the defaults, in a list
    the test extends (or edits) before it trains."""
    from vaedyn_cli import train as train_mod

    factories = list(train_mod.DEFAULT_HOOKS)
    monkeypatch.setattr(train_mod, "DEFAULT_HOOKS", factories)
    return factories


class Crash(Exception):
    """A simulated crash (raised by CrashAt)."""


def crash_at(step: int, exc: type[BaseException] = Crash):
    """A train hook factory whose hook raises `exc` at the start of optimizer step `step`."""
    from vaedyn_cli.hooks import TrainHook

    class CrashAt(TrainHook):
        def begin_step(self, s: int) -> None:
            if s == step:
                raise exc(f"simulated crash at step {s}")

    return lambda ctx: CrashAt()
