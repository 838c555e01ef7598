"""Offline classification of inactive channels: a trace (xarray) -> one label set per channel.

Definitions (DESIGN.md "Activity, state, trajectory, mechanism"), made exact here:

State of a channel at a tracked step (method `dormancy`, the default):
    activity = `act_std` where an activation follows the norm (`has_activation`), else `std`;
    score    = activity / mean activity of the channel's layer at that step (ReDo's
               normalisation on std, so a constant non-zero channel counts as inactive);
    `dead` when activity <= dead_threshold, else `dormant` when score <= tau, else `active`.
    Method `mean_abs_threshold` (the original project's rule): `dormant` when mean_abs <
    threshold, else `active`; score = mean_abs. A step where the statistic is NaN is not
    observed: it neither extends nor breaks a run.

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

The store's `classification` group (`write_classification`) spans every channel of the root, row
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

import csv
import fnmatch
import io
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from pydantic import ValidationError

from vaedyn_cli import store as store_mod
from vaedyn_cli.config import ClassifyConfig, parse_override
from vaedyn_cli.errors import VaedynError

log = logging.getLogger(__name__)

GROUP = store_mod.CLASSIFICATION_GROUP
NO_STEP = -1  # onset_step / revival_step in the store when there is none
STATES = ("active", "dormant", "dead")
TRAJECTORIES = ("active", "born_dormant", "died", "revived", "intermittent")
MECHANISMS = ("gn_scale", "saturated", "input_collapse", "other")
UNKNOWN = "unknown"
RECORD_KEYS = (
    "layer", "channel_index", "part", "state", "trajectory", "mechanism", "unused", "input_collapsed",
    "score", "onset_step", "revival_step", "n_transitions",
)
FORMATS = ("table", "json", "csv")

# per-step state codes (public: report and the TensorBoard hook count them)
UNOBSERVED, ACTIVE, DORMANT, DEAD = -1, 0, 1, 2


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
            raise VaedynError(f"trace has no '{name}' variable: not a vaedyn.trace store (see DESIGN.md)")
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
                          "write it (see DESIGN.md 'Trace store') or choose another --method")
    return np.asarray(ds[name].isel(step=steps, channel=_indexer(pos)).values, dtype=np.float32)


class _Activity:
    """The activity of a chunk, layer by layer: act_std where an activation follows, else std.

    Each source is read once for the whole chunk (a store chunk spans many layers), then sliced.
    """

    def __init__(self, ds: xr.Dataset, ch: Channels, steps: slice | np.ndarray, method: str) -> None:
        self.ch = ch
        self.act = self.std = None
        self.std_from = 0
        if method == "mean_abs_threshold":
            self.act = _read(ds, "mean_abs", steps, ch.pos)
            self.ha = np.ones(ch.n, bool)
            return
        self.ha = ch.has_activation
        if self.ha.any():
            self.act = _read(ds, "act_std", steps, ch.pos)
        if not self.ha.all():  # std over whole layers: a layer may mix channels with and without
            no_act = np.flatnonzero(~self.ha)
            self.std_from = ch.bounds[ch.seg[no_act[0]]][0]
            self.std = _read(ds, "std", steps, ch.pos[self.std_from:ch.bounds[ch.seg[no_act[-1]]][1]])

    def segment(self, start: int, end: int) -> np.ndarray:
        ha = self.ha[start:end]
        if ha.all():
            return self.act[:, start:end]
        std = self.std[:, start - self.std_from:end - self.std_from]
        return std if not ha.any() else np.where(ha, self.act[:, start:end], std)


def _last_observed_rows(finite: np.ndarray) -> np.ndarray:
    """Per column, the index of its last finite row (-1 when none)."""
    flipped = finite[::-1].argmax(axis=0)
    rows = finite.shape[0] - 1 - flipped
    rows[~finite.any(axis=0)] = -1
    return rows


def _layer_codes(a: np.ndarray, p: ClassifyConfig, out: np.ndarray) -> np.ndarray:
    """Write the state codes of one layer's activity block `a` (steps, channels) into `out`; return
    the per-step normaliser of the score (the layer's mean finite activity; 1 for mean_abs_threshold).

    Compares the activity with tau x layer mean rather than dividing first: no (steps, channels)
    temporary for the classification's hot loop. Unobserved (NaN) entries are left to the caller."""
    if p.method == "mean_abs_threshold":
        np.less(a, p.threshold, out=out, casting="unsafe")
        return np.ones(a.shape[0], np.float64)
    norm = a.mean(axis=1, dtype=np.float64)  # NaN in any row when a value is missing
    if not np.isfinite(norm).all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN mean, on purpose
            norm = np.nanmean(a, axis=1, dtype=np.float64)
    limit = (p.tau * norm).astype(np.float32)[:, None]
    np.less_equal(a, limit, out=out, casting="unsafe")
    dead = a <= p.dead_threshold
    if (limit >= p.dead_threshold).all():  # then dead implies dormant: 1 + 1 = 2
        out += dead
    else:
        out[dead] = DEAD
    return norm


def _chunk_states(ds: xr.Dataset, ch: Channels, p: ClassifyConfig, steps: slice | np.ndarray, n_steps: int,
                  all_scores: bool) -> tuple[np.ndarray, np.ndarray]:
    """State codes (steps, channels) at the step positions `steps` (`n_steps` of them), and the
    scores: (steps, channels) when `all_scores`, else each channel's score at its last observed
    step among them (NaN when it has none), which is all the classification keeps."""
    source = _Activity(ds, ch, steps, p.method)
    codes = np.empty((n_steps, ch.n), np.int8)
    shape = (n_steps, ch.n) if all_scores else (ch.n,)
    score = np.full(shape, np.nan, np.float32)
    for start, end in ch.bounds:
        a = source.segment(start, end)
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
# the state machine


def _last_of_group(keys: np.ndarray) -> np.ndarray:
    """Mask of the last element of each run of equal keys (keys sorted by group)."""
    out = np.ones(len(keys), bool)
    out[:-1] = keys[1:] != keys[:-1]
    return out


def _first_of_group(keys: np.ndarray) -> np.ndarray:
    out = np.ones(len(keys), bool)
    out[1:] = keys[1:] != keys[:-1]
    return out


class _Debounce:
    """Per-channel persistence filter over inactive/active, carried across chunks of steps.

    Per chunk, channels whose raw code does not change ("quiet", the common case) are updated in
    bulk; the others are cut into runs of equal state (vectorised over all their runs): a run of
    at least `min_persist` observed steps sets the filtered state, and counts as a change when
    its state differs from that of the previous such run.
    """

    _FIELDS = ("seen", "initial", "cur", "run", "run_len", "run_start", "n_trans", "onset", "revival",
               "last_dead", "last_code")
    BATCH = 1 << 21  # (steps x channels) processed at once on the run path: bounds its memory

    def __init__(self, n: int, min_persist: int) -> None:
        self.k = min_persist
        self.seen = np.zeros(n, bool)
        self.initial = np.zeros(n, bool)  # inactive at the first observed step
        self.cur = np.zeros(n, bool)  # filtered state: inactive?
        self.run = np.zeros(n, bool)  # raw state of the current run: inactive?
        self.run_len = np.zeros(n, np.int64)  # observed steps in the current run
        self.run_start = np.full(n, NO_STEP, np.int64)  # step where the current run began
        self.n_trans = np.zeros(n, np.int64)
        self.onset = np.full(n, NO_STEP, np.int64)
        self.revival = np.full(n, NO_STEP, np.int64)
        self.last_dead = np.zeros(n, bool)  # the most recent inactive observed step was dead
        self.last_code = np.full(n, UNOBSERVED, np.int8)  # raw code of the most recent observed step

    def update(self, steps: np.ndarray, codes: np.ndarray) -> None:
        """A chunk of tracked steps: raw codes of shape (len(steps), channels)."""
        steps = np.asarray(steps, np.int64)
        ref = np.where(self.seen, self.last_code, codes[0])
        same = (codes == ref).all(axis=0)
        held = same & (ref >= ACTIVE)  # observed at every step with an unchanged code
        new = held & ~self.seen
        if new.any():
            inact = ref[new] >= DORMANT
            self.seen[new] = True
            self.initial[new] = self.cur[new] = self.run[new] = inact
            self.run_len[new] = 0
            self.run_start[new] = steps[0]
            self.last_code[new] = ref[new]
            self.last_dead[new] = ref[new] == DEAD
        self.run_len[held] += len(steps)
        change = held & (self.run != self.cur) & (self.run_len >= self.k)
        if change.any():
            self.cur[change] = self.run[change]
            self.n_trans += change
            self.onset[change & self.cur] = self.run_start[change & self.cur]
            self.revival[change & ~self.cur] = self.run_start[change & ~self.cur]
        other = np.flatnonzero(~same)
        if other.size:
            busy = other[~(codes[:, other] == UNOBSERVED).all(axis=0)]
            per = max(1, self.BATCH // len(steps))
            for a in range(0, len(busy), per):
                cols = busy[a:a + per]
                self._runs(cols, steps, codes[:, cols])

    def _runs(self, cols: np.ndarray, steps: np.ndarray, codes: np.ndarray) -> None:
        """Update channels `cols` (each observed at least once in the chunk) run by run."""
        n_steps, n_cols = codes.shape
        flat = np.ascontiguousarray(codes.T).ravel()  # channel-major: each channel's steps in order
        idx = np.flatnonzero(flat >= ACTIVE)
        code = flat[idx]
        c, t = np.divmod(idx, n_steps)
        x = code >= DORMANT
        # runs of equal state within each channel
        rs = np.flatnonzero(_first_of_group(c) | _first_of_group(x))
        rc, rx = c[rs], x[rs]
        rlen = np.diff(np.append(rs, len(idx)))
        rstart = steps[t[rs]]
        seen, run = self.seen[cols], self.run[cols]
        col_first = _first_of_group(rc)
        cont = col_first & seen[rc] & (rx == run[rc])  # the chunk's first run continues the carried one
        rlen = rlen + np.where(cont, self.run_len[cols][rc], 0)
        rstart = np.where(cont, self.run_start[cols][rc], rstart)
        first_x = rx[col_first]  # one entry per channel: every channel has an observed step
        initial = np.where(seen, self.initial[cols], first_x)
        cur = np.where(seen, self.cur[cols], first_x)
        # persistent runs and the changes between them
        p = np.flatnonzero(rlen >= self.k)
        pc, px = rc[p], rx[p]
        prev = np.empty_like(px)
        prev[1:] = px[:-1]
        pfirst = _first_of_group(pc)
        prev[pfirst] = cur[pc[pfirst]]
        change = px != prev
        n_trans = self.n_trans[cols] + np.bincount(pc[change], minlength=n_cols)
        onset, revival = self.onset[cols], self.revival[cols]
        for target, which in ((onset, change & px), (revival, change & ~px)):
            r = p[which]
            last = _last_of_group(rc[r])
            target[rc[r][last]] = rstart[r][last]
        plast = _last_of_group(pc)
        cur[pc[plast]] = px[plast]
        # carried state for the next chunk
        rl = _last_of_group(rc)
        run[rc[rl]] = rx[rl]
        run_len, run_start = self.run_len[cols], self.run_start[cols]
        run_len[rc[rl]] = rlen[rl]
        run_start[rc[rl]] = rstart[rl]
        last_code = self.last_code[cols]
        el = _last_of_group(c)
        last_code[c[el]] = code[el]
        last_dead = self.last_dead[cols]
        ix = np.flatnonzero(x)
        if ix.size:
            il = ix[_last_of_group(c[ix])]
            last_dead[c[il]] = code[il] == DEAD
        self.seen[cols] = True
        self.initial[cols], self.cur[cols], self.run[cols] = initial, cur, run
        self.run_len[cols], self.run_start[cols], self.n_trans[cols] = run_len, run_start, n_trans
        self.onset[cols], self.revival[cols] = onset, revival
        self.last_code[cols], self.last_dead[cols] = last_code, last_dead

    def states(self) -> np.ndarray:
        out = np.where(self.cur, np.where(self.last_dead, "dead", "dormant"), "active").astype(object)
        out[~self.seen] = UNKNOWN
        return out

    def trajectories(self) -> np.ndarray:
        out = np.full(len(self.cur), "intermittent", dtype=object)
        out[(self.n_trans == 0) & ~self.initial] = "active"
        out[(self.n_trans == 0) & self.initial] = "born_dormant"
        out[(self.n_trans == 1) & ~self.initial] = "died"
        out[(self.n_trans == 1) & self.initial] = "revived"
        out[~self.seen] = UNKNOWN
        return out


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
        raise VaedynError("trace has no 'step' coordinate: not a vaedyn.trace store (see DESIGN.md)")
    steps = np.asarray(ds["step"].values).astype(np.int64)
    if len(steps) == 0:
        raise VaedynError("trace has no committed step yet; classify after the first tracked step is written")
    lo, hi = _step_window(steps, from_step, to_step)
    ch = select_channels(ds, layers)
    machine = _Debounce(ch.n, params.min_persist)
    score = np.full(ch.n, np.nan, np.float32)  # at each channel's last observed step
    for a in range(lo, hi, params.chunk_steps):
        b = min(hi, a + params.chunk_steps)
        codes, chunk_score = _chunk_states(ds, ch, params, slice(a, b), b - a, all_scores=False)
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


def _nullable_step(v: Any) -> int | None:
    v = int(v)
    return None if v == NO_STEP else v


def to_records(labels: xr.Dataset) -> list[dict[str, Any]]:
    """One dict per channel with exactly RECORD_KEYS (None for a missing step or mechanism)."""
    cols = {k: labels[k].values.tolist() for k in RECORD_KEYS}
    records = []
    for i in range(labels.sizes["channel"]):
        score = cols["score"][i]
        records.append({
            "layer": str(cols["layer"][i]),
            "channel_index": int(cols["channel_index"][i]),
            "part": str(cols["part"][i]),
            "state": str(cols["state"][i]),
            "trajectory": str(cols["trajectory"][i]),
            "mechanism": cols["mechanism"][i] or None,
            "unused": bool(cols["unused"][i]),
            "input_collapsed": bool(cols["input_collapsed"][i]),
            "score": None if score is None or not np.isfinite(score) else float(score),
            "onset_step": _nullable_step(cols["onset_step"][i]),
            "revival_step": _nullable_step(cols["revival_step"][i]),
            "n_transitions": int(cols["n_transitions"][i]),
        })
    return records


# ---------------------------------------------------------------------------------------------
# the store


def stored_params(ds: xr.Dataset) -> dict[str, Any]:
    """The `classify` section of the config stored in the trace (empty when there is none)."""
    raw = ds.attrs.get("config")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except ValueError:
        import yaml

        cfg = yaml.safe_load(raw) or {}
    section = cfg.get("classify") if isinstance(cfg, dict) else None
    return dict(section) if isinstance(section, dict) else {}


def resolve_params(ds: xr.Dataset, overrides: dict[str, Any] | None = None) -> ClassifyConfig:
    """The store's classify settings with the non-None `overrides` on top, validated."""
    data = {**stored_params(ds), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        return ClassifyConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise VaedynError(f"invalid classify parameters: {problems}") from None


def classify_store(
    path: Path | str,
    params: ClassifyConfig | None = None,
    *,
    from_step: int | None = None,
    to_step: int | None = None,
    layers: Sequence[str] | None = None,
    write: bool = True,
) -> xr.Dataset:
    """Classify a trace store (params default to its stored config) and write its `classification` group."""
    path = store_mod.resolve_store_path(str(path))
    ds = store_mod.open_trace(path)
    labels = classify_trace(ds, params or resolve_params(ds), from_step=from_step, to_step=to_step, layers=layers)
    if write:
        write_classification(path, labels, n_channels=ds.sizes["channel"])
    return labels


def _full_span(labels: xr.Dataset, n_channels: int) -> xr.Dataset:
    """The labels spread over all `n_channels` of the root (aligned with it, as a DataTree needs);
    channels outside the selection are unclassified: empty strings, NaN score, -1 steps."""
    pos = labels["channel"].values
    classified = np.zeros(n_channels, bool)
    classified[pos] = True
    data: dict[str, Any] = {"classified": ("channel", classified)}
    for name in ("state", "trajectory", "mechanism"):
        col = np.full(n_channels, "", dtype=object)
        col[pos] = labels[name].values
        data[name] = ("channel", col.astype(np.dtypes.StringDType()))
    for name, fill, dtype in (("unused", False, bool), ("input_collapsed", False, bool),
                              ("score", np.nan, np.float64), ("onset_step", NO_STEP, np.int64),
                              ("revival_step", NO_STEP, np.int64), ("n_transitions", -1, np.int64)):
        col = np.full(n_channels, fill, dtype=dtype)
        col[pos] = labels[name].values
        data[name] = ("channel", col)
    attrs = {**labels.attrs, "missing_step": NO_STEP,
             "description": "written by `vaedyn classify`; see vaedyn_cli/classify.py for the definitions"}
    return xr.Dataset(data, attrs=attrs)


def write_classification(store: Path, labels: xr.Dataset, n_channels: int) -> Path:
    """Replace the store's `classification` group as a whole.

    The new group is written complete under a hidden temporary name (`.classification.tmp-*`:
    store consolidation skips it, though a non-consolidated listing shows it while it is written),
    then swapped in by two directory renames (old out, new in); when the store has consolidated
    metadata it is refreshed right after (`store.consolidate`). What a concurrent reader sees:
    `read_classification` (the group's own metadata) sees the old group, the new one, or between
    the two renames (microseconds) none, never a mix. A reader through the consolidated metadata
    (plain `xarray.open_datatree`) may, until the refresh a few milliseconds later, pair the old
    group's attributes with the new arrays (same shapes and types). A reader that keeps the old
    group open lazily across a rewrite should reopen it. One classify writer per store at a time.
    """
    store = Path(store)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_name, old_name = f".{GROUP}.tmp-{tag}", f".{GROUP}.old-{tag}"
    full = _full_span(labels, n_channels)
    final = store / GROUP
    try:
        full.to_zarr(store / tmp_name, mode="w-", zarr_format=3, consolidated=False)
        if final.exists():
            os.rename(final, store / old_name)
        os.rename(store / tmp_name, final)
    finally:
        shutil.rmtree(store / tmp_name, ignore_errors=True)
    shutil.rmtree(store / old_name, ignore_errors=True)
    if "consolidated_metadata" in json.loads((store / "zarr.json").read_text()):
        store_mod.consolidate(store)
    return final


def read_classification(store: Path | str) -> xr.Dataset | None:
    """The store's `classification` group, loaded (None when classify has not written one).

    Read through the group's own metadata, never the root's consolidated copy, so that it is the
    old or the new group during a rewrite (see `write_classification`)."""
    store = Path(store)
    if not (store / GROUP / "zarr.json").is_file():
        return None
    with xr.open_zarr(store, group=GROUP, consolidated=False, chunks=None, zarr_format=3) as ds:
        return ds.load()


# ---------------------------------------------------------------------------------------------
# output


def summary(labels: xr.Dataset) -> list[dict[str, Any]]:
    """Per layer: channels, final states, trajectories, mechanisms and flags (counts)."""
    rows = []
    layer = labels["layer"].values
    cols = {k: labels[k].values for k in ("state", "trajectory", "mechanism", "unused", "input_collapsed")}
    for name in dict.fromkeys(layer.tolist()):
        sel = layer == name
        row: dict[str, Any] = {"layer": name, "channels": int(sel.sum())}
        for s in ("dormant", "dead"):
            row[s] = int((cols["state"][sel] == s).sum())
        for t in TRAJECTORIES:
            row[t] = int((cols["trajectory"][sel] == t).sum())
        for m in MECHANISMS:
            row[m] = int((cols["mechanism"][sel] == m).sum())
        row["unused"] = int(cols["unused"][sel].sum())
        row["input_collapsed"] = int(cols["input_collapsed"][sel].sum())
        rows.append(row)
    return rows


def to_json(labels: xr.Dataset, store: Path | str) -> dict[str, Any]:
    """The JSON object `vaedyn classify` prints (documented in README.md, read by `vaedyn nudge`)."""
    layer = labels["layer"].values.tolist()
    return {
        "store": str(store),
        "method": labels.attrs["method"],
        "params": json.loads(labels.attrs["params"]),
        "steps": [labels.attrs["first_step"], labels.attrs["last_step"]],
        "layers": {n: layer.count(n) for n in dict.fromkeys(layer)},
        "channels": to_records(labels),
    }


def to_csv(labels: xr.Dataset) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(RECORD_KEYS), lineterminator="\n")
    writer.writeheader()
    for rec in to_records(labels):
        writer.writerow({k: "" if v is None else v for k, v in rec.items()})
    return buf.getvalue()


_SHORT = {"channels": "ch", "born_dormant": "born", "intermittent": "interm", "input_collapse": "in_coll",
          "input_collapsed": "in_collapsed", "saturated": "satur"}


def to_table(labels: xr.Dataset, store: Path | str, color: bool = True, width: int | None = None) -> str:
    """A rich table: one row per layer, a total row; rendered to text."""
    from rich.console import Console
    from rich.table import Table

    rows = summary(labels)
    keys = [k for k in rows[0] if k != "layer"] if rows else []
    title = (f"{store}: method {labels.attrs['method']}, steps {labels.attrs['first_step']}.."
             f"{labels.attrs['last_step']} ({labels.attrs['n_steps']} tracked)")
    table = Table(title=title, show_footer=True)
    table.add_column("layer", footer="total", no_wrap=True)
    for k in keys:
        table.add_column(_SHORT.get(k, k), justify="right", footer=str(sum(r[k] for r in rows)))
    for r in rows:
        table.add_row(r["layer"], *[str(r[k]) if r[k] else "." for k in keys])
    if width is None:  # a terminal's own width; piped text gets room for the longest layer names
        width = shutil.get_terminal_size().columns if color else 240
    console = Console(file=io.StringIO(), force_terminal=color, width=width)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def run(
    store: str,
    overrides: dict[str, Any] | None = None,
    *,
    sets: Sequence[str] = (),
    from_step: int | None = None,
    to_step: int | None = None,
    layers: Sequence[str] | None = None,
    write: bool = True,
    fmt: str | None = None,
    tty: bool = False,
) -> str:
    """`vaedyn classify`: resolve the store, classify, write the group, render the output text.

    `overrides` (None values ignored) and `sets` (`classify.FIELD=VALUE`) go over the store's config.
    """
    if fmt is not None and fmt not in FORMATS:
        raise VaedynError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    extra = {}
    for item in sets:
        keys, value = parse_override(item)
        if len(keys) != 2 or keys[0] != "classify":
            raise VaedynError(f"--set {item!r}: classify takes only classify.FIELD=VALUE, e.g. classify.tau=0.05")
        extra[keys[1]] = value
    path = store_mod.resolve_store_path(store)
    ds = store_mod.open_trace(path)
    params = resolve_params(ds, {**extra, **(overrides or {})})
    labels = classify_trace(ds, params, from_step=from_step, to_step=to_step, layers=layers)
    if write:
        write_classification(path, labels, n_channels=ds.sizes["channel"])
        log.info("wrote %s/%s", path, GROUP)
    fmt = fmt or ("table" if tty else "json")
    if fmt == "json":
        return json.dumps(to_json(labels, path)) + "\n"
    if fmt == "csv":
        return to_csv(labels)
    return to_table(labels, path, color=tty)

