"""A study's plan: the study file (`StudyFile`, validated like a run config), one resolved run config
per (condition, seed) (`load_study`), and what each run folder still needs (`run_status`).

Statuses: NEW (no folder), RESTART (a folder vaedyn made, killed before its first checkpoint),
RESUME (checkpoints, no final/), EVALUATE (final/, its eval or classification missing), DONE; a
run that was executed ends DONE or FAILED. Read by `vaedyn_cli.study` (the stage) and by the
executors, statistics and report modules.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from vaedyn_cli import artifacts
from vaedyn_cli.config import (
    RunConfig,
    Section,
    apply_overrides,
    config_from_text,
    format_validation_error,
    parse_override,
    read_yaml,
    validate_config,
)
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.selection import parse_select

STUDY_FILE = "study.json"
CONFIGS_DIR = "configs"
LOGS_DIR = "logs"
SLURM_DIR = "slurm"
RESERVED = (CONFIGS_DIR, LOGS_DIR, SLURM_DIR, artifacts.REPORT_DIR)
SET_BY_STUDY = ("seed", "output_dir", "run_name")  # each run's folder and seed come from the study
DEFAULT_ABLATE = ["state=dormant,dead"]
EXECUTORS = ("local", "slurm", "submitit-local")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# run statuses: what a run folder needs (see `run_status`), then the outcome of executing it
NEW, RESTART, RESUME, EVALUATE, DONE, FAILED = "new", "restart", "resume", "evaluate", "done", "failed"
TRAINS = (NEW, RESTART, RESUME)


# ---------------------------------------------------------------------------------------------
# the study file


class SlurmOptions(Section):
    """How `--executor slurm` submits each run (one Slurm job per run, through submitit)."""

    partition: str | None = Field(None, description="Slurm partition (sbatch --partition).")
    account: str | None = Field(None, description="Slurm account (sbatch --account).")
    timeout_min: int = Field(240, ge=1, description="Wall-clock limit of each run's job in minutes.")
    gpus_per_job: int = Field(
        1, ge=0,
        description="GPUs of each run's job; more than 1 trains with `accelerate launch --multi_gpu --num_processes N` "
        "(set data.batch_size per process, see README 'Several GPUs').",
    )
    cpus_per_job: int = Field(8, ge=1, description="CPU cores of each run's job.")
    mem_gb: float | None = Field(None, gt=0, description="Memory of each run's job in GB (empty: the partition's default).")
    additional: dict[str, str | int] = Field(
        default_factory=dict, description="More sbatch options, e.g. {constraint: a100, qos: high}."
    )


class StudyFile(Section):
    """A study: the base config run under each condition with each seed, compared seed by seed."""

    name: str | None = Field(None, description="Study folder name under output_dir (default: the study file's name).")
    base: str = Field(description="The run config every condition starts from; a path relative to the study file.")
    output_dir: str | None = Field(None, description="Root of the study folder (default: the base config's output_dir).")
    overrides: list[str] = Field(
        default_factory=list, description="`--set` overrides applied to every condition, before the condition's own."
    )
    conditions: dict[str, list[str]] = Field(
        description="Condition name -> `--set` overrides of the base config (e.g. `data.dataset_name=builtin:glyphs`, "
        "`nudge.enabled=true`); an empty list runs the base config as it is.",
        min_length=1,
    )
    seeds: int | list[int] = Field(
        description="The seeds every condition runs with: a list of integers, or a count n for seeds 0 .. n-1. "
        "Each run's config gets `seed: k`. With n seeds the exact sign-flip test cannot give p below 2/2^n."
    )
    reference: str = Field(description="The condition every other one is compared with when `comparisons` is empty.")
    comparisons: list[tuple[str, str]] | None = Field(
        None,
        description="[condition, reference] pairs compared seed by seed (default: every condition against `reference`).",
    )
    ablate: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ABLATE),
        description="The causal check: channels mean-ablated by `vaedyn eval --ablate` in each run, against as many "
        "random active ones (syntax of `vaedyn nudge --select`).",
    )
    slurm: SlurmOptions = Field(default_factory=SlurmOptions, description=SlurmOptions.__doc__)

    @field_validator("conditions", mode="before")
    @classmethod
    def _empty_condition(cls, v: Any) -> Any:
        """`name:` with nothing after it (YAML null) is the base config as it is."""
        return {k: [] if sets is None else sets for k, sets in v.items()} if isinstance(v, dict) else v

    @field_validator("conditions")
    @classmethod
    def _condition_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name in v:
            if not _NAME.match(name) or name in RESERVED:
                raise ValueError(
                    f"condition name {name!r} must be a plain folder name (letters, digits, . _ -) other than "
                    f"{', '.join(RESERVED)}"
                )
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, v: int | list[int]) -> int | list[int]:
        seeds = list(range(v)) if isinstance(v, int) else v
        if len(seeds) < 2:
            raise ValueError("a study needs at least 2 seeds to tell a difference from seed noise (3 or more to publish)")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a seed; list each once")
        return v

    @model_validator(mode="after")
    def _names_exist(self) -> StudyFile:
        if self.name is not None and (not _NAME.match(self.name) or self.name in {".", ".."}):
            raise ValueError(f"name {self.name!r} must be a plain folder name")
        if self.reference not in self.conditions:
            raise ValueError(f"reference {self.reference!r} is not a condition (conditions: {', '.join(self.conditions)})")
        seen = set()
        for pair in self.comparisons or []:
            for side in pair:
                if side not in self.conditions:
                    raise ValueError(f"comparison {list(pair)} names {side!r}, which is not a condition "
                                     f"(conditions: {', '.join(self.conditions)})")
            if pair[0] == pair[1] or pair in seen:
                raise ValueError(f"comparison {list(pair)} compares a condition with itself or repeats a pair")
            seen.add(pair)
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The comparisons: the listed ones, else every condition against the reference."""
        if self.comparisons:
            return [tuple(p) for p in self.comparisons]  # type: ignore[misc]
        return [(c, self.reference) for c in self.conditions if c != self.reference]


# ---------------------------------------------------------------------------------------------
# the plan: one resolved config per (condition, seed)


@dataclass
class RunPlan:
    """One (condition, seed) run of a study."""

    condition: str
    seed: int
    cfg: RunConfig
    config_path: Path  # where the resolved config is written (read by `vaedyn train -c`)
    log_path: Path
    status: str = NEW
    error: str | None = None
    job_id: str | None = None

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def key(self) -> str:
        return f"{self.condition}/seed-{self.seed}"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / artifacts.EVAL_DIR / self.cfg.eval.split / artifacts.METRICS_FILE


@dataclass
class Study:
    """A validated study file and its runs (condition-major, seeds in the file's order)."""

    file: Path
    spec: StudyFile
    name: str
    folder: Path
    base_path: Path
    runs: list[RunPlan] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return self.spec.seed_list

    @property
    def ablate(self) -> list[str]:
        return list(self.spec.ablate)

    def runs_of(self, condition: str) -> list[RunPlan]:
        return [r for r in self.runs if r.condition == condition]

    def config_of(self, condition: str) -> RunConfig:
        """The condition's resolved config (of its first seed)."""
        return self.runs_of(condition)[0].cfg


def _check_override_keys(items: list[str], where: str) -> None:
    for item in items:
        try:
            keys, _ = parse_override(item)
        except VaedynError as e:
            raise VaedynError(f"{where}: {e}") from None
        if keys[0] in SET_BY_STUDY:
            raise VaedynError(
                f"{where}: override {item!r} sets {keys[0]}, which the study sets for each run (folder "
                "<output_dir>/<study>/<condition>/seed-<k>, seed from `seeds`); remove it"
            )


def load_study(path: Path | str) -> Study:
    """Read and validate a study file and every run's resolved config; writes nothing."""
    path = Path(path)
    if not path.is_file():
        raise VaedynError(f"study file not found: {path} (see configs/study-quickstart.yaml for an example)")
    data = read_yaml(path)
    try:
        spec = StudyFile.model_validate(data)
    except ValidationError as e:
        raise VaedynError(format_validation_error(e, f"in {path}", StudyFile, "study file")) from None
    try:
        parse_select(spec.ablate)
    except VaedynError as e:
        raise VaedynError(f"study file {path}: ablate: {e}") from None
    base_path = path.parent / spec.base
    if not base_path.is_file():
        raise VaedynError(f"study file {path}: base config {spec.base!r} not found (looked for {base_path}; "
                          "the path is relative to the study file)")
    base = read_yaml(base_path)
    _check_override_keys(spec.overrides, f"study file {path}: overrides")
    name = spec.name or path.stem
    root = Path(spec.output_dir if spec.output_dir is not None else base.get("output_dir", RunConfig().output_dir))
    study = Study(path, spec, name, root / name, base_path)
    for cond, sets in spec.conditions.items():
        _check_override_keys(sets, f"study file {path}: condition {cond!r}")
        merged = apply_overrides(copy.deepcopy(base), [*spec.overrides, *sets])
        shown = " ".join([*spec.overrides, *sets])
        where = f"for condition {cond!r} of {path} (base {base_path}" + (f" with --set {shown})" if shown else ")")
        for seed in spec.seed_list:
            run_data = {**copy.deepcopy(merged), "seed": seed, "output_dir": str(study.folder / cond),
                        "run_name": f"seed-{seed}"}
            cfg = validate_config(run_data, where)
            if not cfg.track.enabled:
                raise VaedynError(f"{where}: track.enabled is false, so no trace to count suppressed channels in; "
                                  "remove the override (a study classifies each run's trace)")
            study.runs.append(RunPlan(cond, seed, cfg, study.folder / CONFIGS_DIR / cond / f"seed-{seed}.yaml",
                                      study.folder / LOGS_DIR / cond / f"seed-{seed}.log"))
    return study


# ---------------------------------------------------------------------------------------------
# what each run folder needs


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key where two config dumps differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in dict.fromkeys([*a, *b]):
            found = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if found:
                return found
        return None
    return None if a == b else f"{prefix[:-1]}: {a!r} in the run, {b!r} in the study"


def _final_step(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / artifacts.FINAL_DIR / artifacts.STEP_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _evaluated(run: RunPlan, ablate: list[str]) -> bool:
    """The final model's eval is there, with the study's ablation, at the final step, and holds every
    metric of today's vaedyn (an older vaedyn's eval, without `psnr_pooled`, is redone)."""
    from vaedyn_cli.metrics import METRICS

    try:
        record = json.loads(run.metrics_path.read_text())
        ablation = record["ablation"]
        return (ablation["select"] == ablate and record["step"] == _final_step(run.run_dir)
                and all(m in record["metrics"] and m in ablation["delta_ablated"] for m in METRICS))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _classified(run: RunPlan) -> bool:
    from vaedyn_cli.store import CLASSIFICATION_GROUP

    return (run.run_dir / artifacts.TRACE_DIR / CLASSIFICATION_GROUP / "zarr.json").is_file()


def run_status(run: RunPlan, ablate: list[str]) -> str:
    """NEW (no folder), RESTART (a folder vaedyn made, killed before its first checkpoint: retrain
    with --overwrite), RESUME (checkpoints, no final/: --resume latest), EVALUATE (final/, eval or
    classification missing) or DONE. A folder vaedyn did not make, or one trained with another
    config, is an error: the study never deletes or mixes it."""
    d = run.run_dir
    if not d.exists():
        return NEW
    stored = d / artifacts.CONFIG_FILE
    if not d.is_dir() or not stored.is_file():
        raise VaedynError(
            f"{d} exists but is not a run folder made by vaedyn (no {artifacts.CONFIG_FILE}); move it away or "
            "choose another study name or output_dir"
        )
    theirs = config_from_text(stored.read_text(), str(stored)).model_dump(mode="json")
    diff = _first_difference(theirs, run.cfg.model_dump(mode="json"))
    if diff:
        raise VaedynError(
            f"run {d} was made with another config ({diff}); restore the study file, or move the run folder away "
            "to train it anew"
        )
    if (d / artifacts.FINAL_DIR).is_dir():
        return DONE if _evaluated(run, ablate) and _classified(run) else EVALUATE
    if artifacts.latest_checkpoint(d) is not None:
        return RESUME
    return RESTART


