"""`vaedyn classify`: planted trajectories, mechanisms and flags, chunked == in memory, the
`classification` group, and the CLI, on stores written directly with xarray + zarr."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from vaedyn_cli import artifacts, classification, classify, persistence
from vaedyn_cli import labels as lab
from vaedyn_cli import store as store_mod
from vaedyn_cli.config import ClassifyConfig
from vaedyn_cli.errors import VaedynError

STAT_VARS = ("in_std", "mean", "mean_abs", "std", "act_mean", "act_std", "gn_weight", "gn_bias",
             "gn_weight_grad", "out_weight_norm")


# ---------------------------------------------------------------------------------------------
# a store "written by another program": plain xarray + zarr following docs/design.md


def make_trace(layers: list[tuple[str, int, bool]], steps: list[int] | np.ndarray, seed: int = 0,
               **stats: np.ndarray) -> xr.Dataset:
    """A schema-conformant root group: every stat defaults to a healthy channel (std ~1, gamma 1)."""
    rng = np.random.default_rng(seed)
    names = [n for n, c, _ in layers for _ in range(c)]
    cidx = [i for _, c, _ in layers for i in range(c)]
    has_act = [a for _, c, a in layers for _ in range(c)]
    n_steps, n_ch = len(steps), len(names)
    healthy = (1.0 + 0.05 * rng.standard_normal((n_steps, n_ch))).astype(np.float32)
    defaults = {
        "in_std": healthy, "mean": np.zeros_like(healthy), "mean_abs": 0.8 * healthy, "std": healthy,
        "act_mean": 0.3 * healthy, "act_std": 0.6 * healthy, "gn_weight": np.ones_like(healthy),
        "gn_bias": np.zeros_like(healthy), "gn_weight_grad": 1e-3 * healthy, "out_weight_norm": healthy,
    }
    data = {}
    for name in STAT_VARS:
        arr = np.array(stats.get(name, defaults[name]), np.float32)  # a copy: variables must not share memory
        if name in ("act_mean", "act_std"):
            arr = np.where(np.asarray(has_act)[None, :], arr, np.nan).astype(np.float32)
        data[name] = (("step", "channel"), arr)
    for name in ("loss", "rec_loss", "kl_loss", "lr"):
        data[name] = ("step", np.full(n_steps, np.nan))
    return xr.Dataset(
        data,
        coords={
            "step": ("step", np.asarray(steps, np.int64)),
            "layer": ("channel", np.array(names, dtype=object)),
            "channel_index": ("channel", np.array(cidx, np.int64)),
            "part": ("channel", np.array([n.split(".")[0] for n in names], dtype=object)),
            "has_activation": ("channel", np.array(has_act, bool)),
        },
        attrs={"schema": "vaedyn.trace", "schema_version": 1, "vaedyn_version": "other-program",
               "source": "track", "run_name": "synthetic", "committed_steps": n_steps},
    )


def write_store(ds: xr.Dataset, path: Path, config: dict | None = None, model_config: dict | None = None,
                committed: int | None = None) -> Path:
    ds = ds.copy()
    if config is not None:
        ds.attrs["config"] = json.dumps(config)
    if model_config is not None:
        ds.attrs["model_config"] = json.dumps(model_config)
    if committed is not None:
        ds.attrs["committed_steps"] = committed
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    return path


def labels_of(labels: xr.Dataset, layer: str, index: int) -> dict:
    rec = [r for r in lab.to_records(labels) if r["layer"] == layer and r["channel_index"] == index]
    assert len(rec) == 1
    return rec[0]


# ---------------------------------------------------------------------------------------------
# planted trajectories

STEPS = np.arange(40) * 10  # tracked every 10 optimizer steps
PLANT = "decoder.up_blocks.0.resnets.0.norm1"


def planted_trace() -> xr.Dataset:
    """Layer PLANT: 24 healthy channels (act_std ~0.6) plus planted ones; one attention-like layer
    without activation. min_persist 3 is the default."""
    layers = [(PLANT, 32, True), ("decoder.mid_block.attentions.0.group_norm", 8, False)]
    ds = make_trace(layers, STEPS)
    act = ds["act_std"].values.copy()
    low = 0.01  # score ~0.017 <= tau 0.1: dormant, not dead
    act[20:, 0] = low  # 0: dies at index 20 (step 200)
    act[20:, 1] = 0.0  # 1: dies at step 200, dead
    act[:12, 2] = low  # 2: dormant until index 12, revives (step 120)
    act[:, 3] = low  # 3: born dormant
    for a in (5, 15, 25):  # 4: off at 5-9, 15-19, 25-29: six persistent changes
        act[a:a + 5, 4] = low
    act[[3, 4, 10, 17, 18, 30], 5] = low  # 5: glitches shorter than min_persist: stays active
    act[10:20, 6] = low  # 6: dies at 100, revives at 200: two changes
    act[37:, 7] = low  # 7: inactive in the last 3 steps only: dies at 370
    act[38:, 8] = low  # 8: inactive in the last 2 steps only (< min_persist): still active
    act[0, 9] = low  # 9: inactive at the first step only, active from step 10 on: revived at 10
    act[39, 10] = np.nan  # 10: not observed at the last step; dormant before: dies at 350
    act[35:39, 10] = low
    ds["act_std"].values[:] = act
    std = ds["std"].values.copy()
    std[30:, 32] = 0.01  # attention channel 0 (activity = std): dormant from step 300
    ds["std"].values[:] = std
    return ds


def test_planted_trajectories_are_labelled_with_exact_steps() -> None:
    labels = classification.classify_trace(planted_trace(), ClassifyConfig())
    expect = {  # channel: (state, trajectory, onset, revival, n_transitions)
        0: ("dormant", "died", 200, None, 1),
        1: ("dead", "died", 200, None, 1),
        2: ("active", "revived", None, 120, 1),
        3: ("dormant", "born_dormant", None, None, 0),
        4: ("active", "intermittent", 250, 300, 6),
        5: ("active", "active", None, None, 0),
        6: ("active", "intermittent", 100, 200, 2),
        7: ("dormant", "died", 370, None, 1),
        8: ("active", "active", None, None, 0),
        9: ("active", "revived", None, 10, 1),
        10: ("dormant", "died", 350, None, 1),
        11: ("active", "active", None, None, 0),
    }
    for i, (state, traj, onset, revival, n) in expect.items():
        rec = labels_of(labels, PLANT, i)
        got = (rec["state"], rec["trajectory"], rec["onset_step"], rec["revival_step"], rec["n_transitions"])
        assert got == (state, traj, onset, revival, n), f"channel {i}: {got}"
    att = labels_of(labels, "decoder.mid_block.attentions.0.group_norm", 0)
    assert (att["state"], att["trajectory"], att["onset_step"]) == ("dormant", "died", 300)
    healthy = [r for r in lab.to_records(labels) if r["layer"] == PLANT and r["channel_index"] >= 11]
    assert {r["trajectory"] for r in healthy} == {"active"}
    # scores: the last observed step; a dormant channel's score is its activity over the layer mean
    rec0 = labels_of(labels, PLANT, 0)
    layer_mean = np.nanmean(planted_trace()["act_std"].values[-1, :32])
    assert rec0["score"] == pytest.approx(0.01 / layer_mean, rel=1e-5)
    assert labels.attrs["first_step"] == 0 and labels.attrs["last_step"] == 390


def test_min_persist_one_counts_every_flip() -> None:
    labels = classification.classify_trace(planted_trace(), ClassifyConfig(min_persist=1))
    rec5 = labels_of(labels, PLANT, 5)  # glitches at 3,4 | 10 | 17,18 | 30 -> 8 flips
    assert (rec5["trajectory"], rec5["n_transitions"], rec5["revival_step"]) == ("intermittent", 8, 310)
    assert labels_of(labels, PLANT, 8)["state"] == "dormant"


def test_window_from_to_step() -> None:
    ds = planted_trace()
    labels = classification.classify_trace(ds, ClassifyConfig(), from_step=210, to_step=300)
    assert (labels.attrs["first_step"], labels.attrs["last_step"], labels.attrs["n_steps"]) == (210, 300, 10)
    assert labels_of(labels, PLANT, 0)["trajectory"] == "born_dormant"  # dead before the window
    rec4 = labels_of(labels, PLANT, 4)  # on 210-240, off 250-290, on again only at 300 (< min_persist)
    assert (rec4["state"], rec4["trajectory"], rec4["onset_step"], rec4["n_transitions"]) == ("dormant", "died", 250, 1)
    with pytest.raises(VaedynError, match="no tracked step"):
        classification.classify_trace(ds, ClassifyConfig(), from_step=1000)


def test_step_states_at_chosen_steps_match_the_classification() -> None:
    """The public per-step rule: known codes at an index array of steps, the same columns as a slice
    read, and the score a one-step classification reports."""
    ds = planted_trace()
    p = ClassifyConfig()
    codes, score = classification.step_states(ds, p, [0, 20, 39])
    whole, whole_score = classification.step_states(ds, p, slice(None))
    assert codes.shape == score.shape == (3, 40) and codes.dtype == np.int8 and score.dtype == np.float32
    np.testing.assert_array_equal(codes, whole[[0, 20, 39]])
    np.testing.assert_array_equal(score, whole_score[[0, 20, 39]])
    A, S, D, U = lab.ACTIVE, lab.DORMANT, lab.DEAD, lab.UNOBSERVED
    assert codes[0, :12].tolist() == [A, A, S, S, A, A, A, A, A, S, A, A]
    assert codes[1, :12].tolist() == [S, D, A, S, A, A, A, A, A, A, A, A]
    assert codes[2, [0, 1, 7, 8, 10, 32, 33]].tolist() == [S, D, S, S, U, S, A]
    assert np.isnan(score[2, 10]) and score[1, 1] == 0.0
    labels = classification.classify_trace(ds, ClassifyConfig(min_persist=1), from_step=390, to_step=390)
    np.testing.assert_array_equal(labels["score"].values, score[2].astype(np.float64))
    state = {A: "active", S: "dormant", D: "dead", U: "unknown"}
    assert labels["state"].values.tolist() == [state[c] for c in codes[2].tolist()]
    # a layer selection narrows the columns to that layer's channels
    attn, _ = classification.step_states(ds, p, slice(30, 31), layers=["*attentions*"])
    assert attn[0].tolist() == [S] + [A] * 7


def test_step_states_with_a_layer_mixing_channels_with_and_without_activation() -> None:
    """has_activation is per channel in the schema: a channel without one is judged on std."""
    ds = make_trace([("decoder.a.norm1", 4, True), ("decoder.b.norm1", 4, True)], [0, 10])
    ha = np.array([True] * 4 + [False, True, True, True])
    std = ds["std"].values.copy()
    std[:, 4] = 0.0  # its act_std is a healthy 0.6: only std says it is dead
    act = ds["act_std"].values.copy()
    act[:, 4] = 0.6
    ds = ds.assign_coords(has_activation=("channel", ha)).assign(
        std=(("step", "channel"), std), act_std=(("step", "channel"), act))
    codes, _ = classification.step_states(ds, ClassifyConfig(), [1])
    assert codes[0].tolist() == [lab.ACTIVE] * 4 + [lab.DEAD] + [lab.ACTIVE] * 3
    assert classification.classify_trace(ds, ClassifyConfig(min_persist=1))["state"].values.tolist()[4] == "dead"


# ---------------------------------------------------------------------------------------------
# chunked == in memory


def flicker_trace(seed: int, n_steps: int = 53) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    layers = [("encoder.down_blocks.0.resnets.0.norm1", 16, True), ("encoder.mid_block.attentions.0.group_norm", 8,
                                                                     False),
              ("decoder.conv_norm_out", 12, True)]
    ds = make_trace(layers, np.arange(n_steps) * 3 + 7, seed=seed)
    for name in ("act_std", "std", "mean_abs"):
        arr = ds[name].values.copy()
        p_off = rng.random(arr.shape[1]) * 0.6
        off = rng.random(arr.shape) < p_off
        arr[off] *= 0.01
        arr[rng.random(arr.shape) < 0.02] = 0.0
        arr[rng.random(arr.shape) < 0.03] = np.nan
        arr[:, :3] = arr[0, :3]  # constant channels take the bulk path
        ds[name].values[:] = np.where(np.isnan(ds[name].values), np.nan, arr)
    return ds


@pytest.mark.parametrize("method", ["dormancy", "mean_abs_threshold"])
def test_chunked_equals_whole_in_memory(tmp_path: Path, method: str) -> None:
    ds = flicker_trace(1)
    store = write_store(ds, tmp_path / "t.zarr")
    whole = classification.classify_trace(ds, ClassifyConfig(method=method, chunk_steps=10_000, min_persist=2))
    assert (whole["n_transitions"] >= 2).sum() > 5  # the trace really flickers
    for chunk in (1, 2, 5, 16, 52, 53):
        lazy = classification.classify_trace(store_mod.open_trace(store), ClassifyConfig(method=method, chunk_steps=chunk,
                                                                                 min_persist=2))
        xr.testing.assert_identical(lazy, whole.assign_attrs(params=lazy.attrs["params"]))


def test_debounce_matches_a_plain_reference() -> None:
    """The vectorised machine equals the definition written out step by step (random codes, gaps)."""

    def reference(codes: np.ndarray, steps: np.ndarray, k: int) -> tuple | None:
        seen, n, onset, revival = False, 0, -1, -1
        for s, code in zip(steps.tolist(), codes.tolist(), strict=True):
            if code < 0:
                continue
            x = code >= 1
            if not seen:
                seen, initial, cur, run, length, start = True, x, x, x, 0, s
            if x != run:
                run, length, start = x, 0, s
            length += 1
            if run != cur and length >= k:
                cur, n = run, n + 1
                onset, revival = (start, revival) if cur else (onset, start)
        return (initial, cur, n, onset, revival) if seen else None

    rng = np.random.default_rng(3)
    for _ in range(12):
        n_steps, n_ch, k = int(rng.integers(1, 40)), int(rng.integers(1, 30)), int(rng.integers(1, 5))
        codes = np.where(rng.random((n_steps, n_ch)) < rng.random(n_ch), rng.integers(1, 3, (n_steps, n_ch)), 0)
        codes[rng.random(codes.shape) < 0.1] = -1
        codes = codes.astype(np.int8)
        steps = np.arange(n_steps) * 5
        for chunk in (1, 3, n_steps):
            m = persistence.Debounce(n_ch, k)
            for a in range(0, n_steps, chunk):
                m.update(steps[a:a + chunk], codes[a:a + chunk])
            for j in range(n_ch):
                ref = reference(codes[:, j], steps, k)
                got = (bool(m.initial[j]), bool(m.cur[j]), int(m.n_trans[j]), int(m.onset[j]), int(m.revival[j]))
                assert (got if m.seen[j] else None) == ref


# ---------------------------------------------------------------------------------------------
# mechanisms and flags

MECH = "encoder.down_blocks.1.resnets.0.norm2"


def mechanism_trace() -> xr.Dataset:
    """16 channels in 2 groups of 8; group 1's inputs are 100x larger than group 0's."""
    ds = make_trace([(MECH, 16, True)], np.arange(6))
    act, gamma, mean, std, in_std, out = (ds[v].values.copy() for v in
                                          ("act_std", "gn_weight", "mean", "std", "in_std", "out_weight_norm"))
    in_std[:, 8:] *= 100
    act[:, 0:5] = 0.01  # five dormant channels
    gamma[:, 0] = 1e-3  # 0: gamma ~0 -> gn_scale
    mean[:, 1], std[:, 1] = -12.0, 2.0  # 1: y far below zero before SiLU -> saturated
    in_std[:, 2] = 1e-4  # 2: the norm's input is flat -> input_collapse
    gamma[:, 3], in_std[:, 3] = 0.0, 0.0  # 3: both; gn_scale comes first
    # 4: dormant for no visible reason -> other
    out[:, 5] = 0.0  # 5: active but nobody reads it -> unused (flag only)
    in_std[:, 6] = 0.5  # 6: small for the layer, normal for its group 0 -> not collapsed
    in_std[:, 9] = 5.0  # 9: normal for the layer, tiny for its group 1 -> collapsed (flag only)
    mean[:, 10], std[:, 10] = -1.0, 2.0  # 10: mean below zero but y not far below: not saturated
    for name, arr in zip(("act_std", "gn_weight", "mean", "std", "in_std", "out_weight_norm"),
                         (act, gamma, mean, std, in_std, out), strict=True):
        ds[name].values[:] = arr
    return ds


def test_mechanisms_and_flags_on_synthetic_trace(tmp_path: Path) -> None:
    store = write_store(mechanism_trace(), tmp_path / "m.zarr", model_config={"norm_num_groups": 2})
    labels = classify.classify_store(store, ClassifyConfig(), write=False)
    recs = {r["channel_index"]: r for r in lab.to_records(labels)}
    assert [recs[i]["mechanism"] for i in range(5)] == ["gn_scale", "saturated", "input_collapse", "gn_scale", "other"]
    assert all(recs[i]["mechanism"] is None for i in range(5, 16))
    assert {i for i, r in recs.items() if r["unused"]} == {5}
    assert {i for i, r in recs.items() if r["input_collapsed"]} == {2, 3, 9}
    assert {i for i, r in recs.items() if r["state"] != "active"} == {0, 1, 2, 3, 4}


def test_without_model_config_the_layer_is_one_group(tmp_path: Path) -> None:
    store = write_store(mechanism_trace(), tmp_path / "m.zarr")
    recs = {r["channel_index"]: r for r in lab.to_records(classify.classify_store(store, write=False))}
    # the layer mean of in_std is ~44: all of group 0 (~1) falls under 0.1 * 44, channel 9 (5.0) does not
    assert {i for i, r in recs.items() if r["input_collapsed"]} == set(range(8))


def test_mean_abs_threshold_flags_exactly_the_channels_under_the_threshold() -> None:
    rng = np.random.default_rng(5)
    n_steps, n_ch = 9, 40
    level = rng.uniform(0.0, 0.5, n_ch)
    level[0] = 0.2  # exactly at the threshold: not under it
    mean_abs = np.repeat(level[None, :], n_steps, axis=0)
    ds = make_trace([("decoder.up_blocks.3.resnets.2.norm2", n_ch, True)], np.arange(n_steps), mean_abs=mean_abs)
    labels = classification.classify_trace(ds, ClassifyConfig(method="mean_abs_threshold", threshold=0.2))
    flagged = labels["state"].values != "active"
    np.testing.assert_array_equal(flagged, level.astype(np.float32) < 0.2)
    assert set(labels["state"].values[flagged]) == {"dormant"}
    np.testing.assert_allclose(labels["score"].values, level.astype(np.float32))
    # with a varying trace and no persistence, the final state is the last step's rule
    mean_abs = rng.uniform(0.0, 0.5, (n_steps, n_ch)).astype(np.float32)
    ds = make_trace([("decoder.up_blocks.3.resnets.2.norm2", n_ch, True)], np.arange(n_steps), mean_abs=mean_abs)
    labels = classification.classify_trace(ds, ClassifyConfig(method="mean_abs_threshold", threshold=0.2, min_persist=1))
    np.testing.assert_array_equal(labels["state"].values != "active", mean_abs[-1] < 0.2)


# ---------------------------------------------------------------------------------------------
# the store: parameters from its config, committed steps, the classification group


def test_store_config_supplies_defaults_and_committed_steps_trim(tmp_path: Path) -> None:
    ds = planted_trace()
    store = write_store(ds, tmp_path / "t.zarr", config={"classify": {"min_persist": 1}}, committed=30)
    labels = classify.classify_store(store, write=False)
    assert json.loads(labels.attrs["params"])["min_persist"] == 1
    assert labels.attrs["last_step"] == 290
    assert labels_of(labels, PLANT, 5)["n_transitions"] == 6  # min_persist 1; the glitch at index 30 is uncommitted
    text = classify.run(str(store), {"min_persist": 3}, write=False, fmt="json")
    assert json.loads(text)["params"]["min_persist"] == 3
    with pytest.raises(VaedynError, match="invalid classify parameters: tau"):
        classify.run(str(store), {"tau": -1}, write=False, fmt="json")


@pytest.mark.filterwarnings("error")
def test_classification_group_round_trip_and_rewrite(tmp_path: Path) -> None:
    store = write_store(planted_trace(), tmp_path / "t.zarr")
    root_meta = (store / "zarr.json").read_text()
    labels = classify.classify_store(store)
    assert (store / "zarr.json").read_text() == root_meta  # the root group is untouched
    back = store_mod.read_classification(store)
    assert back.sizes["channel"] == 40 and bool(back["classified"].all())
    for name in ("state", "trajectory", "unused", "input_collapsed", "score", "onset_step", "revival_step",
                 "n_transitions"):
        np.testing.assert_array_equal(back[name].values.astype(labels[name].dtype), labels[name].values)
    assert back["mechanism"].values.tolist() == [m or "" for m in labels["mechanism"].values.tolist()]
    assert back.attrs["method"] == "dormancy" and json.loads(back.attrs["params"])["tau"] == 0.1
    # the whole store opens as a DataTree: the group is aligned with the root's channel dim
    tree = xr.open_datatree(store, engine="zarr", consolidated=False)
    assert str(tree["classification"]["state"].values[1]) == "dead"
    assert tree["classification"].sizes["channel"] == tree.sizes["channel"]  # row i is the root's channel i
    # rewritten as a whole: now only the attention layer is classified
    classify.classify_store(store, ClassifyConfig(tau=0.5), layers=["*attentions*"])
    back = store_mod.read_classification(store)
    assert back["classified"].values.tolist() == [False] * 32 + [True] * 8
    assert set(back["state"].values[:32].tolist()) == {""}
    assert back["onset_step"].values[32] == 300 and back["onset_step"].values[0] == lab.NO_STEP
    assert json.loads(back.attrs["params"])["tau"] == 0.5
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("classification")) == ["classification"]


def test_layer_globs_and_errors(tmp_path: Path) -> None:
    ds = planted_trace()
    labels = classification.classify_trace(ds, ClassifyConfig(), layers=["*norm1", "decoder.up_blocks.0.*"])
    assert set(labels["layer"].values.tolist()) == {PLANT}
    with pytest.raises(VaedynError, match="matches no layer"):
        classification.classify_trace(ds, ClassifyConfig(), layers=["encoder.*"])
    with pytest.raises(VaedynError, match="not a trace store"):
        classify.classify_store(tmp_path)
    bad = write_store(ds.assign_attrs(schema="other"), tmp_path / "o.zarr")
    with pytest.raises(VaedynError, match="not a vaedyn.trace store"):
        classify.classify_store(bad)


# ---------------------------------------------------------------------------------------------
# CLI


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run_name: tiny\n")
    write_store(planted_trace(), run / "trace.zarr", config={"classify": {"tau": 0.1}})
    return run


def test_cli_json_from_stdin_run_folder(cli, tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    res = cli("classify", "-", input=f"some log line\n{run}\n")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert list(data) == ["store", "method", "params", "steps", "layers", "channels"]
    assert data["store"] == str(run / "trace.zarr") and data["method"] == "dormancy"
    assert data["steps"] == [0, 390]
    assert data["layers"] == {PLANT: 32, "decoder.mid_block.attentions.0.group_norm": 8}
    assert len(data["channels"]) == 40
    assert list(data["channels"][0]) == list(lab.RECORD_KEYS)
    assert data["channels"][1] == {**data["channels"][1], "state": "dead", "trajectory": "died", "onset_step": 200,
                                   "revival_step": None, "mechanism": "other", "part": "decoder"}
    assert (run / "trace.zarr" / "classification" / "zarr.json").is_file()


def test_cli_csv_table_and_options(cli, tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    res = cli("classify", run, "--format", "csv", "--no-write", "--layers", "*attentions*", "--min-persist", "1")
    assert res.exit_code == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 8 and rows[0]["onset_step"] == "300" and rows[1]["onset_step"] == ""
    assert not (run / "trace.zarr" / "classification").exists()
    res = cli("classify", run, "--format", "table", "--no-write", "--from-step", "100", "--to-step", "250")
    assert res.exit_code == 0, res.stderr
    assert PLANT in res.stdout and "total" in res.stdout and "100..250" in res.stdout
    res = cli("classify", run, "--method", "mean_abs_threshold", "--threshold", "0.9", "--format", "json",
              "--no-write", "--set", "classify.gn_scale_ratio=0.5")
    data = json.loads(res.stdout)
    assert data["method"] == "mean_abs_threshold" and data["params"]["threshold"] == 0.9
    assert data["params"]["gn_scale_ratio"] == 0.5 and data["params"]["tau"] == 0.1
    assert sum(c["state"] == "dormant" for c in data["channels"]) > 20  # mean_abs ~0.8 < 0.9


def test_cli_bad_input_exits_2(cli, tmp_path: Path) -> None:
    res = cli("classify", tmp_path)
    assert res.exit_code == 2 and "not a trace store" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
    run = _run_folder(tmp_path)
    for args, msg in ((["--layers", "nope*"], "matches no layer"), (["--method", "ring"], "method"),
                      (["--format", "xml"], "--format"), (["--tau", "-1"], "tau"),
                      (["--set", "train.max_steps=3"], "classify.FIELD=VALUE")):
        res = cli("classify", run, *args)
        assert res.exit_code == 2 and msg in res.stderr, (args, res.stderr)
    assert not (run / "trace.zarr" / "classification").exists()
    res = cli("classify", "-", input="")
    assert res.exit_code == 2 and "stdin is empty" in res.stderr


# ---------------------------------------------------------------------------------------------
# stores written by vaedyn itself: consolidated metadata, and the planted-model ground truth


@pytest.mark.filterwarnings("error")
def test_rewrite_refreshes_consolidated_metadata(tmp_path: Path) -> None:
    ds = planted_trace()
    layout = store_mod.ChannelLayout.from_layers(
        [(PLANT, 32, "decoder", True), ("decoder.mid_block.attentions.0.group_norm", 8, "decoder", False)])
    path = tmp_path / "trace.zarr"
    attrs = store_mod.store_attrs("track", "planted", json.dumps({"classify": {"tau": 0.1}}), "{}")
    with store_mod.TraceWriter(path, layout, attrs, mode="w", chunk_steps=16) as writer:
        for i, step in enumerate(ds["step"].values.tolist()):
            writer.append(store_mod.TraceRecord(step, {v: ds[v].values[i] for v in STAT_VARS}))
    root_attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    for tau in (0.1, 0.5):
        labels = classify.classify_store(path, ClassifyConfig(tau=tau))
        tree = xr.open_datatree(path, engine="zarr")  # through the consolidated metadata
        group = tree["classification"]
        assert json.loads(group.attrs["params"])["tau"] == tau
        assert [str(v) for v in group["state"].values.tolist()] == labels["state"].values.tolist()
    assert json.loads((path / "zarr.json").read_text())["attributes"] == root_attrs
    assert labels_of(labels, PLANT, 1)["onset_step"] == 200
    leftovers = [p.name for p in path.iterdir() if artifacts.is_temp(p.name)]
    assert not leftovers  # no hidden temp group survives the swap
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == [artifacts.MARKER_FILE, store_mod.LOCK_FILE]


def test_planted_channels_of_a_tracked_model_are_found(tmp_path: Path, tiny_cfg) -> None:
    """Plant inactive channels in the tiny SDXL-architecture model, track it with `track`, classify:
    each plant is found with its mechanism or flag, nothing new is flagged elsewhere."""
    import torch

    from vaedyn_cli import model as model_mod
    from vaedyn_cli import track

    vae = model_mod.build_preset(tiny_cfg.model.width, seed=0)
    folders = []
    for step in (0, 10):
        folders.append(model_mod.save_model(vae, tmp_path / f"ckpt-{step}", tiny_cfg, step=step))
    m = dict(vae.named_modules())
    gn_scale = ("decoder.up_blocks.0.resnets.0.norm1", 3)
    saturated = ("encoder.down_blocks.1.resnets.0.norm2", 5)
    collapsed = ("encoder.down_blocks.2.resnets.1.norm2", 6)  # reads conv1 of the same resnet
    unused = ("decoder.up_blocks.1.resnets.1.norm1", 2)  # read by conv1 of the same resnet
    with torch.no_grad():
        m[gn_scale[0]].weight[gn_scale[1]] = 0.0
        m[saturated[0]].bias[saturated[1]] = -30.0
        conv = m[collapsed[0].replace("norm2", "conv1")]
        conv.weight[collapsed[1]] = 0.0
        conv.bias[collapsed[1]] = 0.0
        m[unused[0].replace("norm1", "conv1")].weight[:, unused[1]] = 0.0
    for step in (20, 30, 40):
        folders.append(model_mod.save_model(vae, tmp_path / f"ckpt-{step}", tiny_cfg, step=step))
    store = track.track_checkpoints(tiny_cfg, [str(f) for f in folders], out=tmp_path / "trace.zarr", device="cpu")

    after = {(r["layer"], r["channel_index"]): r for r in lab.to_records(classify.classify_store(store))}
    before = {(r["layer"], r["channel_index"]): r for r in lab.to_records(
        classify.classify_store(store, to_step=10, write=False))}
    assert len(after) == 1240
    rec = after[gn_scale]
    assert (rec["state"], rec["mechanism"], rec["trajectory"], rec["onset_step"]) == ("dead", "gn_scale", "died", 20)
    rec = after[saturated]
    assert rec["state"] in ("dead", "dormant") and rec["mechanism"] == "saturated" and rec["onset_step"] == 20
    rec = after[collapsed]
    assert rec["input_collapsed"] and (rec["state"], rec["mechanism"], rec["onset_step"]) == (
        "dormant", "input_collapse", 20)
    assert after[unused]["unused"] and after[unused]["state"] == "active"

    def flags(r: dict) -> set[str]:
        return {k for k in ("unused", "input_collapsed") if r[k]} | ({"inactive"} if r["state"] != "active" else set())

    planted = {gn_scale, saturated, collapsed, unused}
    new = {key: flags(r) - flags(before[key]) for key, r in after.items() if key not in planted}
    assert not {k: v for k, v in new.items() if v}, "flagged only after planting"
    assert not any(flags(before[key]) for key in planted)


def test_in_memory_window_of_records_equals_the_store_window(tmp_path: Path) -> None:
    """The in-training nudge classifies the writer's recent records: same labels as the stored steps."""
    ds = flicker_trace(2, n_steps=20)
    layers = [(n, int((ds["layer"].values == n).sum()), n.split(".")[0],
               bool(ds["has_activation"].values[list(ds["layer"].values).index(n)]))
              for n in dict.fromkeys(ds["layer"].values.tolist())]
    layout = store_mod.ChannelLayout.from_layers(layers)
    records = [store_mod.TraceRecord(int(s), {v: ds[v].values[i] for v in STAT_VARS})
               for i, s in enumerate(ds["step"].values)]
    attrs = {"model_config": json.dumps({"norm_num_groups": 2})}
    window = store_mod.records_to_dataset(records[-6:], layout, attrs)
    store = write_store(ds, tmp_path / "t.zarr", model_config={"norm_num_groups": 2})
    params = ClassifyConfig(min_persist=2)
    live = classification.classify_trace(window, params)
    stored = classification.classify_trace(store_mod.open_trace(store), params, from_step=int(ds["step"].values[-6]))
    xr.testing.assert_identical(live.drop_attrs(), stored.drop_attrs())
    one = classification.classify_trace(store_mod.records_to_dataset(records[-1:], layout, attrs), params)
    assert set(one["trajectory"].values.tolist()) <= {"active", "born_dormant", "unknown"}


def test_sparse_weight_statistics_use_the_latest_recorded_value(tmp_path: Path) -> None:
    """Weight statistics are recorded once per `track.weight_interval` steps (NaN in between), and a
    skipped step leaves every statistic NaN: mechanisms and flags read each one's latest recorded value."""
    ds = mechanism_trace()
    out = ds["out_weight_norm"].values
    out[1:] = np.nan  # recorded at the first step only; channel 5 was unused then
    for name in ("gn_weight", "mean", "std", "in_std", "act_std"):
        ds[name].values[-1] = np.nan  # the last step was skipped (non-finite)
    store = write_store(ds, tmp_path / "sparse.zarr", model_config={"norm_num_groups": 2})
    labels = classify.classify_store(store, ClassifyConfig(), write=False)
    recs = {r["channel_index"]: r for r in lab.to_records(labels)}
    assert {i for i, r in recs.items() if r["unused"]} == {5}
    assert [recs[i]["mechanism"] for i in range(5)] == ["gn_scale", "saturated", "input_collapse", "gn_scale", "other"]
    assert {i for i, r in recs.items() if r["input_collapsed"]} == {2, 3, 9}
    window = classify.classify_store(store, ClassifyConfig(), from_step=2, write=False)
    assert not lab.to_records(window)[5]["unused"]  # no weight record inside the window


# ---------------------------------------------------------------------------------------------
# the table




def test_table_fits_80_columns_with_every_header_and_count(tmp_path: Path) -> None:
    """At 80 columns (a 19,840-channel trace: the widest counts) the table splits into state + trajectory
    and mechanism + flags, with short layer names; every header reads in full and every count is there."""
    from tests.test_report_heatmap import write_sdxl_trace

    store = write_sdxl_trace(tmp_path / "sdxl.zarr", tmp_path)
    labels = classify.classify_store(store, write=False)
    text = classify.to_table(labels, store, color=False, width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    heads = [i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "ch"]]
    assert len(heads) == 2  # two tables
    assert lines[heads[0] - 1].split() == ["state", "traj."] and lines[heads[1] - 1].split() == ["mech.", "flags"]
    expected = {0: ["layer", "ch", "act", "dorm", "dead", "act", "born", "died", "rev", "int"],
                1: ["layer", "ch", "gn", "sat", "in", "oth", "unus", "coll"]}
    totals = [line for line in lines if line.split()[:1] == ["total"]]
    for k, at in enumerate(heads):
        assert lines[at].split() == expected[k]
        # the total row fills every column (a count or '.'), each right-aligned under its header
        assert len(totals[k].split()) == len(expected[k])
        ends = [m.end() for m in re.finditer(r"\S+", lines[at])][1:]
        assert [m.end() for m in re.finditer(r"\S+", totals[k])][1:] == ends
    # known answers: 6 planted inactive channels, one of them dead since step 40 (died), all 'other'
    assert totals[0].split() == ["total", "19840", "19834", "5", "1", "19834", "5", "1", ".", "."]
    assert totals[1].split() == ["total", "19840", ".", ".", ".", "6", ".", "."]
    row = next(line for line in lines[heads[0]:] if line.split()[:1] == ["up1.r2.norm2"]).split()
    assert row == ["up1.r2.norm2", "512", "511", "1", ".", "511", "1", ".", ".", "."]
    # decoder rows under a "decoder" heading, its mid block first (data-flow order)
    dec = next(i for i, line in enumerate(lines) if line.strip() == "decoder")
    assert lines[dec + 1].split()[0] == "mid.r0.norm1"
    # wide: one table, full layer names
    wide = classify.to_table(labels, store, color=False, width=240)
    assert sum(line.split()[:2] == ["layer", "ch"] for line in wide.splitlines()) == 1
    assert "decoder.up_blocks.1.resnets.2.norm2" in wide and max(len(x) for x in wide.splitlines()) <= 240


def test_stored_labels_are_the_classification_group_with_the_traces_channel_coordinates(tmp_path):
    """A store classified for two of its layers: stored_labels gives those channels' labels under the
    trace's own layer / channel_index / part, equal to classifying them in memory; before that it says
    that it classified in memory."""
    layers = [("encoder.down_blocks.0.resnets.0.norm1", 3, True), ("decoder.up_blocks.0.resnets.0.norm2", 2, True),
              ("decoder.mid_block.attentions.0.group_norm", 2, False)]
    act = np.ones((2, 7), np.float32)
    act[:, 1] = 0.0  # dead
    path = write_store(make_trace(layers, [0, 10], act_std=act), tmp_path / "t.zarr")
    ds = store_mod.open_trace(path)
    labels, source = classification.stored_labels(path, ds)
    assert source == "computed in memory (store has none)" and labels.sizes["channel"] == 7
    picked = [layers[0][0], layers[2][0]]
    mem = classification.classify_trace(ds, classification.trace_params(ds), layers=picked)
    store_mod.write_classification(path, mem, n_channels=7)
    labels, source = classification.stored_labels(path, store_mod.open_trace(path))
    assert source == "stored by `vaedyn classify`"
    assert {k: labels[k].dims for k in ("layer", "channel_index", "part")} == {k: ("channel",) for k in
                                                                               ("layer", "channel_index", "part")}
    assert labels["layer"].values.tolist() == [picked[0]] * 3 + [picked[1]] * 2
    assert labels["channel_index"].values.tolist() == [0, 1, 2, 0, 1]
    assert labels["part"].values.tolist() == ["encoder"] * 3 + ["decoder"] * 2
    assert lab.to_records(labels) == lab.to_records(mem)
    assert lab.to_records(labels)[1]["state"] == "dead"
