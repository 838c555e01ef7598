"""`vaedyn train`: run-folder layout, determinism, exact mid-epoch resume, hooks, non-finite losses, CLI contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import Crash, crash_at, tiny_config_dict
from vaedyn_cli import artifacts, randomness
from vaedyn_cli import hooks as hooks_mod
from vaedyn_cli import train as train_mod
from vaedyn_cli.config import RunConfig, load_config
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.model import resolve_checkpoint

STEP_FILES = {
    "config.json", "vaedyn_state.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
    "scheduler.bin", "vaedyn_config.yaml",
}
FINAL_FILES = {"config.json", "diffusion_pytorch_model.safetensors", "vaedyn_config.yaml", "vaedyn_step.json"}


def make_cfg(tmp_path: Path, **sections: dict) -> RunConfig:
    """The tiny config without channel tracking (these tests are about the loop itself)."""
    sections.setdefault("track", {})
    sections["track"] = {"enabled": False, **sections["track"]}
    return RunConfig.model_validate(tiny_config_dict(tmp_path, **sections))


def write_cfg(tmp_path: Path, **sections: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(make_cfg(tmp_path, **sections).to_yaml())
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if (folder / "model.safetensors").is_file() else "diffusion_pytorch_model.safetensors"
    return load_file(str(folder / name))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def tb_scalars(logs: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------


def test_cli_train_layout_logs_and_rerun_is_bitwise_identical(tmp_path, cli, hooks):
    cfg_file = write_cfg(tmp_path, log={"report_to": "tensorboard"})
    made: list[Recorder] = []
    hooks.append(lambda ctx: made.append(Recorder(ctx)) or made[-1])
    result = cli("train", "-c", cfg_file)
    run = tmp_path / "runs" / "tiny"
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{run}\n"  # the run folder path is the only stdout line

    assert {p.name for p in run.iterdir()} == {"config.yaml", "checkpoints", "final", "logs", "validation.jsonl",
                                               artifacts.MARKER_FILE, artifacts.TRAIN_LOCK_FILE, artifacts.TRAIN_PID_FILE}
    assert artifacts.marker_kind(run) == "run" and artifacts.marker_kind(run / "final") is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    for step_dir in (run / "checkpoints").iterdir():
        assert {p.name for p in step_dir.iterdir()} == STEP_FILES
    assert {p.name for p in (run / "final").iterdir()} == FINAL_FILES
    assert json.loads((run / "final" / "vaedyn_step.json").read_text()) == {"step": 6}
    assert load_config(run / "config.yaml") == load_config(cfg_file)

    # the step folder loads like any checkpoint, and step 6 is the final model
    ckpt = resolve_checkpoint(run / "checkpoints" / "step-000006")
    assert ckpt.step == 6 and ckpt.run_dir == run and ckpt.config == load_config(cfg_file)
    assert_bitwise_equal(ckpt.load().state_dict(), weights(run / "final"))
    first = weights(run / "checkpoints" / "step-000003")
    assert any(not torch.equal(first[k], v) for k, v in weights(run / "final").items())

    lines = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in lines] == [3, 6]
    assert all(v["val_rec_loss"] > 0 and v["val_kl_loss"] > 0 for v in lines)

    scalars = tb_scalars(run / "logs")
    for tag in ("loss", "rec_loss", "kl_loss", "lr", "grad_norm", "images_per_s"):
        assert [s for s, _ in scalars[tag]] == [2, 4, 6], tag
    assert [s for s, _ in scalars["val_rec_loss"]] == [3, 6]
    assert scalars["val_rec_loss"][1][1] == pytest.approx(lines[1]["val_rec_loss"], rel=1e-6)
    assert all(v == pytest.approx(1e-3) for _, v in scalars["lr"])
    # logged: the mean of the steps since the last log
    step_losses = made[0].scalars
    for step, value in scalars["loss"]:
        assert value == pytest.approx((step_losses[step - 1]["loss"] + step_losses[step]["loss"]) / 2, rel=1e-6)
    # loss = rec + kl_weight * kl
    for (_, loss), (_, rec), (_, kl) in zip(scalars["loss"], scalars["rec_loss"], scalars["kl_loss"], strict=True):
        assert loss == pytest.approx(rec + 1e-6 * kl, rel=1e-5)

    # same config again (over the old folder): bitwise identical weights
    hooks.clear()
    again = cli("train", "-c", cfg_file, "--overwrite")
    assert again.exit_code == 0, again.stderr
    assert_bitwise_equal(weights(run / "final"), ckpt.load().state_dict())


def resume_cfg(tmp_path: Path, name: str) -> RunConfig:
    """20 images in batches of 4 = 5 micro-batches an epoch, 2 per step: steps of 2, 2, 1 micro-batches;
    flips, warmup + linear decay and a strong KL make every kind of state matter."""
    return make_cfg(
        tmp_path,
        run_name=name,
        data={"max_samples": 20, "random_flip": True},
        train={
            "max_steps": 7, "gradient_accumulation_steps": 2, "save_interval": 2, "lr_scheduler_type": "linear",
            "lr_warmup_steps": 2, "kl_weight": 1e-2, "validation_unit": "epoch", "validation_interval": 1,
        },
    )


def test_resume_mid_epoch_gives_bitwise_identical_weights(tmp_path, hooks):
    ref = train_mod.train(resume_cfg(tmp_path, "ref"))
    ref_val = [json.loads(line) for line in (ref / "validation.jsonl").read_text().splitlines()]
    assert [(v["step"], v["epoch"]) for v in ref_val] == [(3, 1), (6, 2)]  # every epoch (3 steps each)

    cfg = resume_cfg(tmp_path, "crashed")
    saves: list[int] = []
    hooks.append(lambda ctx: SaveSteps(saves))
    hooks.append(crash_at(5))
    with pytest.raises(Crash):
        train_mod.train(cfg)
    run = cfg.run_dir
    assert [s for s, _ in artifacts.list_checkpoints(run)] == [2, 4] and saves == [2, 4]  # hooks hear each save
    assert not (run / "final").exists()
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # no temp folders left
    hooks.clear()
    # a power cut while step 6 was being saved would leave its temporary folder: the resumed run replaces it
    stale = artifacts.temp_path(run / "checkpoints" / "step-000006")
    stale.mkdir()
    (stale / "half-written.bin").write_bytes(b"\0" * 16)

    # step 4 sits mid-epoch: epoch 1, two of its five micro-batches consumed
    state = json.loads((run / "checkpoints" / "step-000004" / artifacts.TRAINING_STATE_FILE).read_text())
    assert state == {"global_step": 4, "epoch": 1, "batch_in_epoch": 2}
    seen: list[int | None] = []
    hooks.append(lambda ctx: seen.append(ctx.resume_step))
    assert train_mod.train(cfg, resume="latest") == run
    assert seen == [4]
    assert_bitwise_equal(weights(run / "final"), weights(ref / "final"))
    assert_bitwise_equal(weights(run / "checkpoints" / "step-000006"), weights(ref / "checkpoints" / "step-000006"))
    assert not stale.exists() and not (run / "checkpoints" / "step-000006" / "half-written.bin").exists()
    resumed_val = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert resumed_val == ref_val
    assert [s for s, _ in artifacts.list_checkpoints(run)] == [2, 4, 6]  # the resumed-from checkpoint stays

    # resuming the finished reference from step 2 drops what came after it (checkpoints 4 and 6, the
    # validation of step 3 and 6) and replays the same continuation
    final = weights(ref / "final")
    assert train_mod.train(resume_cfg(tmp_path, "ref"), resume=str(ref / "checkpoints" / "step-000002")) == ref
    assert [s for s, _ in artifacts.list_checkpoints(ref)] == [2, 4, 6]
    assert_bitwise_equal(weights(ref / "final"), final)
    assert [json.loads(line) for line in (ref / "validation.jsonl").read_text().splitlines()] == ref_val


class SaveSteps(hooks_mod.TrainHook):
    """Records the step of each checkpoint the hooks are told about."""

    def __init__(self, steps: list[int]):
        self.steps = steps

    def before_save(self, step: int) -> None:
        self.steps.append(step)


class Recorder(hooks_mod.TrainHook):
    def __init__(self, ctx: hooks_mod.TrainContext):
        self.ctx, self.events, self.scalars, self.closed = ctx, [], {}, 0
        self.param = next(ctx.model.parameters())

    def begin_step(self, step):
        self.events.append(("begin", step, self.param.grad is None))

    def after_backward(self, step):
        self.events.append(("after", step, self.param.grad is None))

    def end_step(self, step, scalars):
        self.events.append(("end", step, self.param.grad is None))
        self.scalars[step] = dict(scalars)

    def on_validation(self, step, metrics):
        self.events.append(("val", step, sorted(metrics)))

    def close(self):
        self.closed += 1


def test_hooks_order_scalars_and_checkpoint_retention(tmp_path, hooks):
    made: list[Recorder] = []
    hooks.append(lambda ctx: made.append(Recorder(ctx)) or made[-1])
    hooks.append(lambda ctx: None)  # a factory may decline
    cfg = make_cfg(
        tmp_path,
        train={"max_steps": 3, "gradient_accumulation_steps": 2, "save_interval": 1, "checkpoints_total_limit": 2,
               "validation_interval": 2, "learning_rate": 2e-3},
    )
    run = train_mod.train(cfg)
    (rec,) = made
    assert rec.ctx.resume_step is None and rec.ctx.run_dir == run and rec.closed == 1
    # the factory's context holds the loader the run trains from
    assert len(rec.ctx.train_loader) == cfg.data.max_samples // cfg.data.batch_size
    assert next(iter(rec.ctx.train_loader)).shape == (cfg.data.batch_size, 3, cfg.data.resolution, cfg.data.resolution)
    assert rec.events == [
        ("begin", 1, True), ("after", 1, False), ("end", 1, True),
        ("begin", 2, True), ("after", 2, False), ("end", 2, True), ("val", 2, ["val_kl_loss", "val_rec_loss"]),
        ("begin", 3, True), ("after", 3, False), ("end", 3, True),
    ]
    for values in rec.scalars.values():
        assert set(values) == {"loss", "rec_loss", "kl_loss", "lr"}
        assert values["lr"] == pytest.approx(2e-3)
        assert values["loss"] == pytest.approx(values["rec_loss"] + 1e-6 * values["kl_loss"], rel=1e-6)
    assert [s for s, _ in artifacts.list_checkpoints(run)] == [2, 3]  # retention: newest two


class Poison(hooks_mod.TrainHook):
    """Makes the forward of one step non-finite, and repairs the weights after it."""

    def __init__(self, ctx, step: int):
        self.bias = ctx.accelerator.unwrap_model(ctx.model).decoder.conv_out.bias
        self.step, self.saved = step, None

    def begin_step(self, step):
        if step == self.step:
            self.saved = self.bias.detach().clone()
            with torch.no_grad():
                self.bias.fill_(float("nan"))

    def end_step(self, step, scalars):
        if step == self.step:
            assert scalars["loss"] != scalars["loss"]  # NaN reaches the hooks
            with torch.no_grad():
                self.bias.copy_(self.saved)


def test_nonfinite_skip_leaves_weights_and_optimizer_untouched(tmp_path, hooks):
    hooks.append(lambda ctx: Poison(ctx, 2))
    cfg = make_cfg(tmp_path, train={"max_steps": 3, "save_interval": 1, "on_nonfinite": "skip"})
    run = train_mod.train(cfg)
    ck = run / "checkpoints"
    assert_bitwise_equal(weights(ck / "step-000001"), weights(ck / "step-000002"))
    opt1 = torch.load(ck / "step-000001" / "optimizer.bin", weights_only=False)
    opt2 = torch.load(ck / "step-000002" / "optimizer.bin", weights_only=False)
    assert all(torch.equal(opt1["state"][i]["exp_avg"], opt2["state"][i]["exp_avg"]) for i in opt1["state"])
    # the step counter and the schedule advance; step 3 trains again
    assert torch.load(ck / "step-000002" / "scheduler.bin", weights_only=False)["last_epoch"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(weights(ck / "step-000002").values(),
                                                     weights(ck / "step-000003").values(), strict=True))
    assert all(torch.isfinite(t).all() for t in weights(run / "final").values())


def test_nonfinite_error_names_the_step_and_saves_nothing(tmp_path, hooks, cli):
    hooks.append(lambda ctx: Poison(ctx, 2))
    cfg_file = write_cfg(tmp_path, train={"max_steps": 4, "save_interval": 3})
    result = cli("train", "-c", cfg_file)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "non-finite loss at step 2" in result.stderr
    run = tmp_path / "runs" / "tiny"
    assert not (run / "final").exists() and artifacts.list_checkpoints(run) == []
    with pytest.raises(RuntimeFailure, match="step 2"):
        train_mod.train(load_config(cfg_file), overwrite=True)


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


def test_cli_bad_inputs(tmp_path, cli):
    cfg_file = write_cfg(tmp_path)
    run = tmp_path / "runs" / "tiny"

    result = cli("train", "-c", cfg_file, "--resume", "latest")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""

    result = cli("train", "-c", cfg_file, "--set", "log.report_to=wandb")
    assert result.exit_code == 2 and "pip install vaedyn[wandb]" in result.stderr
    assert not run.exists()

    result = cli("train", "-c", cfg_file, "--set", "data.image_column=img")
    assert result.exit_code == 2 and "column 'img' not found" in result.stderr
    assert not run.exists()

    run.mkdir(parents=True)
    result = cli("train", "-c", cfg_file)
    assert result.exit_code == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr
    result = cli("train", "-c", cfg_file, "--resume", "latest")
    assert result.exit_code == 2 and "no step-* checkpoint" in result.stderr
    result = cli("train", "-c", cfg_file, "--resume", str(tmp_path))
    assert result.exit_code == 2 and "not a checkpoints/step-NNNNNN folder" in result.stderr
    result = cli("train", "-c", cfg_file, "--resume", "latest", "--overwrite")
    assert result.exit_code == 2
    assert list(run.iterdir()) == []


def test_streamed_data_needs_max_steps(tmp_path, monkeypatch):
    """A dataset without length cannot define epochs; the error comes before any folder is made."""
    from vaedyn_cli import data as data_mod

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.zeros(8, 3, 16, 16))

    monkeypatch.setattr(data_mod, "train_dataset", lambda cfg, seed: Stream())
    cfg = make_cfg(tmp_path, train={"max_steps": None, "num_train_epochs": 1})
    with pytest.raises(VaedynError, match="set train.max_steps"):
        train_mod.train(cfg)
    assert not cfg.run_dir.exists()


def test_epoch_sampler_replays_each_epoch():
    s = randomness.EpochSampler(10, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    s.set_epoch(0)
    assert list(s) == first
    assert list(randomness.EpochSampler(10, seed=4)) != first


def test_config_yaml_is_the_resolved_config(tmp_path):
    cfg = make_cfg(tmp_path, train={"max_steps": 1, "save_interval": 5}, data={"do_validation": False})
    run = train_mod.train(cfg)
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    assert {p.name for p in run.iterdir()} == {"config.yaml", "final", artifacts.MARKER_FILE, artifacts.TRAIN_LOCK_FILE,
                                               artifacts.TRAIN_PID_FILE}


@pytest.mark.parametrize("state", [
    [4, 1, 2],  # not a mapping
    {"global_step": 4, "epoch": 1},  # a count missing
    {"global_step": 4, "epoch": 1, "batch_in_epoch": 2, "extra": 0},  # one too many
    {"global_step": 4, "epoch": 1, "batch_in_epoch": 2.0},  # not a whole number
    {"global_step": 4, "epoch": True, "batch_in_epoch": 2},  # a bool is not a count
    {"global_step": 4, "epoch": 1, "batch_in_epoch": -1},  # negative
])
def test_a_training_state_is_exactly_three_counts(state):
    """TrainState loads exactly {global_step, epoch, batch_in_epoch} as whole non-negative numbers; anything
    else is a damaged checkpoint, named by where it came from, and changes nothing."""
    from vaedyn_cli.trainer import TrainState

    ts = TrainState()
    ts.load_state_dict({"global_step": 4, "epoch": 1, "batch_in_epoch": 2}, "ok.json")
    assert ts.state_dict() == {"global_step": 4, "epoch": 1, "batch_in_epoch": 2}
    with pytest.raises(VaedynError) as err:
        ts.load_state_dict(state, "step-4/training_state.json")
    assert str(err.value) == ("step-4/training_state.json is not a training state (batch_in_epoch, epoch, global_step: "
                              "counts); the checkpoint is damaged: resume from another one")
    assert ts.state_dict() == {"global_step": 4, "epoch": 1, "batch_in_epoch": 2}


def test_missing_or_damaged_random_states_stop_the_resume(tmp_path, hooks):
    """A checkpoint whose random_states_0.pkl is gone, or holds plain data that is not accelerate's
    mapping of generator states, is refused with one message naming it (the run resumes nothing)."""
    cfg = make_cfg(tmp_path, run_name="rng", train={"max_steps": 2, "save_interval": 1})
    run = train_mod.train(cfg)
    step = run / "checkpoints" / "step-000001"

    def assert_refused() -> None:
        with pytest.raises(VaedynError) as err:
            train_mod.train(cfg, resume=str(step))
        assert str(err.value).startswith(f"cannot resume from {step}: random_states_0.pkl is missing or damaged; ")
        assert [s for s, _ in artifacts.list_checkpoints(run)] == [1, 2]

    (step / "random_states_0.pkl").unlink()
    assert_refused()
    torch.save([1, 2, 3], step / "random_states_0.pkl")
    assert_refused()


def test_a_run_resumed_at_its_last_step_only_writes_final_and_a_finished_one_is_refused(tmp_path, hooks):
    """Trained by epochs (no max_steps, so the trainer's own check decides): 8 images in batches of 4
    are 2 steps, checkpointed at step 2. Killed before final/ was written, the resume from step 2
    writes final/ (the checkpoint's weights) and trains no step; with final/ there, it is refused."""
    cfg = make_cfg(tmp_path, run_name="epochs", data={"max_samples": 8},
                   train={"max_steps": None, "num_train_epochs": 1, "save_interval": 2})
    run = train_mod.train(cfg)
    assert [s for s, _ in artifacts.list_checkpoints(run)] == [2]
    step = run / "checkpoints" / "step-000002"
    shutil.rmtree(run / "final")
    steps: list[int] = []
    hooks.append(lambda ctx: SaveSteps(steps))
    assert train_mod.train(cfg, resume=str(step)) == run
    assert_bitwise_equal(weights(run / "final"), weights(step))
    assert steps == [] and [s for s, _ in artifacts.list_checkpoints(run)] == [2]
    with pytest.raises(VaedynError) as err:
        train_mod.train(cfg, resume=str(step))
    assert str(err.value).startswith(f"{step} is at step 2, already at train.max_steps (2); ")
