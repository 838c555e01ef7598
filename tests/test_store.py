"""The trace store: round trip through plain xarray, commits, torn writes, truncation, the writer thread."""

from __future__ import annotations

import io
import json
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from vaedyn_cli import artifacts, store
from vaedyn_cli.errors import RuntimeFailure, VaedynError
from vaedyn_cli.store import ChannelLayout, TraceRecord, TraceWriter

pytestmark = pytest.mark.filterwarnings("error::UserWarning", "error::FutureWarning", "error::RuntimeWarning")

LAYOUT = ChannelLayout.from_layers(
    [("encoder.down.norm1", 3, "encoder", True), ("decoder.mid.attentions.0.group_norm", 2, "decoder", False)],
    ["encoder.conv_in.weight", "decoder.conv_out.weight"],
)
ATTRS = store.store_attrs("train", "unit", json.dumps({"run_name": "unit"}), "{}")


def record(step: int, seed: int | None = None) -> TraceRecord:
    rng = np.random.default_rng(step if seed is None else seed)
    channels = {k: rng.standard_normal(LAYOUT.n_channels).astype(np.float32) for k in store.CHANNEL_VARS}
    channels["act_std"][3:] = np.nan  # no activation after the attention norm
    scalars = {"loss": float(step) / 10, "lr": 1e-4}  # rec_loss, kl_loss missing -> NaN
    return TraceRecord(step, channels, scalars, rng.random(2).astype(np.float32))


def assert_matches(ds: xr.Dataset, records: list[TraceRecord]) -> None:
    assert ds["step"].values.tolist() == [r.step for r in records]
    for name in store.CHANNEL_VARS:
        np.testing.assert_array_equal(ds[name].values, np.stack([r.channels[name] for r in records]))
    np.testing.assert_array_equal(ds["near_zero_frac"].values, np.stack([r.near_zero_frac for r in records]))
    np.testing.assert_array_equal(ds["loss"].values, [r.scalars["loss"] for r in records])
    assert np.isnan(ds["rec_loss"].values).all()


def write(path: Path, records: list[TraceRecord], chunk_steps: int = 2) -> Path:
    return store.write_records(path, records, LAYOUT, ATTRS, chunk_steps=chunk_steps)


def test_round_trip_through_plain_xarray(tmp_path):
    records = [record(s) for s in (0, 3, 5, 9, 12)]  # crosses two chunk boundaries
    path = write(tmp_path / "t.zarr", records)

    tree = xr.open_datatree(path, engine="zarr")  # warnings are errors in this module
    root = tree.to_dataset()
    assert dict(root.sizes) == {"step": 5, "channel": 5, "param": 2}
    assert_matches(root, records)
    assert root["layer"].values.tolist() == ["encoder.down.norm1"] * 3 + ["decoder.mid.attentions.0.group_norm"] * 2
    assert root["channel_index"].values.tolist() == [0, 1, 2, 0, 1]
    assert root["part"].values.tolist() == ["encoder"] * 3 + ["decoder"] * 2
    assert root["has_activation"].values.tolist() == [True] * 3 + [False] * 2
    assert root["param"].values.tolist() == list(LAYOUT.params)
    assert {"layer", "channel_index", "part", "has_activation", "step", "param"} <= set(root.coords)
    for key in ("schema", "schema_version", "vaedyn_version", "source", "run_name", "config", "model_config"):
        assert key in root.attrs
    assert root.attrs["committed_steps"] == 5 and root.attrs["schema"] == "vaedyn.trace"
    assert "population std" in root["std"].attrs["description"]

    # string arrays use zarr v3's specified `string` type; step arrays are chunked along step
    for name in ("layer", "part", "param"):
        assert json.loads((path / name / "zarr.json").read_text())["data_type"] == "string"
    arr = zarr.open_array(str(path / "mean"), mode="r")
    assert arr.chunks == (2, 5) and arr.shape == (5, 5)  # a clean close trims to the committed rows
    assert arr.compressors  # compressed

    assert_matches(store.open_trace(path), records)
    assert_matches(xr.open_zarr(path, chunks=None), records)


def test_in_memory_dataset_has_the_store_schema(tmp_path):
    records = [record(1), record(2)]
    mem = store.records_to_dataset(records, LAYOUT)
    disk = store.open_trace(write(tmp_path / "t.zarr", records)).load()
    assert set(mem.variables) == set(disk.variables)
    xr.testing.assert_identical(mem.drop_attrs(), disk.drop_attrs())
    with pytest.raises(ValueError, match="strictly increasing"):
        store.records_to_dataset([record(2), record(2)], LAYOUT)


def test_torn_write_reads_as_the_committed_prefix(tmp_path):
    records = [record(s) for s in (1, 2, 3)]
    path = write(tmp_path / "t.zarr", records)
    # a crash after writing steps 4.. but before the commit: some arrays grown and written, some not
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    for name in ("step", "mean", "std", "loss"):
        arr = group[name]
        arr.resize((6, *arr.shape[1:]))
        arr[3:] = 7
    assert store.open_trace(path)["step"].values.tolist() == [1, 2, 3]
    assert_matches(store.open_trace(path), records)
    assert xr.open_datatree(path, engine="zarr")["step"].values.tolist() == [1, 2, 3]

    # metadata consolidated by plain zarr (arrays longer than committed_steps): trimmed by the attribute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _name, arr in group.arrays():
            if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "step" and arr.shape[0] != 6:
                arr.resize((6, *arr.shape[1:]))
        zarr.consolidate_metadata(str(path))
    assert_matches(store.open_trace(path), records)

    # the writer reopens a torn store at its committed step and overwrites the torn rows
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=2) as w:
        assert w.committed_steps == 3
        w.append(record(4))
    assert_matches(store.open_trace(path), [*records, record(4)])


def test_resume_truncates_steps_and_events(tmp_path):
    path = tmp_path / "t.zarr"
    first = [record(s) for s in (2, 4, 6, 8, 10)]
    with TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=2) as w:
        for r in first:
            w.append(r)
        w.add_events([
            {"step": s, "layer": "encoder.down.norm1", "channel_index": 1, "strategy": "gn_scale_nudge",
             "param": "gn_weight", "before": 0.1 * s, "after": 0.2 * s}
            for s in (4, 8)
        ])
    assert store.read_events(path)["step"].values.tolist() == [4, 8]

    # resume from the checkpoint of step 5: steps after it and their events go
    redo = [record(s, seed=100 + s) for s in (6, 8)]
    with TraceWriter(path, LAYOUT, ATTRS, mode="a", chunk_steps=2) as w:
        w.truncate(5)
        assert w.committed_steps == 2
        assert store.open_trace(path)["step"].values.tolist() == [2, 4]
        with pytest.raises(VaedynError, match="not after the last recorded step 4"):
            w.append(record(3))
        for r in redo:
            w.append(r)
    assert_matches(store.open_trace(path), first[:2] + redo)
    events = store.read_events(path)
    assert events["step"].values.tolist() == [4]
    assert events["strategy"].values.tolist() == ["gn_scale_nudge"] and events["after"].values.tolist() == [0.8]
    tree = xr.open_datatree(path, engine="zarr")
    assert tree["events"].to_dataset(inherit=False)["step"].values.tolist() == [4]


def test_consolidated_metadata_matches_zarr(tmp_path):
    path = write(tmp_path / "t.zarr", [record(1), record(2), record(3)])
    ours = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not in the v3 spec
        zarr.consolidate_metadata(str(path))
    theirs = json.loads((path / "zarr.json").read_text())["consolidated_metadata"]
    assert ours == theirs


def test_commit_interval_makes_steps_visible_without_flush(tmp_path):
    path = tmp_path / "t.zarr"
    w = TraceWriter(path, LAYOUT, ATTRS, mode="w", chunk_steps=8, commit_interval_s=0.05)
    try:
        w.append(record(1))
        deadline = time.monotonic() + 10
        while store.open_trace(path).sizes["step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.open_trace(path)["step"].values.tolist() == [1]
    finally:
        w.close()


class Blocking:
    """A pending record that the writer thread cannot resolve until released."""

    def __init__(self, step: int, fail: bool = False):
        self.step, self.fail, self.release = step, fail, threading.Event()

    def resolve(self) -> TraceRecord:
        self.release.wait(10)
        if self.fail:
            raise ValueError("device copy failed")
        return record(self.step)


def test_bounded_queue_blocks_only_when_full_and_errors_propagate(tmp_path):
    w = TraceWriter(tmp_path / "t.zarr", LAYOUT, ATTRS, mode="w", queue_size=1)
    first, second, third = Blocking(1), Blocking(2), Blocking(3)
    w.append(first)  # taken by the thread, which waits in resolve()
    deadline = time.monotonic() + 5
    while w._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    w.append(second)  # fills the queue, returns at once
    producer = threading.Thread(target=w.append, args=(third,))
    producer.start()
    producer.join(0.3)
    assert producer.is_alive()  # the queue is full: training would wait here
    for b in (first, second, third):
        b.release.set()
    producer.join(5)
    assert not producer.is_alive()
    w.close()
    assert store.open_trace(tmp_path / "t.zarr")["step"].values.tolist() == [1, 2, 3]

    w = TraceWriter(tmp_path / "u.zarr", LAYOUT, ATTRS, mode="w")
    bad = Blocking(1, fail=True)
    bad.release.set()
    w.append(bad)
    with pytest.raises(RuntimeFailure, match="device copy failed"):
        w.close()


def test_bad_stores_give_one_line_errors(tmp_path):
    with pytest.raises(VaedynError, match="not found") as e:
        store.open_trace(tmp_path / "missing.zarr")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "file.txt").write_text("x")
    with pytest.raises(VaedynError, match="not a trace store"):
        store.open_trace(tmp_path / "empty")
    with pytest.raises(VaedynError, match="not a trace store"):
        TraceWriter(tmp_path / "empty", LAYOUT, ATTRS, mode="w")
    assert (tmp_path / "empty" / "file.txt").is_file()  # never deletes what it did not write

    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3).attrs["schema"] = "something.else"
    with pytest.raises(VaedynError, match="not a vaedyn.trace store"):
        store.open_trace(other)

    path = write(tmp_path / "t.zarr", [record(1)])
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 3
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(VaedynError, match="schema_version 3.*reads versions 1 and 2"):
        store.open_trace(path)

    path = write(tmp_path / "t2.zarr", [record(1)])
    wider = ChannelLayout.from_layers([("encoder.down.norm1", 4, "encoder", True)], LAYOUT.params)
    with pytest.raises(VaedynError, match="tracks other channels"):
        TraceWriter(path, wider, ATTRS, mode="a")


def test_resolve_store_path(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / artifacts.CONFIG_FILE).write_text("run_name: run\n")
    with pytest.raises(VaedynError, match="has no trace store"):
        store.resolve_store_path(str(run))
    track = write(run / artifacts.TRACK_TRACE_DIR, [record(1)])
    assert store.resolve_store_path(str(run)) == track
    trace = write(run / artifacts.TRACE_DIR, [record(1)])
    assert store.resolve_store_path(str(run)) == trace  # the training trace first
    assert store.resolve_store_path(str(track)) == track
    monkeypatch.setattr("sys.stdin", io.StringIO(f"some log line\n{run}\n\n"))
    assert store.resolve_store_path("-") == trace
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(VaedynError, match="stdin is empty"):
        store.resolve_store_path("-")


def test_store_info_and_cli(tmp_path, cli):
    path = write(tmp_path / "t.zarr", [record(s) for s in (3, 6, 9)])
    info = store.store_info(path)
    assert info["steps"] == 3 and (info["first_step"], info["last_step"]) == (3, 9)
    assert info["channels"] == 5 and info["layers"] == 2 and info["params"] == 2
    assert info["layers_by_part"] == {"encoder": {"layers": 1, "channels": 3}, "decoder": {"layers": 1, "channels": 2}}
    assert info["events"] == 0 and info["classification"] is False and info["size_bytes"] > 0
    assert set(store.CHANNEL_VARS) <= set(info["variables"])

    result = cli("store", "info", path, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == info
    result = cli("store", "info", path)
    assert result.exit_code == 0 and "steps" in result.stdout and "3 (3 .. 9)" in result.stdout
    result = cli("store", "info", tmp_path / "nope.zarr")
    assert result.exit_code == 2 and "not found" in result.stderr and result.stdout == ""


def test_a_store_records_the_torch_threads_that_wrote_it(tmp_path, cli):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        attrs = store.store_attrs("train", "unit", json.dumps({"run_name": "unit"}), "{}")
    finally:
        torch.set_num_threads(before)
    assert (attrs["torch_threads"], attrs["torch_version"]) == (3, torch.__version__)
    path = store.write_records(tmp_path / "t.zarr", [record(1)], LAYOUT, attrs)
    info = store.store_info(path)
    assert info["torch_threads"] == 3
    result = cli("store", "info", path)
    assert f"torch {torch.__version__}, 3 threads" in result.stdout
