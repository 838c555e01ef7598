"""What a trace store holds (schema "vaedyn.trace", version 1): names, layout, records, attributes.

The root group has dims `step` (appendable) and `channel` (every tracked channel, in module
order), per-step-per-channel statistics, training scalars and `near_zero_frac` (step, param);
group `events` (dim `event`) holds interventions; group `classification` is written by `vaedyn
classify`. docs/design.md "Trace store" is the contract; the descriptions below are stored with
the arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import xarray as xr

from vaedyn_cli import __version__

SCHEMA = "vaedyn.trace"
SCHEMA_VERSION = 1
EVENTS_GROUP = "events"
CLASSIFICATION_GROUP = "classification"
ZARR_JSON = "zarr.json"
LOCK_FILE = ".vaedyn-commit.lock"  # serialises rewrites of the root zarr.json (writer commits, consolidate)
CHANNEL_CHUNK = 4096  # channels per chunk: a per-channel read touches a few chunks, an append a handful
EVENT_CHUNK = 1024

STD_NOTE = "population std (ddof=0) over batch and spatial positions"

# Per-step, per-channel statistics (float32), with what they mean.
CHANNEL_VARS: dict[str, str] = {
    "in_std": f"std of the norm's input channel, {STD_NOTE}",
    "mean": "mean of the norm's output y = gamma * xhat + beta over batch and spatial positions",
    "mean_abs": "mean |y| over batch and spatial positions (the original project's activity metric)",
    "std": f"std of y, {STD_NOTE}",
    "act_mean": "mean of act(y) where an activation follows the norm, else NaN",
    "act_std": f"std of act(y), {STD_NOTE}; NaN where no activation follows",
    "gn_weight": "GroupNorm gamma used by this step's forward",
    "gn_bias": "GroupNorm beta used by this step's forward",
    "gn_weight_grad": "|d loss / d gamma| of this step (NaN when tracked without gradients)",
    "out_weight_norm": "L2 norm of the weights of the next layer(s) that read this channel (NaN when unknown; "
    "in training traces recorded once per track.weight_interval steps, NaN in between)",
}
SCALAR_VARS: dict[str, str] = {
    "loss": "training loss of the step (NaN when not training)",
    "rec_loss": "reconstruction (MSE) loss of the step (NaN when not training)",
    "kl_loss": "mean per-image KL of the step (NaN when not training)",
    "lr": "learning rate of the step (NaN when not training)",
}
PARAM_VARS: dict[str, str] = {
    "near_zero_frac": "share of near-zero weights of each conv/linear weight (track.near_zero; in training "
    "traces recorded once per track.weight_interval steps, NaN in between)",
}
STEP_VARS = ("step", *CHANNEL_VARS, *SCALAR_VARS, *PARAM_VARS)
CHANNEL_COORDS = ("layer", "channel_index", "part", "has_activation")
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
    """The fixed `channel` and `param` axes of a store: which channels of which layers are tracked."""

    layer: tuple[str, ...]
    channel_index: tuple[int, ...]
    part: tuple[str, ...]
    has_activation: tuple[bool, ...]
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.layer)
        if not (len(self.channel_index) == len(self.part) == len(self.has_activation) == n):
            raise ValueError("layout columns differ in length")

    @classmethod
    def from_layers(
        cls, layers: Iterable[tuple[str, int, str, bool]], params: Iterable[str] = ()
    ) -> ChannelLayout:
        """From (layer name, channel count, part, has_activation) per layer, in module order."""
        cols: tuple[list, list, list, list] = ([], [], [], [])
        for name, channels, part, has_act in layers:
            for c in range(channels):
                for col, v in zip(cols, (name, c, part, bool(has_act)), strict=True):
                    col.append(v)
        return cls(*(tuple(c) for c in cols), params=tuple(params))

    @property
    def n_channels(self) -> int:
        return len(self.layer)

    @property
    def layers(self) -> list[str]:
        """Layer names in store order."""
        return list(dict.fromkeys(self.layer))

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> ChannelLayout:
        params = tuple(str(p) for p in ds["param"].values) if "param" in ds.coords else ()
        return cls(
            tuple(str(v) for v in ds["layer"].values),
            tuple(int(v) for v in ds["channel_index"].values),
            tuple(str(v) for v in ds["part"].values),
            tuple(bool(v) for v in ds["has_activation"].values),
            params,
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
    if name in CHANNEL_VARS:
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
    for name, doc in CHANNEL_VARS.items():
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
        "layer": ("channel", np.array(layout.layer, dtype=object), {"description": "module path of the norm"}),
        "channel_index": ("channel", np.array(layout.channel_index, dtype=np.int64),
                          {"description": "index of the channel inside its layer"}),
        "part": ("channel", np.array(layout.part, dtype=object), {"description": "encoder or decoder"}),
        "has_activation": ("channel", np.array(layout.has_activation, dtype=bool),
                           {"description": "whether a nonlinearity follows this norm"}),
        "param": ("param", np.array(layout.params, dtype=object), {"description": "conv/linear weight name"}),
    }
    ds = xr.Dataset(data, coords=coords, attrs=dict(attrs or {}))
    steps = ds["step"].values
    if n > 1 and not (np.diff(steps) > 0).all():
        raise ValueError(f"steps must be strictly increasing, got {steps.tolist()}")
    return ds


def store_attrs(
    source: Literal["train", "track"], run_name: str, config_json: str, model_config_json: str
) -> dict[str, Any]:
    """The root attributes of a new store (docs/design.md)."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "vaedyn_version": __version__,
        "source": source,
        "run_name": run_name,
        "config": config_json,
        "model_config": model_config_json,
        "committed_steps": 0,
        "std_definition": STD_NOTE,
        "step_definition": (
            "source=train: step k holds the forward pass of optimizer step k (weights after k-1 updates), "
            "as the loss does (with track.source=probe: the probe after update k); "
            "source=track: the weights saved at global step k"
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


