"""`vaedyn study STUDY.yaml`: the same experiment over several seeds and conditions, so that a finding
about suppression can be told apart from seed noise.

A study file (`StudyFile`, validated like a run config) names a base config, `conditions` (name ->
`--set` overrides; a dataset is just a condition), `seeds`, a `reference` condition and optional
`comparisons`. Every (condition, seed) is an ordinary run folder,
`<output_dir>/<study>/<condition>/seed-<k>/`, trained by `vaedyn train`, evaluated by `vaedyn eval
--ablate` (the causal check) and classified by `vaedyn classify`. The study folder also holds:

    study.json                      runs (path, status) and, once all are done, the statistics
    configs/<condition>/seed-<k>.yaml   each run's resolved config (what `vaedyn train -c` reads)
    logs/<condition>/seed-<k>.log   stderr of runs executed as subprocesses (--jobs N > 1)
    slurm/                          submitit's job files (--executor slurm)
    report/                         index.html and figures (`vaedyn_cli.study_report`)

Resuming is by inspection of each run folder (`run_status`): finished and evaluated runs are
skipped, killed ones continue with `--resume latest`, and no folder that vaedyn did not make is
ever deleted. The study file and the plan are `vaedyn_cli.study_plan`, executing runs is
`vaedyn_cli.study_exec`, the statistics `vaedyn_cli.study_results`, the page `vaedyn_cli.study_report`.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

from vaedyn_cli import artifacts, study_exec, study_report, study_results, train
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.study_plan import DONE, EXECUTORS, FAILED, STUDY_FILE, TRAINS, Study, load_study, run_status

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# study.json


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_text(path, text)


def runs_json(study: Study) -> list[dict[str, Any]]:
    """study.json's `runs`: where each run is and how it stands."""
    rows = []
    for r in study.runs:
        row: dict[str, Any] = {"condition": r.condition, "seed": r.seed, "path": str(r.run_dir),
                               "config": str(r.config_path), "status": r.status}
        for key, value in (("error", r.error), ("job_id", r.job_id)):
            if value is not None:
                row[key] = value
        rows.append(row)
    return rows


def write_study_json(study: Study, statistics: dict[str, Any] | None = None) -> Path:
    """Write (atomically) study.json: the study, its runs and, when given, the statistics."""
    from vaedyn_cli import __version__

    doc = {
        "schema": "vaedyn.study",
        "schema_version": 1,
        "vaedyn_version": __version__,
        "study": study.name,
        "study_file": str(study.file),
        "base_config": str(study.base_path),
        "folder": str(study.folder),
        "seeds": study.seeds,
        "n_seeds": len(study.seeds),
        "reference": study.spec.reference,
        "comparisons": [list(p) for p in study.spec.pairs],
        "ablate": study.ablate,
        "conditions": {c: {"overrides": [*study.spec.overrides, *sets],
                           "dataset_name": study.config_of(c).data.dataset_name}
                       for c, sets in study.spec.conditions.items()},
        "method": study_results.method_json(len(study.seeds)),
        "runs": runs_json(study),
    }
    if statistics is not None:
        doc.update(statistics)
    path = study.folder / STUDY_FILE
    _atomic_write(path, json.dumps(doc, indent=2) + "\n")
    return path


def _check_folder(study: Study) -> None:
    """The study folder is new, or one that vaedyn study made (it holds study.json)."""
    f = study.folder
    if f.exists() and (not f.is_dir() or (any(f.iterdir()) and not (f / STUDY_FILE).is_file())):
        raise VaedynError(f"{f} exists and is not a vaedyn study folder (no {STUDY_FILE}); choose another study name "
                          "(`name:`) or output_dir")


def _recorded_jobs(study: Study) -> dict[str, str]:
    """Run key -> the job id an earlier `vaedyn study` recorded in study.json (none when unreadable)."""
    try:
        runs = json.loads((study.folder / STUDY_FILE).read_text())["runs"]
        return {f"{r['condition']}/seed-{r['seed']}": str(r["job_id"]) for r in runs if r.get("job_id")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_configs(study: Study) -> None:
    """Each run's resolved config, where `vaedyn train -c` (and a scheduler) reads it."""
    for r in study.runs:
        text = r.cfg.to_yaml()
        if not r.config_path.is_file() or r.config_path.read_text() != text:
            _atomic_write(r.config_path, text)


# ---------------------------------------------------------------------------------------------
# the stage


def _pending_bases(pending: list[Any]) -> dict[str, tuple[Any, str]]:
    """The base run configs (`model.pretrained: BASE.yaml`) of runs that still train and are not
    built yet: source -> (base config, what its folder needs)."""
    found: dict[str, tuple[Any, str]] = {}
    for r in pending:
        if r.status in TRAINS and str(r.cfg.model.pretrained) not in found:
            status = train.base_status(r.cfg)
            if status is not None and status[1] != train.BASE_READY:
                found[str(r.cfg.model.pretrained)] = status
    return found


def run_study(path: Path | str, *, executor: str = "local", jobs: int = 1, print_commands: bool = False) -> str:
    """Run (or resume) a study and write study.json and its report; returns what stdout shows: the
    report folder, or with `print_commands` one shell line per pending run (nothing is executed)."""
    if executor not in EXECUTORS:
        raise VaedynError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise VaedynError(f"--jobs {jobs}: run at least 1 job at a time")
    if executor != "local" and not print_commands:
        study_exec.import_submitit()  # a missing extra is one line, before anything is written
    study = load_study(path)
    _check_folder(study)
    recorded = _recorded_jobs(study)
    for r in study.runs:
        r.status = run_status(r, study.ablate)
        r.job_id = recorded.get(r.key)
    pending = [r for r in study.runs if r.status != DONE]
    if executor == "slurm" and not print_commands:
        study_exec.check_not_in_flight(study, pending)
    write_study_json(study)  # first: a folder with study.json is this study's, whatever else is missing
    write_configs(study)
    bases = _pending_bases(pending)
    if print_commands:
        if not pending:
            log.info("every run of %s is done: `vaedyn study %s` writes the statistics and the report", study.name, path)
        first = [shlex.join(["python", "-m", "vaedyn_cli", "train", "-c", str(source),
                             *train.base_train_flags(base, status)]) for source, (base, status) in bases.items()]
        return "".join(line + "\n" for line in [*first, *(study_exec.shell_line(r, study.ablate) for r in pending)])
    done = len(study.runs) - len(pending)
    log.info("study %s: %d runs, %d done, %d to run (%s)", study.name, len(study.runs), done, len(pending),
             ", ".join(f"{r.key}: {r.status}" for r in pending) or "none")
    for run in {str(r.cfg.model.pretrained): r for r in pending if str(r.cfg.model.pretrained) in bases}.values():
        train.ensure_base_model(run.cfg)  # here, once, before runs in parallel processes would race for it
    if pending:
        study_exec.execute(study, pending, executor=executor, jobs=jobs, on_change=lambda: write_study_json(study))
    failed = [r for r in study.runs if r.status == FAILED]
    write_study_json(study)
    if failed:
        first = failed[0]
        raise RuntimeFailure(
            f"{len(failed)} of {len(study.runs)} runs failed ({first.key}: {first.error}); fix the cause and rerun "
            f"`vaedyn study {path}` to continue them (finished runs are kept)"
        )
    results = study_results.collect(study)
    statistics = study_results.statistics(study, results)
    write_study_json(study, statistics)
    return str(study_report.build(study, statistics, results))
