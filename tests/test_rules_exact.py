"""The labelling rules at their edges: values exactly on tau, on the dead threshold and on the
mean-|y| threshold, and the order in which mechanisms are checked when a channel meets several.

Known answers are written out by hand from the definitions in `vaedyn_cli/classification.py`; the
values are chosen to be exact in float32, so a `<=` turned into `<` (or the reverse) changes a label.
"""

from __future__ import annotations

import numpy as np

from tests.test_classify import make_trace
from vaedyn_cli import classification
from vaedyn_cli import labels as lab
from vaedyn_cli.config import ClassifyConfig

LAYER = "decoder.up_blocks.1.resnets.0.norm2"
ONE_STEP = [10]


def _labels(ds, **params) -> list[dict]:
    return lab.to_records(classification.classify_trace(ds, ClassifyConfig(min_persist=1, **params)))


def _one_layer(activity: list[float], has_activation: bool = True, **stats: np.ndarray):
    """A one-step trace of one layer whose activity (act_std, or std without activation) is `activity`."""
    n = len(activity)
    act = np.asarray(activity, np.float32).reshape(1, n)
    key = "act_std" if has_activation else "std"
    return make_trace([(LAYER, n, has_activation)], ONE_STEP, **{key: act}, **stats)


def test_score_exactly_at_tau_is_dormant_and_one_ulp_above_is_active() -> None:
    """tau 0.5, activities [1, 1+ulp, 3, 3 - ulp]: the layer mean is 2 (+ less than an ulp of 2),
    so tau x mean rounds to exactly 1.0 in float32; score <= tau is dormant."""
    up = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    down = float(np.nextafter(np.float32(3.0), np.float32(0.0)))
    recs = _labels(_one_layer([1.0, up, 3.0, down]), tau=0.5)
    assert [r["state"] for r in recs] == ["dormant", "active", "active", "active"]
    assert recs[0]["score"] == 0.5 and recs[0]["mechanism"] == "other"


def test_activity_exactly_at_the_dead_threshold_is_dead_and_above_it_only_dormant() -> None:
    """dead_threshold 2^-20 (exact in float32): activity == threshold is dead (<=), half of it is
    dead too (a rule that only calls activity 0 dead fails), one ulp above is dormant (score <= tau)."""
    thr = 2.0**-20
    above = float(np.nextafter(np.float32(thr), np.float32(1.0)))
    recs = _labels(_one_layer([thr, thr / 2, above, 1.0, 1.0, 1.0]), dead_threshold=thr)
    assert [r["state"] for r in recs] == ["dead", "dead", "dormant", "active", "active", "active"]


def test_dead_with_a_threshold_above_tau_times_the_mean() -> None:
    """When dead_threshold exceeds tau x layer mean, a channel between the two is dead, not dormant
    (the dead test does not depend on the dormant one)."""
    recs = _labels(_one_layer([0.05, 0.15, 1.0, 1.0]), tau=0.1, dead_threshold=0.2)
    # mean 0.55, tau x mean 0.055: 0.05 dormant and dead (<= 0.2); 0.15 above tau x mean but <= 0.2: dead
    assert [r["state"] for r in recs] == ["dead", "dead", "active", "active"]


def test_mean_abs_threshold_is_strict() -> None:
    """The fixed-threshold rule: mean |y| < threshold; a channel exactly at it is active."""
    ds = make_trace([(LAYER, 3, True)], ONE_STEP, mean_abs=np.array([[0.25, 0.2499999, 0.3]], np.float32))
    recs = _labels(ds, method="mean_abs_threshold", threshold=0.25)
    assert [r["state"] for r in recs] == ["active", "dormant", "active"]


def _mechanism_trace():
    """Six channels of one activated layer, all inactive (act_std 0.001 against healthy 1.0), each
    meeting a chosen set of mechanism conditions at the last step:

    0: gamma 0 and beta -3 (y far below zero: also saturated) -> gn_scale (checked first)
    1: gamma 0 and collapsed input                            -> gn_scale
    2: saturated (mean -3, std 0.1) and collapsed input       -> saturated (before input_collapse)
    3: collapsed input only                                   -> input_collapse
    4: none of them                                           -> other
    5..9: healthy channels, so that medians and means are those of a normal layer
    """
    n = 10
    act = np.full((1, n), 1.0, np.float32)
    act[0, :5] = 0.001
    gamma = np.ones((1, n), np.float32)
    gamma[0, [0, 1]] = 0.0
    mean = np.zeros((1, n), np.float32)
    mean[0, [0, 2]] = -3.0
    std = np.full((1, n), 1.0, np.float32)
    std[0, [0, 2]] = 0.1
    in_std = np.full((1, n), 1.0, np.float32)
    in_std[0, [1, 2, 3]] = 0.01
    return make_trace([(LAYER, n, True)], ONE_STEP, act_std=act, gn_weight=gamma, mean=mean, std=std, in_std=in_std)


def test_mechanism_precedence_gn_scale_then_saturated_then_input_collapse() -> None:
    recs = _labels(_mechanism_trace())
    assert [r["state"] for r in recs[:5]] == ["dormant"] * 5
    assert [r["mechanism"] for r in recs] == ["gn_scale", "gn_scale", "saturated", "input_collapse", "other",
                                             None, None, None, None, None]
    # the flag is reported whatever the mechanism
    assert [r["input_collapsed"] for r in recs[:5]] == [False, True, True, True, False]


def test_gn_scale_boundary_is_inclusive() -> None:
    """|gamma| <= ratio x the layer's median |gamma| (1): with ratio 0.125 (exact in binary) a gamma
    of exactly 0.125 is gn_scale, one ulp above it is not; the sign of gamma does not matter."""
    n = 8
    act = np.full((1, n), 1.0, np.float32)
    act[0, :3] = 0.001
    gamma = np.ones((1, n), np.float32)
    gamma[0, 0] = 0.125
    gamma[0, 1] = np.nextafter(np.float32(0.125), np.float32(1.0))
    gamma[0, 2] = -0.125
    ds = make_trace([(LAYER, n, True)], ONE_STEP, act_std=act, gn_weight=gamma)
    assert [r["mechanism"] for r in _labels(ds, gn_scale_ratio=0.125)[:3]] == ["gn_scale", "other", "gn_scale"]


def test_saturation_boundary_is_strict() -> None:
    """saturated needs mean + m std < -m: exactly on the line (mean -3, std 0.5, m 2: -3 + 1 = -2) is not."""
    n = 5
    act = np.full((1, n), 1.0, np.float32)
    act[0, :2] = 0.001
    mean = np.zeros((1, n), np.float32)
    mean[0, :2] = -3.0
    std = np.full((1, n), 1.0, np.float32)
    std[0, 0], std[0, 1] = 0.5, 0.25
    ds = make_trace([(LAYER, n, True)], ONE_STEP, act_std=act, mean=mean, std=std)
    assert [r["mechanism"] for r in _labels(ds)[:2]] == ["other", "saturated"]


def test_no_activation_no_saturation() -> None:
    """A norm without a following activation (attention group_norm) cannot be saturated, however far
    below zero its output lies."""
    n = 4
    std = np.full((1, n), 1.0, np.float32)
    std[0, 0] = 0.001
    mean = np.zeros((1, n), np.float32)
    mean[0, 0] = -10.0
    ds = make_trace([("decoder.mid_block.attentions.0.group_norm", n, False)], ONE_STEP, std=std, mean=mean)
    assert _labels(ds)[0]["mechanism"] == "other"


def test_layer_states_is_the_per_step_rule_on_one_layers_activities() -> None:
    """The lens labels its grid tiles with this. tau 0.1: the finite mean is (0 + 1e-7 + 0.125 + 3 + 4.875)
    / 5 = 1.6, limit 0.16: 0 and 1e-7 are at most the dead threshold (dead), 0.125 is dormant, NaN is
    unobserved; the absolute mean-|y| rule is strict (0.2 is active)."""
    codes = classification.layer_states(np.array([0.0, 1e-7, 0.125, np.nan, 3.0, 4.875]), ClassifyConfig(tau=0.1))
    assert codes.tolist() == [lab.DEAD, lab.DEAD, lab.DORMANT, lab.UNOBSERVED, lab.ACTIVE, lab.ACTIVE]
    assert codes.dtype == np.int8
    below = float(np.nextafter(np.float32(0.2), np.float32(0)))
    strict = classification.layer_states([below, 0.2, np.nan], ClassifyConfig(method="mean_abs_threshold", threshold=0.2))
    assert strict.tolist() == [lab.DORMANT, lab.ACTIVE, lab.UNOBSERVED]


def test_a_channel_never_observed_has_no_score_even_when_its_layers_last_step_is_missing() -> None:
    """Channel 3 is NaN on both steps and the layer skipped its last step entirely: every other
    channel's score is from step 10 (its last observed one); channel 3 has none and stays unknown."""
    act = np.array([[1.0, 2.0, 3.0, np.nan], [np.nan] * 4], np.float32)
    ds = make_trace([(LAYER, 4, True)], [10, 20], act_std=act)
    recs = _labels(ds)
    assert [r["score"] for r in recs[:3]] == [0.5, 1.0, 1.5]
    assert recs[3]["score"] is None and recs[3]["state"] == "unknown"


def test_the_last_value_of_a_statistic_the_trace_lacks_is_nan_for_every_channel():
    """`_last` of a variable the trace does not hold: NaN (float32, like the recorded statistics) for
    each of the channels asked for, so the tests that need it are false."""
    import xarray as xr

    ds = xr.Dataset({"std": (("step", "channel"), np.ones((2, 5), np.float32))})
    out = classification._last(ds, "out_weight_norm", 0, 2, np.arange(3))
    assert out.dtype == np.float32 and out.shape == (3,) and np.isnan(out).all()


def test_unused_and_input_collapsed_are_inclusive_against_the_mean_of_the_finite_values() -> None:
    """unused: out_weight_norm <= ratio x its layer's mean; input_collapsed: in_std <= ratio x its
    group's mean (here the layer: the trace names no groups). The means are over the finite values
    only: channels 0-6 hold 0.5, 0.515625, 10.984375 and 4 x 4 (sum 28, mean exactly 4; all exact in
    binary), channel 7 is NaN. With ratio 0.125 the line is exactly 0.5: channel 0 on it is flagged,
    channel 1 above it is not (a NaN counted as 1 would move the line to 0.518, as 0 to 0.4375)."""
    values = np.array([[0.5, 0.515625, 10.984375, 4, 4, 4, 4, np.nan]], np.float32)
    act = np.full((1, 8), 1.0, np.float32)
    act[0, :2] = 0.001
    ds = make_trace([(LAYER, 8, True)], ONE_STEP, act_std=act, out_weight_norm=values, in_std=values)
    recs = _labels(ds, unused_ratio=0.125, input_collapse_ratio=0.125)
    assert [r["unused"] for r in recs] == [True] + [False] * 7
    assert [r["input_collapsed"] for r in recs] == [True] + [False] * 7
    assert [r["mechanism"] for r in recs[:2]] == ["input_collapse", "other"]


def test_gn_scale_is_relative_to_the_layers_median_gamma() -> None:
    """|gamma| <= ratio x the layer's median |gamma|, with a median of 2 (not 1, where x and / agree):
    at ratio 0.125 the line is 0.25; a gamma on it is gn_scale, one ulp above it is not."""
    n = 8
    act = np.full((1, n), 1.0, np.float32)
    act[0, :2] = 0.001
    gamma = np.full((1, n), 2.0, np.float32)
    gamma[0, 0] = 0.25
    gamma[0, 1] = np.nextafter(np.float32(0.25), np.float32(1.0))
    ds = make_trace([(LAYER, n, True)], ONE_STEP, act_std=act, gn_weight=gamma)
    assert [r["mechanism"] for r in _labels(ds, gn_scale_ratio=0.125)[:2]] == ["gn_scale", "other"]


def test_a_layer_without_gamma_is_never_gn_scale() -> None:
    """A tracked module with no GroupNorm scale (a conv: its gn_weight is NaN) has no median gamma:
    its inactive channels are classified, with mechanism other, never gn_scale."""
    n = 6
    act = np.full((1, n), 1.0, np.float32)
    act[0, 0] = 0.001
    ds = make_trace([(LAYER, n, True)], ONE_STEP, act_std=act, gn_weight=np.full((1, n), np.nan, np.float32))
    recs = _labels(ds)
    assert [r["state"] != "active" for r in recs] == [True] + [False] * 5
    assert recs[0]["mechanism"] == "other"


def test_the_labels_layout_every_variable_along_channel_and_the_settings_they_came_from() -> None:
    """classify_trace's Dataset: every variable and coordinate along the one dim `channel` (the
    position along the trace's channel dim), dtypes as the store schema has them, and `params` the
    JSON of the settings, the window and the layers asked for."""
    import json

    other = "decoder.mid_block.attentions.0.group_norm"
    ds = make_trace([(other, 2, False), (LAYER, 3, True)], [10, 20, 30])
    labels = classification.classify_trace(ds, ClassifyConfig(min_persist=1), from_step=20, layers=[LAYER])
    names = ["state", "trajectory", "mechanism", "unused", "input_collapsed", "score", "onset_step",
             "revival_step", "n_transitions"]
    assert sorted(labels.data_vars) == sorted(names) and dict(labels.sizes) == {"channel": 3}
    assert {n: labels[n].dims for n in [*names, "channel", "layer", "channel_index", "part"]} == {
        n: ("channel",) for n in [*names, "channel", "layer", "channel_index", "part"]}
    assert labels["channel"].values.tolist() == [2, 3, 4] and labels["channel"].dtype == np.int64
    assert labels["score"].dtype == np.float64
    assert (labels.attrs["first_step"], labels.attrs["last_step"], labels.attrs["n_steps"]) == (20, 30, 2)
    params = json.loads(labels.attrs["params"])
    assert params == {**ClassifyConfig(min_persist=1).model_dump(mode="json"), "from_step": 20, "to_step": None,
                      "layers": [LAYER]}


def test_a_layer_whose_channels_interleave_in_the_store_keeps_each_channels_values() -> None:
    """Another program's store order a.0, b.0, a.1, c.0: the classifier groups layer a's channels (store
    positions 0, 2, 1, 3: one range, but not in order), and each channel is classified on its own
    values (a.1 at 0.01 of a.0 is dormant; b.0 and c.0, alone in their layers, are active)."""
    ds = make_trace([("encoder.a", 2, True), ("encoder.b", 1, True), ("encoder.c", 1, True)], ONE_STEP,
                    act_std=np.array([[1.0, 0.01, 2.0, 3.0]], np.float32)).isel(channel=[0, 2, 1, 3])
    assert ds["layer"].values.tolist() == ["encoder.a", "encoder.b", "encoder.a", "encoder.c"]
    states = {(r["layer"], r["channel_index"]): r["state"] for r in _labels(ds)}
    assert states == {("encoder.a", 0): "active", ("encoder.a", 1): "dormant", ("encoder.b", 0): "active",
                      ("encoder.c", 0): "active"}


def test_a_float64_trace_is_classified_on_its_float32_values() -> None:
    """Stores hold float32; a float64 trace from another program is read as float32, like a store:
    1 + 1e-9 is 1.0 in float32, exactly tau x the layer mean (0.5 x 2), so it is dormant."""
    ds = _one_layer([1.0, 3.0])
    ds["act_std"] = ds["act_std"].astype(np.float64)
    ds["act_std"].values[0, 0] = 1.0 + 1e-9
    assert ds["act_std"].dtype == np.float64
    assert [r["state"] for r in _labels(ds, tau=0.5)] == ["dormant", "active"]


def test_model_config_given_as_a_mapping_sets_the_groups_like_its_json() -> None:
    """`model_config` as a mapping (an in-memory trace or another writer's attrs) gives the same groups
    as the JSON string vaedyn writes: channel 9 is input-collapsed only against its group's mean."""
    from tests.test_classify import mechanism_trace

    flags = {}
    for given in ('{"norm_num_groups": 2}', {"norm_num_groups": 2}):
        ds = mechanism_trace()
        ds.attrs["model_config"] = given
        flags[type(given)] = {r["channel_index"] for r in _labels(ds) if r["input_collapsed"]}
    assert flags == {str: {2, 3, 9}, dict: {2, 3, 9}}


def test_scores_of_a_silent_layer_are_0_and_of_an_unobserved_step_nan() -> None:
    """Per-step scores, by hand: [1, 3] scores [0.5, 1.5]; a silent layer [0, 0] scores 0 (not 0/0)
    and is dead; a step with no finite value scores NaN and is unobserved; [2, NaN] scores [1, NaN]."""
    act = np.array([[1.0, 3.0], [0.0, 0.0], [np.nan, np.nan], [2.0, np.nan]], np.float32)
    ds = make_trace([(LAYER, 2, True)], [0, 1, 2, 3], act_std=act)
    codes, score = classification.step_states(ds, ClassifyConfig())
    assert codes.tolist() == [[lab.ACTIVE, lab.ACTIVE], [lab.DEAD, lab.DEAD], [lab.UNOBSERVED, lab.UNOBSERVED],
                              [lab.ACTIVE, lab.UNOBSERVED]]
    np.testing.assert_array_equal(score, np.array([[0.5, 1.5], [0.0, 0.0], [np.nan, np.nan], [1.0, np.nan]]))
    assert score.dtype == np.float32
    # the labels keep each channel's score at its last observed step: 1.0 at step 3, 0 (silent) at step 1
    assert [r["score"] for r in _labels(ds)] == [1.0, 0.0]


def test_interleaved_layers_are_grouped_keeping_store_order_within_each_layer() -> None:
    """Two layers of 40 channels stored alternately (a.0, b.0, a.1, b.1, ...): the labels list layer a's
    channels, then layer b's, each in store order (a stable grouping)."""
    ds = make_trace([("encoder.a", 40, True), ("encoder.b", 40, True)], ONE_STEP)
    ds = ds.isel(channel=[j for i in range(40) for j in (i, 40 + i)])
    recs = _labels(ds)
    assert [(r["layer"], r["channel_index"]) for r in recs] == [
        (name, i) for name in ("encoder.a", "encoder.b") for i in range(40)]


def test_each_channels_part_is_the_traces_part_variable_else_its_module_paths_first_name() -> None:
    """`part` comes from the trace's variable when it has one (here a made-up split the module paths do
    not show); a trace from another program without it gets the module path's first name."""
    ds = make_trace([("encoder.mid.a", 1, True), ("decoder.up.b", 1, True), ("post_quant_conv", 1, False)],
                    ONE_STEP)
    ds["part"] = ("channel", np.array(["decoder", "encoder", "decoder"], dtype=object))
    assert [r["part"] for r in _labels(ds)] == ["decoder", "encoder", "decoder"]
    assert [r["part"] for r in _labels(ds.drop_vars("part"))] == ["encoder", "decoder", "post_quant_conv"]


def test_a_trace_without_has_activation_reads_every_channel_as_without_activation() -> None:
    """No `has_activation` variable (another program's trace): the activity is `std` of y itself; here
    channel 0's std is 0.01 of the others' while its act_std is healthy, so it is dormant."""
    std = np.array([[0.01, 1.0, 1.0]], np.float32)
    ds = make_trace([(LAYER, 3, True)], ONE_STEP, std=std).drop_vars("has_activation")
    assert [r["state"] for r in _labels(ds)] == ["dormant", "active", "active"]


def test_one_channel_per_group_is_never_input_collapsed_against_a_neighbour() -> None:
    """norm_num_groups 2 on a 2-channel layer: each channel is its own group, so a tiny in_std is not
    collapsed against its neighbour's (it equals its group's mean; collapse is at most 0.1 x the mean)."""
    ds = make_trace([(LAYER, 2, True)], ONE_STEP, in_std=np.array([[1e-4, 1.0]], np.float32))
    ds.attrs["model_config"] = '{"norm_num_groups": 2}'
    assert [r["input_collapsed"] for r in _labels(ds)] == [False, False]
    ds.attrs["model_config"] = '{"norm_num_groups": 1}'
    assert [r["input_collapsed"] for r in _labels(ds)] == [True, False]


def test_a_trace_without_channels_classifies_to_empty_labels() -> None:
    """A store of no channels (every layer filtered out upstream) is not an error: no labels, no codes,
    with the schema's dtypes (the layer and part strings as objects, the counts as integers)."""
    ds = make_trace([("encoder.a", 4, True)], [10, 20]).isel(channel=[])
    labels = classification.classify_trace(ds, ClassifyConfig(min_persist=1))
    assert labels.sizes["channel"] == 0 and lab.to_records(labels) == []
    assert (labels.attrs["first_step"], labels.attrs["last_step"], labels.attrs["n_steps"]) == (10, 20, 2)
    assert labels["layer"].dtype == object and labels["part"].dtype == object
    assert labels["onset_step"].dtype == np.int64 and labels["score"].dtype == np.float64
    ch = classification.select_channels(ds)
    assert (ch.n, ch.bounds, ch.group.tolist()) == (0, [], [])
    codes, scores = classification.step_states(ds, ClassifyConfig())
    assert codes.shape == scores.shape == (2, 0)
    assert classification.select_channels(ds.drop_vars("part")).part.dtype == object  # the module-path fallback
