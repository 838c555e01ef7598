"""Chunk checks: a damaged store is never read as data.

zarr reads a chunk file that is missing as the array's fill value (NaN, 0, ""), so a deleted chunk
of `act_std` would read as "not measured" and a truncated one fails deep in a decoder. Stores
written since `ALL_CHUNKS` exists hold every chunk (zarr's `write_empty_chunks`, also for chunks
of fill values only), so there a missing chunk below the committed rows is damage. `check_chunks`
costs a listing and a 16-byte read per chunk (blosc's header states the chunk's sizes, so random
bytes or a cut-off file show without decoding); `check_chunks(decode=True)` (`vaedyn store check`)
also decodes every chunk. A live writer rewrites the open chunk by an atomic rename: a reader finds
the old or the new file, both complete.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaedyn_cli.errors import VaedynError
from vaedyn_cli.store.schema import EVENTS_GROUP, ZARR_JSON

ALL_CHUNKS = "all_chunks_written"  # root attribute (and classification group attribute): see the module docstring
FIX = "restore the store from a copy, or re-create the trace with `vaedyn track`"
WRITE_CONFIG = {"write_empty_chunks": True}  # what every vaedyn writer opens its arrays with
_BLOSC_HEADER = 16


@dataclass(frozen=True)
class Chunk:
    """One chunk file of an array: its grid index, file, and the rows of dim 0 it covers."""

    array: str  # path of the array below the store root, e.g. "act_std" or "events/step"
    index: tuple[int, ...]
    path: Path
    rows: tuple[int, int]  # first and last row of dim 0 (inclusive)


def _arrays(root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path below root, metadata) of every array of the root group and its child groups."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "c")
        if here == root or ZARR_JSON not in filenames:
            continue
        try:
            meta = json.loads((here / ZARR_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            raise VaedynError(f"trace store {root} is damaged: {here / ZARR_JSON} does not parse; {FIX}") from None
        if meta.get("node_type") == "array":
            dirnames[:] = []
            yield here.relative_to(root).as_posix(), meta


def _in(name: str, group: str | None) -> bool:
    """Whether array `name` belongs to `group` ("" the root group, None every group)."""
    return group is None or ("/" not in name if group == "" else name.startswith(f"{group}/"))


def committed_chunks(root: Path, attrs: dict[str, Any], group: str | None = "") -> Iterator[tuple[Chunk, dict[str, Any]]]:
    """Every chunk of the arrays of `group` ("" the root, None all) that holds committed rows
    (`committed_steps` of the root's step arrays, `committed_events` of the events group, all rows
    elsewhere), with its array's metadata."""
    for name, meta in _arrays(root):
        if not _in(name, group):
            continue
        encoding = meta.get("chunk_key_encoding") or {}
        separator = (encoding.get("configuration") or {}).get("separator", "/")
        if encoding.get("name") != "default" or separator != "/":
            continue  # (not what vaedyn writes; zarr finds its chunks itself)
        shape = [int(n) for n in meta["shape"]]
        grid = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        dims = meta.get("dimension_names") or []
        rows = shape[0] if shape else 0
        if dims and dims[0] == "step" and "/" not in name:
            rows = min(rows, int(attrs.get("committed_steps", 0)))
        elif dims and dims[0] == "event" and name.startswith(f"{EVENTS_GROUP}/"):
            rows = min(rows, int(attrs.get("committed_events", rows)))
        if not shape:  # a scalar: one chunk, the file `c` itself
            yield Chunk(name, (), root / name / "c", (0, 0)), meta
            continue
        counts = [math.ceil(rows / grid[0]), *(math.ceil(n / g) for n, g in zip(shape[1:], grid[1:], strict=True))]
        for index in np.ndindex(*counts):
            first = index[0] * grid[0]
            path = root / name / "c" / Path(*map(str, index))
            yield Chunk(name, tuple(int(i) for i in index), path, (first, min(first + grid[0], rows) - 1)), meta


def _expected_bytes(meta: dict[str, Any]) -> int | None:
    """Uncompressed bytes of one chunk of a fixed-size type (None for strings)."""
    try:
        item = np.dtype(meta["data_type"]).itemsize
    except TypeError:
        return None
    return item * math.prod(int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"])


def _header_problem(chunk: Chunk, meta: dict[str, Any]) -> str | None:
    """Why a blosc chunk's header disagrees with the file (None when it agrees, or is not blosc)."""
    if [c.get("name") for c in meta.get("codecs", [])][-1:] != ["blosc"]:
        return None
    with open(chunk.path, "rb") as f:
        head = f.read(_BLOSC_HEADER)
    size = chunk.path.stat().st_size
    if len(head) < _BLOSC_HEADER:
        return f"is {size} bytes long, shorter than its header"
    nbytes, cbytes = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
    expected = _expected_bytes(meta)
    if head[0] not in (1, 2) or cbytes != size or (expected is not None and nbytes != expected):
        return "does not hold a blosc chunk of this array (its header and size disagree)"
    return None


def check_chunks(root: Path, attrs: dict[str, Any], group: str | None = "", *, decode: bool = False,
                 steps: Any = None) -> int:
    """Raise a VaedynError naming the first damaged chunk of `group`'s arrays (array, chunk, the
    steps it covers); returns the number of chunks checked. Missing chunks count only in stores that
    write every chunk (root attribute `ALL_CHUNKS`). `steps`: the committed step values, to name a
    chunk's steps."""
    all_written = bool(attrs.get(ALL_CHUNKS))
    checked = 0
    opened: dict[str, Any] = {}
    for chunk, meta in committed_chunks(root, attrs, group):
        problem = None
        if not chunk.path.is_file():
            problem = "is missing" if all_written else None
            if problem is None:
                continue
        else:
            problem = _header_problem(chunk, meta)
            if problem is None and decode:
                problem = _decode_problem(root, chunk, meta, opened)
        if problem is not None:
            raise VaedynError(
                f"trace store {root} is damaged: chunk {chunk.path.relative_to(root)} of '{chunk.array}' "
                f"({_covers(chunk, meta, steps)}) {problem}; {FIX}"
            )
        checked += 1
    return checked


def _covers(chunk: Chunk, meta: dict[str, Any], steps: Any) -> str:
    dims = meta.get("dimension_names") or []
    first, last = chunk.rows
    if dims and dims[0] == "step" and steps is not None and last < len(steps):
        return f"steps {int(steps[first])}..{int(steps[last])}"
    return f"{dims[0] if dims else 'row'}s {first}..{last}" if meta.get("shape") else "its only chunk"


def _decode_problem(root: Path, chunk: Chunk, meta: dict[str, Any], opened: dict[str, Any]) -> str | None:
    """Why a chunk does not decode through zarr (None when it does)."""
    import zarr

    if chunk.array not in opened:
        opened[chunk.array] = zarr.open_array(str(root / chunk.array), mode="r")
    arr = opened[chunk.array]
    grid = arr.chunks
    region = tuple(slice(i * g, min((i + 1) * g, n)) for i, g, n in zip(chunk.index, grid, arr.shape, strict=True))
    try:
        arr[region]
    except Exception as e:  # noqa: BLE001 - codecs raise many types for a damaged chunk
        from vaedyn_cli.inputs import first_line

        return f"does not decode ({type(e).__name__}: {first_line(e)[:80]})"
    return None
