"""Offline classification of inactive channels: a trace (xarray) -> one label set per channel.

Definitions (docs/design.md "Activity, state, trajectory, mechanism"), made exact here:

State of a channel at a tracked step. Each method (the METHODS registry; `classify.method`)
names a per-channel statistic s of the step; a relative method scores it against its layer:
    score = s / mean of s over the channel's layer at that step (a silent layer scores 0);
    `dead` when s <= dead_threshold (methods whose s is an activation scale), else `dormant`
    when score <= tau, else `active`;
an absolute method compares s itself: `dormant` when s < threshold, else `active`; score = s.
A step where the statistic is NaN is not observed: it neither extends nor breaks a run. "h" below
is the post-activation map act(y) where an activation follows the tracked output
(`has_activation`), else the captured tensor y itself. The methods:
    `dormancy` (default): s = std of h (`act_std`, else `std`): ReDo's normalisation on std, so a
        constant non-zero channel counts as inactive;
    `mean_abs_threshold` (absolute; the original project's rule): s = mean |y| (`mean_abs`);
    `redo` (Sokar et al. 2023, the tau-dormant neuron): s = mean |h| (`act_mean_abs`, else
        `mean_abs`);
    `grama` (Liu et al. 2025, GraMa): s = mean |grad| of the channel's incoming parameters, here
        its scale gamma: |d loss / d gamma| (`gn_weight_grad`); no dead state;
    `grama_filter`: the same with the incoming filter's weights (`in_weight_grad`, recorded with
        track.extra_statistics);
    `cbp` (Dohare et al. 2024, Continual Backprop's contribution utility): s = mean |h| x the L1
        norm of the outgoing weights (`out_weight_l1`, the latest recorded value at or before the
        step within the window: weight statistics are recorded once per track.weight_interval);
        no dead state. (CBP keeps a running average of the utility over steps; here each tracked
        step is scored on its own and the persistence filter plays that part.)

Persistence filter (a debounce on inactive = dead or dormant vs active): the filtered state
starts as the state of the first observed step; it changes only when the raw state has differed
from it for `min_persist` consecutive observed steps, and the change is dated at the first step
of that run. `n_transitions` counts these persistent changes.

Trajectory: `active` (0 changes, started active), `born_dormant` (0 changes, inactive from the
first step), `died` (1 change, active -> inactive), `revived` (1 change, inactive -> active),
`intermittent` (2 or more changes). `onset_step` is the step where the most recent persistent
change to inactive began, `revival_step` the same for the most recent change to active; each is
None (JSON null, -1 in the store) when there was no such change (e.g. `born_dormant` has no
onset). A channel with no finite statistic in the window is `unknown` (state and trajectory).

Final `state`: the filtered state at the last step of the window; an inactive channel is `dead`
when its most recent inactive observed step was dead, else `dormant`. `score` is the score at
the channel's last observed step.

Mechanism, only for channels inactive at the end ("" in the Dataset and store, JSON null
otherwise), from the statistics at the last step of the window, first match wins:
    1. `gn_scale`: |gamma| <= gn_scale_ratio * median |gamma| of its layer (the norm's own
       scale silences the channel; nothing downstream of gamma matters then);
    2. `saturated`: an activation follows and mean + m * std < -m of the norm output y, with
       m = saturation_margin: nearly all of y lies below -m, where SiLU is flat (its slope is at
       most ~0.1 in magnitude below -2), so y varies but the activation flattens it;
    3. `input_collapse`: the `input_collapsed` flag below;
    4. `other`.
Flags on every classified channel, at the last step of the window:
    `unused`: out_weight_norm <= unused_ratio * mean out_weight_norm of its layer;
    `input_collapsed`: in_std <= input_collapse_ratio * mean in_std of its GroupNorm group
    (groups are consecutive channels; their number is `norm_num_groups` of the store's
    `model_config` attribute when that divides the layer's width, else the layer is one group).
A statistic missing from the store or NaN makes its test false.

The store's `classification` group (`vaedyn_cli.store.classification`) spans every channel of the root, row
i being the root's channel i (so `xarray.open_datatree` can align it); `classified` marks the
channels of the selected layers, the others hold "" labels, NaN score and -1 steps. Attributes:
`method`, `params` (JSON, with the window and layer globs), `first_step`, `last_step`, `n_steps`.

Out of core: the trace is read `chunk_steps` steps at a time and a vectorised per-channel state
machine carries the runs across chunks, so memory is bounded by the chunk, not the trace. The
same code classifies an in-memory window (the in-training nudge passes the recent steps).
The per-step rule alone (codes UNOBSERVED / ACTIVE / DORMANT / DEAD and scores at chosen steps)
is `step_states`, the one implementation that the report and the TensorBoard hook count with.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vaedyn_cli import settings
from vaedyn_cli import store as store_mod
from vaedyn_cli.config import ClassifyConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.labels import DEAD, FLAGS, MECHANISMS, STATES, TRAJECTORIES, UNKNOWN, UNOBSERVED
from vaedyn_cli.persistence import Debounce

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# channels


@dataclass
class Channels:
    """The selected channels, grouped by layer (each layer one contiguous segment)."""

    pos: np.ndarray  # positions along the root `channel` dim
    layer: np.ndarray  # layer name per channel (object)
    channel_index: np.ndarray
    part: np.ndarray
    has_activation: np.ndarray  # bool
    seg: np.ndarray  # per channel: index of its layer among the selected layers
    bounds: list[tuple[int, int]]  # [start, end) of each layer's segment
    group: np.ndarray  # global GroupNorm group id per channel

    @property
    def n(self) -> int:
        return len(self.pos)

    @property
    def names(self) -> list[str]:
        """The selected layers, in segment order (`seg` indexes it)."""
        return [str(self.layer[start]) for start, _ in self.bounds]


def _strings(values: Any) -> np.ndarray:
    return np.asarray([str(v) for v in np.asarray(values).tolist()], dtype=object)


def _norm_groups(ds: xr.Dataset) -> int | None:
    raw = ds.attrs.get("model_config")
    if not raw:
        return None
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
        groups = int(cfg.get("norm_num_groups") or 0)
    except (ValueError, TypeError, AttributeError):
        return None
    return groups or None


def select_channels(ds: xr.Dataset, layers: Sequence[str] | None = None) -> Channels:
    """Channels of the layers whose names match any glob in `layers` (all layers when None), in
    store order; should a layer's channels not be contiguous in the store, they are grouped."""
    for name in ("layer", "channel_index"):
        if name not in ds.variables:
            raise VaedynError(f"trace has no '{name}' variable: not a vaedyn.trace store (see docs/design.md)")
    layer_all = _strings(ds["layer"].values)
    if layers:
        keep = np.zeros(len(layer_all), bool)
        for pattern in layers:
            hit = np.array([fnmatch.fnmatchcase(n, pattern) for n in layer_all], bool)
            if not hit.any():
                some = ", ".join(list(dict.fromkeys(layer_all.tolist()))[:2])
                raise VaedynError(
                    f"--layers {pattern!r} matches no layer of the trace (e.g. {some}); "
                    "use a glob on module names such as 'decoder.*' or '*norm1'"
                )
            keep |= hit
        pos = np.flatnonzero(keep)
    else:
        pos = np.arange(len(layer_all))
    names = list(dict.fromkeys(layer_all[pos].tolist()))
    code = {n: i for i, n in enumerate(names)}
    pos = pos[np.argsort([code[n] for n in layer_all[pos]], kind="stable")]
    layer = layer_all[pos]
    seg = np.array([code[n] for n in layer], np.int64)
    counts = np.bincount(seg, minlength=len(names))
    ends = np.cumsum(counts)
    bounds = [(int(e - c), int(e)) for c, e in zip(counts, ends, strict=True)]
    cidx = np.asarray(ds["channel_index"].values)[pos].astype(np.int64)
    if "part" in ds.variables:
        part = _strings(ds["part"].values)[pos]
    else:  # a store from another program: the module path's first name (encoder / decoder)
        part = np.asarray([n.split(".", 1)[0] for n in layer.tolist()], dtype=object)
    if "has_activation" in ds.variables:
        has_act = np.asarray(ds["has_activation"].values)[pos].astype(bool)
    else:
        has_act = np.zeros(len(pos), bool)
    n_groups = _norm_groups(ds)
    local = np.zeros(len(pos), np.int64)
    if n_groups:
        width = counts[seg]
        divisible = width % n_groups == 0
        local = np.where(divisible, cidx // np.maximum(width // n_groups, 1), 0)
    group = seg * (int(local.max(initial=0)) + 1) + local
    return Channels(pos, layer, cidx, part, has_act, seg, bounds, group)


# ---------------------------------------------------------------------------------------------
# per-step states


def _indexer(pos: np.ndarray) -> slice | np.ndarray:
    """A slice when the positions are one increasing contiguous range (a cheaper read), else the array."""
    if len(pos) and pos[-1] - pos[0] + 1 == len(pos) and np.all(np.diff(pos) == 1):
        return slice(int(pos[0]), int(pos[-1]) + 1)
    return pos


def _read(ds: xr.Dataset, name: str, steps: slice | np.ndarray, pos: np.ndarray) -> np.ndarray:
    """A (steps, channels) block as float32; never modified in place (it may be the caller's data)."""
    if name not in ds.variables:
        raise VaedynError(f"trace has no '{name}' variable, needed by the classification method; "
                          "write it (see docs/design.md 'Trace store') or choose another --method")
    return np.asarray(ds[name].isel(step=steps, channel=_indexer(pos)).values, dtype=np.float32)


@dataclass(frozen=True)
class Method:
    """A classify method: the per-channel statistic it scores, and how (module docstring)."""

    name: str
    statistic: Callable[[_Chunk, int, int], np.ndarray]  # (steps, channels) of one layer's segment
    needs: tuple[str, ...]  # the trace variables it may read
    relative: bool  # score = s / layer mean of s, dormant at <= tau; else dormant at s < threshold
    dead: bool  # `dead` when s <= dead_threshold (s an activation scale)


METHODS: dict[str, Method] = {}


def method(name: str, needs: tuple[str, ...], *, relative: bool = True,
           dead: bool = True) -> Callable[[Callable], Callable]:
    """Register a method by name (also list it in ClassifyConfig.method)."""

    def register(fn: Callable[[_Chunk, int, int], np.ndarray]) -> Callable[[_Chunk, int, int], np.ndarray]:
        METHODS[name] = Method(name, fn, tuple(needs), relative, dead)
        return fn

    return register


def unrecorded_statistics(name: str, extra: Sequence[str]) -> list[str]:
    """The optional statistics (store.OPTIONAL_CHANNEL_VARS) a method reads that a trace recording
    `extra` (track.extra_statistics) would lack: checked before training, so that an in-training
    nudge does not fail at its first step."""
    return [v for v in get_method(name).needs if v in store_mod.OPTIONAL_CHANNEL_VARS and v not in extra]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise VaedynError(f"unknown classify method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def _as_recorded(name: str) -> Callable[[_Chunk, int, int], np.ndarray]:
    """A method whose statistic is one stored variable as it is."""

    def statistic(c: _Chunk, start: int, end: int) -> np.ndarray:
        return c.block(name, start, end)

    return statistic


@method("dormancy", ("act_std", "std"))
def _dormancy(c: _Chunk, start: int, end: int) -> np.ndarray:
    return c.of_h("act_std", "std", start, end)


method("mean_abs_threshold", ("mean_abs",), relative=False)(_as_recorded("mean_abs"))


@method("redo", ("act_mean_abs", "mean_abs"))
def _redo(c: _Chunk, start: int, end: int) -> np.ndarray:
    return c.of_h("act_mean_abs", "mean_abs", start, end)


method("grama", ("gn_weight_grad",), dead=False)(_as_recorded("gn_weight_grad"))
method("grama_filter", ("in_weight_grad",), dead=False)(_as_recorded("in_weight_grad"))


@method("cbp", ("act_mean_abs", "mean_abs", "out_weight_l1"), dead=False)
def _cbp(c: _Chunk, start: int, end: int) -> np.ndarray:
    return c.of_h("act_mean_abs", "mean_abs", start, end) * c.latest("out_weight_l1", start, end)


# Where a statistic a method reads comes from, for the message when a trace lacks it.
_RECORDED_BY = {
    "act_mean_abs": "track.extra_statistics: [act_mean_abs]",
    "in_weight_grad": "track.extra_statistics: [in_weight_grad]",
    "out_weight_l1": "schema version 2",
}


class _Chunk:
    """The statistics a method reads for one chunk of steps, each variable read once for all the
    selected channels (a store chunk spans many layers) and sliced layer by layer.

    `carry`: for `latest`, the last finite value of each weight statistic seen in earlier chunks of
    the same window (classify_trace); None: look back in the trace before the chunk (step_states)."""

    def __init__(self, ds: xr.Dataset, ch: Channels, steps: slice | np.ndarray, method: str,
                 carry: dict[str, np.ndarray] | None = None) -> None:
        self.ds, self.ch, self.steps, self.method, self.carry = ds, ch, steps, method, carry
        self._full: dict[str, np.ndarray] = {}
        self._plain: dict[str, tuple[int, np.ndarray]] = {}

    def _read(self, name: str, pos: np.ndarray) -> np.ndarray:
        if name not in self.ds.variables:
            how = _RECORDED_BY.get(name)
            hint = f" (recorded with {how})" if how else ""
            raise VaedynError(f"classify method '{self.method}' needs '{name}', which this trace does not hold{hint}; "
                              "choose another --method or re-record the trace")
        return _read(self.ds, name, self.steps, pos)

    def block(self, name: str, start: int, end: int) -> np.ndarray:
        if name not in self._full:
            self._full[name] = self._read(name, self.ch.pos)
        return self._full[name][:, start:end]

    def of_h(self, act: str, plain: str, start: int, end: int) -> np.ndarray:
        """The statistic of h: `act` where an activation follows, `plain` elsewhere. `plain` is read
        only over the layers that hold channels without an activation."""
        ha = self.ch.has_activation[start:end]
        if ha.all():
            return self.block(act, start, end)
        if plain not in self._plain:
            no_act = np.flatnonzero(~self.ch.has_activation)
            lo, hi = self.ch.bounds[self.ch.seg[no_act[0]]][0], self.ch.bounds[self.ch.seg[no_act[-1]]][1]
            self._plain[plain] = (lo, self._read(plain, self.ch.pos[lo:hi]))
        lo, values = self._plain[plain]
        other = values[:, start - lo:end - lo]
        return other if not ha.any() else np.where(ha, self.block(act, start, end), other)

    def latest(self, name: str, start: int, end: int) -> np.ndarray:
        """A weight statistic (NaN on steps that did not record it) as its latest recorded value at or
        before each step."""
        key = f"latest:{name}"
        if key not in self._full:
            self._full[key] = self._forward_filled(name)
        return self._full[key][:, start:end]

    def _forward_filled(self, name: str) -> np.ndarray:
        if name not in self.ds.variables:
            self._read(name, self.ch.pos)  # says which method needs it
        n_total = self.ds.sizes["step"]
        rows = np.arange(n_total)[self.steps]
        if self.carry is not None:  # a window read chunk by chunk, in order
            block = self._read(name, self.ch.pos).copy()
            prev = self.carry.get(name)
        elif isinstance(self.steps, slice):
            block = self._read(name, self.ch.pos).copy()
            prev = _last(self.ds, name, 0, int(rows[0]), self.ch.pos) if len(rows) else None
        else:  # arbitrary positions: each from the trace up to it
            return np.stack([_last(self.ds, name, 0, int(r) + 1, self.ch.pos) for r in rows]) if len(rows) else \
                np.zeros((0, self.ch.n), np.float32)
        for i in range(block.shape[0]):
            row = block[i]
            if prev is not None:
                np.copyto(row, prev, where=~np.isfinite(row))
            prev = row
        if self.carry is not None and prev is not None:
            self.carry[name] = prev.copy()
        return block


def _last_observed_rows(finite: np.ndarray) -> np.ndarray:
    """Per column, the index of its last finite row (-1 when none)."""
    flipped = finite[::-1].argmax(axis=0)
    rows = finite.shape[0] - 1 - flipped
    rows[~finite.any(axis=0)] = -1
    return rows


def _layer_codes(a: np.ndarray, p: ClassifyConfig, out: np.ndarray) -> np.ndarray:
    """Write the state codes of one layer's activity block `a` (steps, channels) into `out`; return
    the per-step normaliser of the score (the layer's mean finite statistic; 1 for an absolute method).

    Compares the statistic with tau x layer mean rather than dividing first: no (steps, channels)
    temporary for the classification's hot loop. Unobserved (NaN) entries are left to the caller."""
    m = get_method(p.method)
    if not m.relative:
        np.less(a, p.threshold, out=out, casting="unsafe")
        return np.ones(a.shape[0], np.float64)
    norm = a.mean(axis=1, dtype=np.float64)  # NaN in any row when a value is missing
    if not np.isfinite(norm).all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN mean, on purpose
            norm = np.nanmean(a, axis=1, dtype=np.float64)
    limit = (p.tau * norm).astype(np.float32)[:, None]
    np.less_equal(a, limit, out=out, casting="unsafe")
    if not m.dead:
        return norm
    dead = a <= p.dead_threshold
    if (limit >= p.dead_threshold).all():  # then dead implies dormant: 1 + 1 = 2
        out += dead
    else:
        out[dead] = DEAD
    return norm


def layer_states(activity: np.ndarray, params: ClassifyConfig) -> np.ndarray:
    """The per-step rule on one layer at one step: the state codes of its channels' activities
    (UNOBSERVED where the activity is NaN)."""
    a = np.asarray(activity, np.float32).reshape(1, -1)
    out = np.empty(a.shape, np.int8)
    _layer_codes(a, params, out)
    out[~np.isfinite(a)] = UNOBSERVED
    return out[0]


def _chunk_states(ds: xr.Dataset, ch: Channels, p: ClassifyConfig, steps: slice | np.ndarray, n_steps: int,
                  all_scores: bool, carry: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """State codes (steps, channels) at the step positions `steps` (`n_steps` of them), and the
    scores: (steps, channels) when `all_scores`, else each channel's score at its last observed
    step among them (NaN when it has none), which is all the classification keeps."""
    statistic = get_method(p.method).statistic
    source = _Chunk(ds, ch, steps, p.method, carry)
    codes = np.empty((n_steps, ch.n), np.int8)
    shape = (n_steps, ch.n) if all_scores else (ch.n,)
    score = np.full(shape, np.nan, np.float32)
    for start, end in ch.bounds:
        a = statistic(source, start, end)
        out = codes[:, start:end]
        norm = _layer_codes(a, p, out)
        finite = np.isfinite(a)
        observed = bool(finite.all())
        if not observed:
            out[~finite] = UNOBSERVED
        if all_scores:
            with np.errstate(invalid="ignore", divide="ignore"):
                block = np.where(norm[:, None] > 0, a / norm[:, None], 0.0)  # a silent layer scores 0
            if not observed:
                block[~finite] = np.nan
            score[:, start:end] = block
            continue
        rows = np.full(end - start, n_steps - 1) if observed else _last_observed_rows(finite)
        seen = rows >= 0
        cols = np.flatnonzero(seen)
        value, base = a[rows[seen], cols], norm[rows[seen]]
        with np.errstate(invalid="ignore", divide="ignore"):
            score[start + cols] = np.where(base > 0, value / base, 0.0)
    return codes, score


def _positions(steps: slice | Sequence[int] | np.ndarray, n_total: int) -> tuple[slice | np.ndarray, int]:
    """A step indexer for `isel` (a slice when the positions are contiguous) and how many steps it takes."""
    if isinstance(steps, slice):
        start, stop, stride = steps.indices(n_total)
        if stride == 1:
            return slice(start, max(start, stop)), max(0, stop - start)
    pos = np.atleast_1d(np.arange(n_total)[steps if isinstance(steps, slice) else np.asarray(steps, np.int64)])
    return _indexer(pos), len(pos)


def step_states(
    ds: xr.Dataset,
    params: ClassifyConfig,
    steps: slice | Sequence[int] | np.ndarray = slice(None),
    layers: Sequence[str] | None = None,
    *,
    channels: Channels | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The per-step rule (module docstring, "State of a channel"), with no persistence filter.

    Returns state codes (steps, channels) int8 (UNOBSERVED, ACTIVE, DORMANT, DEAD) and scores
    (steps, channels) float32 (NaN where unobserved) at the step positions `steps` (a slice or
    positions along the trace's `step` dim; all of them are read at once, so chunk long traces).
    Columns follow `channels` (default `select_channels(ds, layers)`: store order when each layer's
    channels are contiguous, as in every vaedyn store). `classify_trace` runs the same code chunk by chunk.
    """
    ch = channels if channels is not None else select_channels(ds, layers)
    index, n_steps = _positions(steps, ds.sizes["step"])
    return _chunk_states(ds, ch, params, index, n_steps, all_scores=True)



# ---------------------------------------------------------------------------------------------
# mechanism and flags


def _last(ds: xr.Dataset, name: str, lo: int, hi: int, pos: np.ndarray) -> np.ndarray:
    """Each channel's latest finite value of `name` among the window's steps [lo, hi), NaN when none.

    Weight statistics (`out_weight_norm`) are recorded once per `track.weight_interval` steps
    and a skipped step is NaN, so "the last step" means the last step that recorded the statistic.
    Reads backwards in growing blocks: usually one row."""
    if name not in ds.variables:
        log.warning("trace has no '%s': the tests that need it are false", name)
        return np.full(len(pos), np.nan, np.float32)
    out = np.full(len(pos), np.nan, np.float32)
    missing = np.ones(len(pos), bool)
    end, span = hi, 1
    while end > lo and missing.any():
        start = max(lo, end - span)
        block = _read(ds, name, slice(start, end), pos)
        for row in block[::-1]:
            take = missing & np.isfinite(row)
            out[take] = row[take]
            missing &= ~take
        end, span = start, span * 4
    return out


def _group_mean(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-key mean of the finite values, broadcast back to each element (NaN for a key without any)."""
    finite = np.isfinite(values)
    sums = np.bincount(keys, np.where(finite, values, 0.0))
    counts = np.bincount(keys, finite)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts)[keys]


def _layer_median(ch: Channels, values: np.ndarray) -> np.ndarray:
    """Per layer median of the finite values, broadcast back to each channel."""
    out = np.full(len(values), np.nan)
    for start, end in ch.bounds:
        v = values[start:end]
        v = v[np.isfinite(v)]
        if len(v):
            out[start:end] = np.median(v)
    return out


def _mechanisms(ds: xr.Dataset, ch: Channels, p: ClassifyConfig, lo: int, hi: int,
                inactive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mechanism, unused, input_collapsed) from each statistic's latest recorded value in the window."""
    gamma = np.abs(_last(ds, "gn_weight", lo, hi, ch.pos)).astype(np.float64)
    mean = _last(ds, "mean", lo, hi, ch.pos).astype(np.float64)
    std = _last(ds, "std", lo, hi, ch.pos).astype(np.float64)
    in_std = _last(ds, "in_std", lo, hi, ch.pos).astype(np.float64)
    out_norm = _last(ds, "out_weight_norm", lo, hi, ch.pos).astype(np.float64)
    with np.errstate(invalid="ignore"):
        unused = out_norm <= p.unused_ratio * _group_mean(ch.seg, out_norm)
        collapsed = in_std <= p.input_collapse_ratio * _group_mean(ch.group, in_std)
        gn_scale = gamma <= p.gn_scale_ratio * _layer_median(ch, gamma)
        m = p.saturation_margin
        saturated = ch.has_activation & (mean + m * std < -m)
    mech = np.select([gn_scale, saturated, collapsed], ["gn_scale", "saturated", "input_collapse"], "other")
    mech = mech.astype(object)
    mech[~inactive] = ""
    return mech, unused, collapsed


# ---------------------------------------------------------------------------------------------
# public API


def _step_window(steps: np.ndarray, from_step: int | None, to_step: int | None) -> tuple[int, int]:
    lo = 0 if from_step is None else int(np.searchsorted(steps, from_step, side="left"))
    hi = len(steps) if to_step is None else int(np.searchsorted(steps, to_step, side="right"))
    if hi <= lo:
        have = f"{steps[0]}..{steps[-1]}" if len(steps) else "none"
        window = " ".join(f"--{k} {v}" for k, v in (("from-step", from_step), ("to-step", to_step)) if v is not None)
        raise VaedynError(f"no tracked step in the window {window} (trace steps: {have}); widen the window")
    return lo, hi


def classify_trace(
    ds: xr.Dataset,
    params: ClassifyConfig,
    *,
    from_step: int | None = None,
    to_step: int | None = None,
    layers: Sequence[str] | None = None,
) -> xr.Dataset:
    """Label every channel of the selected layers over the steps [from_step, to_step] of a trace.

    `ds` is the trace's root group, lazy (read chunk by chunk) or in memory. Returns a Dataset
    with dim `channel` (coordinate: position along the trace's `channel` dim) holding `layer`,
    `channel_index`, `part` (coordinates) and `state`, `trajectory`, `mechanism`, `unused`,
    `input_collapsed`, `score`, `onset_step`, `revival_step`, `n_transitions`; attributes
    `method`, `params` (JSON), `first_step`, `last_step`, `n_steps`.
    """
    if "step" not in ds.variables:
        raise VaedynError("trace has no 'step' coordinate: not a vaedyn.trace store (see docs/design.md)")
    steps = np.asarray(ds["step"].values).astype(np.int64)
    if len(steps) == 0:
        raise VaedynError("trace has no committed step yet; classify after the first tracked step is written")
    lo, hi = _step_window(steps, from_step, to_step)
    ch = select_channels(ds, layers)
    machine = Debounce(ch.n, params.min_persist)
    score = np.full(ch.n, np.nan, np.float32)  # at each channel's last observed step
    carry: dict[str, np.ndarray] = {}  # weight statistics carried from chunk to chunk (cbp)
    for a in range(lo, hi, params.chunk_steps):
        b = min(hi, a + params.chunk_steps)
        codes, chunk_score = _chunk_states(ds, ch, params, slice(a, b), b - a, all_scores=False, carry=carry)
        machine.update(steps[a:b], codes)
        np.copyto(score, chunk_score, where=~np.isnan(chunk_score))
        del codes
    state = machine.states()
    inactive = (state == "dormant") | (state == "dead")
    mech, unused, collapsed = _mechanisms(ds, ch, params, lo, hi, inactive)
    settings = {**params.model_dump(mode="json"), "from_step": from_step, "to_step": to_step,
                "layers": list(layers) if layers else None}
    return xr.Dataset(
        {
            "state": ("channel", state),
            "trajectory": ("channel", machine.trajectories()),
            "mechanism": ("channel", mech),
            "unused": ("channel", unused),
            "input_collapsed": ("channel", collapsed),
            "score": ("channel", score.astype(np.float64)),
            "onset_step": ("channel", machine.onset),
            "revival_step": ("channel", machine.revival),
            "n_transitions": ("channel", machine.n_trans),
        },
        coords={
            "channel": ("channel", ch.pos.astype(np.int64)),
            "layer": ("channel", ch.layer),
            "channel_index": ("channel", ch.channel_index),
            "part": ("channel", ch.part),
        },
        attrs={
            "method": params.method,
            "params": json.dumps(settings),
            "first_step": int(steps[lo]),
            "last_step": int(steps[hi - 1]),
            "n_steps": int(hi - lo),
        },
    )



def summary(labels: xr.Dataset) -> list[dict[str, Any]]:
    """Per layer (in the labels' order): its part, channels, and counts by group: `state` (at the last step:
    active, dormant, dead, unknown), `trajectory`, `mechanism` (of the channels inactive at the end) and
    `flag` (unused, input_collapsed)."""
    rows = []
    layer = labels["layer"].values
    part = labels["part"].values
    cols = {k: labels[k].values for k in ("state", "trajectory", "mechanism", "unused", "input_collapsed")}
    for name in dict.fromkeys(layer.tolist()):
        sel = layer == name
        rows.append({
            "layer": name, "part": str(part[sel][0]), "channels": int(sel.sum()),
            "state": {s: int((cols["state"][sel] == s).sum()) for s in (*STATES, UNKNOWN)},
            "trajectory": {t: int((cols["trajectory"][sel] == t).sum()) for t in (*TRAJECTORIES, UNKNOWN)},
            "mechanism": {m: int((cols["mechanism"][sel] == m).sum()) for m in MECHANISMS},
            "flag": {f: int(cols[f][sel].sum()) for f in FLAGS},
        })
    return rows


def trace_params(ds: xr.Dataset, options: dict[str, Any] | None = None, sets: Sequence[str] = ()) -> ClassifyConfig:
    """The classify settings of a trace: the `classify` section of the config stored in it, then the
    `--set classify.FIELD=VALUE` overrides, then `options` (None values ignored), validated."""
    return settings.resolve(
        store_mod.stored_config(ds.attrs), overrides=sets, options={"classify": options or {}},
        stored_in="the trace", section="classify",
    ).classify


def stored_labels(path: Path, trace: xr.Dataset) -> tuple[xr.Dataset, str]:
    """The labels of a store's classified channels and where they come from: its `classification`
    group (with the trace's channel coordinates) when `vaedyn classify` wrote one, else the trace
    classified in memory with its stored settings (nothing is written)."""
    group = store_mod.read_classification(path)
    if group is None:
        log.info("%s has no classification group: classifying it in memory with its stored settings", path)
        return classify_trace(trace, trace_params(trace)), "computed in memory (store has none)"
    keep = np.flatnonzero(np.asarray(group["classified"].values, dtype=bool))
    coords = {k: ("channel", _strings(trace[k].values)[keep] if k != "channel_index" else
                  np.asarray(trace[k].values)[keep]) for k in ("layer", "channel_index", "part")}
    return group.isel(channel=keep).assign_coords(coords), "stored by `vaedyn classify`"
