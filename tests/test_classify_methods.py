"""Classify methods from the literature on hand-made traces with answers worked out by hand, and
version 1 stores (written by the old schema) opened, classified and reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_classify import labels_of, make_trace, write_store
from vaedyn_cli import classification, store
from vaedyn_cli.config import ClassifyConfig
from vaedyn_cli.errors import VaedynError

L, A = "decoder.up_blocks.0.resnets.0.norm1", "decoder.mid_block.attentions.0.group_norm"
LAYERS = [(L, 4, True), (A, 2, False)]  # L: an activation follows; A: none (its own output is read)


def trace(n_steps: int = 1, **stats: np.ndarray):  # noqa: ANN201
    """A one-layer-pair trace whose planted statistics repeat on every step."""
    full = {k: np.tile(np.asarray(v, np.float32), (n_steps, 1)) for k, v in stats.items()}
    ds = make_trace(LAYERS, np.arange(n_steps) * 10)
    for name, values in full.items():
        ds[name] = (("step", "channel"), values)
    return ds


def classify(ds, method: str, **params):  # noqa: ANN001, ANN201
    return classification.classify_trace(ds, ClassifyConfig(method=method, min_persist=1, **params))


def states(labels, layer: str) -> list[str]:  # noqa: ANN001
    return [labels_of(labels, layer, i)["state"] for i in range(4 if layer == L else 2)]


def scores(labels, layer: str) -> list[float]:  # noqa: ANN001
    return [labels_of(labels, layer, i)["score"] for i in range(4 if layer == L else 2)]


def test_every_registered_method_is_a_config_choice():
    assert list(classification.METHODS) == list(ClassifyConfig.model_fields["method"].annotation.__args__)


def test_redo_is_mean_abs_activation_over_its_layers_mean():
    # ReDo: s_i = E|h_i| / mean_k E|h_k|, tau-dormant when s_i <= tau. L: E|act(y)| = [0.5, 0.125,
    # 1.375, 2.0], mean 1, so s = the same; channel 1 sits exactly at tau = 0.125 (<= counts).
    # A has no activation: h is its output, E|y| = mean_abs = [0.25, 1.75], mean 1.
    ds = trace(act_mean_abs=[0.5, 0.125, 1.375, 2.0, np.nan, np.nan], mean_abs=[9, 9, 9, 9, 0.25, 1.75])
    labels = classify(ds, "redo", tau=0.125)
    assert scores(labels, L) == [0.5, 0.125, 1.375, 2.0] and scores(labels, A) == [0.25, 1.75]
    assert states(labels, L) == ["active", "dormant", "active", "active"]
    assert states(labels, A) == ["active", "active"]
    # a channel whose mean |h| is at most dead_threshold is dead, as in the dormancy method
    dead = classify(trace(act_mean_abs=[0.5, 0.0, 1.5, 2.0, 0, 0], mean_abs=[0, 0, 0, 0, 0.25, 1.75]), "redo")
    assert states(dead, L) == ["active", "dead", "active", "active"]


def test_grama_is_the_gradient_magnitude_over_its_layers_mean_without_a_dead_state():
    # |d loss / d gamma| = [3, 0.25, 6, 2.75] x 2^-20 (all below dead_threshold 1e-6 in absolute
    # terms): mean 3 x 2^-20, scores [1, 1/12, 2, 11/12]; only channel 1 is <= tau 0.1.
    g = np.array([3, 0.25, 6, 2.75, 1, 3], np.float64) * 2.0**-20
    labels = classify(trace(gn_weight_grad=g), "grama")
    assert scores(labels, L) == pytest.approx([1, 1 / 12, 2, 11 / 12], rel=1e-6)
    assert scores(labels, A) == pytest.approx([0.5, 1.5], rel=1e-6)
    assert states(labels, L) == ["active", "dormant", "active", "active"]  # never dead: gradients are small
    filt = classify(trace(in_weight_grad=[1, 1, 1, 0.2, 2, 2]), "grama_filter")  # mean 0.8: 0.2 / 0.8 = 0.25
    assert scores(filt, L) == [1.25, 1.25, 1.25, 0.25]


def test_cbp_utility_is_mean_abs_h_times_outgoing_l1_over_its_layers_mean():
    # L: E|h| = [0.5, 0.125, 1.375, 2.0], L1 of the outgoing weights [2, 8, 0, 1]: utility [1, 1, 0, 2],
    # mean 1; A: E|y| = [0.25, 1.75] x L1 [4, 1] = [1, 1.75], mean 1.375.
    ds = trace(act_mean_abs=[0.5, 0.125, 1.375, 2.0, np.nan, np.nan], mean_abs=[9, 9, 9, 9, 0.25, 1.75],
               out_weight_l1=[2, 8, 0, 1, 4, 1])
    labels = classify(ds, "cbp")
    assert scores(labels, L) == [1.0, 1.0, 0.0, 2.0]
    assert scores(labels, A) == pytest.approx([1 / 1.375, 1.75 / 1.375], rel=1e-6)
    assert states(labels, L) == ["active", "active", "dormant", "active"]  # utility 0: dormant, not dead


def test_cbp_takes_the_latest_recorded_outgoing_weights_within_the_window():
    """Weight statistics are recorded once per track.weight_interval: between records the utility
    uses the latest one at or before the step, never one from before the window."""
    ds = trace(3, act_mean_abs=[1, 1, 1, 1, np.nan, np.nan], mean_abs=[1] * 6, out_weight_l1=[1] * 6)
    l1 = ds["out_weight_l1"].values.copy()
    l1[0, :4] = [2, 8, 0, 1]  # recorded at step 0 only
    l1[1:] = np.nan
    act = ds["act_mean_abs"].values.copy()
    act[2, :4] = [0.5, 0.125, 1.375, 2.0]  # the last step's activity
    ds = ds.assign(out_weight_l1=(("step", "channel"), l1), act_mean_abs=(("step", "channel"), act))
    labels = classify(ds, "cbp")
    assert scores(labels, L) == [1.0, 1.0, 0.0, 2.0]  # step 20's E|h| x step 0's L1
    codes, per_step = classification.step_states(ds, ClassifyConfig(method="cbp"), [1, 2])  # positions: lookback
    assert per_step[1, :4].tolist() == [1.0, 1.0, 0.0, 2.0]
    window = classification.classify_trace(ds, ClassifyConfig(method="cbp", min_persist=1), from_step=10)
    assert states(window, L) == ["unknown"] * 4  # no outgoing weights recorded inside steps 10..20


def test_a_method_needs_its_statistic():
    with pytest.raises(VaedynError, match=r"'redo' needs 'act_mean_abs'.*track.extra_statistics"):
        classify(make_trace(LAYERS, [0, 10]), "redo")


def test_cbp_carries_the_latest_outgoing_weights_across_chunk_boundaries():
    """Outgoing weights recorded at steps 0 and 30 only (track.weight_interval): every step uses the
    latest record at or before it, also when the trace is classified a step or two at a time."""
    ds = trace(6, act_mean_abs=[1, 1, 1, 1, np.nan, np.nan], mean_abs=[1] * 6, out_weight_l1=[1] * 6)
    l1 = np.full((6, 6), np.nan, np.float32)
    l1[0] = [2, 8, 0, 1, 4, 1]
    l1[3] = [1, 1, 4, 2, 1, 4]
    act = ds["act_mean_abs"].values.copy()
    act[5, :4] = [2, 1, 1, 1]  # the last step's activity differs from the step that recorded the weights
    ds = ds.assign(out_weight_l1=(("step", "channel"), l1), act_mean_abs=(("step", "channel"), act))
    # step 20 (row 2) uses step 0's weights: L utility [2, 8, 0, 1], mean 2.75; A [4, 1], mean 2.5
    _, per_step = classification.step_states(ds, ClassifyConfig(method="cbp"), [2, 5])
    assert per_step[0].tolist() == pytest.approx([2 / 2.75, 8 / 2.75, 0, 1 / 2.75, 4 / 2.5, 1 / 2.5], rel=1e-6)
    # step 50 (row 5) uses step 30's: L [2, 1, 4, 2], mean 2.25; A [1, 4], mean 2.5
    last = [2 / 2.25, 1 / 2.25, 4 / 2.25, 2 / 2.25]
    assert per_step[1].tolist() == pytest.approx([*last, 0.4, 1.6], rel=1e-6)
    # a step that recorded weights uses its own (L [1, 1, 4, 2] / 2, A [1, 4] / 2.5), by position or by slice
    at_30 = [0.5, 0.5, 2, 1, 0.4, 1.6]
    assert classification.step_states(ds, ClassifyConfig(method="cbp"), [3])[1][0].tolist() == pytest.approx(at_30)
    assert classification.step_states(ds, ClassifyConfig(method="cbp"), slice(3, 4))[1][0].tolist() == pytest.approx(at_30)
    # a slice starting between records takes the latest before it
    _, window = classification.step_states(ds, ClassifyConfig(method="cbp"), slice(5, 6))
    assert window[0].tolist() == pytest.approx([*last, 0.4, 1.6], rel=1e-6)
    codes, none = classification.step_states(ds, ClassifyConfig(method="cbp"), [])
    assert codes.shape == none.shape == (0, 6) and none.dtype == np.float32
    for chunk in (None, 1, 2, 4):
        labels = classify(ds, "cbp", **({} if chunk is None else {"chunk_steps": chunk}))
        assert scores(labels, L) == pytest.approx(last, rel=1e-6), chunk
        assert scores(labels, A) == pytest.approx([0.4, 1.6], rel=1e-6), chunk
        two = labels_of(labels, L, 2)  # utility 0 until step 20, 4 from step 30: dormant, then revived
        assert (two["state"], two["trajectory"], two["revival_step"]) == ("active", "revived", 30), chunk


def test_cbp_without_outgoing_weights_says_which_statistic_is_missing():
    ds = trace(2, act_mean_abs=[1, 1, 1, 1, np.nan, np.nan], mean_abs=[1] * 6)
    with pytest.raises(VaedynError, match="'cbp' needs 'out_weight_l1', which this trace does not hold"):
        classify(ds, "cbp")


# ---------------------------------------------------------------------------------------------
# version 1 stores


def test_a_version_1_store_opens_classifies_and_reports(tmp_path: Path, cli):
    """A store as vaedyn wrote it before schema version 2 (no module_type, capture, out_weight_l1,
    near_zero_frac of all parameters): readers fill what it lacks or say a method needs it."""
    v1 = make_trace(LAYERS, [0, 10, 20])
    assert v1.attrs["schema_version"] == 1 and "module_type" not in v1.variables
    path = write_store(v1, tmp_path / "v1.zarr", config={"classify": {"method": "dormancy", "min_persist": 1}},
                       model_config={"norm_num_groups": 2})
    opened = store.open_trace(path)
    assert set(opened["module_type"].values) == {""} and set(opened["capture"].values) == {"output"}
    assert store.ChannelLayout.from_dataset(opened).extra == ()

    res = cli("classify", path, "--format", "json", "--no-write")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["method"] == "dormancy" and out["layers"] == {L: 4, A: 2} and len(out["channels"]) == 6
    assert cli("classify", path, "--method", "grama", "--no-write").exit_code == 0  # |grad gamma| is in v1
    for method, missing in (("redo", "act_mean_abs"), ("cbp", "act_mean_abs")):
        res = cli("classify", path, "--method", method, "--no-write")
        assert res.exit_code == 2 and res.stdout == ""
        line = res.stderr.strip()
        assert len(line.splitlines()) == 1 and f"'{method}' needs '{missing}'" in line, line

    assert cli("classify", path).exit_code == 0  # writes the classification group into the v1 store
    res = cli("report", path)
    assert res.exit_code == 0, res.stderr
    report = Path(res.stdout.strip())
    summary = json.loads((report / "summary.json").read_text())
    assert summary["schema_version"] == 1 and (report / "dormant_counts.png").is_file()


def test_an_in_training_nudge_refuses_a_rule_its_trace_would_not_record(tmp_path: Path, cli):
    import yaml

    from tests.conftest import tiny_config_dict

    cfg = tmp_path / "redo.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, classify={"method": "redo"}, nudge={"enabled": True, "every": 2})))
    res = cli("train", "-c", cfg)
    assert res.exit_code == 2 and res.stdout == ""
    assert "track.extra_statistics=[act_mean_abs]" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_the_summary_counts_a_one_channel_layer_by_its_part():
    ds = make_trace([("encoder.conv_norm_out", 1, True), (L, 4, True)], [0, 10])
    rows = classification.summary(classification.classify_trace(ds, ClassifyConfig(min_persist=1)))
    assert [(r["layer"], r["part"], r["channels"]) for r in rows] == [
        ("encoder.conv_norm_out", "encoder", 1), (L, "decoder", 4)]
    assert sum(rows[0]["state"].values()) == 1 and sum(rows[1]["trajectory"].values()) == 4
