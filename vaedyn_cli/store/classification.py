"""The `classification` group: one row per root channel, written whole by `vaedyn classify`.

Row i is the root's channel i (so `xarray.open_datatree` can align the group with the root);
`classified` marks the channels of the classified layers, the others hold "" labels, NaN score and
-1 (`NO_STEP`) steps. Attributes: `method`, `params` (JSON, with the window and layer globs),
`first_step`, `last_step`, `n_steps`, `missing_step`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vaedyn_cli import artifacts
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.inputs import first_line
from vaedyn_cli.labels import NO_STEP
from vaedyn_cli.store.chunks import check_chunks
from vaedyn_cli.store.metadata import consolidate, root_attrs
from vaedyn_cli.store.schema import CLASSIFICATION_GROUP, ZARR_JSON


def full_span(labels: xr.Dataset, n_channels: int) -> xr.Dataset:
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
             "description": "written by `vaedyn classify`; see vaedyn_cli/classification.py for the definitions"}
    return xr.Dataset(data, attrs=attrs)


def write_classification(store: Path | str, labels: xr.Dataset, n_channels: int) -> Path:
    """Replace the store's `classification` group as a whole.

    The new group is written complete under a hidden temporary name (`.classification.tmp-*`:
    store consolidation skips it, though a non-consolidated listing shows it while it is written),
    then swapped in by two directory renames (old out, new in); when the store has consolidated
    metadata it is refreshed right after (`consolidate`). What a concurrent reader sees:
    `read_classification` (the group's own metadata) sees the old group, the new one, or between
    the two renames (microseconds) none, never a mix. A reader through the consolidated metadata
    (plain `xarray.open_datatree`) may, until the refresh a few milliseconds later, pair the old
    group's attributes with the new arrays (same shapes and types). A reader that keeps the old
    group open lazily across a rewrite should reopen it. One classify writer per store at a time.
    """
    store = Path(store)
    final = store / CLASSIFICATION_GROUP
    tag = artifacts.unique_tag()
    tmp, old = artifacts.temp_path(final, tag), artifacts.temp_path(final, "old-" + tag)
    full = full_span(labels, n_channels)
    try:
        full.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, write_empty_chunks=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    if "consolidated_metadata" in json.loads((store / ZARR_JSON).read_text()):
        consolidate(store)
    return final


def read_classification(store: Path | str) -> xr.Dataset | None:
    """The store's `classification` group, loaded (None when classify has not written one).

    Read through the group's own metadata, never the root's consolidated copy, so that it is the
    old or the new group during a rewrite (see `write_classification`)."""
    store = Path(store)
    if not (store / CLASSIFICATION_GROUP / ZARR_JSON).is_file():
        return None
    fix = "run `vaedyn classify` to write it again"
    check_chunks(store, root_attrs(store), CLASSIFICATION_GROUP)
    try:
        with xr.open_zarr(store, group=CLASSIFICATION_GROUP, consolidated=False, chunks=None, zarr_format=3) as ds:
            return ds.load()
    except Exception as e:  # noqa: BLE001 - zarr and its codecs raise many types for a damaged group
        raise VaedynError(f"the classification group of trace store {store} is damaged ({type(e).__name__}: "
                          f"{first_line(e)[:80]}); {fix}") from None
