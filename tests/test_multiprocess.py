"""Several processes: `vaedyn train` under torchrun with 2 CPU processes (gloo) records the statistics
of one process on the same global batch, and only the main process writes the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import tiny_config_dict
from vaedyn_cli import artifacts, store
from vaedyn_cli import train as train_mod
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import VaedynError

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
STEP_FILES = {
    "config.json", "vaedyn_state.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
    "scheduler.bin", "vaedyn_config.yaml",
}
NUDGED = "decoder.up_blocks.3.resnets.0.norm1"


def config(tmp_path: Path, name: str, batch_size: int) -> dict:
    """4 steps = 2 epochs of 8 images; every step tracked, a gn_scale nudge of one whole layer every
    2 steps. A small learning rate: Adam's first steps move a weight by ~lr whatever the size of its
    gradient, so the last-digit differences of an all-reduced gradient would otherwise grow to ~lr in
    the weights, and from there into the statistics of the next steps."""
    return tiny_config_dict(
        tmp_path,
        run_name=name,
        data={"batch_size": batch_size, "max_samples": 8, "validation_max_samples": 8, "validation_batch_size": 4},
        train={"max_steps": 4, "save_interval": 2, "validation_interval": 2, "learning_rate": 1e-5},
        track={"interval": 1, "weight_interval": 1},
        nudge={"enabled": True, "strategy": "gn_scale_nudge", "every": 2, "select": [f"layer={NUDGED}"]},
        log={"report_to": "tensorboard", "log_interval": 2},
    )


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-5, atol=1e-6, err_msg=what)


@pytest.mark.long
def test_two_cpu_processes_record_the_global_batch(tmp_path):
    one = train_mod.train(RunConfig.model_validate(config(tmp_path, "one", 4)))  # 1 process x 4 images

    cfg_file = tmp_path / "two.yaml"
    cfg_file.write_text(yaml.safe_dump(config(tmp_path, "two", 2)))  # 2 processes x 2 images
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vaedyn_cli", "train", "-c", str(cfg_file)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )
    two = tmp_path / "runs" / "two"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"{two}\n"  # printed once

    # one complete run folder, written once
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()} == {
        "config.yaml", "checkpoints", "final", "logs", "trace.zarr", "validation.jsonl",
        ".vaedyn", ".vaedyn-train.lock", ".vaedyn-train.pid"}  # only the main process writes (and locks) the run
    assert [s for s, _ in artifacts.list_checkpoints(two)] == [2, 4]
    for _, step_dir in artifacts.list_checkpoints(two):  # plus the second process's RNG state
        assert {p.name for p in step_dir.iterdir()} == STEP_FILES | {"random_states_1.pkl"}
    assert tree(two / artifacts.FINAL_DIR) == tree(one / artifacts.FINAL_DIR)
    n_event_files = [len(list((run / artifacts.LOGS_DIR).rglob("events.out.tfevents.*"))) for run in (one, two)]
    assert n_event_files[0] == n_event_files[1] > 0  # TensorBoard files of the main process only
    assert RunConfig.model_validate(yaml.safe_load((two / "config.yaml").read_text())).data.batch_size == 2

    # the trace: the statistics of the global batch of 4
    ta, tb = store.open_trace(one / artifacts.TRACE_DIR), store.open_trace(two / artifacts.TRACE_DIR)
    assert ta["step"].values.tolist() == tb["step"].values.tolist() == [1, 2, 3, 4]
    for name in store.STEP_VARS[1:]:
        a, b = ta[name].values, tb[name].values
        assert (np.isnan(a) == np.isnan(b)).all(), name
        close(a[~np.isnan(a)], b[~np.isnan(b)], name)
    assert np.isfinite(tb["gn_weight_grad"].values).all() and (tb["std"].values > 0).any()

    # validation: one line per validation, over all 8 images
    va = [json.loads(line) for line in (one / artifacts.VALIDATION_FILE).read_text().splitlines()]
    vb = [json.loads(line) for line in (two / artifacts.VALIDATION_FILE).read_text().splitlines()]
    assert [(v["step"], v["epoch"]) for v in vb] == [(v["step"], v["epoch"]) for v in va] == [(2, 1), (4, 2)]
    for x, y in zip(va, vb, strict=True):
        close(np.array([x["val_rec_loss"], x["val_kl_loss"]]), np.array([y["val_rec_loss"], y["val_kl_loss"]]), "val")

    # events: the main process classified, every process nudged, the main process recorded once
    ea, eb = store.read_events(one / artifacts.TRACE_DIR), store.read_events(two / artifacts.TRACE_DIR)
    assert eb.sizes["event"] == ea.sizes["event"] == 2 * int((ta["layer"].values == NUDGED).sum()) > 0
    for name in ("step", "layer", "channel_index", "strategy", "param"):
        assert eb[name].values.tolist() == ea[name].values.tolist(), name
    close(ea["after"].values, eb["after"].values, "after")

    # the weights of both processes' shared model: those of the single process
    wa = load_file(str(one / artifacts.FINAL_DIR / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(two / artifacts.FINAL_DIR / "diffusion_pytorch_model.safetensors"))
    for k in wa:
        close(wa[k].numpy(), wb[k].numpy(), k)

    # its checkpoints resume only under 2 processes (the epoch position counts per-process batches)
    before = tree(two)
    longer = RunConfig.model_validate(config(tmp_path, "two", 2)).model_copy(deep=True)
    longer.train.max_steps = 6
    with pytest.raises(VaedynError, match="written by 2 processes, this run has 1; resume it with 2"):
        train_mod.train(longer, resume="latest")
    assert tree(two) == before
