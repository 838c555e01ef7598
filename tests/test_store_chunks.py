"""The chunk checks on their own (`store.chunks`): which chunk files hold committed rows, and what
counts as a damaged one, on stores whose chunk files are listed from the disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.test_store import ATTRS, LAYOUT, record
from tests.test_store_commit import _event
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.store import TraceWriter, chunks
from vaedyn_cli.store.metadata import root_attrs

STEPS = [3, 6, 9, 12, 15]  # chunks of 2 steps: rows 0..1, 2..3, 4


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two stores written once: five steps, with 3 events or none."""
    out = {}
    for events in (0, 3):
        out[events] = tmp_path_factory.mktemp("template") / "t.zarr"
        with TraceWriter(out[events], LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
            for s in STEPS:
                w.append(record(s))
            if events:
                w.add_events([_event(3)] * events)
    return out


@pytest.fixture
def make_store(templates: dict[int, Path], tmp_path: Path):
    def make(events: int = 3) -> Path:
        return Path(shutil.copytree(templates[events], tmp_path / "t.zarr"))
    return make


def _chunk_files(path: Path) -> set[Path]:
    """Every chunk file on disk: the files below a `c` folder of an array."""
    return {f for f in path.rglob("*") if f.is_file() and "c" in f.relative_to(path).parts[:-1]}


def _listed(path: Path, attrs: dict, group: str | None) -> list[tuple[str, tuple[int, ...], Path, tuple[int, int]]]:
    return [(c.array, c.index, c.path, c.rows) for c, _ in chunks.committed_chunks(path, attrs, group)]


def _by_array(listed: list) -> dict[str, list[tuple[tuple[int, ...], tuple[int, int]]]]:
    out: dict[str, list] = {}
    for array, index, _, rows in listed:
        out.setdefault(array, []).append((index, rows))
    return out


def test_a_full_store_lists_exactly_its_chunk_files_with_the_rows_each_holds(make_store) -> None:
    path = make_store()
    attrs = root_attrs(path)
    every = _listed(path, attrs, None)
    assert len(every) == len({p for _, _, p, _ in every}) == len(_chunk_files(path)) > 60
    assert {p for _, _, p, _ in every} == _chunk_files(path)
    root, events = _listed(path, attrs, ""), _listed(path, attrs, "events")
    assert sorted(root + events) == sorted(every)
    assert all("/" not in a for a, *_ in root) and all(a.startswith("events/") for a, *_ in events)
    assert {a for a, *_ in events} == {f"events/{n}" for n in
                                       ("after", "before", "channel_index", "layer", "param", "step", "strategy")}
    arrays = _by_array(every)
    assert arrays["step"] == [((0,), (0, 1)), ((1,), (2, 3)), ((2,), (4, 4))]
    assert arrays["mean"] == [((0, 0), (0, 1)), ((1, 0), (2, 3)), ((2, 0), (4, 4))]
    assert arrays["near_zero_frac"] == [((0, 0), (0, 1)), ((1, 0), (2, 3)), ((2, 0), (4, 4))]
    assert arrays["layer"] == [((0,), (0, 4))] and arrays["param"] == [((0,), (0, 1))]
    assert arrays["events/step"] == [((0,), (0, 2))]
    for array, index, file, _ in every:
        assert file == path / array / "c" / Path(*map(str, index))
    for chunk, meta in chunks.committed_chunks(path, attrs, None):
        assert meta == json.loads((path / chunk.array / "zarr.json").read_text())


def test_the_committed_counts_bound_only_the_rows_they_count(make_store) -> None:
    path = make_store()
    full = root_attrs(path)
    arrays = _by_array(_listed(path, {**full, "committed_steps": 3, "committed_events": 2}, None))
    assert arrays["step"] == [((0,), (0, 1)), ((1,), (2, 2))]  # row 2 commits only part of the second chunk
    assert arrays["mean"] == [((0, 0), (0, 1)), ((1, 0), (2, 2))]
    assert arrays["layer"] == [((0,), (0, 4))]  # a channel coordinate: every row
    assert arrays["events/step"] == [((0,), (0, 1))]
    # committed counts beyond the arrays, no count of steps, and none of events
    assert _by_array(_listed(path, {**full, "committed_steps": 9, "committed_events": 7}, None)) == \
        _by_array(_listed(path, full, None))
    unmarked = {k: v for k, v in full.items() if k not in ("committed_steps", "committed_events")}
    arrays = _by_array(_listed(path, unmarked, None))
    assert "step" not in arrays and "mean" not in arrays  # no step is committed: no chunk of a step array
    assert arrays["layer"] == [((0,), (0, 4))] and arrays["events/step"] == [((0,), (0, 2))]
    assert "events/step" not in _by_array(_listed(path, {**full, "committed_events": 0}, None))


def test_step_and_event_counts_apply_only_where_the_store_puts_steps_and_events(make_store) -> None:
    """A step dimension below a group, and an event dimension outside the events group, keep every row."""
    path = make_store(events=0)
    root = zarr.open_group(str(path), mode="a")
    for name, dim in (("extra/steps", "step"), ("loose_events", "event")):
        arr = root.create_array(name, shape=(5,), chunks=(2,), dtype="float32", dimension_names=[dim],
                                config=chunks.WRITE_CONFIG)
        arr[:] = np.arange(5)
    attrs = {**root_attrs(path), "committed_steps": 1, "committed_events": 1}
    arrays = _by_array(_listed(path, attrs, None))
    assert arrays["extra/steps"] == arrays["loose_events"] == [((0,), (0, 1)), ((1,), (2, 3)), ((2,), (4, 4))]
    assert arrays["step"] == [((0,), (0, 0))]
    assert [a for a, *_ in _listed(path, attrs, "extra")] == ["extra/steps"] * 3
    assert "extra/steps" not in _by_array(_listed(path, attrs, ""))


def test_hidden_and_plain_folders_and_other_chunk_key_encodings_are_not_listed_and_a_scalar_has_one_chunk(
        make_store) -> None:
    path = make_store(events=0)
    before = _listed(path, root_attrs(path), None)
    zarr.create_array(str(path / ".hidden" / "x"), shape=(4,), chunks=(2,), dtype="int32", fill_value=1,
                      config=chunks.WRITE_CONFIG)[:] = 2
    root = zarr.open_group(str(path), mode="a")
    for name, encoding in (("dotted", {"name": "default", "separator": "."}), ("v2", {"name": "v2"})):
        root.create_array(name, shape=(4,), chunks=(2,), dtype="int32", chunk_key_encoding=encoding,
                          config=chunks.WRITE_CONFIG)[:] = 3
    (path / "notes").mkdir()  # a folder that is no zarr node, as a user might add
    (path / "notes" / "readme.txt").write_text("not zarr")
    scalar = root.create_array("scalar", shape=(), dtype="float64", config=chunks.WRITE_CONFIG)
    scalar[...] = 1.5
    after = _listed(path, root_attrs(path), None)
    assert sorted(after) == sorted([*before, ("scalar", (), path / "scalar" / "c", (0, 0))])
    assert (path / "scalar" / "c").is_file()
    meta = json.loads((path / "scalar" / "zarr.json").read_text())
    assert chunks._covers(chunks.Chunk("scalar", (), path / "scalar" / "c", (0, 0)), meta, None) == "its only chunk"


def test_an_array_metadata_file_that_does_not_parse_is_named(make_store) -> None:
    path = make_store(events=0)
    (path / "std" / "zarr.json").write_text("{not json")
    with pytest.raises(VaedynError) as err:
        list(chunks.committed_chunks(path, root_attrs(path), None))
    assert str(err.value) == (f"trace store {path} is damaged: {path / 'std' / 'zarr.json'} does not parse; "
                              f"{chunks.FIX}")


def _damage(path: Path, chunk: str, head: bytes | None = None, size: int | None = None) -> None:
    data = (path / chunk).read_bytes()
    data = (head + data[len(head):]) if head is not None else data
    (path / chunk).write_bytes(data if size is None else data[:size])


def _problem(path: Path, **kwargs) -> str | None:
    try:
        chunks.check_chunks(path, root_attrs(path), None, **kwargs)
    except VaedynError as e:
        return str(e)
    return None


def _header(path: Path, chunk: str) -> bytearray:
    return bytearray((path / chunk).read_bytes()[:16])


@pytest.mark.parametrize("version", [1, 2])
def test_a_blosc_header_of_either_version_with_its_sizes_passes(make_store, version: int) -> None:
    path = make_store()
    head = _header(path, "mean/c/1/0")
    assert head[0] == 2 and int.from_bytes(head[4:8], "little") == 4 * 2 * 5
    assert int.from_bytes(head[12:16], "little") == (path / "mean/c/1/0").stat().st_size
    head[0] = version
    _damage(path, "mean/c/1/0", bytes(head))
    assert _problem(path) is None


def _mean_chunk_message(path: Path, problem: str) -> str:
    """check_chunks without step values names the rows of the step dimension."""
    return f"trace store {path} is damaged: chunk mean/c/1/0 of 'mean' (steps 2..3) {problem}; {chunks.FIX}"


DISAGREE = "does not hold a blosc chunk of this array (its header and size disagree)"


@pytest.mark.parametrize("edit", ["version 0", "version 3", "nbytes + 1", "nbytes - 1", "cbytes + 1", "cut to 16",
                                  "cut to 15", "cut to 0"])
def test_a_chunk_whose_header_disagrees_with_its_file_or_array_is_named(make_store, edit: str) -> None:
    path = make_store()
    head = _header(path, "mean/c/1/0")
    size = None
    if edit.startswith("version"):
        head[0] = int(edit.split()[1])
    elif edit.startswith(("nbytes", "cbytes")):
        at = slice(4, 8) if edit.startswith("nbytes") else slice(12, 16)
        head[at] = (int.from_bytes(head[at], "little") + int(edit.split()[1] + edit.split()[2])).to_bytes(4, "little")
    else:
        size = int(edit.split()[2])
    _damage(path, "mean/c/1/0", bytes(head), size)
    short = size is not None and size < 16
    want = f"is {size} bytes long, shorter than its header" if short else DISAGREE
    assert _problem(path) == _mean_chunk_message(path, want)


def test_a_string_chunk_is_not_held_to_a_size_and_a_chunk_without_blosc_is_checked_only_by_decoding(
        make_store) -> None:
    path = make_store()
    sound = (path / "layer/c/0").read_bytes()
    head = _header(path, "layer/c/0")
    head[4:8] = (int.from_bytes(head[4:8], "little") + 7).to_bytes(4, "little")  # strings: no fixed size
    _damage(path, "layer/c/0", bytes(head))
    n = chunks.check_chunks(path, root_attrs(path), None)
    (path / "layer/c/0").write_bytes(sound)
    plain = zarr.open_group(str(path), mode="a").create_array(
        "plain", shape=(4,), chunks=(2,), dtype="float32", compressors=None, dimension_names=["channel"],
        config=chunks.WRITE_CONFIG)
    plain[:] = 1.0
    assert chunks._header_problem(chunks.Chunk("plain", (0,), path / "plain/c/0", (0, 1)),
                                  json.loads((path / "plain/zarr.json").read_text())) is None
    _damage(path, "plain/c/1", size=3)
    assert chunks.check_chunks(path, root_attrs(path), None) == n + 2  # the header check passes it
    problem = _problem(path, decode=True)
    assert problem is not None and problem.startswith(
        f"trace store {path} is damaged: chunk plain/c/1 of 'plain' (channels 2..3) does not decode (")


def test_the_expected_size_of_a_chunk_is_its_items_times_their_bytes(make_store) -> None:
    path = make_store()
    meta = {n: json.loads((path / n / "zarr.json").read_text()) for n in ("mean", "near_zero_frac", "step", "layer")}
    assert [chunks._expected_bytes(meta[n]) for n in ("mean", "near_zero_frac", "step")] == [4 * 2 * 5, 4 * 2 * 2, 8 * 2]
    assert chunks._expected_bytes(meta["layer"]) is None


def test_check_chunks_counts_what_it_checked_and_a_missing_chunk_only_where_every_chunk_is_written(
        make_store) -> None:
    path = make_store()
    attrs = root_attrs(path)
    every = len(_chunk_files(path))
    assert chunks.check_chunks(path, attrs, None) == every
    assert chunks.check_chunks(path, attrs, None, decode=True) == every
    assert chunks.check_chunks(path, attrs, "events") == 7
    assert chunks.check_chunks(path, attrs) == every - 7
    (path / "std/c/2/0").unlink()
    older = {k: v for k, v in attrs.items() if k != chunks.ALL_CHUNKS}  # zarr's fill value may stand in for it
    assert chunks.check_chunks(path, older, None) == every - 1
    assert chunks.check_chunks(path, {**older, chunks.ALL_CHUNKS: False}, None) == every - 1
    with pytest.raises(VaedynError) as err:
        chunks.check_chunks(path, attrs, None, steps=np.array(STEPS))
    assert str(err.value) == (f"trace store {path} is damaged: chunk std/c/2/0 of 'std' (steps 15..15) is missing; "
                              f"{chunks.FIX}")


@pytest.mark.parametrize(("dims", "shape", "rows", "steps", "covers"), [
    (["step", "channel"], [5, 5], (2, 3), STEPS, "steps 9..12"),
    (["step", "channel"], [5, 5], (4, 4), STEPS, "steps 15..15"),
    (["step", "channel"], [5, 5], (2, 3), None, "steps 2..3"),  # no step values: the rows
    (["step"], [5], (2, 3), STEPS[:3], "steps 2..3"),  # values that end before the chunk: the rows
    (["step"], [5], (2, 2), STEPS[:3], "steps 9..9"),
    (["channel"], [5], (0, 4), STEPS, "channels 0..4"),
    (None, [4], (2, 3), None, "rows 2..3"),
    (None, [], (0, 0), None, "its only chunk"),
])
def test_a_chunk_is_named_by_the_steps_or_rows_it_covers(dims, shape, rows, steps, covers) -> None:
    meta = {"shape": shape, **({"dimension_names": dims} if dims is not None else {})}
    chunk = chunks.Chunk("a", (0,), Path("a/c/0"), rows)
    assert chunks._covers(chunk, meta, None if steps is None else np.array(steps)) == covers
