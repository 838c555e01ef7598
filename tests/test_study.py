"""`vaedyn study`: a tiny study end to end (2 conditions x 2 seeds), its statistics against a hand
computation from the runs' own metrics.json and classification groups, resume after a run is
killed (SIGKILL inside a step), --jobs 2 subprocesses, --print-commands, submitit's local executor,
and bad study files (one line, exit 2, nothing written)."""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import tiny_config_dict
from tests.test_seedstats import enumerated_p
from vaedyn_cli import artifacts, study, study_exec, study_plan, study_report, study_results
from vaedyn_cli import store as store_mod
from vaedyn_cli.config import RunConfig
from vaedyn_cli.metrics import METRICS

NUDGE = ["nudge.enabled=true", "nudge.every=2", "nudge.factor=1.5", "nudge.max_scale=2"]
SEEDS = [0, 1]


def write_study(root: Path, **fields: Any) -> Path:
    """base.yaml (the tiny config, runs under root/runs) and tiny.yaml (baseline vs nudge, seeds 0 and 1)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "base.yaml").write_text(yaml.safe_dump(tiny_config_dict(root)))
    spec = {"base": "base.yaml", "seeds": SEEDS, "reference": "baseline",
            "conditions": {"baseline": [], "nudge": NUDGE}, **fields}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# the hand computation


def hand_values(run: Path) -> dict[str, Any]:
    """What a run measured, read straight from its metrics.json and its store's classification group."""
    record = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    trace = run / artifacts.TRACE_DIR
    group = store_mod.read_classification(trace)
    part = np.asarray([str(p) for p in store_mod.open_trace(trace)["part"].values])
    state = np.asarray([str(s) for s in group["state"].values])
    traj = np.asarray([str(s) for s in group["trajectory"].values])
    mech = np.asarray([str(s) for s in group["mechanism"].values])
    inactive = (state == "dormant") | (state == "dead")
    counts = {"inactive": inactive.sum(), "inactive_encoder": (inactive & (part == "encoder")).sum(),
              "inactive_decoder": (inactive & (part == "decoder")).sum(), "dead": (state == "dead").sum(),
              "died": (traj == "died").sum(),
              **{m: (inactive & (mech == m)).sum() for m in ("gn_scale", "saturated", "input_collapse", "other")}}
    ab = record["ablation"]
    return {"metrics": record["metrics"], "counts": {k: float(v) for k, v in counts.items()},
            "delta_ablated": ab["delta_ablated"], "delta_control": ab["delta_control"], "n_ablated": ab["n_channels"]}


def expect_interval(entry: dict[str, Any], values: list[float]) -> None:
    """Two seeds: the mean, and the interval is the range of the two values (seedstats' docstring)."""
    assert entry["n"] == 2 and entry["values"] == pytest.approx(values, abs=0)
    assert entry["mean"] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-15)
    assert entry["ci"] == [min(values), max(values)]


def expect_paired(entry: dict[str, Any], cond: list[float], ref: list[float], lower_is_better: bool | None) -> None:
    diffs = [a - b for a, b in zip(cond, ref, strict=True)]
    expect_interval(entry, diffs)
    assert entry["p_value"] == pytest.approx(enumerated_p(diffs))
    lo, hi = min(diffs), max(diffs)
    if lo > 0 or hi < 0:
        if lower_is_better is None:
            want = "more" if lo > 0 else "fewer"
        else:
            want = "better" if (hi < 0) == lower_is_better else "worse"
    else:
        want = "no difference detected (2 seeds)"
    assert entry["verdict"] == want


def check_statistics(doc: dict[str, Any], folder: Path) -> None:
    """study.json's summary and comparison against the hand computation."""
    hand = {c: [hand_values(folder / c / f"seed-{s}") for s in SEEDS] for c in ("baseline", "nudge")}
    lower = {"mse": True, "kl": True, "psnr_pooled": False, "psnr_per_image_mean": False, "ssim": False}
    for c, runs in hand.items():
        s = doc["summary"][c]
        for m in METRICS:
            expect_interval(s["metrics"][m], [r["metrics"][m] for r in runs])
            ab = s["ablation"][m]
            expect_interval(ab["delta_ablated"], [r["delta_ablated"][m] for r in runs])
            expect_interval(ab["delta_control"], [r["delta_control"][m] for r in runs])
        for k in runs[0]["counts"]:
            expect_interval(s["counts"][k], [r["counts"][k] for r in runs])
        # the causal check ablated exactly the channels the classification calls inactive
        assert [r["n_ablated"] for r in runs] == [r["counts"]["inactive"] for r in runs]
    (comp,) = doc["comparison_results"]
    assert (comp["condition"], comp["reference"], comp["same_data"], comp["same_test_set"]) == \
        ("nudge", "baseline", True, True)
    assert comp["differs"] == {"nudge.enabled": [True, False], "nudge.every": [2, 20], "nudge.factor": [1.5, 1.1],
                               "nudge.max_scale": [2, 1.5]}
    for m in METRICS:
        expect_paired(comp["metrics"][m], [r["metrics"][m] for r in hand["nudge"]],
                      [r["metrics"][m] for r in hand["baseline"]], lower[m])
    for k in hand["nudge"][0]["counts"]:
        expect_paired(comp["counts"][k], [r["counts"][k] for r in hand["nudge"]],
                      [r["counts"][k] for r in hand["baseline"]], None)


def statistics_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in ("per_run", "summary", "comparison_results", "answers")}


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.long
def test_tiny_study_end_to_end_resume_and_executors(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "my study"  # a space: every printed path must be quoted
    spec = write_study(root)
    folder = root / "runs" / "tiny"
    monkeypatch.chdir(root)

    res = cli("study", spec)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"{folder / 'report'}\n"
    assert sorted(p.name for p in folder.iterdir()) == ["baseline", "configs", "nudge", "report", "study.json"]
    for c in ("baseline", "nudge"):
        assert sorted(p.name for p in (folder / c).iterdir()) == ["seed-0", "seed-1"]
        for s in SEEDS:
            run = folder / c / f"seed-{s}"
            cfg = yaml.safe_load((run / artifacts.CONFIG_FILE).read_text())
            assert (cfg["seed"], cfg["run_name"], cfg["output_dir"]) == (s, f"seed-{s}", str(folder / c))
            assert (folder / "configs" / c / f"seed-{s}.yaml").read_text() == (run / artifacts.CONFIG_FILE).read_text()
            assert {"final", "trace.zarr", "eval", "checkpoints"} <= {p.name for p in run.iterdir()}
    doc = json.loads((folder / "study.json").read_text())
    assert (doc["study"], doc["seeds"], doc["reference"], doc["comparisons"]) == ("tiny", SEEDS, "baseline",
                                                                                   [["nudge", "baseline"]])
    assert [(r["condition"], r["seed"], r["status"], r["path"]) for r in doc["runs"]] == [
        (c, s, "done", str(folder / c / f"seed-{s}")) for c in ("baseline", "nudge") for s in SEEDS]
    assert doc["method"]["min_p_value"] == 0.5 and doc["method"]["sign_patterns"] == 4
    check_statistics(doc, folder)
    assert [a["question"] for a in doc["answers"]] == [
        "Does suppression depend on the data?", "Does nudging change reconstruction beyond seed noise?",
        "Does ablating the suppressed channels cost more than ablating random active ones?"]
    assert doc["answers"][0]["answer"] == "not tested"  # both conditions train on builtin:natural

    report = folder / "report"
    assert sorted(p.name for p in report.iterdir()) == sorted([*study_report.FIGURES, study_report.INDEX_FILE,
                                                               artifacts.MARKER_FILE])
    page = (report / "index.html").read_text()
    assert "<script" not in page and "http" not in page
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(study_report.FIGURES)
    first = page.index('id="comparisons"')
    for a in doc["answers"]:  # the answers, with their numbers, come before everything else
        assert 0 < page.index(html.escape(a["answer"])) < first
        for d in a["details"]:
            assert page.index(html.escape(d)) < first
    assert "no p-value can be below 0.5" in page[:first]
    assert "which happens by chance with probability 0.5 for each quantity" in page[:first]
    for m in METRICS:  # the relative difference is the mean difference over the reference's mean
        ref = np.mean([hand_values(folder / "baseline" / f"seed-{s}")["metrics"][m] for s in SEEDS])
        assert doc["comparison_results"][0]["metrics"][m]["relative"] == pytest.approx(
            doc["comparison_results"][0]["metrics"][m]["mean"] / ref)

    # an eval written by an older vaedyn (`psnr` only, the per-image mean) is redone, not read
    planned = study_plan.load_study(spec)
    first = planned.runs[0]
    current = first.metrics_path.read_text()
    legacy = json.loads(current)
    for values in (legacy["metrics"], *(legacy["ablation"][k] for k in ("baseline", "delta_ablated"))):
        values["psnr"] = values.pop("psnr_per_image_mean")
        del values["psnr_pooled"]
    first.metrics_path.write_text(json.dumps(legacy))
    assert study_plan.run_status(first, planned.ablate) == study_plan.EVALUATE
    first.metrics_path.write_text(current)
    assert study_plan.run_status(first, planned.ablate) == study_plan.DONE

    # kill one run inside step 5 (its last checkpoint is step 3), as a lost machine would
    killed = folder / "nudge" / "seed-1"
    env = {**os.environ, "VAEDYN_FAULT": "step:5", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "vaedyn_cli", "train", "-c", str(folder / "configs" / "nudge" /
                           "seed-1.yaml"), "--overwrite"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "final").exists() and artifacts.latest_checkpoint(killed).name == "step-000003"

    res = cli("study", spec, "--print-commands")
    assert res.exit_code == 0, res.stderr
    (line,) = res.stdout.splitlines()
    train, ev, cls = line.split(" && ")
    assert shlex.split(train) == ["python", "-m", "vaedyn_cli", "train", "-c",
                                  str(folder / "configs" / "nudge" / "seed-1.yaml"), "--resume", "latest"]
    assert shlex.split(ev) == ["python", "-m", "vaedyn_cli", "eval", "--checkpoint", str(killed),
                               "--ablate", "state=dormant,dead"]
    assert shlex.split(cls) == ["python", "-m", "vaedyn_cli", "classify", str(killed), "--format", "json", ">",
                                "/dev/null"]
    assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0
    marks = {(r["condition"], r["seed"]): r["status"] for r in json.loads((folder / "study.json").read_text())["runs"]}
    assert marks == {("baseline", 0): "done", ("baseline", 1): "done", ("nudge", 0): "done", ("nudge", 1): "resume"}

    # resume it through submitit's local executor: the real submission code, one job (a process of its own),
    # 1 thread like the in-process runs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = cli("study", spec, "--executor", "submitit-local")
    assert res.exit_code == 0, res.stderr
    resumed = json.loads((folder / "study.json").read_text())
    (job,) = [r for r in resumed["runs"] if "job_id" in r]
    assert (job["condition"], job["seed"], job["status"]) == ("nudge", 1, "done")
    assert all(r["status"] == "done" for r in resumed["runs"])
    (job_log,) = (folder / "slurm").rglob(f"{job['job_id']}_*_log.err")
    assert f"resuming {killed} from step 3" in job_log.read_text()
    assert statistics_of(resumed) == statistics_of(doc)  # bit for bit what the uninterrupted study found

    # --jobs 2: the CLI commands as subprocesses (2 cores / 2 jobs: 1 thread), for the run whose eval is gone
    shutil.rmtree(folder / "baseline" / "seed-0" / "eval")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(study_exec, "available_cores", lambda: 2)
    res = cli("study", spec, "--jobs", "2")
    assert res.exit_code == 0, res.stderr
    log_text = (folder / "logs" / "baseline" / "seed-0.log").read_text()
    assert [shlex.split(line[2:]) for line in log_text.splitlines() if line.startswith("$ ")] == [
        [sys.executable, "-m", "vaedyn_cli", "eval", "--checkpoint", str(folder / "baseline" / "seed-0"), "--ablate",
         "state=dormant,dead"],
        [sys.executable, "-m", "vaedyn_cli", "classify", str(folder / "baseline" / "seed-0"), "--format", "json"]]
    assert sorted(p.name for p in (folder / "logs").rglob("*.log")) == ["seed-0.log"]  # the others were skipped
    final = json.loads((folder / "study.json").read_text())
    assert all(r["status"] == "done" for r in final["runs"])
    assert statistics_of(final) == statistics_of(doc)


# ---------------------------------------------------------------------------------------------
# statistics on planted numbers: conditions on different data


def planted_results(study_: study_plan.Study, shift: dict[str, float]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per condition and seed: metrics 1 + seed/10 + shift, counts 10 + 2*seed + 5*shift, ablation
    deltas (ablated 0.2, control 0.1, plus seed/100)."""
    out = {}
    for c in study_.spec.conditions:
        out[c] = {}
        for s in study_.seeds:
            base = 1.0 + s / 10 + shift[c]
            out[c][s] = {
                "metrics": dict.fromkeys(METRICS, base),
                "counts": dict.fromkeys(study_results.SUPPRESSION, 10 + 2 * s + 5 * shift[c]),
                "ablation": {"n_channels": 4, "n_control": 4,
                             "delta_ablated": dict.fromkeys(METRICS, 0.2 + s / 100),
                             "delta_control": dict.fromkeys(METRICS, 0.1 + s / 100)},
                "by_layer": {}, "layers": {}, "step": 6, "num_images": 8, "classification_steps": [2, 6],
            }
    return out


def test_conditions_on_different_data_compare_counts_but_not_reconstruction(tmp_path: Path) -> None:
    spec = write_study(tmp_path, seeds=[0, 1, 2], conditions={
        "natural": [], "glyphs": ["data.dataset_name=builtin:glyphs"], "natural-nudge": NUDGE},
        reference="natural", comparisons=[["glyphs", "natural"], ["natural-nudge", "natural"]])
    s = study_plan.load_study(spec)
    stats = study_results.statistics(s, planted_results(s, {"natural": 0.0, "glyphs": 1.0, "natural-nudge": -0.5}))
    glyphs, nudge = stats["comparison_results"]
    assert (glyphs["same_data"], glyphs["same_test_set"]) == (False, False)
    assert glyphs["differs"] == {"data.dataset_name": ["builtin:glyphs", "builtin:natural"]}
    assert "different test sets" in glyphs["note"]
    for m in METRICS:  # +1 on every seed, but on other images: no verdict
        assert glyphs["metrics"][m]["verdict"] == "not comparable: different test sets"
        assert glyphs["metrics"][m]["mean"] == pytest.approx(1.0) and glyphs["metrics"][m]["p_value"] == 0.25
    assert glyphs["counts"]["inactive"]["verdict"] == "more"
    assert glyphs["counts"]["inactive"]["ci"] == pytest.approx([5.0, 5.0])
    assert nudge["metrics"]["mse"]["verdict"] == "better" and nudge["metrics"]["psnr_pooled"]["verdict"] == "worse"
    assert nudge["metrics"]["psnr_per_image_mean"]["verdict"] == "worse"
    data, nudging, ablation = stats["answers"]
    assert data["answer"].startswith("yes, in 1 of 1 comparisons (with 3 seeds the interval is the seeds' range")
    assert data["details"] == ["glyphs vs natural (data.dataset_name 'builtin:glyphs' vs 'builtin:natural'): more "
                               "inactive channels, difference +5 (95% CI [5, 5], p = 0.25, n = 3)"]
    assert nudging["answer"].startswith("yes, in 1 of 1 comparisons")
    assert "MSE better: -0.5 (95% CI [-0.5, -0.5], p = 0.25, n = 3), -45.45% of the reference" in nudging["details"][0]
    assert nudge["metrics"]["mse"]["relative"] == pytest.approx(-0.5 / 1.1)  # reference mean 1 + (0 + .1 + .2) / 3
    assert ablation["answer"].startswith("yes, in 3 of 3 conditions")  # +0.1 MSE over the control, every seed
    summary = stats["summary"]["glyphs"]["ablation"]["mse"]["ablated_minus_control"]
    assert summary["mean"] == pytest.approx(0.1) and summary["verdict"] == "costs more"


# ---------------------------------------------------------------------------------------------
# files, statuses, environment


def test_shipped_study_file_is_valid() -> None:
    s = study_plan.load_study(Path(__file__).resolve().parent.parent / "configs" / "study-quickstart.yaml")
    assert s.name == "study-quickstart" and s.seeds == [0, 1, 2] and len(s.runs) == 12
    assert s.folder == Path("stores") / "study-quickstart"
    nudged = s.config_of("glyphs-nudge")
    assert nudged.data.dataset_name == "builtin:glyphs" and nudged.nudge.enabled
    assert (nudged.nudge.strategy, nudged.nudge.factor, nudged.nudge.max_scale) == ("gn_scale_nudge", 1.1, 1.5)
    assert nudged.nudge.every % nudged.track.interval == 0
    assert s.spec.pairs == [("natural-nudge", "natural-baseline"), ("glyphs-nudge", "glyphs-baseline"),
                            ("glyphs-baseline", "natural-baseline")]


def test_shipped_hub_study_asks_the_question_of_the_real_model_on_six_seeds() -> None:
    s = study_plan.load_study(Path(__file__).resolve().parent.parent / "configs" / "study-cifar10.yaml")
    assert s.seeds == [0, 1, 2, 3, 4, 5] and len(s.runs) == 12
    base, nudged = s.config_of("baseline"), s.config_of("nudge")
    assert base.model.pretrained == "stabilityai/sdxl-vae" and base.data.dataset_name == "uoft-cs/cifar10"
    assert not base.nudge.enabled and nudged.nudge.enabled and nudged.nudge.every % nudged.track.interval == 0
    assert base.track.layers == ["encoder.conv_in", "*norm*"]  # every GroupNorm, not the original's two
    assert s.spec.pairs == [("nudge", "baseline")]


@pytest.mark.parametrize(("fields", "message"), [
    ({"seed": [0, 1]}, "invalid study file in {spec}: unknown key 'seed' (did you mean 'seeds'?)"),
    ({"seeds": [3]}, "invalid study file in {spec}: seeds: a study needs at least 2 seeds"),
    ({"reference": "nope"}, "invalid study file in {spec}: (root): reference 'nope' is not a condition"),
    ({"comparisons": [["nudge", "other"]]}, "comparison ['nudge', 'other'] names 'other', which is not a condition"),
    ({"conditions": {"baseline": [], "report": []}}, "condition name 'report' must be a plain folder name"),
    ({"conditions": {"baseline": [], "odd": ["nudge.enabled=true", "nudge.every=3"]}},
     "invalid config for condition 'odd' of {spec} (base {base} with --set nudge.enabled=true nudge.every=3): "
     "(root): nudge.every (3) must be a multiple of track.interval (2)"),
    ({"conditions": {"baseline": [], "typo": ["train.max_step=3"]}},
     ("for condition 'typo' of {spec}", "unknown key 'train.max_step' (did you mean 'train.max_steps'?)")),
    ({"conditions": {"baseline": [], "s": ["seed=3"]}}, "condition 's': override 'seed=3' sets seed"),
    ({"base": "missing.yaml"}, "base config 'missing.yaml' not found"),
    ({"ablate": ["colour=red"]}, "study file {spec}: ablate:"),
])
def test_bad_study_file_is_one_line_exit_2_and_nothing_written(cli, tmp_path: Path, fields: dict,
                                                               message: str | tuple[str, ...]) -> None:
    spec = write_study(tmp_path, **fields)
    res = cli("study", spec)
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for part in (message,) if isinstance(message, str) else message:
        assert part.format(spec=spec, base=tmp_path / "base.yaml") in res.stderr
    assert not (tmp_path / "runs").exists()


def test_folders_vaedyn_did_not_make_or_with_another_config_are_refused(cli, tmp_path: Path) -> None:
    spec = write_study(tmp_path)
    s = study_plan.load_study(spec)
    foreign = s.runs[0].run_dir
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (s.folder / "study.json").write_text("{}")
    res = cli("study", spec)
    assert res.exit_code == 2 and "is not a run folder made by vaedyn (no config.yaml)" in res.stderr
    assert (foreign / "notes.txt").read_text() == "mine" and not (s.folder / "configs").exists()
    other = s.runs[0].cfg.model_copy(deep=True)
    other.train.max_steps = 9
    (foreign / artifacts.CONFIG_FILE).write_text(other.to_yaml())
    res = cli("study", spec)
    assert res.exit_code == 2
    assert f"run {foreign} was made with another config (train.max_steps: 9 in the run, 6 in the study)" in res.stderr
    (foreign / artifacts.CONFIG_FILE).write_text(s.runs[0].cfg.to_yaml())
    assert study_plan.run_status(s.runs[0], s.ablate) == study_plan.RESTART  # made by vaedyn, no checkpoint: --overwrite
    assert study_exec.stage_commands(study_plan.RunPlan(**{**vars(s.runs[0]), "status": study_plan.RESTART}), s.ablate)[0][-1] \
        == "--overwrite"


def test_failed_runs_are_recorded_and_exit_1_without_statistics(cli, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-images"
    spec = write_study(tmp_path, conditions={"baseline": [f"data.dataset_name={missing}"]})
    res = cli("study", spec)
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.splitlines()[-1].startswith("error: 2 of 2 runs failed (baseline/seed-0: ")
    assert res.stderr.splitlines()[-1].endswith(f"rerun `vaedyn study {spec}` to continue them (finished runs are kept)")
    doc = json.loads((tmp_path / "runs" / "tiny" / "study.json").read_text())
    assert [r["status"] for r in doc["runs"]] == ["failed"] * 2
    assert all(str(missing) in r["error"] for r in doc["runs"])
    assert "summary" not in doc and not (tmp_path / "runs" / "tiny" / "report").exists()
    assert not (tmp_path / "runs" / "tiny" / "baseline").exists()  # train wrote nothing for a run that never began


def test_a_folder_that_is_not_a_study_is_refused(cli, tmp_path: Path) -> None:
    spec = write_study(tmp_path)
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "data.csv").write_text("1,2\n")
    res = cli("study", spec, "--print-commands")
    assert res.exit_code == 2 and "is not a vaedyn study folder (no study.json)" in res.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv"]


def test_slurm_without_submitit_is_one_line(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write_study(tmp_path)
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    res = cli("study", spec, "--executor", "slurm")
    assert res.exit_code == 2
    assert res.stderr == "error: --executor slurm needs submitit, which is not installed: pip install 'vaedyn[slurm]'\n"
    assert not (tmp_path / "runs").exists()
    assert cli("study", spec, "--jobs", "0").exit_code == 2


def test_a_run_still_in_an_earlier_slurm_job_is_not_submitted_again(cli, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write_study(tmp_path, conditions={"baseline": None, "nudge": NUDGE})  # `baseline:` alone: no overrides
    s = study_plan.load_study(spec)
    assert s.spec.conditions["baseline"] == []
    s.runs[1].job_id = "4242"
    study.write_study_json(s)
    asked = []

    class SlurmJob:  # submitit's, as sacct would answer for a job still running
        def __init__(self, folder: str, job_id: str) -> None:
            asked.append(job_id)
            self.state = "RUNNING"

    monkeypatch.setitem(sys.modules, "submitit", type(sys)("submitit"))
    monkeypatch.setattr(sys.modules["submitit"], "SlurmJob", SlurmJob, raising=False)
    res = cli("study", spec, "--executor", "slurm")
    assert res.exit_code == 2 and asked == ["4242"]
    assert res.stderr == ("error: run baseline/seed-1 is still in Slurm job 4242 (RUNNING) submitted by an earlier "
                          "`vaedyn study`; wait for it to end (or `scancel 4242`), then rerun\n")
    assert not (s.folder / "configs").exists()


def test_jobs_split_the_cores_and_torch_follows(tmp_path: Path) -> None:
    assert study_exec.thread_env(2, cores=2, base={})["OMP_NUM_THREADS"] == "1"
    assert study_exec.thread_env(3, cores=2, base={}) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert study_exec.thread_env(3, cores=16, base={"A": "b"}) == {"A": "b", "OMP_NUM_THREADS": "5",
                                                                  "MKL_NUM_THREADS": "5"}
    env = study_exec.thread_env(2, cores=2)  # torch caps its count at the cores it finds
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1", out.stderr


def test_a_base_model_config_is_built_before_the_runs(cli, tmp_path: Path) -> None:
    """Runs whose model.pretrained is a base run config: --print-commands builds it first (one line);
    once it is built, no such line."""
    spec = write_study(tmp_path)
    base = tiny_config_dict(tmp_path, run_name="base", train={"max_steps": 1, "save_interval": 100},
                            track={"enabled": False}, data={"do_validation": False})
    (tmp_path / "base-model.yaml").write_text(yaml.safe_dump(base))
    tune = yaml.safe_load((tmp_path / "base.yaml").read_text())
    tune["model"] = {"pretrained": str(tmp_path / "base-model.yaml")}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tune))
    res = cli("study", spec, "--print-commands")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"python -m vaedyn_cli train -c {tmp_path / 'base-model.yaml'}"
    assert len(lines) == 1 + 4 and all(" train -c " in line for line in lines[1:])
    from vaedyn_cli import train as train_mod

    train_mod.train(RunConfig.model_validate(base))
    lines = cli("study", spec, "--print-commands").stdout.splitlines()
    assert len(lines) == 4 and "base-model.yaml" not in lines[0]
