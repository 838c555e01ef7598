"""Writing a store from a background thread (TraceWriter), and whole stores or groups at once.

How a step becomes visible. Arrays along `step` are chunked `chunk_steps` rows at a time and grow
a whole chunk at once; a background thread fills the current chunk in memory and writes it whole
(no read-modify-write), then commits (`metadata.commit_root`): plain `xarray.open_datatree(path,
engine="zarr")` sees the committed prefix only, and `reader.open_trace` also trims to
`committed_steps` when read without consolidated metadata. A crash leaves arrays longer than
`committed_steps`: they read as the committed prefix. Commits happen when a chunk fills,
`commit_interval_s` after the first uncommitted step, and on `flush()`, `truncate()`,
`add_events()` and `close()`; a clean close of a writer that wrote trims the arrays to their
committed length (one that only opened the store changes nothing). Events follow the same rule
with the root attribute `committed_events`: rows go after the committed ones, the count is
committed last, readers read each column up to it (the first rows make the group aside and
rename it in). Resuming truncates steps and events to the checkpoint's step,
dropping whatever a killed writer left uncommitted.

Strings are stored as zarr v3 `string` (variable-length UTF-8), which zarr specifies, so no
"unstable specification" warning. Anything else that writes into a store (e.g. the
`classification` group) calls `metadata.consolidate(path)` afterwards so that consolidated readers
see it.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from vaedyn_cli import artifacts, faults, inputs
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.store.chunks import ALL_CHUNKS, WRITE_CONFIG, check_chunks
from vaedyn_cli.store.metadata import commit_root, root_attrs
from vaedyn_cli.store.reader import check_store, committed_events, open_group
from vaedyn_cli.store.schema import (
    EVENT_FIELDS,
    EVENTS_GROUP,
    SCHEMA_VERSION,
    ZARR_JSON,
    ChannelLayout,
    PendingRecord,
    TraceRecord,
    encoding,
    events_dataset,
    record_row,
    records_to_dataset,
)

log = logging.getLogger(__name__)


def _new_store(path: Path, layout: ChannelLayout, attrs: Mapping[str, Any], chunk_steps: int) -> None:
    """Write an empty store under a temporary name and rename it into place."""
    tmp = artifacts.temp_path(path, artifacts.unique_tag())
    try:
        skeleton = records_to_dataset([], layout, {**attrs, "committed_steps": 0, ALL_CHUNKS: True})
        skeleton.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=encoding(skeleton, chunk_steps),
                         write_empty_chunks=True)
        commit_root(tmp, root_attrs(tmp), 0)
        artifacts.write_marker(tmp, artifacts.TRACE)
        artifacts.replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stored_layout(path: Path) -> ChannelLayout:
    with open_group(path) as ds:
        return ChannelLayout.from_dataset(ds)


# the writer thread's operations (identities, not strings: an op is compared with `is`)
_RECORD, _TICK, _EVENTS, _TRUNCATE, _FLUSH, _CLOSE = (object() for _ in range(6))
_WAITED_FOR = (_TRUNCATE, _FLUSH)  # their caller waits on an Event the thread sets when done


class TraceWriter:
    """Appends tracked steps to a store from a background thread.

    `append` only enqueues (it blocks when `queue_size` steps wait); the thread writes and commits
    (see the module docstring). `mode="w"` starts a new store (replacing an existing trace store at
    `path`, never any other folder); `mode="a"` opens an existing one with the same layout, or
    creates it. Errors of the thread surface on the next call and on `close()`.
    """

    def __init__(
        self,
        path: str | Path,
        layout: ChannelLayout,
        attrs: Mapping[str, Any],
        *,
        mode: Literal["w", "a"] = "a",
        chunk_steps: int = 64,
        queue_size: int = 8,
        commit_interval_s: float = 60.0,
        keep_recent: int = 0,
    ):
        self.path = Path(path)
        self.layout = layout
        self.chunk_steps = int(chunk_steps)
        self.commit_interval_s = float(commit_interval_s)
        self._recent: deque[TraceRecord] = deque(maxlen=max(0, keep_recent))
        self._touched = False  # whether this writer changed the store (else closing it writes nothing)
        self._open_or_create(mode, attrs)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"vaedyn-trace-writer:{self.path.name}", daemon=True)
        self._thread.start()

    # -- caller side ------------------------------------------------------------------------

    def _open_or_create(self, mode: str, attrs: Mapping[str, Any]) -> None:
        exists = self.path.exists()
        if exists and not (self.path / ZARR_JSON).is_file() and any(self.path.iterdir()):
            raise VaedynError(f"{self.path} exists and is not a trace store; choose another path or remove it")
        if exists and (self.path / ZARR_JSON).is_file():
            version = check_store(self.path).get("schema_version")
            if mode == "w":  # a vaedyn.trace store (checked above), and nothing else in it
                artifacts.check_replaceable(self.path, artifacts.TRACE, "trace store", legacy=lambda _: True)
            elif version != SCHEMA_VERSION:
                raise VaedynError(
                    f"trace store {self.path} has schema_version {version}; this vaedyn appends to version "
                    f"{SCHEMA_VERSION} only: finish the run with the vaedyn that started it, or start it over"
                )
            if mode == "a":
                check_chunks(self.path, root_attrs(self.path))  # never append to (or rewrite) damaged data
                stored = stored_layout(self.path)
                if stored != self.layout:
                    raise VaedynError(
                        f"trace store {self.path} tracks other channels ({stored.n_channels} channels, "
                        f"{len(stored.params)} params) than this model and track config ({self.layout.n_channels}, "
                        f"{len(self.layout.params)}); resume with the same config or write a new store"
                    )
        if mode == "w" or not exists or not (self.path / ZARR_JSON).is_file():
            if exists and not (self.path / ZARR_JSON).is_file():
                self.path.rmdir()  # an empty folder
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _new_store(self.path, self.layout, attrs, self.chunk_steps)
        self._attrs = root_attrs(self.path)
        self._n = int(self._attrs.get("committed_steps", 0))
        import zarr

        for stale in self.path.glob(f".{EVENTS_GROUP}.tmp-*"):  # a crash while the first events were written
            shutil.rmtree(stale, ignore_errors=True)
        if "committed_events" not in self._attrs:
            ev_dir = self.path / EVENTS_GROUP
            self._attrs["committed_events"] = (
                committed_events({}, zarr.open_group(str(ev_dir), mode="r", use_consolidated=False), self.path)
                if (ev_dir / ZARR_JSON).is_file() else 0
            )

        group = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        self._arrays = {name: group[name].with_config(WRITE_CONFIG) for name in self.layout.step_vars}
        chunk = self._arrays["step"].chunks[0]
        if chunk != self.chunk_steps:
            log.info("store %s has chunks of %d steps; using that instead of %d", self.path, chunk, self.chunk_steps)
            self.chunk_steps = chunk
        self._load_cache()
        self._last_step = int(self._arrays["step"][self._n - 1]) if self._n else None

    def append(self, record: TraceRecord | PendingRecord) -> None:
        """Queue one step (strictly after the previous one); blocks only while the queue is full."""
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("TraceWriter is closed")
        step = int(record.step)
        if self._last_step is not None and step <= self._last_step:
            raise VaedynError(
                f"trace store {self.path}: step {step} is not after the last recorded step {self._last_step} "
                "(steps must be strictly increasing; truncate first when resuming)"
            )
        self._last_step = step
        self._put((_RECORD, record))

    def add_events(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Queue intervention rows (fields: step, layer, channel_index, strategy, param, before, after)."""
        if rows:
            self._put((_EVENTS, events_dataset(rows)))

    def truncate(self, step: int) -> None:
        """Drop every step after `step` (and the events after it), e.g. when resuming from a checkpoint."""
        self._call(_TRUNCATE, int(step))
        steps = self._arrays_steps()
        self._last_step = int(steps[-1]) if steps.size else None

    def flush(self) -> None:
        """Write and commit everything queued so far."""
        self._call(_FLUSH, None)

    def close(self) -> None:
        """Flush, trim the arrays to the committed steps, stop the thread; raises the thread's error."""
        with self._lock:
            if self._closed:
                self._raise_if_failed()
                return
            self._closed = True
        self._queue.put((_CLOSE, None))
        self._thread.join()
        self._raise_if_failed()

    def recent(self) -> list[TraceRecord]:
        """The last `keep_recent` written records (oldest first), e.g. for in-training classification."""
        return list(self._recent)

    @property
    def committed_steps(self) -> int:
        return self._n

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, item: tuple[Any, Any]) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_if_failed()
                    raise RuntimeFailure(f"trace writer for {self.path} stopped") from None

    def _call(self, op: object, arg: Any) -> None:
        if self._closed:
            raise RuntimeError("TraceWriter is closed")
        done = threading.Event()
        self._put((op, (arg, done)))
        while not done.wait(0.5):
            if not self._thread.is_alive():
                break
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            raise RuntimeFailure(
                f"writing trace store {self.path} failed: {type(e).__name__}: {inputs.first_line(e)}"
            ) from e

    # -- writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        deadline: float | None = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                op, arg = self._queue.get(timeout=timeout)
            except queue.Empty:
                op, arg = _TICK, None
            if self._error is not None:  # failed: keep draining so producers never block
                self._release(op, arg)
                if op is _CLOSE:
                    return
                continue
            try:
                if op is _RECORD:
                    self._add_row(arg.resolve())
                    if self._pending == 0:
                        deadline = None
                    elif deadline is None:
                        deadline = time.monotonic() + self.commit_interval_s
                    continue
                if op is _TICK:
                    self._commit_pending()
                elif op is _EVENTS:
                    self._commit_pending()
                    self._append_events(arg)
                elif op is _TRUNCATE:
                    self._commit_pending()
                    self._truncate(arg[0])
                elif op is _FLUSH:
                    self._commit_pending()
                elif op is _CLOSE:
                    if self._touched:
                        self._commit_pending()
                        self._trim_to_committed()
                    return
                deadline = None
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                self._error = e
                log.error("trace writer for %s failed: %s", self.path, e)
                if op is _CLOSE:
                    return  # close() is waiting for this thread to end
            finally:
                if op not in (_RECORD, _TICK) or self._error is not None:
                    self._release(op, arg)

    @staticmethod
    def _release(op: Any, arg: Any) -> None:
        if op in _WAITED_FOR and arg is not None:
            arg[1].set()

    def _load_cache(self) -> None:
        """The in-memory copy of the chunk that holds the next step (its committed rows included)."""
        self._start = (self._n // self.chunk_steps) * self.chunk_steps
        self._cache = {}
        for name, arr in self._arrays.items():
            block = np.full((self.chunk_steps, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
            have = self._n - self._start
            if have:
                block[:have] = arr[self._start : self._n]
            self._cache[name] = block
        self._pending = 0

    def _arrays_steps(self) -> np.ndarray:
        return np.asarray(self._arrays["step"][: self._n]) if self._n else np.zeros(0, np.int64)

    def _add_row(self, record: TraceRecord) -> None:
        self._touched = True
        i = self._n + self._pending - self._start
        for name in self.layout.step_vars:
            self._cache[name][i] = record_row(record, name, self.layout)
        self._pending += 1
        if self._recent.maxlen:
            self._recent.append(record)
        if i + 1 == self.chunk_steps:
            self._commit_pending()

    def _write_cache(self) -> None:
        end = self._start + self.chunk_steps
        for name, arr in self._arrays.items():
            if arr.shape[0] < end:
                arr.resize((end, *arr.shape[1:]))
            arr[self._start : end] = self._cache[name]

    def _commit(self) -> None:
        self._attrs["committed_steps"] = int(self._n)
        commit_root(self.path, self._attrs, self._n)

    def _commit_pending(self) -> None:
        if not self._pending:
            return
        self._write_cache()
        if faults.armed("writer_flush"):
            first = self._n - self._start
            for step in self._cache["step"][first : first + self._pending]:
                faults.maybe_fail("writer_flush", int(step))
        self._n += self._pending
        self._pending = 0
        self._commit()
        if self._n - self._start == self.chunk_steps:
            self._load_cache()

    def _truncate(self, step: int) -> None:
        """Commit the shorter counts first, then drop what lies beyond them on disk (rows a crashed
        writer left uncommitted included)."""
        import zarr

        self._touched = True
        keep = int(np.searchsorted(self._arrays_steps(), step, side="right"))
        if keep != self._n:
            log.info("trace %s: dropping %d steps after step %d", self.path, self._n - keep, step)
        self._n = keep
        self._load_cache()
        ev_dir = self.path / EVENTS_GROUP
        committed = int(self._attrs.get("committed_events", 0))
        group = zarr.open_group(str(ev_dir), mode="r+", use_consolidated=False) if committed else None
        n_keep = 0
        if group is not None:
            ev_steps = np.asarray(group["step"][:committed])
            n_keep = int((ev_steps <= step).sum())
            if not (ev_steps[:n_keep] <= step).all():
                raise RuntimeError("events are not in step order; cannot truncate them")
        self._attrs["committed_events"] = n_keep
        self._commit()
        if group is None or n_keep == 0:
            shutil.rmtree(ev_dir, ignore_errors=True)
        else:
            for name in EVENT_FIELDS:
                if group[name].shape[0] != n_keep:
                    group[name].resize((n_keep,))
        self._commit()

    def _append_events(self, ds: xr.Dataset) -> None:
        """Rows after the committed ones (overwriting what a crashed writer left), then a commit of
        `committed_events`; the first rows make the group aside and rename it into place."""
        self._touched = True
        ev_dir = self.path / EVENTS_GROUP
        n0, k = int(self._attrs.get("committed_events", 0)), ds.sizes["event"]
        if n0 == 0:
            tmp = artifacts.temp_path(ev_dir, artifacts.unique_tag())
            try:
                ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=encoding(ds, self.chunk_steps),
                           write_empty_chunks=True)
                shutil.rmtree(ev_dir, ignore_errors=True)
                os.rename(tmp, ev_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            import zarr

            group = zarr.open_group(str(ev_dir), mode="r+", use_consolidated=False)
            for name in EVENT_FIELDS:
                arr = group[name].with_config(WRITE_CONFIG)
                arr.resize((n0 + k,))
                values = ds[name].values
                arr[n0:] = values.astype(object) if values.dtype.kind in "OUT" else values
        self._attrs["committed_events"] = n0 + k
        self._commit()

    def _trim_to_committed(self) -> None:
        for arr in self._arrays.values():
            if arr.shape[0] != self._n:
                arr.resize((self._n, *arr.shape[1:]))
        self._commit()


def write_records(
    path: str | Path,
    records: Sequence[TraceRecord],
    layout: ChannelLayout,
    attrs: Mapping[str, Any],
    chunk_steps: int = 64,
) -> Path:
    """Write a whole store at once (tests, conversions); replaces an existing trace store at `path`."""
    with TraceWriter(path, layout, attrs, mode="w", chunk_steps=chunk_steps) as writer:
        for record in records:
            writer.append(record)
    return Path(path)
