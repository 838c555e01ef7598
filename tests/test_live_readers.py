"""Readers during writes: `store info`, `classify`, `report`, `open_trace`/`read_events` and plain
`xarray.open_datatree` on a store that a live TraceWriter keeps appending to (steps and events)
see a committed prefix: steps 1..k, every variable k long, the values appended for those steps."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.conftest import tiny_config_dict
from vaedyn_cli import store
from vaedyn_cli.classify import classify_store
from vaedyn_cli.config import RunConfig
from vaedyn_cli.labels import to_json
from vaedyn_cli.store import metadata as store_metadata

LAYERS = [("encoder.down_blocks.0.resnets.0.norm1", "encoder"), ("decoder.up_blocks.0.resnets.0.norm2", "decoder")]
WIDTH = 8
N_CH = WIDTH * len(LAYERS)
PARAMS = ("encoder.conv_in.weight", "decoder.conv_out.weight")
EVENT_EVERY = 7


def low(step: int) -> np.ndarray:
    """Channels whose activity is ~0 at `step`: the first (step // 3) % 8 of each layer, so that the
    count changes every 3 steps. Never the whole layer: the dormancy score is relative to the layer's
    mean activity, so a layer whose every channel is equally quiet scores 1 (active), not dormant."""
    return np.arange(N_CH) % WIDTH < (step // 3) % WIDTH


def expected(step: int) -> store.TraceRecord:
    """What the writer appends at `step` (every number tells its step and channel apart)."""
    g = np.arange(N_CH)
    activity = np.where(low(step), 1e-4, 1.0 + 0.001 * ((7 * step + g) % 13))
    channels = {name: 0.5 * step + 0.01 * g + i for i, name in enumerate(store.CHANNEL_VARS)}
    channels.update(std=activity, act_std=activity, gn_weight=np.ones(N_CH))
    scalars = {"loss": 1.0 / step, "rec_loss": 0.5 / step, "kl_loss": float(step), "lr": 1e-3}
    return store.TraceRecord(step, channels, scalars, np.array([1e-4 * step, 2e-4 * step]))


def event_row(step: int) -> dict:
    return {"step": step, "layer": LAYERS[step % 2][0], "channel_index": step % WIDTH, "strategy": "gn_scale_nudge",
            "param": f"{LAYERS[step % 2][0]}.weight", "before": 0.01 * step, "after": 0.011 * step}


class LiveWriter(threading.Thread):
    """Appends a step every ~10 ms (committing each, commit_interval_s=0) and an event every 7 steps,
    until told to stop; then closes the writer."""

    def __init__(self, path: Path, tmp_path: Path):
        super().__init__(daemon=True)
        layout = store.ChannelLayout.from_layers([(name, WIDTH, part, True) for name, part in LAYERS], params=PARAMS)
        cfg = RunConfig.model_validate(tiny_config_dict(tmp_path))
        attrs = store.store_attrs("train", "live", cfg.to_json(), json.dumps({"norm_num_groups": 2}))
        self.writer = store.TraceWriter(path, layout, attrs, mode="w", chunk_steps=8, commit_interval_s=0.0)
        self.stop, self.steps, self.error = threading.Event(), 0, None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                step = self.steps + 1
                self.writer.append(expected(step))
                if step % EVENT_EVERY == 0:
                    self.writer.add_events([event_row(step)])
                self.steps = step
                time.sleep(0.01)
            self.writer.close()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def check_prefix(ds: xr.Dataset) -> int:
    """The dataset holds steps 1..k with the appended values; returns k."""
    steps = ds["step"].values.tolist()
    k = len(steps)
    assert steps == list(range(1, k + 1))
    assert {v: ds[v].sizes["step"] for v in ds.data_vars if "step" in ds[v].dims} == dict.fromkeys(store.STEP_VARS[1:], k)
    records = [expected(s) for s in range(1, k + 1)]
    want = store.records_to_dataset(records, store.ChannelLayout.from_dataset(ds))
    for name in store.STEP_VARS[1:]:
        np.testing.assert_array_equal(ds[name].values, want[name].values.astype(ds[name].dtype), err_msg=name)
    return k


def check_events(ev: xr.Dataset | None) -> None:
    """Committed events: whole rows, the first n that were appended."""
    n = 0 if ev is None else ev.sizes["event"]
    rows = [] if ev is None else [{k: ev[k].values.tolist()[i] for k in store.EVENT_FIELDS} for i in range(n)]
    assert rows == [event_row(EVENT_EVERY * (i + 1)) for i in range(n)]


@pytest.fixture
def live(tmp_path):
    path = tmp_path / "run" / "trace.zarr"
    writer = LiveWriter(path, tmp_path)
    writer.start()
    while committed(path) < 10 and writer.is_alive():
        time.sleep(0.01)
    yield path, writer
    writer.stop.set()
    writer.join(30)


def committed(path: Path) -> int:
    return int(json.loads((path / "zarr.json").read_text())["attributes"]["committed_steps"])


@pytest.mark.long
def test_readers_see_a_committed_prefix_while_training_appends(live, cli, tmp_path):
    path, writer = live
    seen: list[int] = []
    for round_ in range(4):
        # vaedyn store info --json
        result = cli("store", "info", path, "--json")
        assert result.exit_code == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["first_step"] == 1 and info["last_step"] == info["steps"] >= 10
        assert info["events"] <= info["steps"] // EVENT_EVERY + 1
        seen.append(info["steps"])

        # vaedyn classify (also rewrites the classification group inside the live store)
        result = cli("classify", path, "--format", "json")
        assert result.exit_code == 0, result.stderr
        labels = json.loads(result.stdout)
        assert labels["steps"][0] == 1 and labels["steps"][1] >= seen[-1]
        seen.append(labels["steps"][1])
        if round_ == 0:
            first_labels = labels

        # vaedyn report (slow: twice)
        if round_ % 2:
            out = tmp_path / f"report-{round_}"
            result = cli("report", path, "--out", out)
            assert result.exit_code == 0, result.stderr
            summary = json.loads((out / "summary.json").read_text())
            k = summary["steps"]["count"]
            assert (summary["steps"]["first"], summary["steps"]["last"]) == (1, k) and k >= seen[-1]
            seen.append(k)
            for i, (_, part) in enumerate(LAYERS):  # the counts of step k, not of a later step
                assert summary["last_step"][part]["inactive"] == int(low(k)[i * WIDTH : (i + 1) * WIDTH].sum()), part

        # the library readers and plain xarray
        k = check_prefix(store.open_trace(path))
        check_events(store.read_events(path))
        tree = xr.open_datatree(path, engine="zarr")
        check_prefix(tree.to_dataset())
        if "events" in tree.children:  # its own columns: `step` and `param` would inherit the root's
            ev = tree["events"].to_dataset(inherit=False)
            check_events(ev if ev.sizes.get("event", 0) else None)
        seen.append(k)

        for _ in range(5):  # consolidations between the writer's commits
            store.consolidate(path)
            seen.append(committed(path))
    assert writer.is_alive() and writer.error is None
    writer.stop.set()
    writer.join(30)
    assert writer.error is None, writer.error

    # the readers ran while steps were being added, and never looked past the committed ones
    assert seen == sorted(seen) and seen[0] < seen[-1] < writer.steps
    final = store.open_trace(path)
    assert check_prefix(final) == writer.steps == final.attrs["committed_steps"]
    check_events(store.read_events(path))
    assert store.read_events(path).sizes["event"] == writer.steps // EVENT_EVERY
    # what classify printed mid-run is the classification of that prefix
    again = classify_store(path, to_step=first_labels["steps"][1], write=False)
    assert json.loads(json.dumps(to_json(again, path)))["channels"] == first_labels["channels"]
    assert xr.open_datatree(path, engine="zarr")["classification"].to_dataset().sizes["channel"] == N_CH


def test_consolidate_never_undoes_a_concurrent_commit(tmp_path, monkeypatch):
    """`classify` refreshes the consolidated metadata (read attributes, walk the nodes, write the root)
    while the writer commits: the commit lock keeps the two apart, so the refresh never writes back
    an older `committed_steps`. The walk is slowed down here so that a commit falls inside it."""
    writer = LiveWriter(tmp_path / "trace.zarr", tmp_path).writer
    path = writer.path
    writer.append(expected(1))
    writer.flush()
    walk = store_metadata.node_metadata
    main = threading.get_ident()

    def slow_walk(root):
        if threading.get_ident() == main:
            writer.append(expected(2))  # the writer thread commits step 2 now, unless it has to wait
            time.sleep(0.3)
        return walk(root)

    monkeypatch.setattr(store_metadata, "node_metadata", slow_walk)
    store.consolidate(path)
    monkeypatch.setattr(store_metadata, "node_metadata", walk)
    writer.flush()
    assert committed(path) == writer.committed_steps == 2
    writer.close()
    assert store.open_trace(path)["step"].values.tolist() == [1, 2]
