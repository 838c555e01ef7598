"""What a trace store holds (schema "vaedyn.trace", version 2; version 1 stores are read too):
names, layout, records, attributes.

The root group has dims `step` (appendable) and `channel` (every tracked channel, in module
order), per-step-per-channel statistics, training scalars and `near_zero_frac` (step, param);
group `events` (dim `event`) holds interventions; group `classification` is written by `vaedyn
classify`. docs/design.md "Trace store" is the contract; the descriptions below are stored with
the arrays.

Version 2 added: any module can be tracked (channel coordinates `module_type` and `capture`: the
module's class and whether its output or its input is measured), `out_weight_l1` (always), and
the optional statistics `act_mean_abs` and `in_weight_grad`, present only when recorded
(`track.extra_statistics`). A version 1 store lacks all of these: readers fill the coordinates
(`module_type` "", `capture` "output") and a method that needs a missing variable says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import xarray as xr

from vaedyn_cli import __version__

SCHEMA = "vaedyn.trace"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # what the readers open; writers write SCHEMA_VERSION only
EVENTS_GROUP = "events"
CLASSIFICATION_GROUP = "classification"
ZARR_JSON = "zarr.json"
LOCK_FILE = ".vaedyn-commit.lock"  # serialises rewrites of the root zarr.json (writer commits, consolidate)
CHANNEL_CHUNK = 4096  # channels per chunk: a per-channel read touches a few chunks, an append a handful
EVENT_CHUNK = 1024

STD_NOTE = "population std (ddof=0) over batch and spatial positions"

# Per-step, per-channel statistics (float32), with what they mean. "The captured tensor" is the
# module's output (capture "output"; for a norm y = gamma * xhat + beta) or its input ("input").
CHANNEL_VARS: dict[str, str] = {
    "in_std": f"std of a norm's input channel, {STD_NOTE} (NaN for other modules and for capture=input)",
    "mean": "mean of the captured tensor's channel over batch and spatial positions",
    "mean_abs": "mean |.| of the captured tensor's channel (the original project's activity metric)",
    "std": f"std of the captured tensor's channel, {STD_NOTE}",
    "act_mean": "mean of act(y) where an activation follows the captured output, else NaN",
    "act_std": f"std of act(y), {STD_NOTE}; NaN where no activation follows",
    "gn_weight": "the module's per-channel scale used by this step's forward (a norm's gamma; NaN where the "
    "module has none, and for capture=input)",
    "gn_bias": "the module's per-channel shift used by this step's forward (a norm's beta, a conv's or linear's "
    "bias; NaN where the module has none, and for capture=input)",
    "gn_weight_grad": "|d loss / d gamma| of this step (NaN when tracked without gradients or without a "
    "per-channel scale)",
    "out_weight_norm": "L2 norm of the weights of the next layer(s) that read this channel (NaN when unknown; "
    "in training traces recorded once per track.weight_interval steps, NaN in between)",
    "out_weight_l1": "L1 norm of the same weights (Continual Backprop's outgoing-weight factor; recorded with "
    "out_weight_norm)",
}
# Per-step, per-channel statistics recorded only when asked for (track.extra_statistics): each costs
# a pass per tracked step, so a store holds the variable only when it was recorded.
OPTIONAL_CHANNEL_VARS: dict[str, str] = {
    "act_mean_abs": "mean |act(y)| where an activation follows the captured output (ReDo's activity), else NaN",
    "in_weight_grad": "mean |d loss / d w| over the incoming filter of the channel (the weights of the conv or "
    "linear that produces it: the module itself for a tracked conv/linear, a norm's producer; GraMa's "
    "gradient magnitude); NaN without one",
}
SCALAR_VARS: dict[str, str] = {
    "loss": "training loss of the step (NaN when not training)",
    "rec_loss": "reconstruction (MSE) loss of the step (NaN when not training)",
    "kl_loss": "mean per-image KL of the step (NaN when not training)",
    "lr": "learning rate of the step (NaN when not training)",
}
PARAM_VARS: dict[str, str] = {
    "near_zero_frac": "share of near-zero entries of each tracked parameter tensor (track.near_zero; in training "
    "traces recorded once per track.weight_interval steps, NaN in between)",
}
STEP_VARS = ("step", *CHANNEL_VARS, *SCALAR_VARS, *PARAM_VARS)  # in every version 2 store
CHANNEL_COORDS = ("layer", "channel_index", "part", "has_activation", "module_type", "capture")
CAPTURES = ("output", "input")
EVENT_FIELDS: dict[str, type] = {
    "step": np.int64,
    "layer": str,
    "channel_index": np.int64,
    "strategy": str,
    "param": str,
    "before": np.float64,
    "after": np.float64,
}
REQUIRED_ATTRS = ("schema", "schema_version", "committed_steps")


# ---------------------------------------------------------------------------------------------
# what a store holds


@dataclass(frozen=True)
class ChannelLayout:
    """The fixed `channel` and `param` axes of a store: which channels of which modules are tracked,
    and which optional statistics it records (`extra`, names of OPTIONAL_CHANNEL_VARS)."""

    layer: tuple[str, ...]
    channel_index: tuple[int, ...]
    part: tuple[str, ...]
    has_activation: tuple[bool, ...]
    params: tuple[str, ...] = ()
    module_type: tuple[str, ...] | None = None  # None: every channel "GroupNorm"
    capture: tuple[str, ...] | None = None  # None: every channel "output"
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.layer)
        if self.module_type is None:
            object.__setattr__(self, "module_type", ("GroupNorm",) * n)
        if self.capture is None:
            object.__setattr__(self, "capture", ("output",) * n)
        columns = (self.channel_index, self.part, self.has_activation, self.module_type, self.capture)
        if any(len(c) != n for c in columns):
            raise ValueError("layout columns differ in length")
        unknown = [v for v in self.extra if v not in OPTIONAL_CHANNEL_VARS]
        if unknown:
            raise ValueError(f"unknown optional statistics {unknown}; known: {', '.join(OPTIONAL_CHANNEL_VARS)}")

    @classmethod
    def from_layers(
        cls, layers: Iterable[tuple[Any, ...]], params: Iterable[str] = (), extra: Iterable[str] = ()
    ) -> ChannelLayout:
        """From (layer name, channel count, part, has_activation[, module_type, capture]) per layer,
        in module order (module_type defaults to "GroupNorm", capture to "output")."""
        cols: tuple[list, ...] = ([], [], [], [], [], [])
        for entry in layers:
            name, channels, part, has_act, *kind = entry
            module_type, capture = (*kind, *("GroupNorm", "output")[len(kind):])
            for c in range(channels):
                for col, v in zip(cols, (name, c, part, bool(has_act), str(module_type), str(capture)), strict=True):
                    col.append(v)
        return cls(*(tuple(c) for c in cols[:4]), params=tuple(params), module_type=tuple(cols[4]),
                   capture=tuple(cols[5]), extra=tuple(extra))

    @property
    def n_channels(self) -> int:
        return len(self.layer)

    @property
    def layers(self) -> list[str]:
        """Layer names in store order."""
        return list(dict.fromkeys(self.layer))

    @property
    def channel_vars(self) -> tuple[str, ...]:
        """The (step, channel) variables this layout's store holds."""
        return (*CHANNEL_VARS, *(v for v in OPTIONAL_CHANNEL_VARS if v in self.extra))

    @property
    def step_vars(self) -> tuple[str, ...]:
        """Every array along `step` of this layout's store (the `step` coordinate first)."""
        return ("step", *self.channel_vars, *SCALAR_VARS, *PARAM_VARS)

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> ChannelLayout:
        """The layout of a store's root group (a version 1 store: module types "", captures "output")."""
        params = tuple(str(p) for p in ds["param"].values) if "param" in ds.coords else ()
        n = ds.sizes.get("channel", 0)
        kinds = {k: tuple(str(v) for v in ds[k].values) if k in ds.variables else (default,) * n
                 for k, default in (("module_type", ""), ("capture", "output"))}
        return cls(
            tuple(str(v) for v in ds["layer"].values),
            tuple(int(v) for v in ds["channel_index"].values),
            tuple(str(v) for v in ds["part"].values),
            tuple(bool(v) for v in ds["has_activation"].values),
            params,
            module_type=kinds["module_type"],
            capture=kinds["capture"],
            extra=tuple(v for v in OPTIONAL_CHANNEL_VARS if v in ds.variables),
        )


@dataclass
class TraceRecord:
    """One tracked step: per-channel statistics, training scalars, near-zero fractions per param.
    Missing entries are NaN."""

    step: int
    channels: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    near_zero_frac: np.ndarray | None = None

    def resolve(self) -> TraceRecord:
        return self


class PendingRecord(Protocol):
    """A record whose numbers are finished on the writer thread (e.g. after an async device copy)."""

    step: int

    def resolve(self) -> TraceRecord: ...


def record_row(record: TraceRecord, name: str, layout: ChannelLayout) -> np.ndarray:
    if name in CHANNEL_VARS or name in OPTIONAL_CHANNEL_VARS:
        v = record.channels.get(name)
        if v is None:
            return np.full(layout.n_channels, np.nan, np.float32)
        v = np.asarray(v, dtype=np.float32).reshape(-1)
        if v.shape[0] != layout.n_channels:
            raise ValueError(f"record '{name}' has {v.shape[0]} channels, the store {layout.n_channels}")
        return v
    if name in SCALAR_VARS:
        return np.float64(record.scalars.get(name, np.nan))
    if name == "near_zero_frac":
        if record.near_zero_frac is None:
            return np.full(len(layout.params), np.nan, np.float32)
        v = np.asarray(record.near_zero_frac, dtype=np.float32).reshape(-1)
        if v.shape[0] != len(layout.params):
            raise ValueError(f"record near_zero_frac has {v.shape[0]} params, the store {len(layout.params)}")
        return v
    if name == "step":
        return np.int64(record.step)
    raise KeyError(name)


def records_to_dataset(
    records: Sequence[TraceRecord], layout: ChannelLayout, attrs: Mapping[str, Any] | None = None
) -> xr.Dataset:
    """Records as an in-memory Dataset with the store's schema (also the skeleton of a new store)."""
    n = len(records)
    data: dict[str, Any] = {}
    for name in layout.channel_vars:
        doc = CHANNEL_VARS.get(name) or OPTIONAL_CHANNEL_VARS[name]
        rows = [record_row(r, name, layout) for r in records]
        arr = np.stack(rows) if rows else np.zeros((0, layout.n_channels), np.float32)
        data[name] = (("step", "channel"), arr, {"description": doc})
    for name, doc in SCALAR_VARS.items():
        arr = np.array([record_row(r, name, layout) for r in records], dtype=np.float64).reshape(n)
        data[name] = (("step",), arr, {"description": doc})
    rows = [record_row(r, "near_zero_frac", layout) for r in records]
    arr = np.stack(rows) if rows else np.zeros((0, len(layout.params)), np.float32)
    data["near_zero_frac"] = (("step", "param"), arr, {"description": PARAM_VARS["near_zero_frac"]})
    coords = {
        "step": ("step", np.array([r.step for r in records], dtype=np.int64), {"description": "global optimizer step"}),
        "layer": ("channel", np.array(layout.layer, dtype=object), {"description": "module path of the tracked module"}),
        "channel_index": ("channel", np.array(layout.channel_index, dtype=np.int64),
                          {"description": "index of the channel inside its layer"}),
        "part": ("channel", np.array(layout.part, dtype=object), {"description": "encoder or decoder"}),
        "has_activation": ("channel", np.array(layout.has_activation, dtype=bool),
                           {"description": "whether a nonlinearity follows the captured output"}),
        "module_type": ("channel", np.array(layout.module_type, dtype=object),
                        {"description": "class name of the tracked module (e.g. GroupNorm, Conv2d)"}),
        "capture": ("channel", np.array(layout.capture, dtype=object),
                    {"description": "which tensor of the module is measured: output or input"}),
        "param": ("param", np.array(layout.params, dtype=object), {"description": "parameter tensor name"}),
    }
    ds = xr.Dataset(data, coords=coords, attrs=dict(attrs or {}))
    steps = ds["step"].values
    if n > 1 and not (np.diff(steps) > 0).all():
        raise ValueError(f"steps must be strictly increasing, got {steps.tolist()}")
    return ds


def store_attrs(
    source: Literal["train", "track"], run_name: str, config_json: str, model_config_json: str,
    pooling: Literal["step", "interval"] = "step",
) -> dict[str, Any]:
    """The root attributes of a new store (docs/design.md)."""
    import torch  # the writers run beside a model; readers never import torch through here

    pooled = (
        "the forwards of optimizer steps k-interval+1 .. k, every micro-batch pooled (with track.pool_validation "
        "also the validation forwards run in between); its weight statistics, gamma and beta those of step k"
        if pooling == "interval" else "the forward pass of optimizer step k"
    )
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "vaedyn_version": __version__,
        "source": source,
        "run_name": run_name,
        "config": config_json,
        "model_config": model_config_json,
        "committed_steps": 0,
        # on a CPU the thread count orders float sums, and a long run amplifies that as a seed would
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "std_definition": STD_NOTE,
        "step_definition": (
            f"source=train: step k holds {pooled} (weights after k-1 updates), as the loss does "
            "(with track.source=probe: the probe after update k); source=track: the weights saved at global step k"
        ),
    }



# ---------------------------------------------------------------------------------------------
# writing


def compressor() -> Any:
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")  # fast: commits re-encode the current chunk


def encoding(ds: xr.Dataset, chunk_steps: int) -> dict[str, dict[str, Any]]:
    enc: dict[str, dict[str, Any]] = {}
    for name, var in ds.variables.items():
        shape = []
        for dim in var.dims:
            if dim == "step":
                shape.append(chunk_steps)
            elif dim == "channel" and "step" in var.dims:
                shape.append(max(1, min(ds.sizes["channel"], CHANNEL_CHUNK)))
            elif dim == "event":
                shape.append(EVENT_CHUNK)
            else:
                shape.append(max(1, ds.sizes[dim]))
        enc[str(name)] = {"chunks": tuple(shape), "compressors": (compressor(),)}
    return enc


def events_dataset(rows: Sequence[Mapping[str, Any]]) -> xr.Dataset:
    """Validated event rows as a Dataset with dim `event`."""
    cols: dict[str, list] = {k: [] for k in EVENT_FIELDS}
    for i, row in enumerate(rows):
        missing = [k for k in EVENT_FIELDS if k not in row]
        if missing:
            raise ValueError(f"event row {i} lacks {', '.join(missing)} (fields: {', '.join(EVENT_FIELDS)})")
        for k in EVENT_FIELDS:
            cols[k].append(row[k])
    data = {}
    for k, kind in EVENT_FIELDS.items():
        arr = np.array([str(v) for v in cols[k]], dtype=object) if kind is str else np.array(cols[k], dtype=kind)
        data[k] = ("event", arr.reshape(len(rows)))
    return xr.Dataset(data, attrs={"description": "one row per intervention (written by in-training nudges)"})


