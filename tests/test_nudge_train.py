"""In-training nudges: events in the store, the trace's reaction, optimizer moments, exact resume;
and the shell pipeline train | classify | nudge | eval through the real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import crash_at, tiny_config_dict
from vaedyn_cli import artifacts, store
from vaedyn_cli import hooks as hooks_mod
from vaedyn_cli import train as train_mod
from vaedyn_cli.classify import classify_store
from vaedyn_cli.config import RunConfig, load_config
from vaedyn_cli.labels import to_records
from vaedyn_cli.randomness import channel_generator
from vaedyn_cli.tracker import make_tracker

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# (layer, channel) -> (gamma, beta) planted at the start of training
PLANTED = {
    ("encoder.down_blocks.1.resnets.0.norm2", 2): (0.0, 0.0),
    ("decoder.up_blocks.0.resnets.0.norm1", 3): (0.05, 0.0),
    ("decoder.up_blocks.2.resnets.1.norm2", 1): (0.0, 0.0),
}


class Plant(hooks_mod.TrainHook):
    """Sets PLANTED gammas and betas before the first step of a fresh run (a resumed run loads them)."""

    def __init__(self, ctx: hooks_mod.TrainContext):
        if ctx.resume_step is not None:
            return
        modules = dict(ctx.accelerator.unwrap_model(ctx.model).named_modules())
        with torch.no_grad():
            for (layer, c), (gamma, beta) in PLANTED.items():
                modules[layer].weight[c] = gamma
                modules[layer].bias[c] = beta


class Moments(hooks_mod.TrainHook):
    """Runs after the nudge: keeps copies of the Adam moments of every GroupNorm gamma at `steps`."""

    def __init__(self, ctx: hooks_mod.TrainContext, steps: set[int]):
        self.steps, self.seen = steps, {}
        self.opt = ctx.optimizer.optimizer
        self.gammas = {n: m.weight for n, m in ctx.accelerator.unwrap_model(ctx.model).named_modules()
                       if isinstance(m, torch.nn.GroupNorm)}

    def end_step(self, step, scalars):
        if step in self.steps:
            self.seen[step] = {n: {k: self.opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
                               for n, p in self.gammas.items()}


def nudge_cfg(tmp_path: Path, name: str, **sections: Any) -> RunConfig:
    """Tracking every step, a nudge every 2 steps (a section's keys merge; another key is set)."""
    base = {"run_name": name, "track": {"interval": 1, "weight_interval": 1},
            "nudge": {"enabled": True, "every": 2, "window": 1}, "train": {"max_steps": 4, "save_interval": 100}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return RunConfig.model_validate(tiny_config_dict(tmp_path, **base))


def events_rows(run: Path) -> list[dict]:
    ev = store.read_events(run / artifacts.TRACE_DIR)
    if ev is None:
        return []
    cols = {k: ev[k].values.tolist() for k in store.EVENT_FIELDS}
    return [{k: cols[k][i] for k in store.EVENT_FIELDS} for i in range(ev.sizes["event"])]


def gn_weight(trace, step: int, layer: str, c: int) -> float:
    at = np.flatnonzero((trace["layer"].values == layer) & (trace["channel_index"].values == c))[0]
    return float(trace["gn_weight"].sel(step=step).values[at])


def test_original_rule_nudges_under_the_mean_abs_threshold(tmp_path, hooks) -> None:
    """configs/cifar10_nudge_all.yaml's classify and nudge sections (the original's rule and nudge on
    every GroupNorm; window 1), every 2 steps: each nudge touches exactly the channels whose mean
    |output| is under 0.2 at that step, gamma <- min(1.1 gamma, 1.5); the next tracked step shows the
    new gamma; the Adam moments of those slices are kept, as the original kept them."""
    original = load_config(CONFIGS / "cifar10_nudge_all.yaml")
    assert (original.nudge.window, original.classify.method, original.classify.threshold) == (1, "mean_abs_threshold", 0.2)
    assert (original.nudge.strategy, original.nudge.factor, original.nudge.max_scale) == ("gn_scale_nudge", 1.1, 1.5)
    assert original.nudge.reset_optimizer_state is False
    cfg = nudge_cfg(tmp_path, "original", classify=original.classify.model_dump(),
                    nudge={**original.nudge.model_dump(), "every": 2}, log={"report_to": "tensorboard"})
    seen: list[Moments] = []
    hooks.append(Plant)
    hooks.append(lambda ctx: seen.append(Moments(ctx, {2, 4})) or seen[-1])
    run = train_mod.train(cfg)
    trace = store.open_trace(run / artifacts.TRACE_DIR)
    rows = events_rows(run)
    assert rows and {r["step"] for r in rows} == {2, 4}
    for step in (2, 4):
        at = trace["mean_abs"].sel(step=step).values < 0.2
        under = set(zip(trace["layer"].values[at].tolist(), trace["channel_index"].values[at].tolist(), strict=True))
        nudged = {(r["layer"], r["channel_index"]) for r in rows if r["step"] == step}
        assert nudged == under and set(PLANTED) <= under
        for r in (r for r in rows if r["step"] == step):
            assert r["strategy"] == "gn_scale_nudge" and r["param"] == f"{r['layer']}.weight"
            assert r["after"] == pytest.approx(min(r["before"] * 1.1, 1.5), rel=1e-6)
            if step < 4:  # the next tracked step starts from the nudged gamma
                assert gn_weight(trace, step + 1, r["layer"], r["channel_index"]) == pytest.approx(r["after"], abs=0)
            moments = seen[0].seen[step][r["layer"]]
            assert moments["exp_avg_sq"][r["channel_index"]] > 0  # kept, not zeroed
    # the gentle nudge is a product: a gamma planted at 0 (moved ~lr by Adam) stays under the threshold
    zero = [r for r in rows if (r["layer"], r["channel_index"]) == ("decoder.up_blocks.2.resnets.1.norm2", 1)]
    assert [r["step"] for r in zero] == [2, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / artifacts.LOGS_DIR))
    acc.Reload()
    n_targets = [(e.step, e.value) for e in acc.Scalars("nudge/n_targets")]
    assert n_targets == [(s, float(sum(r["step"] == s for r in rows))) for s in (2, 4)]
    assert [(e.step, e.value) for e in acc.Scalars("nudge/n_events")] == n_targets  # one slice per channel


def test_planted_gn_scale_channels_are_reset_and_wake_up(tmp_path, hooks) -> None:
    """gn_scale_reset on mechanism=gn_scale: events at the nudge step, gamma 1 in the trace right
    after, and the channels classify as active from then on."""
    cfg = nudge_cfg(tmp_path, "reset", nudge={"strategy": "gn_scale_reset", "select": ["mechanism=gn_scale"]})
    assert cfg.nudge.reset_optimizer_state is True  # the default
    seen: list[Moments] = []
    hooks.append(Plant)
    hooks.append(lambda ctx: seen.append(Moments(ctx, {2})) or seen[-1])
    run = train_mod.train(cfg)
    rows = events_rows(run)
    assert sorted((r["step"], r["layer"], r["channel_index"]) for r in rows) == sorted(
        (2, layer, c) for layer, c in PLANTED)
    # the nudge zeroed the Adam moments of exactly the nudged gammas (of the optimizer being trained)
    for layer, moments in seen[0].seen[2].items():
        nudged = [c for (name, c) in PLANTED if name == layer]
        assert (moments["exp_avg"][nudged] == 0).all() and (moments["exp_avg_sq"][nudged] == 0).all(), layer
        assert (np.delete(moments["exp_avg_sq"].numpy(), nudged) > 0).all(), layer
    assert all(r["param"] == f"{r['layer']}.weight" and r["after"] == 1.0 for r in rows)
    trace = store.open_trace(run / artifacts.TRACE_DIR)
    for r in rows:
        planted = PLANTED[r["layer"], r["channel_index"]][0]
        assert gn_weight(trace, 2, r["layer"], r["channel_index"]) == pytest.approx(planted, abs=2e-3)  # one update
        assert gn_weight(trace, 3, r["layer"], r["channel_index"]) == 1.0
    before = {(r["layer"], r["channel_index"]): r for r in to_records(classify_store(run, to_step=2, write=False))}
    after = {(r["layer"], r["channel_index"]): r for r in to_records(classify_store(run, from_step=3, write=False))}
    for key in PLANTED:
        assert before[key]["state"] in ("dormant", "dead") and before[key]["mechanism"] == "gn_scale"
        assert after[key]["state"] == "active"


def test_resume_after_a_nudge_is_bitwise_identical(tmp_path, hooks) -> None:
    """A random strategy (shrink_perturb) with a 2-step window, nudges at 2, 4, 6; a crash at step 5
    and a resume from the step-3 checkpoint (its first nudge reads step 3 back from the store) end
    with the same weights, the same events and the same trace as an uninterrupted run."""
    sections = {"nudge": {"strategy": "shrink_perturb", "window": 2, "perturb_std": 0.05},
                "train": {"max_steps": 6, "save_interval": 3}, "seed": 7}
    hooks.append(Plant)
    ref = train_mod.train(nudge_cfg(tmp_path, "ref", **sections))
    ref_rows = events_rows(ref)
    assert {r["step"] for r in ref_rows} == {2, 4, 6}
    # each gamma's draw is the first of its generator, seeded by (run seed, nudge step, layer, channel)
    seed = nudge_cfg(tmp_path, "ref", **sections).seed
    assert seed == 7  # not apply()'s default
    for r in (r for r in ref_rows if r["param"] == f"{r['layer']}.weight"):
        draw = torch.randn((), dtype=torch.float32, generator=channel_generator(seed, r["step"], r["layer"],
                                                                                r["channel_index"]))
        assert r["after"] == pytest.approx(float(np.float32(0.8 * r["before"] + 0.05 * float(draw))), rel=1e-6)

    cfg = nudge_cfg(tmp_path, "crashed", **sections)
    hooks.append(crash_at(5, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg)
    hooks.pop()
    assert [s for s, _ in artifacts.list_checkpoints(cfg.run_dir)] == [3]
    assert {r["step"] for r in events_rows(cfg.run_dir)} == {2, 4}
    train_mod.train(cfg, resume="latest")

    a = load_file(str(ref / artifacts.FINAL_DIR / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(cfg.run_dir / artifacts.FINAL_DIR / "diffusion_pytorch_model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert events_rows(cfg.run_dir) == ref_rows
    ta, tb = store.open_trace(ref / artifacts.TRACE_DIR), store.open_trace(cfg.run_dir / artifacts.TRACE_DIR)
    assert ta["step"].values.tolist() == tb["step"].values.tolist() == [1, 2, 3, 4, 5, 6]
    for name in ("gn_weight", "gn_bias", "std", "mean_abs"):
        np.testing.assert_array_equal(ta[name].values, tb[name].values, err_msg=name)


def test_nudge_needs_the_tracker(tmp_path, hooks) -> None:
    from vaedyn_cli.errors import VaedynError

    with pytest.raises(Exception, match="track.enabled"):
        nudge_cfg(tmp_path, "x", track={"enabled": False})
    cfg = nudge_cfg(tmp_path, "no-tracker")
    hooks.remove(make_tracker)
    with pytest.raises(VaedynError, match="track.enabled"):
        train_mod.train(cfg)
    assert not cfg.run_dir.exists()


def _console() -> list[str]:
    exe = shutil.which("vaedyn") or str(Path(sys.executable).with_name("vaedyn"))
    return [exe] if Path(exe).is_file() else [sys.executable, "-m", "vaedyn_cli"]


@pytest.mark.other_processes
@pytest.mark.long
def test_shell_pipeline_train_classify_nudge_eval(tmp_path) -> None:
    cfg = tiny_config_dict(tmp_path, train={"max_steps": 2, "save_interval": 100, "validation_interval": 100},
                           track={"interval": 1}, eval={"num_samples_to_save": 0})
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run = Path(cfg["output_dir"]) / cfg["run_name"]
    vaedyn = " ".join(_console())
    script = (
        f"{vaedyn} train -c {cfg_file} | {vaedyn} classify - "
        f"| {vaedyn} nudge --checkpoint {run} --targets - --strategy gn_scale_reset "
        f"| xargs {vaedyn} eval --checkpoint"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {script}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nudged = run / "nudged-gn_scale_reset"
    metrics = run / artifacts.EVAL_DIR / nudged.name / "test" / artifacts.METRICS_FILE
    assert proc.stdout == f"{metrics}\n"
    record = json.loads(metrics.read_text())
    assert record["checkpoint"] == str(nudged) and record["step"] == 2
    nudge = json.loads((nudged / artifacts.NUDGE_FILE).read_text())
    assert nudge["classification"]["store"] == str(run / artifacts.TRACE_DIR) and nudge["classification"]["steps"] == [1, 2]
    assert nudge["n_targets"] == len(nudge["events"]) > 0
