"""Crash safety: `vaedyn train` killed with SIGKILL inside a step, during a checkpoint save and while
the trace writer commits, resumed with `--resume latest`, ends with the weights, trace, events and
validation records of an uninterrupted run, bit for bit; non-finite losses stop or skip cleanly and
never reach the trace."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import load_file

from tests.conftest import tiny_config_dict
from vaedyn_cli import artifacts, store
from vaedyn_cli import hooks as hooks_mod
from vaedyn_cli import train as train_mod
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import VaedynError

MODEL_FILE = "diffusion_pytorch_model.safetensors"


def crash_config(tmp_path: Path, name: str) -> dict:
    """12 steps over 20 images in batches of 4 (5 steps an epoch, so checkpoints 3, 6, 9 sit mid-epoch);
    tracked every step into chunks of 8 steps; a seeded random nudge every 4 steps (events at 4, 8, 12);
    validation every 4 steps."""
    return tiny_config_dict(
        tmp_path,
        run_name=name,
        data={"max_samples": 20, "random_flip": True},
        train={"max_steps": 12, "save_interval": 3, "validation_interval": 4, "lr_scheduler_type": "linear",
               "lr_warmup_steps": 2},
        track={"interval": 1, "weight_interval": 2, "chunk_steps": 8},
        nudge={"enabled": True, "strategy": "shrink_perturb", "every": 4, "window": 2, "perturb_std": 0.05,
               "select": ["layer=decoder.up_blocks.3.*"], "max_fraction": 0.25},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (shared by the tests of this module)."""
    tmp = tmp_path_factory.mktemp("reference")
    return train_mod.train(RunConfig.model_validate(crash_config(tmp, "ref")))


def run_cli(cfg_file: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process; `fault` goes to VAEDYN_FAULT."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VAEDYN_FAULT", None)
    if fault is not None:
        env["VAEDYN_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "vaedyn_cli", "train", "-c", str(cfg_file), *args], env=env,
                          cwd=cfg_file.parent, capture_output=True, text=True, timeout=300)


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert proc.stdout == ""


def latest(run: Path) -> int | None:
    found = artifacts.latest_checkpoint(run)
    return None if found is None else artifacts.parse_step(found.name)


def trace_steps(run: Path) -> list[int]:
    """The committed steps; they must be 1, 2, ..., n (tracked every step)."""
    steps = store.open_trace(run / artifacts.TRACE_DIR)["step"].values.tolist()
    assert steps == list(range(1, len(steps) + 1))
    return steps


def event_steps(run: Path) -> list[int]:
    ev = store.read_events(run / artifacts.TRACE_DIR)
    return [] if ev is None else ev["step"].values.tolist()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def assert_same_trace(a: Path, b: Path) -> None:
    ta, tb = store.open_trace(a / artifacts.TRACE_DIR), store.open_trace(b / artifacts.TRACE_DIR)
    assert ta["step"].values.tolist() == tb["step"].values.tolist()
    assert set(ta.data_vars) == set(tb.data_vars) == set(store.STEP_VARS[1:])
    for name in ta.data_vars:
        np.testing.assert_array_equal(ta[name].values, tb[name].values, err_msg=name)
    ea, eb = store.read_events(a / artifacts.TRACE_DIR), store.read_events(b / artifacts.TRACE_DIR)
    for name in store.EVENT_FIELDS:
        assert ea[name].values.tolist() == eb[name].values.tolist(), name


@pytest.mark.other_processes
@pytest.mark.long
def test_killed_three_times_resumes_to_the_uninterrupted_run(reference, tmp_path, cli):
    ref = reference
    assert trace_steps(ref) == list(range(1, 13))
    assert sorted(set(event_steps(ref))) == [4, 8, 12]
    cfg_file = tmp_path / "crash.yaml"
    cfg_file.write_text(yaml.safe_dump(crash_config(tmp_path, "crashed")))
    run = tmp_path / "runs" / "crashed"

    # 1. inside step 4 (after its backward, before the update): the checkpoint of step 3 is latest,
    #    and the trace holds exactly steps 1..3 (committed before that checkpoint was written)
    assert_killed(run_cli(cfg_file, fault="step:4"))
    assert latest(run) == 3 and not (run / artifacts.FINAL_DIR).exists()
    assert trace_steps(run) == [1, 2, 3]
    assert event_steps(run) == []

    # 2. resumed, then killed while the checkpoint of step 6 is written: its files lie in the temporary
    #    folder, the step-3 checkpoint stays latest; the trace reached step 6, the nudge at 4 is recorded
    assert_killed(run_cli(cfg_file, "--resume", "latest", fault="checkpoint_save:6"))
    tmp_ckpt = artifacts.temp_path(run / artifacts.CHECKPOINTS_DIR / "step-000006")
    assert (tmp_ckpt / artifacts.ACCELERATE_MODEL_FILE).is_file()
    assert latest(run) == 3
    assert trace_steps(run) == list(range(1, 7))
    assert set(event_steps(run)) == {4}

    # 3. resumed from 3 again (the trace back to 3, the event of step 4 dropped, then redone), and
    #    killed while the writer commits steps 7-8: their rows are in the arrays, not committed
    assert_killed(run_cli(cfg_file, "--resume", "latest", fault="writer_flush:8"))
    assert latest(run) == 6 and not tmp_ckpt.exists()
    assert trace_steps(run) == list(range(1, 7))
    assert zarr.open_array(str(run / artifacts.TRACE_DIR / "step"), mode="r")[:8].tolist() == list(range(1, 9))
    assert set(event_steps(run)) == {4}

    # 4. resumed to the end through the CLI: everything equals the uninterrupted run
    result = cli("train", "-c", cfg_file, "--resume", "latest")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{run}\n"
    assert_same_weights(ref / artifacts.FINAL_DIR / MODEL_FILE, run / artifacts.FINAL_DIR / MODEL_FILE)
    assert [s for s, _ in artifacts.list_checkpoints(run)] == [3, 6, 9, 12]
    ckpt12 = Path(artifacts.CHECKPOINTS_DIR) / "step-000012" / artifacts.ACCELERATE_MODEL_FILE
    assert_same_weights(ref / ckpt12, run / ckpt12)
    assert_same_trace(ref, run)
    assert (run / artifacts.VALIDATION_FILE).read_text() == (ref / artifacts.VALIDATION_FILE).read_text()
    assert not [p.name for p in (run / artifacts.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]

    # 5. killed after the last checkpoint, before final/ was written: the resume only writes final/
    final_weights = load_file(str(run / artifacts.FINAL_DIR / MODEL_FILE))
    shutil.rmtree(run / artifacts.FINAL_DIR)
    result = cli("train", "-c", cfg_file, "--resume", "latest")
    assert result.exit_code == 0, result.stderr
    restored = load_file(str(run / artifacts.FINAL_DIR / MODEL_FILE))
    assert all(torch.equal(final_weights[k], restored[k]) for k in final_weights)
    assert_same_trace(ref, run)
    result = cli("train", "-c", cfg_file, "--resume", "latest")  # a finished run has nothing left to do
    assert result.exit_code == 2 and "already at train.max_steps" in result.stderr


# ---------------------------------------------------------------------------------------------
# non-finite losses


class Poison(hooks_mod.TrainHook):
    """A NaN bias makes the forward of step `step` non-finite; restored after the step (so that with
    on_nonfinite=skip training continues from intact weights)."""

    def __init__(self, ctx: hooks_mod.TrainContext, step: int):
        self.bias = ctx.accelerator.unwrap_model(ctx.model).decoder.conv_out.bias
        self.step, self.saved = step, None

    def begin_step(self, step: int) -> None:
        if step == self.step:
            self.saved = self.bias.detach().clone()
            with torch.no_grad():
                self.bias.fill_(float("nan"))

    def end_step(self, step: int, scalars) -> None:
        if step == self.step:
            with torch.no_grad():
                self.bias.copy_(self.saved)


@pytest.fixture
def poison_step_3(hooks):
    hooks.append(lambda ctx: Poison(ctx, 3))  # after the tracker: it sees the NaN step


def nonfinite_config(tmp_path: Path, mode: str) -> dict:
    return tiny_config_dict(tmp_path, train={"max_steps": 5, "save_interval": 100, "on_nonfinite": mode},
                            track={"interval": 1}, data={"do_validation": False}, log={"log_interval": 4})


def assert_all_finite(run: Path) -> None:
    trace = store.open_trace(run / artifacts.TRACE_DIR)
    has_act = trace["has_activation"].values
    for name in ("in_std", "mean", "mean_abs", "std", "gn_weight", "gn_bias", "gn_weight_grad", "loss", "rec_loss"):
        assert np.isfinite(trace[name].values).all(), name
    assert np.isfinite(trace["act_std"].values[:, has_act]).all()


def test_nonfinite_skip_leaves_the_step_out_of_the_trace(tmp_path, poison_step_3, caplog):
    run = train_mod.train(RunConfig.model_validate(nonfinite_config(tmp_path, "skip")))
    assert store.open_trace(run / artifacts.TRACE_DIR)["step"].values.tolist() == [1, 2, 4, 5]
    assert_all_finite(run)
    assert "step 3: non-finite loss, not recorded in the trace" in caplog.text
    weights = load_file(str(run / artifacts.FINAL_DIR / MODEL_FILE))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_error_stops_naming_the_step(tmp_path, poison_step_3, cli):
    cfg_file = tmp_path / "nan.yaml"
    cfg_file.write_text(yaml.safe_dump(nonfinite_config(tmp_path, "error")))
    result = cli("train", "-c", cfg_file)
    assert result.exit_code == 1 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss at step 3: ")
    assert "Traceback" not in result.stderr
    run = tmp_path / "runs" / "tiny"
    # step 3 (NaN forward) and step 4 (NaN weights after the update of step 3) never reach the trace
    assert store.open_trace(run / artifacts.TRACE_DIR)["step"].values.tolist() == [1, 2]
    assert_all_finite(run)
    assert not (run / artifacts.FINAL_DIR).exists()
    with pytest.raises(VaedynError, match="--resume latest: .* no step-\\* checkpoint"):
        train_mod.train(RunConfig.model_validate(nonfinite_config(tmp_path, "error")), resume="latest")
