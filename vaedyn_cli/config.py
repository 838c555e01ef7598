"""The one config every stage reads: pydantic models, YAML loading and `--set` overrides.

Every field carries a description; the descriptions flow into `--help`, into the JSON Schema
in `schemas/` and into the comments of `vaedyn config show --comments`. Unknown keys are errors
with a "did you mean" suggestion; checks across fields live in validators.
"""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from vaedyn_cli import artifacts, inputs
from vaedyn_cli.errors import VaedynError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "vaedyn.schema.json"
SCHEMA_FILE_NAME = "vaedyn.schema.json"


MAX_SEED = 2**32 - 1  # numpy's (and so accelerate's set_seed) largest seed
MAX_NAME_BYTES = 200  # a run folder name, leaving room within the usual 255-byte limit for `.NAME.tmp-TAG`


def _numeric(annotation: Any) -> bool:
    """Whether a field takes numbers (int, float, or either or None), not booleans."""
    args = typing.get_args(annotation) or (annotation,)
    return bool({int, float} & set(args)) and bool not in args


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected, assignments re-validated, and numbers
    are numbers: no infinities or NaN, and no `true` where a count or rate goes (pydantic would read
    it as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _numeric(field.annotation):
            raise ValueError("expected a number, not a boolean")
        return value


class ModelConfig(Section):
    """Which VAE to train or analyse: a preset architecture built from a seed, or pretrained weights."""

    architecture: Literal["sdxl"] = Field(
        "sdxl",
        description="Preset architecture built from the seed when `pretrained` is empty. "
        "`sdxl`: the SDXL VAE (block channels 128/256/512/512, 2 layers per block, 32 norm groups, "
        "4 latent channels, SiLU, scaling factor 0.13025).",
    )
    width: float = Field(
        1.0,
        gt=0,
        le=4,
        description="Width multiplier of the preset: scales every block's channels and the number of "
        "norm groups together (0.25 gives 32/64/128/128 channels in 8 groups).",
    )
    pretrained: str | None = Field(
        None,
        description="Pretrained weights instead of a preset: a hub id (e.g. `stabilityai/sdxl-vae`), "
        "a local diffusers folder, a single `.safetensors` file, or a vaedyn run config (`.yaml`): the final "
        "model of that run, which `vaedyn train` builds first when it is missing and reuses after (e.g. "
        "`configs/quickstart-base.yaml`).",
    )
    subfolder: str | None = Field(
        None, description="Subfolder of a hub repo or local folder holding the VAE (e.g. `vae`)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `pretrained`.")

    @model_validator(mode="after")
    def _width_makes_whole_channels(self) -> ModelConfig:
        if self.pretrained is None:
            groups = 32 * self.width
            if abs(groups - round(groups)) > 1e-9 or round(groups) < 1:
                raise ValueError(
                    f"width {self.width} gives {groups:g} norm groups; choose a width that makes "
                    "32*width a whole number (e.g. 0.25, 0.5, 1)"
                )
        elif self.width != 1.0:
            raise ValueError("width applies only to presets; remove it or remove `pretrained`")
        return self


class DataConfig(Section):
    """Where images come from and how they are prepared (resize the shorter side, center crop, [-1, 1])."""

    dataset_name: str = Field(
        "builtin:natural",
        description="Image source: `builtin:natural` or `builtin:glyphs` (no network), a hub dataset id "
        "(e.g. `uoft-cs/cifar10`), a local image folder, a parquet file or folder, or a `save_to_disk` folder.",
    )
    dataset_config_name: str | None = Field(
        None, description="Hub dataset configuration (e.g. `320px` for `frgfm/imagenette`)."
    )
    image_column: str = Field("image", description="Column holding the images (`img` for CIFAR-10).")
    train_split_name: str = Field("train", description="Split used for training.")
    resolution: int = Field(
        32, ge=8, le=4096, description="Side of the square training images in pixels (a multiple of 8)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training images.")
    random_flip: bool = Field(False, description="Randomly flip training images horizontally.")
    streaming: bool = Field(False, description="Stream a hub dataset instead of downloading it whole.")
    batch_size: int = Field(8, ge=1, description="Training batch size per process.")
    num_workers: int = Field(0, ge=0, description="Data loader worker processes.")
    do_validation: bool = Field(True, description="Run validation during training.")
    validation_split_name: str = Field(
        "validation", description="Split used for validation (and as the default probe set)."
    )
    validation_max_samples: int | None = Field(
        100, ge=1, description="Use at most this many validation images."
    )
    validation_batch_size: int = Field(8, ge=1, description="Validation batch size.")
    on_bad_image: Literal["error", "skip"] = Field(
        "error",
        description="An image that cannot be read: stop with an error naming it (`error`), or leave it out, "
        "counted and logged (`skip`: a local folder's unreadable files are dropped before training starts; one "
        "that fails later is replaced by the next readable image of the split).",
    )

    @model_validator(mode="after")
    def _resolution_multiple_of_8(self) -> DataConfig:
        if self.resolution % 8:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of 8 (the VAE downsamples 8x); "
                f"try {max(8, self.resolution // 8 * 8)}"
            )
        return self


class TrainConfig(Section):
    """The optimisation: AdamW, a diffusers LR schedule, MSE + kl_weight * KL."""

    num_train_epochs: int | None = Field(None, ge=1, description="Epochs to train (ignored when max_steps is set).")
    max_steps: int | None = Field(300, ge=1, description="Optimizer steps to train; takes precedence over epochs.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field("linear", description="diffusers `get_scheduler` name.")
    lr_warmup_steps: int = Field(100, ge=0, description="Warmup steps of the LR schedule.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="accelerate mixed precision. The SDXL VAE overflows in fp16; prefer bf16 or no."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (empty: no clipping).")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term in the loss.")
    validation_interval: int = Field(1, ge=1, description="Validate every this many validation units.")
    validation_unit: Literal["epoch", "step"] = Field("epoch", description="Unit of validation_interval.")
    save_interval: int = Field(500, ge=1, description="Save an accelerate checkpoint every this many steps.")
    checkpoints_total_limit: int | None = Field(
        None, ge=1, description="Keep at most this many step checkpoints (oldest deleted first)."
    )
    on_nonfinite: Literal["error", "skip"] = Field(
        "error", description="On a non-finite loss: stop with an error naming the step, or skip the step."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the VAE blocks.")

    @model_validator(mode="after")
    def _some_length(self) -> TrainConfig:
        if self.max_steps is None and self.num_train_epochs is None:
            raise ValueError("set train.max_steps or train.num_train_epochs")
        return self


class NearZeroConfig(Section):
    """The near-zero ("dead") weight tracker: share of near-zero entries per parameter tensor."""

    enabled: bool = Field(True, description="Record `near_zero_frac` per parameter tensor.")
    params: Literal["all", "weights"] = Field(
        "all",
        description="Which tensors: `all`: every parameter of the model (weights and biases of convs, linears and "
        "norms: 248 tensors in the SDXL VAE, as the original project tracked); `weights`: conv/linear weights only "
        "(72 in the SDXL VAE; vaedyn's choice before schema version 2).",
    )
    mode: Literal["absolute", "percent_of_mean", "both"] = Field(
        "absolute",
        description="`absolute`: |w| < abs_threshold; `percent_of_mean`: |w| < rel_threshold * m, m = mean |w| of "
        "the tensor, except that a tensor with m < 1e-9 (numerically zero, e.g. all zeros) counts its entries with "
        "|w| < 1e-9; `both`: both tests hold (AND). Comparisons are strict, in the tensor's precision.",
    )
    abs_threshold: float = Field(1e-5, gt=0, description="Absolute threshold of `absolute` and `both` modes.")
    rel_threshold: float = Field(
        0.01, gt=0, description="Fraction of the tensor's mean |w| in `percent_of_mean` and `both` modes."
    )


class TrackConfig(Section):
    """Per-channel activity probes written to the trace store."""

    enabled: bool = Field(True, description="Record per-channel statistics while training.")
    interval: int = Field(10, ge=1, description="Track every this many optimizer steps.")
    layers: list[str] = Field(
        default_factory=lambda: ["*"], description="Glob patterns on module names selecting the layers to track."
    )
    module_types: list[str] = Field(
        default_factory=lambda: ["GroupNorm"],
        description="Class names of the modules to track among those track.layers matches (any module whose "
        "captured tensor has a fixed channel count: GroupNorm, Conv2d, Linear, ResnetBlock2D, ...).",
    )
    capture: Literal["output", "input"] = Field(
        "output",
        description="Which tensor of each tracked module is measured: its output (a norm's y, a conv's feature "
        "maps; then in_std is the norm's input std and act_* describe the activation after it) or its input.",
    )
    source: Literal["batch", "probe"] = Field(
        "batch",
        description="`batch`: statistics of the tracked step's training batch (no extra forward); "
        "`probe`: a fixed probe batch in eval mode, no grad.",
    )
    pooling: Literal["step", "interval"] = Field(
        "step",
        description="`step`: a tracked step k records the forwards of step k (all its micro-batches); `interval`: "
        "every forward of steps k-interval+1 .. k, pooled on the device (the original project's hooks averaged "
        "every forward since the previous read). Costs about as much as tracking every step (source batch only).",
    )
    pool_validation: bool = Field(
        False,
        description="With pooling interval: also pool the validation forwards run since the previous tracked step "
        "(the original project's did: at epoch ends they outnumbered the training forwards). Off: a tracked step "
        "describes training forwards only.",
    )
    extra_statistics: list[Literal["act_mean_abs", "in_weight_grad"]] = Field(
        default_factory=list,
        description="Statistics recorded besides the default set, each a pass per tracked step: `act_mean_abs` "
        "(mean |act(y)|, for classify methods redo and cbp), `in_weight_grad` (mean |grad| of each channel's "
        "incoming filter, for grama_filter).",
    )
    probe_samples: int = Field(16, ge=1, description="Images in the probe set (`track` command and source=probe).")
    probe_split: str | None = Field(None, description="Split of the probe set (default: the validation split).")
    gradients: bool = Field(True, description="Record |grad gamma| on tracked training steps.")
    weight_interval: int = Field(
        100,
        ge=1,
        description="Record the weight statistics (out_weight_norm, near_zero_frac) on one tracked training step "
        "per this many optimizer steps: the first tracked step, then the first tracked step of each following "
        "window of this length (at most track.interval: every tracked step; NaN on the steps in between). They "
        "are passes over all weights (about 0.2 s on CPU at width 1), and weights change slowly.",
    )
    near_zero: NearZeroConfig = Field(default_factory=NearZeroConfig, description="Near-zero weight tracker.")
    queue_size: int = Field(8, ge=1, description="Tracked steps buffered for the background writer.")
    chunk_steps: int = Field(64, ge=1, description="Zarr chunk length along `step`.")
    commit_interval_s: float = Field(
        60.0,
        ge=0,
        description="Seconds after which recorded steps are committed to the store while a chunk is still "
        "filling: a live reader sees the trace at most this old (checkpoints and the end of training commit "
        "at once). Each such commit rewrites the open chunk of every variable (about 0.2 s of CPU at width 1).",
    )

    @model_validator(mode="after")
    def _pooling_fits(self) -> TrackConfig:
        if self.pooling == "interval" and self.source != "batch":
            raise ValueError("track.pooling interval pools training forwards: it needs track.source batch")
        if self.pool_validation and self.pooling != "interval":
            raise ValueError("track.pool_validation needs track.pooling interval")
        return self


class ClassifyConfig(Section):
    """How channels are labelled from a trace (docs/design.md: activity, state, trajectory, mechanism)."""

    method: Literal["dormancy", "mean_abs_threshold", "redo", "grama", "grama_filter", "cbp"] = Field(
        "dormancy",
        description="`dormancy`: std of the activation / its layer's mean; `mean_abs_threshold`: the original "
        "project's rule, mean |output| < threshold; `redo` (Sokar et al. 2023): mean |activation| / its layer's mean; "
        "`grama` (Liu et al. 2025): |grad gamma| / its layer's mean; `grama_filter`: the same with the incoming "
        "filter's mean |grad|; `cbp` (Dohare et al. 2024): mean |activation| x L1 norm of the outgoing weights / "
        "its layer's mean. Relative scores are dormant at <= tau (see vaedyn_cli/classification.py).",
    )
    tau: float = Field(0.1, ge=0, description="Dormant when a relative method's score is at most tau.")
    dead_threshold: float = Field(1e-6, ge=0, description="Dead when activity is at most this, in absolute terms.")
    threshold: float = Field(0.2, ge=0, description="Threshold of `mean_abs_threshold` on mean |output|.")
    min_persist: int = Field(
        3, ge=1, description="A change of state counts only when it holds this many consecutive tracked steps."
    )
    gn_scale_ratio: float = Field(
        0.1, ge=0, description="Mechanism gn_scale: |gamma| at most this times the median |gamma| of its layer."
    )
    saturation_margin: float = Field(
        2.0, ge=0, description="Mechanism saturated: mean + margin * std of the norm output stays below -margin."
    )
    input_collapse_ratio: float = Field(
        0.1, ge=0, description="input_collapsed: in_std at most this times the mean in_std of its group."
    )
    unused_ratio: float = Field(
        0.01, ge=0, description="unused: out_weight_norm at most this times the mean of its layer."
    )
    chunk_steps: int = Field(1024, ge=1, description="Steps read at a time (bounds memory).")


class NudgeConfig(Section):
    """Interventions that wake inactive channels, offline or every N steps of training."""

    enabled: bool = Field(False, description="Nudge during training.")
    strategy: Literal["gn_scale_nudge", "gn_scale_reset", "gn_scale_to_layer", "redo", "shrink_perturb"] = Field(
        "gn_scale_nudge", description="Intervention applied to each target channel."
    )
    every: int = Field(20, ge=1, description="Nudge every this many optimizer steps (the original intervention_interval).")
    window: int = Field(1, ge=1, description="Recent tracked steps classified before each in-training nudge.")
    select: list[str] = Field(
        default_factory=lambda: ["state=dormant,dead"],
        description="Target filters over classification fields, all must match (e.g. `mechanism=gn_scale`, "
        "`layer=decoder.*`); `a,b` matches either value, globs allowed, `field!=v` excludes.",
    )
    max_fraction: float = Field(1.0, gt=0, le=1, description="Touch at most this fraction of each layer's channels.")
    factor: float = Field(1.1, gt=0, description="gn_scale_nudge: gamma <- min(gamma * factor, max_scale).")
    max_scale: float = Field(1.5, gt=0, description="gn_scale_nudge: cap on the nudged gamma.")
    shrink: float = Field(0.8, ge=0, le=1, description="shrink_perturb: lambda multiplying the parameters.")
    perturb_std: float = Field(0.01, ge=0, description="shrink_perturb: sigma of the added Gaussian noise.")
    reset_optimizer_state: bool = Field(
        True, description="Zero the Adam moments of touched slices after an in-training nudge."
    )


class EvalConfig(Section):
    """Reconstruction evaluation (MSE, KL, PSNR, SSIM), samples and ablations."""

    split: str = Field("test", description="Split to evaluate.")
    batch_size: int = Field(8, ge=1, description="Evaluation batch size.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate at most this many images.")
    num_samples_to_save: int = Field(10, ge=0, description="Original/reconstruction pairs saved as PNG.")
    grid_samples: int = Field(2, ge=1, description="Images shown in activation grids.")
    grid_scale: Literal["layer", "tile"] = Field(
        "layer", description="Grey scale of activation-grid tiles: `layer`, one range for the whole layer (a quiet "
        "channel looks flat); `tile`, each tile its own range (the original Figure 2)."
    )


class LogConfig(Section):
    """Where training scalars go."""

    log_interval: int = Field(10, ge=1, description="Log training scalars every this many steps.")
    report_to: Literal["tensorboard", "wandb", "all", "none"] = Field(
        "tensorboard", description="accelerate trackers: tensorboard (under logs/), wandb, all or none."
    )
    wandb_entity: str | None = Field(None, description="wandb entity (team or user).")
    wandb_project: str = Field("vaedyn", description="wandb project.")


class RunConfig(Section):
    """A vaedyn experiment: one file read by every stage."""

    run_name: str = Field("quickstart", min_length=1, description="Name of the run folder under output_dir.")
    output_dir: str = Field("stores", description="Root folder of run folders.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of model init, data order, crops and controls.")
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    track: TrackConfig = Field(default_factory=TrackConfig, description=TrackConfig.__doc__)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig, description=ClassifyConfig.__doc__)
    nudge: NudgeConfig = Field(default_factory=NudgeConfig, description=NudgeConfig.__doc__)
    eval: EvalConfig = Field(default_factory=EvalConfig, description=EvalConfig.__doc__)
    log: LogConfig = Field(default_factory=LogConfig, description=LogConfig.__doc__)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        _check_path_text("run_name", self.run_name)
        _check_path_text("output_dir", self.output_dir)
        if "/" in self.run_name or "\\" in self.run_name or self.run_name in {".", ".."}:
            raise ValueError(f"run_name {self.run_name!r} must be a plain folder name")
        if len(self.run_name.encode()) > MAX_NAME_BYTES:
            raise ValueError(
                f"run_name is {len(self.run_name.encode())} bytes long; folder names hold at most {MAX_NAME_BYTES} here"
            )
        if self.nudge.enabled and not self.track.enabled:
            raise ValueError("nudge.enabled needs track.enabled: in-training nudges classify the live trace")
        if self.nudge.enabled and self.nudge.every % self.track.interval:
            raise ValueError(
                f"nudge.every ({self.nudge.every}) must be a multiple of track.interval ({self.track.interval}) "
                "so that each nudge sees a fresh tracked step"
            )
        return self

    @property
    def run_dir(self) -> Path:
        """`<output_dir>/<run_name>`, with a leading `~` in output_dir meaning the home folder (as in a shell)."""
        return Path(self.output_dir).expanduser() / self.run_name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=False)


def _check_path_text(name: str, value: str) -> None:
    """No NUL byte or other control character in a name that becomes part of a path."""
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"{name} contains the control character {bad!r}; use a plain folder name")


# ---------------------------------------------------------------------------------------------
# resuming with other settings

# What a resumed run may set differently from the checkpoint it continues (README "Resuming"):
# settings that do not change what the optimizer does to the weights (how long, how often it saves,
# validates, logs and commits; where the run lives), and the offline sections. They are applied and
# recorded (the run's resumes.jsonl; config.yaml says what the run does from then on). Every other
# field is fixed by the checkpoint: model, data pipeline, batch size, optimizer and LR schedule, KL
# weight, accumulation, precision, clipping, seed, what is tracked. A section name covers the section.
RESUME_MAY_CHANGE: frozenset[str] = frozenset({
    "run_name", "output_dir",
    "train.max_steps", "train.num_train_epochs", "train.save_interval", "train.checkpoints_total_limit",
    "train.validation_interval", "train.validation_unit", "train.on_nonfinite", "train.gradient_checkpointing",
    "data.num_workers", "data.do_validation", "data.validation_batch_size", "data.on_bad_image",
    "track.queue_size", "track.chunk_steps", "track.commit_interval_s",
    "eval", "log",
})
# ... and these too while the run does not nudge during training (when it does, they pick the channels it nudges).
RESUME_MAY_CHANGE_WITHOUT_NUDGE: frozenset[str] = frozenset({
    "classify", "nudge.strategy", "nudge.every", "nudge.window", "nudge.select", "nudge.max_fraction",
    "nudge.factor", "nudge.max_scale", "nudge.shrink", "nudge.perturb_std", "nudge.reset_optimizer_state",
})


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as `section.key` -> value (lists and scalars are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return {k.removesuffix("."): v for k, v in flat.items()}


def resume_changes(stored: RunConfig, given: RunConfig) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """The fields in which `given` differs from the config a checkpoint was trained with, as
    (refused, allowed): `{field: (stored, given)}` by the rule tables above."""
    old, new = flatten(stored.model_dump(mode="json")), flatten(given.model_dump(mode="json"))
    nudging = stored.nudge.enabled or given.nudge.enabled

    def covered(key: str, table: frozenset[str]) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in table for i in range(1, len(parts) + 1))

    refused, allowed = {}, {}
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key):
            continue
        free = covered(key, RESUME_MAY_CHANGE) or (not nudging and covered(key, RESUME_MAY_CHANGE_WITHOUT_NUDGE))
        (allowed if free else refused)[key] = (old.get(key), new.get(key))
    return refused, allowed


# ---------------------------------------------------------------------------------------------
# loading


def _field_names(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Valid keys at a dotted location of the config, for "did you mean" suggestions."""
    current: Any = model
    for part in path:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            current = ann
        else:
            return []
    return list(current.model_fields)


def format_validation_error(
    err: ValidationError, where: str, model: type[BaseModel] | None = None, what: str = "config"
) -> str:
    """One line for all problems of a config (or of another file or section validated by `model`,
    named `what`): location, problem, fix."""
    parts = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "(root)"
        if e["type"] == "extra_forbidden":
            known = _field_names(model or RunConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
            valid = f"; valid keys: {', '.join(known)}" if not close and known else ""
            parts.append(f"unknown key '{dotted}'{hint}{valid}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) or got is None else f" (got {inputs.shorten(repr(got))})"
            parts.append(f"{dotted}: {msg}{shown}")
    head = f"invalid {what} {where}" if where else f"invalid {what}"
    return f"{head}: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (["train", "learning_rate"], 1e-4); values are YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise VaedynError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys into a nested dict (new dicts are created on the way)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[keys[-1]] = value
    return data


def with_overrides(overrides: list[str] | tuple[str, ...]) -> str:
    """" with --set A B" for an error's "where" (each override shortened: a hostile value must not
    flood the line); "" without overrides."""
    return " with --set " + " ".join(inputs.shorten(o) for o in overrides) if overrides else ""


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise VaedynError(f"config file not found: {path} (list the shipped ones with `ls configs/`)")
    data = inputs.parse_yaml(inputs.read_text(path, "config file"), str(path), "fix the file and retry")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VaedynError(f"config {path} must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def validate_config(data: dict[str, Any], where: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise VaedynError(format_validation_error(e, where)) from None


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when path is None), apply `--set` overrides, validate."""
    data = read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    where = f"in {path}" if path is not None else "(defaults)"
    where += with_overrides(overrides or [])
    return validate_config(data, where)


def config_from_text(text: str, where: str) -> RunConfig:
    """Rebuild the config stored in an artifact (YAML or JSON text)."""
    data = inputs.parse_yaml(text, f"the config stored in {where}", "regenerate the artifact") or {}
    if not isinstance(data, dict):
        raise VaedynError(f"the config stored in {where} is not a mapping of sections; regenerate the artifact")
    return validate_config(data, f"stored in {where}")


# ---------------------------------------------------------------------------------------------
# schema and commented YAML


def json_schema() -> dict[str, Any]:
    schema = RunConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "vaedyn config"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path = Path(path)
    if path.is_dir():
        raise VaedynError(f"--out {path} is a folder; pass the path of the schema file to write")
    if path.exists() and _title_of(path) != json_schema()["title"]:
        raise VaedynError(f"--out {path} exists and is not a vaedyn config schema; vaedyn replaces only files it "
                          "wrote: choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_text(path, schema_text())
    return path


def _title_of(path: Path) -> Any:
    """The "title" of a JSON file (None when it is not a JSON object)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return found.get("title") if isinstance(found, dict) else None


def commented_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML with each field's description as a comment above it."""
    lines: list[str] = []

    def emit(model: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if field.description:
                lines.append(f"{pad}# {field.description.splitlines()[0]}")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(value, indent + 1)
            else:
                dumped = yaml.safe_dump({name: value if not isinstance(value, Path) else str(value)},
                                        default_flow_style=True, width=10_000).strip()
                lines.append(pad + dumped.removeprefix("{").removesuffix("}"))

    emit(cfg, 0)
    return "\n".join(lines) + "\n"
