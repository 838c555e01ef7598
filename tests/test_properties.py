"""Properties over large input spaces (hypothesis): the out-of-core classifier equals the in-memory
one for any trace and chunk size, a store gives back any records it was given (shapes, gaps, NaNs),
and a selection survives being written out and parsed again."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_classify import make_trace
from vaedyn_cli import classification, selection, store
from vaedyn_cli.config import ClassifyConfig
from vaedyn_cli.store import ChannelLayout, TraceRecord

SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def traces(draw: st.DrawFn) -> tuple[xr.Dataset, int]:
    """A trace of 1-3 layers over 1-40 steps whose activity switches between healthy, dormant, dead
    and unobserved at random (runs of random length), and a chunk size."""
    n_layers = draw(st.integers(1, 3))
    layers = [(f"decoder.up_blocks.{i}.resnets.0.norm{1 + i % 2}", draw(st.integers(1, 6)), draw(st.booleans()))
              for i in range(n_layers)]
    n_steps = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    n_ch = sum(c for _, c, _ in layers)
    # each channel: runs of 1-12 steps at a level drawn from healthy, dormant, dead, unobserved
    level = np.empty((n_steps, n_ch))
    for c in range(n_ch):
        t = 0
        while t < n_steps:
            length = int(rng.integers(1, 13))
            level[t:t + length, c] = rng.choice([1.0, 0.01, 0.0, np.nan], p=[0.5, 0.3, 0.1, 0.1])
            t += length
    act = (level * (1 + 0.05 * rng.standard_normal(level.shape))).astype(np.float32)
    steps = np.cumsum(rng.integers(1, 5, n_steps)) * 10
    ds = make_trace(layers, steps, seed=seed, act_std=act, std=act)
    return ds, draw(st.integers(1, n_steps + 2))


@SLOW
@given(traces(), st.integers(1, 4), st.sampled_from(["dormancy", "mean_abs_threshold"]))
def test_chunked_classification_equals_the_whole_trace_at_once(case, min_persist: int, method: str) -> None:
    ds, chunk = case
    whole = classification.classify_trace(ds, ClassifyConfig(method=method, min_persist=min_persist, chunk_steps=10**6))
    chunked = classification.classify_trace(ds, ClassifyConfig(method=method, min_persist=min_persist,
                                                               chunk_steps=chunk))
    xr.testing.assert_identical(chunked, whole.assign_attrs(params=chunked.attrs["params"]))


@st.composite
def records(draw: st.DrawFn) -> tuple[ChannelLayout, list[TraceRecord], int]:
    layers = [(f"encoder.l{i}", draw(st.integers(1, 5)), draw(st.sampled_from(["encoder", "decoder"])),
               draw(st.booleans())) for i in range(draw(st.integers(1, 3)))]
    params = [f"w{i}" for i in range(draw(st.integers(0, 3)))]
    layout = ChannelLayout.from_layers(layers, params)
    n = draw(st.integers(0, 12))
    steps = np.cumsum(draw(st.lists(st.integers(1, 7), min_size=n, max_size=n))).tolist()
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    out = []
    for s in steps:
        channels = {}
        for name in store.CHANNEL_VARS:
            v = rng.standard_normal(layout.n_channels).astype(np.float32)
            v[rng.random(layout.n_channels) < 0.2] = np.nan
            if rng.random() < 0.2:
                continue  # a statistic this step did not record: NaN in the store
            channels[name] = v
        scalars = {k: float(rng.standard_normal()) for k in store.SCALAR_VARS if rng.random() < 0.7}
        nz = rng.random(len(params)).astype(np.float32) if rng.random() < 0.5 else None
        out.append(TraceRecord(int(s), channels, scalars, nz))
    return layout, out, draw(st.integers(1, 6))


@SLOW
@given(records())
def test_a_store_gives_back_every_record(case) -> None:
    layout, recs, chunk = case
    attrs = store.store_attrs("track", "prop", "{}", "{}")
    with tempfile.TemporaryDirectory() as tmp:
        path = store.write_records(Path(tmp) / "t.zarr", recs, layout, attrs, chunk_steps=chunk)
        ds = store.open_trace(path).load()
    assert ds["step"].values.tolist() == [r.step for r in recs]
    assert ds["layer"].values.tolist() == list(layout.layer)
    for name in store.CHANNEL_VARS:
        want = np.stack([r.channels.get(name, np.full(layout.n_channels, np.nan, np.float32)) for r in recs]) \
            if recs else np.zeros((0, layout.n_channels), np.float32)
        np.testing.assert_array_equal(ds[name].values, want)
    for name in store.SCALAR_VARS:
        np.testing.assert_array_equal(ds[name].values, [r.scalars.get(name, np.nan) for r in recs])
    nz = [r.near_zero_frac if r.near_zero_frac is not None else np.full(len(layout.params), np.nan, np.float32)
          for r in recs]
    np.testing.assert_array_equal(ds["near_zero_frac"].values,
                                  np.stack(nz) if recs else np.zeros((0, len(layout.params)), np.float32))


FIELD_VALUES = {k: v for k, v in selection.VOCABULARY.items()}
_text = st.text(alphabet="abcdefgh0123456789._*?", min_size=1, max_size=12)


@st.composite
def selectors(draw: st.DrawFn) -> selection.Selector:
    field = draw(st.sampled_from(selection.CHANNEL_FIELDS))
    vocab = FIELD_VALUES.get(field)
    values = st.sampled_from(vocab) if vocab else _text.filter(lambda t: "," not in t)
    patterns = tuple(draw(st.lists(values, min_size=1, max_size=3)))
    return selection.Selector(field, patterns, draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(st.lists(selectors(), min_size=1, max_size=4))
def test_selections_round_trip_through_their_text(sels: list[selection.Selector]) -> None:
    assert selection.parse_select([s.expression for s in sels]) == sels
