"""The store's commit protocol, without a crash run: data is on disk before `committed_steps` says
it is there, and truncation to a checkpoint's step keeps that step and its events."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.test_store import ATTRS, LAYOUT, Blocking, assert_matches, record, write
from vaedyn_cli import artifacts, store
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.store import TraceWriter
from vaedyn_cli.store import writer as writer_mod


def _event(step: int) -> dict:
    return {"step": step, "layer": "encoder.down.norm1", "channel_index": 0, "strategy": "gn_scale_reset",
            "param": "encoder.down.norm1.weight", "before": 0.0, "after": 1.0}


def test_every_commit_finds_its_rows_already_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At each rewrite of the root zarr.json that makes n steps visible, the `step` and `std` arrays on
    disk (read with zarr, bypassing the store's readers) already hold those n rows."""
    path = tmp_path / "t.zarr"
    records = [record(s) for s in (1, 2, 3, 5, 8)]
    seen: list[tuple[int, list[int], bool]] = []
    real = writer_mod.commit_root

    def checking_commit(root, attributes, step_rows):  # noqa: ANN001, ANN202
        if step_rows and Path(root) == path:
            group = zarr.open_group(str(root), mode="r", use_consolidated=False)
            on_disk = np.asarray(group["step"][:step_rows]).tolist()
            std = np.asarray(group["std"][:step_rows])
            want = np.stack([r.channels["std"] for r in records[:step_rows]])
            seen.append((step_rows, on_disk, bool(np.array_equal(std, want))))
        return real(root, attributes, step_rows)

    monkeypatch.setattr(writer_mod, "commit_root", checking_commit)
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2, commit_interval_s=3600) as w:
        for r in records:
            w.append(r)
            if r.step == 3:
                w.flush()  # a commit of a partly filled chunk
    counts = [n for n, _, _ in seen]
    assert counts[0] == 2 and 3 in counts and counts[-1] == 5  # chunk full, flush, close
    for n, on_disk, std_ok in seen:
        assert on_disk == [r.step for r in records[:n]] and std_ok, n
    assert_matches(store.open_trace(path), records)


def test_truncating_to_a_recorded_step_keeps_it_and_its_events(tmp_path: Path) -> None:
    """A run resumed from the checkpoint of step 4 keeps step 4 and the nudge recorded at step 4;
    steps 6 and 8 and the events after step 4 go."""
    path = tmp_path / "t.zarr"
    first = [record(s) for s in (2, 4, 6, 8)]
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=3) as w:
        for r in first:
            w.append(r)
        w.add_events([_event(s) for s in (2, 4, 4, 6, 8)])
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=3) as w:
        w.truncate(4)
        assert w.committed_steps == 2
        assert store.open_trace(path)["step"].values.tolist() == [2, 4]
        assert store.read_events(path)["step"].values.tolist() == [2, 4, 4]
        w.append(record(6, seed=60))
    assert_matches(store.open_trace(path), [*first[:2], record(6, seed=60)])
    # at the first step: only it remains; before it: nothing
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=3) as w:
        w.truncate(2)
    assert store.open_trace(path)["step"].values.tolist() == [2]
    assert store.read_events(path)["step"].values.tolist() == [2]
    # what lies beyond the counts is gone from disk too, not only uncounted
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    assert root["step"].shape == (1,) and root["std"].shape[0] == 1
    events = zarr.open_group(str(path / "events"), mode="r", use_consolidated=False)
    assert {name: events[name].shape for name in store.EVENT_FIELDS} == {name: (1,) for name in store.EVENT_FIELDS}
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=3) as w:
        w.truncate(1)
    assert store.open_trace(path)["step"].values.tolist() == []
    assert store.read_events(path) is None and not (path / "events").exists()
    assert zarr.open_group(str(path), mode="r", use_consolidated=False)["step"].shape == (0,)


def test_truncating_a_store_without_events_or_without_steps(tmp_path: Path) -> None:
    """Truncation of a trace with no events keeps `committed_events` at 0 and makes no events group;
    truncation of a trace with no steps yet keeps it empty, and the next step appends as the first."""
    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=3) as w:
        for s in (2, 4, 6):
            w.append(record(s))
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=3) as w:
        w.truncate(4)
        assert w.committed_steps == 2
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    assert root.attrs["committed_events"] == 0 and root.attrs["committed_steps"] == 2
    assert store.read_events(path) is None and not (path / "events").exists()
    empty = tmp_path / "empty.zarr"
    with TraceWriter(empty, LAYOUT, ATTRS, mode="w", chunk_steps=3) as w:
        w.truncate(3)
        assert w.committed_steps == 0
        w.append(record(1))
    assert store.open_trace(empty)["step"].values.tolist() == [1]


def _nudge(step: int, channel: int, before: float) -> dict:
    return {"step": step, "layer": "decoder.mid.attentions.0.group_norm", "channel_index": channel,
            "strategy": "gn_scale_nudge", "param": "decoder.mid.attentions.0.group_norm.weight",
            "before": before, "after": min(before * 1.1, 1.5)}


def test_events_added_in_batches_follow_each_other_across_writers(tmp_path: Path) -> None:
    """The first batch creates the events group, later ones grow it in place (also from a writer that
    reopened the store): every row keeps its values and order, and `committed_events` counts them all."""
    path = tmp_path / "t.zarr"
    batches = [[_event(2), _event(2)], [_nudge(4, 1, 0.25)], [_nudge(6, 0, 0.5), _nudge(6, 1, 1.4), _event(6)]]
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
        for s in (2, 4, 6):
            w.append(record(s))
        w.add_events(batches[0])
        w.add_events(batches[1])
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=2) as w:
        w.add_events(batches[2])
    rows = [row for batch in batches for row in batch]
    events = store.read_events(path)
    assert events.sizes["event"] == 6
    for name in ("step", "layer", "channel_index", "strategy", "param", "before", "after"):
        assert events[name].values.tolist() == [r[name] for r in rows], name
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    assert root.attrs["committed_events"] == 6
    assert zarr.open_group(str(path / "events"), mode="r", use_consolidated=False)["step"].shape == (6,)
    assert not [p.name for p in path.iterdir() if artifacts.is_temp(p.name)]  # no temporary group left beside it


@pytest.mark.parametrize(("chunk", "covers"), [
    ("mean/c/1/0", "of 'mean' (steps 9..12)"),   # rows 2..3 of the step dim, named by their steps
    ("mean/c/2/0", "of 'mean' (steps 15..15)"),  # the last chunk: its committed row only
    ("layer/c/0", "of 'layer' (channels 0..4)"),  # a channel coordinate: rows of its own dim
])
def test_a_missing_chunk_names_the_steps_or_rows_it_held(tmp_path: Path, chunk: str, covers: str) -> None:
    path = write(tmp_path / "t.zarr", [record(s) for s in (3, 6, 9, 12, 15)])  # chunks of 2 steps
    (path / chunk).unlink()
    with pytest.raises(VaedynError) as err:
        store.open_trace(path)
    assert str(err.value) == (f"trace store {path} is damaged: chunk {chunk} {covers} is missing; restore the "
                              "store from a copy, or re-create the trace with `vaedyn track`")


def test_the_first_events_replace_an_events_group_a_crashed_writer_left_uncommitted(tmp_path: Path) -> None:
    """A writer killed while it wrote its first events leaves an `events` group that `committed_events`
    (still 0) does not count: the next first batch replaces it, and only the new rows are read."""
    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
        w.append(record(2))
        w.add_events([_event(2), _event(2), _event(2)])
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["committed_events"] = 0  # as if the crash came before the commit
    (path / "zarr.json").write_text(json.dumps(meta))
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=2) as w:
        w.add_events([_nudge(2, 1, 0.5)])
    events = store.read_events(path)
    assert events["strategy"].values.tolist() == ["gn_scale_nudge"] and events["after"].values.tolist() == [0.55]
    assert zarr.open_group(str(path / "events"), mode="r", use_consolidated=False)["step"].shape == (1,)


@pytest.mark.parametrize("chunk", ["mean/c/0/0", "mean/c/2/0"])  # the first chunk, and the last (one row)
def test_a_chunk_that_does_not_decode_is_named_and_every_other_decodes(tmp_path: Path, chunk: str) -> None:
    """`store check` decodes each committed chunk through zarr: a sound store reports how many; a chunk
    whose blosc header keeps its sizes but names no compressor blosc knows (the readers' header check
    passes it) is named with its steps."""
    path = write(tmp_path / "t.zarr", [record(s) for s in (3, 6, 9, 12, 15)])  # chunks of 2 steps
    sound = store.verify_store(path)
    n = int(sound.split(" events, ")[1].split()[0])
    assert sound.startswith(f"OK: trace store {path}: 5 steps, 0 events, ") and n > 9
    data = (path / chunk).read_bytes()
    flags = (data[2] & ~0x02) | 0xE0  # "not a plain copy", compressor code 7 (blosc has 0..5)
    (path / chunk).write_bytes(data[:2] + bytes([flags]) + data[3:])
    assert store.open_trace(path).sizes["step"] == 5  # only decoding finds it
    with pytest.raises(VaedynError) as err:
        store.verify_store(path)
    covers = "steps 3..6" if chunk == "mean/c/0/0" else "steps 15..15"
    assert str(err.value).startswith(f"trace store {path} is damaged: chunk {chunk} of 'mean' ({covers}) does not decode (")


def test_a_failed_first_events_write_leaves_no_temporary_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first events are written aside and renamed into place: when the rename fails, the error
    reaches the caller (naming the store), the events stay uncommitted, and the group written aside is
    removed."""
    path = tmp_path / "t.zarr"

    def failing_rename(src, dst):  # noqa: ANN001, ANN202
        raise OSError(28, "No space left on device")

    with pytest.raises(RuntimeFailure, match=f"writing trace store {path} failed: OSError: .*No space left"):  # noqa: PT012
        with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
            w.append(record(2))
            w.flush()
            monkeypatch.setattr(writer_mod.os, "rename", failing_rename)
            w.add_events([_event(2)])
    monkeypatch.undo()
    assert not [p.name for p in path.iterdir() if artifacts.is_temp(p.name)]
    assert not (path / "events").exists()
    assert store.read_events(path) is None and store.open_trace(path)["step"].values.tolist() == [2]


def test_flush_returns_only_once_its_rows_are_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flush` waits for the writer thread however long the commit takes (here 0.8 s, longer than the
    caller's 0.5 s poll of the thread): when it returns, the root already counts the rows."""
    path = tmp_path / "t.zarr"
    real = writer_mod.commit_root

    def slow_commit(root, attributes, step_rows):  # noqa: ANN001, ANN202
        if step_rows:
            time.sleep(0.8)
        return real(root, attributes, step_rows)

    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=4, commit_interval_s=3600) as w:
        w.append(record(1))
        monkeypatch.setattr(writer_mod, "commit_root", slow_commit)
        w.flush()
        assert json.loads((path / "zarr.json").read_text())["attributes"]["committed_steps"] == 1
        monkeypatch.undo()


def test_a_new_store_is_built_beside_another_writers_temporary_without_touching_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each writer builds a new store under a hidden temporary name of its own, beside the store (one
    file system: the rename into place is atomic). One that another writer left (here a zarr group at
    the plain `.NAME.tmp`) neither stops the store nor is removed."""
    path = tmp_path / "t.zarr"
    other = artifacts.temp_path(path)
    zarr.open_group(other, mode="w", zarr_format=3).attrs["mine"] = "other writer"
    renamed = []
    real = artifacts.replace_dir
    monkeypatch.setattr(artifacts, "replace_dir", lambda src, dst: renamed.append(Path(src)) or real(src, dst))
    monkeypatch.chdir(tmp_path.parent)  # not where the store goes
    records = [record(s) for s in (1, 2)]
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
        for r in records:
            w.append(r)
    assert_matches(store.open_trace(path), records)
    assert zarr.open_group(other, mode="r").attrs["mine"] == "other writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "t.zarr"]
    assert [(p.parent, p.name.startswith(f".t.zarr{artifacts.TEMP_MARK}-")) for p in renamed] == [(tmp_path, True)]


def test_a_stores_attributes_are_the_given_ones_and_the_writers_three_counts(tmp_path: Path) -> None:
    """The root attributes: those the writer was given, with its own bookkeeping (committed steps and
    events, whether every chunk was written) and nothing else."""
    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=3) as w:
        w.append(record(1))
    attrs = dict(zarr.open_group(str(path), mode="r", use_consolidated=False).attrs)
    assert sorted(attrs) == sorted({*ATTRS, "committed_steps", "committed_events", writer_mod.ALL_CHUNKS})
    assert {k: attrs[k] for k in ("committed_steps", "committed_events", writer_mod.ALL_CHUNKS)} == {
        "committed_steps": 1, "committed_events": 0, writer_mod.ALL_CHUNKS: True}
    assert {k: v for k, v in attrs.items() if k in ATTRS and k != "committed_steps"} == {
        k: v for k, v in ATTRS.items() if k != "committed_steps"}


def test_a_new_store_holds_no_step_before_its_first_commit_and_a_failed_one_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after the writer creates the store, any reader (vaedyn's or plain xarray on the consolidated
    metadata) sees 0 steps; a creation that fails midway leaves no store and no temporary behind."""
    import xarray as xr

    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=3) as w:
        assert xr.open_zarr(path, consolidated=True).sizes["step"] == 0
        assert store.open_trace(path).sizes["step"] == 0
        w.append(record(1))
    failing = tmp_path / "failing"
    failing.mkdir()

    def broken_marker(folder, kind):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "write_marker", broken_marker)
    with pytest.raises(OSError, match="disk full"):
        TraceWriter(failing / "t.zarr", LAYOUT, ATTRS, mode="w", chunk_steps=3)
    assert list(failing.iterdir()) == []


class _Slow:
    """A pending record whose numbers take `seconds` to finish on the writer thread."""

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def resolve(self):  # noqa: ANN201
        time.sleep(self.seconds)
        return record(self.step)


def test_append_waits_for_a_slow_writer_while_its_queue_is_full(tmp_path: Path) -> None:
    """One step may wait (queue_size 1) while the thread spends 0.8 s on the step before it, longer
    than `append`'s 0.5 s poll: the third append waits for room instead of calling the thread stopped."""
    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=4, queue_size=1) as w:
        w.append(_Slow(1, 0.8))
        w.append(record(2))
        start = time.monotonic()
        w.append(record(3))
        assert time.monotonic() - start > 0.5  # it did wait past the poll
    assert_matches(store.open_trace(path), [record(s) for s in (1, 2, 3)])


def test_a_step_not_after_the_last_appended_one_is_refused(tmp_path: Path) -> None:
    """Steps must strictly increase within one writer's appends: the same step again, or an earlier one,
    is refused and leaves the trace as it was."""
    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=4) as w:
        w.append(record(2))
        w.append(record(5))
        for step in (5, 3):
            with pytest.raises(VaedynError, match=f"step {step} is not after the last recorded step 5"):
                w.append(record(step))
        w.append(record(6))
    assert_matches(store.open_trace(path), [record(s) for s in (2, 5, 6)])


def test_a_new_store_replaces_only_a_trace_store_holding_nothing_else(tmp_path: Path) -> None:
    """`mode="w"` over an existing trace store: refused while it holds a file vaedyn does not write there
    (which stays, as does the trace); replaced once that file is gone, and also when an older vaedyn
    wrote it without a marker. An empty folder becomes a new store in either mode."""
    path = tmp_path / "t.zarr"
    path.mkdir()
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=2) as w:
        w.append(record(1))
    (path / "notes.txt").write_text("mine")
    with pytest.raises(VaedynError, match=rf"^trace store {path} holds 'notes.txt', which vaedyn does not write"):
        TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2)
    assert (path / "notes.txt").read_text() == "mine"
    assert_matches(store.open_trace(path), [record(1)])
    (path / "notes.txt").unlink()
    for marker in (True, False):  # a marked store, then one without the marker (an older vaedyn's)
        if not marker:
            (path / artifacts.MARKER_FILE).unlink()
        with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
            assert store.open_trace(path).sizes["step"] == 0
            w.append(record(7))
        assert_matches(store.open_trace(path), [record(7)])


def test_the_writer_thread_never_keeps_the_interpreter_alive(tmp_path: Path) -> None:
    """A writer that is never closed (a crashed caller) must not stop Python from exiting: its thread
    is a daemon."""
    before = set(threading.enumerate())
    w = TraceWriter(tmp_path / "t.zarr", LAYOUT, ATTRS, mode="w", chunk_steps=2)
    try:
        started = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert started and all(t.daemon for t in started)
    finally:
        w.close()


def test_a_store_is_made_with_its_missing_folders_and_opened_again_without_a_crashed_events_temporary(
        tmp_path: Path) -> None:
    """A store at a path whose folders do not exist yet gets them. Reopened to append, it loses the
    temporary events group that a writer killed during its first events write left (and only that)."""
    path = tmp_path / "a" / "b" / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
        w.append(record(1))
    stale = path / f".{writer_mod.EVENTS_GROUP}.tmp-123-abcd"
    zarr.open_group(stale, mode="w", zarr_format=3)
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=2) as w:
        assert not stale.exists()
        w.append(record(2))
    assert_matches(store.open_trace(path), [record(1), record(2)])
    assert store.read_events(path) is None


def test_appending_events_to_a_store_that_does_not_count_its_events(tmp_path: Path) -> None:
    """A store from a vaedyn that did not record `committed_events`: every events row on disk counts,
    and a new writer's events follow them."""
    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
        w.append(record(1))
        w.add_events([_event(1), _event(1)])
    attrs = writer_mod.root_attrs(path)
    del attrs["committed_events"]
    writer_mod.commit_root(path, attrs, None)
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=2) as w:
        w.append(record(2))
        w.add_events([_event(2)])
    assert store.read_events(path)["step"].values.tolist() == [1, 1, 2]


def test_a_reopened_store_keeps_its_chunk_length_and_its_last_step(tmp_path: Path) -> None:
    """Reopened to append with another chunk length, the writer uses the store's own, and it refuses
    a step that is not after the last committed one."""
    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
        for s in (1, 2, 3):
            w.append(record(s))
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=5) as w:
        assert w.chunk_steps == 2
        with pytest.raises(VaedynError, match="step 3 is not after the last recorded step 3"):
            w.append(record(3))
        for s in (4, 5, 6):
            w.append(record(s))
    assert_matches(store.open_trace(path), [record(s) for s in range(1, 7)])
    assert zarr.open_group(str(path), mode="r", use_consolidated=False)["step"].chunks == (2,)


def test_a_closed_writer_refuses_more_work_and_closes_again_as_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "t.zarr"
    w = TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2)
    w.append(record(1))
    w.close()
    for call in (lambda: w.append(record(2)), w.flush, lambda: w.truncate(1)):
        with pytest.raises(RuntimeError, match="^TraceWriter is closed$"):
            call()
    w.close()  # again: nothing left to do
    assert store.open_trace(path)["step"].values.tolist() == [1]


def _in_thread(fn) -> tuple[threading.Thread, list[BaseException]]:
    """Run `fn` in a daemon thread (a hang fails the test instead of stalling it); its exception is kept."""
    caught: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            caught.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, caught


def _until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_a_flush_queued_behind_a_failing_step_is_released_with_the_error(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t.zarr", LAYOUT, ATTRS, mode="w", chunk_steps=4)
    bad = Blocking(1, fail=True)
    w.append(bad)
    _until(lambda: w._queue.qsize() == 0)  # the writer thread waits in resolve()
    flusher, caught = _in_thread(w.flush)
    _until(lambda: w._queue.qsize() == 1)  # the flush waits behind the step
    bad.release.set()
    flusher.join(10)
    assert not flusher.is_alive()
    (err,) = caught
    assert isinstance(err, RuntimeFailure) and "ValueError: device copy failed" in str(err)
    with pytest.raises(RuntimeFailure, match="device copy failed"):
        w.close()


def test_steps_wait_for_their_commit_interval_or_a_flush(tmp_path: Path) -> None:
    """Two steps of a 4-step chunk with a 60 s interval: the thread holds them uncommitted until flush."""
    path = tmp_path / "t.zarr"
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=4, commit_interval_s=60) as w:
        w.append(record(1))
        w.append(record(2))
        _until(lambda: w._pending == 2)
        time.sleep(0.2)
        assert store.metadata.root_attrs(path)["committed_steps"] == 0 and w.committed_steps == 0
        w.flush()
        assert store.metadata.root_attrs(path)["committed_steps"] == 2 and w.committed_steps == 2


def test_a_failure_while_closing_ends_the_writer_and_close_raises_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    w = TraceWriter(tmp_path / "t.zarr", LAYOUT, ATTRS, mode="w", chunk_steps=2)
    w.append(record(1))

    def full() -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(w, "_trim_to_committed", full)
    closer, caught = _in_thread(w.close)
    closer.join(10)
    assert not closer.is_alive() and not w._thread.is_alive()
    (err,) = caught
    assert isinstance(err, RuntimeFailure) and str(err).startswith(f"writing trace store {tmp_path / 't.zarr'} failed: "
                                                                   "OSError: no space left on device")
