"""A study's numbers: what each run measured, summarised over seeds and compared seed by seed.

Per run (`collect`): the final metrics (MSE, KL, PSNR, SSIM) of its `metrics.json`, the
suppression counts of its trace's `classification` group (`SUPPRESSION`), and the causal check of
the same `metrics.json` (`ablation`: deltas of the mean-ablated inactive channels and of the
random active control).

Per condition (`statistics`): mean and 95 % bootstrap interval over seeds of each number; for
the ablation, the paired difference (ablated delta minus control delta) as well. Per comparison
[condition, reference]: the paired difference seed by seed with its interval and exact sign-flip
p-value (`vaedyn_cli.seedstats`), and a verdict only where the interval excludes 0. Conditions on
different test sets (dataset, split, resolution or number of images differ) get no reconstruction
verdict: their metrics are on different images. `answers` turns the numbers into the three
questions a study asks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vaedyn_cli import seedstats
from vaedyn_cli.metrics import LOWER_IS_BETTER, METRICS, load_metrics
from vaedyn_cli.selection import store_classification
from vaedyn_cli.study_plan import Study

# suppression counts per run: name -> (what it counts)
SUPPRESSION = {
    "inactive": "channels dormant or dead at the end (all parts)",
    "inactive_encoder": "inactive channels of the encoder",
    "inactive_decoder": "inactive channels of the decoder",
    "dead": "channels dead at the end",
    "died": "channels whose trajectory is `died` (active, then persistently inactive)",
    "gn_scale": "inactive channels silenced by their GroupNorm scale (mechanism gn_scale)",
    "saturated": "inactive channels with mechanism saturated",
    "input_collapse": "inactive channels with mechanism input_collapse",
    "other": "inactive channels with mechanism other",
}
INACTIVE_STATES = ("dormant", "dead")
NOT_COMPARABLE = "not comparable: different test sets"
TEST_SET_KEYS = ("data.dataset_name", "data.dataset_config_name", "data.resolution", "eval.split", "eval.max_samples")


def method_json(n: int) -> dict[str, Any]:
    """study.json's `method`: how the intervals, p-values and verdicts are made, for n seeds."""
    return {
        "confidence": seedstats.CONFIDENCE,
        "interval": f"percentile bootstrap over seeds (scipy.stats.bootstrap, {seedstats.BOOTSTRAP_RESAMPLES} "
                    f"resamples, rng seed {seedstats.BOOTSTRAP_SEED}); with n <= 3 seeds it is the range of the seed values",
        "test": "exact two-sided sign-flip permutation test of the mean paired difference (scipy.stats."
                "permutation_test, permutation_type='samples'; all 2^n sign patterns)",
        "sign_patterns": 2**n,
        "min_p_value": seedstats.min_p_value(n),
        "min_p_value_note": f"with {n} seeds no p-value can be below {seedstats.min_p_value(n):.3g}; "
                            f"p < 0.05 needs at least 6 seeds",
        "verdict_rule": "better/worse (more/fewer) only where the 95% interval of the paired difference excludes 0, "
                        f"else '{seedstats.NO_DIFFERENCE} (n seeds)'; reconstruction metrics of conditions on "
                        f"different test sets are '{NOT_COMPARABLE}'",
        "false_call_note": (f"With {n} seeds the interval is the range of the seeds, so a call means every seed agreed "
                            f"in sign, which happens by chance with probability {seedstats.min_p_value(n):.3g} for "
                            "each quantity when there is no effect: treat calls as leads and add seeds before "
                            "publishing one") if n <= 3 else
                           f"Each quantity is tested on its own (no correction for the {len(METRICS)} metrics and "
                           f"{len(SUPPRESSION)} counts of a comparison)",
        "pairing": "by seed: seed k of a condition against seed k of its reference",
    }


# ---------------------------------------------------------------------------------------------
# per run


def suppression_counts(channels: Iterable[dict[str, Any]]) -> dict[str, int]:
    """SUPPRESSION counts from classify JSON records (`vaedyn classify --format json`'s `channels`)."""
    counts = dict.fromkeys(SUPPRESSION, 0)
    for rec in channels:
        inactive = rec["state"] in INACTIVE_STATES
        counts["inactive"] += inactive
        if rec["part"] in ("encoder", "decoder"):
            counts[f"inactive_{rec['part']}"] += inactive
        counts["dead"] += rec["state"] == "dead"
        counts["died"] += rec["trajectory"] == "died"
        if inactive and rec.get("mechanism") in SUPPRESSION:
            counts[rec["mechanism"]] += 1
    return counts


def inactive_by_layer(channels: Iterable[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in channels:
        out[rec["layer"]] = out.get(rec["layer"], 0) + (rec["state"] in INACTIVE_STATES)
    return out


def run_values(metrics_path: Any, store: Any) -> dict[str, Any]:
    """What one finished run measured (its metrics.json and its trace's classification)."""
    record = load_metrics(metrics_path)
    ab = record.get("ablation")
    if not ab:
        raise ValueError(f"{metrics_path} has no ablation section; rerun `vaedyn eval --ablate`")
    labels = store_classification(store)
    return {
        "step": record["step"],
        "num_images": record["num_images"],
        "metrics": {m: float(record["metrics"][m]) for m in METRICS},
        "counts": suppression_counts(labels["channels"]),
        "ablation": {"n_channels": ab["n_channels"], "n_control": ab["n_control"],
                     "delta_ablated": {m: float(ab["delta_ablated"][m]) for m in METRICS},
                     "delta_control": {m: float(ab["delta_control"][m]) for m in METRICS}},
        "by_layer": inactive_by_layer(labels["channels"]),
        "layers": labels["layers"],
        "classification_steps": labels["steps"],
    }


def collect(study: Study) -> dict[str, dict[int, dict[str, Any]]]:
    """condition -> seed -> `run_values` of every run (all must be done)."""
    from vaedyn_cli import artifacts

    return {c: {r.seed: run_values(r.metrics_path, r.run_dir / artifacts.TRACE_DIR) for r in study.runs_of(c)}
            for c in study.spec.conditions}


# ---------------------------------------------------------------------------------------------
# over seeds


def _column(runs: dict[int, dict[str, Any]], seeds: list[int], *path: str) -> list[float]:
    values = []
    for s in seeds:
        node: Any = runs[s]
        for p in path:
            node = node[p]
        values.append(float(node))
    return values


def _cost_word(result: seedstats.Paired, lower_is_better: bool) -> str:
    """Ablated minus control delta: `costs more` when the ablated model is the worse one."""
    v = seedstats.verdict(result, lower_is_better)
    return {"worse": "costs more", "better": "costs less"}.get(v, v)


def condition_summary(runs: dict[int, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Mean and interval over seeds of every number of a condition's runs."""
    metrics = {m: seedstats.mean_ci(_column(runs, seeds, "metrics", m)).to_json() for m in METRICS}
    counts = {k: seedstats.mean_ci(_column(runs, seeds, "counts", k)).to_json() for k in SUPPRESSION}
    ablation: dict[str, Any] = {
        "n_channels": seedstats.mean_ci(_column(runs, seeds, "ablation", "n_channels")).to_json(),
    }
    for m in METRICS:
        ablated = _column(runs, seeds, "ablation", "delta_ablated", m)
        control = _column(runs, seeds, "ablation", "delta_control", m)
        excess = seedstats.paired(ablated, control)
        ablation[m] = {
            "delta_ablated": seedstats.mean_ci(ablated).to_json(),
            "delta_control": seedstats.mean_ci(control).to_json(),
            "ablated_minus_control": {**excess.to_json(), "verdict": _cost_word(excess, LOWER_IS_BETTER[m])},
        }
    return {"n": len(seeds), "metrics": metrics, "counts": counts, "ablation": ablation}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(study: Study, a: str, b: str) -> dict[str, list[Any]]:
    """Dotted keys where two conditions' resolved configs differ (seed and folder aside): [a, b]."""
    fa = _flat(study.config_of(a).model_dump(mode="json"))
    fb = _flat(study.config_of(b).model_dump(mode="json"))
    skip = {"seed", "output_dir", "run_name"}
    return {k: [fa.get(k), fb.get(k)] for k in dict.fromkeys([*fa, *fb]) if k not in skip and fa.get(k) != fb.get(k)}


def compare(study: Study, results: dict[str, dict[int, dict[str, Any]]], cond: str, ref: str) -> dict[str, Any]:
    """One comparison: paired differences (cond minus ref) of metrics, counts and ablation cost."""
    seeds = study.seeds
    differs = config_differences(study, cond, ref)
    same_test_set = not any(k in differs for k in TEST_SET_KEYS)
    metrics = {}
    for m in METRICS:
        ref_values = _column(results[ref], seeds, "metrics", m)
        p = seedstats.paired(_column(results[cond], seeds, "metrics", m), ref_values)
        ref_mean = sum(ref_values) / len(ref_values)
        metrics[m] = {**p.to_json(), "relative": p.diff.mean / ref_mean if ref_mean else None,
                      "verdict": seedstats.verdict(p, LOWER_IS_BETTER[m]) if same_test_set else NOT_COMPARABLE}
    counts = {}
    for k in SUPPRESSION:
        p = seedstats.paired(_column(results[cond], seeds, "counts", k), _column(results[ref], seeds, "counts", k))
        counts[k] = {**p.to_json(), "verdict": seedstats.direction(p)}
    return {
        "condition": cond,
        "reference": ref,
        "differs": differs,
        "same_data": "data.dataset_name" not in differs,
        "same_test_set": same_test_set,
        "note": None if same_test_set else
        f"{cond} and {ref} are evaluated on different test sets ({', '.join(k for k in TEST_SET_KEYS if k in differs)} "
        "differ): their reconstruction metrics are not compared; suppression counts are",
        "metrics": metrics,
        "counts": counts,
    }


def statistics(study: Study, results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """study.json's statistics: `per_run`, `summary` per condition, `comparison_results`, `answers`."""
    seeds = study.seeds
    per_run = [{"condition": c, "seed": s, **{k: v for k, v in results[c][s].items() if k != "layers"}}
               for c in study.spec.conditions for s in seeds]
    summary = {c: condition_summary(results[c], seeds) for c in study.spec.conditions}
    comparisons = [compare(study, results, c, r) for c, r in study.spec.pairs]
    return {"per_run": per_run, "summary": summary, "comparison_results": comparisons,
            "answers": answers(study, summary, comparisons)}


# ---------------------------------------------------------------------------------------------
# the answers, written from the numbers


def _paired_of(entry: dict[str, Any]) -> seedstats.Paired:
    low, high = entry["ci"]
    sign = 1 if low is not None and low > 0 else -1 if high is not None and high < 0 else 0
    diff = seedstats.Interval(entry["mean"], low, high, entry["n"], tuple(entry["values"]))
    return seedstats.Paired(diff, entry["p_value"], sign != 0, sign)


def _differs_text(differs: dict[str, list[Any]]) -> str:
    return ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differs.items()) or "nothing"


def _answer_data(comparisons: list[dict[str, Any]], n: int) -> dict[str, Any]:
    cross = [c for c in comparisons if not c["same_data"]]
    question = "Does suppression depend on the data?"
    if not cross:
        return {"question": question, "answer": "not tested",
                "details": ["no comparison between conditions on different data: add one under `comparisons:`"]}
    details, found = [], 0
    for c in cross:
        e = c["counts"]["inactive"]
        v = e["verdict"]
        found += v in ("more", "fewer")
        word = f"{v} inactive channels" if v in ("more", "fewer") else v
        details.append(f"{c['condition']} vs {c['reference']} ({_differs_text(c['differs'])}): {word}, "
                       f"difference {seedstats.describe(_paired_of(e))}")
    head = f"yes, in {found} of {len(cross)} comparisons" if found else f"{seedstats.NO_DIFFERENCE} ({n} seeds)"
    return {"question": question, "answer": head + _strength(n, found), "details": details}


def _answer_nudge(comparisons: list[dict[str, Any]], n: int) -> dict[str, Any]:
    question = "Does nudging change reconstruction beyond seed noise?"
    nudged = [c for c in comparisons if c["same_test_set"] and any(k.startswith("nudge.") for k in c["differs"])]
    if not nudged:
        return {"question": question, "answer": "not tested",
                "details": ["no comparison on the same test set between conditions whose nudge settings differ"]}
    details, found = [], 0
    for c in nudged:
        called = {m: e["verdict"] for m, e in c["metrics"].items() if e["verdict"] in ("better", "worse")}
        found += bool(called)
        parts = [f"{m.upper()} {e['verdict']}: {seedstats.describe(_paired_of(e))}"
                 + (f", {e['relative']:+.2%} of the reference" if e["relative"] is not None else "")
                 for m, e in c["metrics"].items()]
        details.append(f"{c['condition']} vs {c['reference']}: " + "; ".join(parts))
    head = f"yes, in {found} of {len(nudged)} comparisons" if found else f"{seedstats.NO_DIFFERENCE} ({n} seeds)"
    return {"question": question, "answer": head + _strength(n, found), "details": details}


def _answer_ablation(summary: dict[str, Any], n: int) -> dict[str, Any]:
    question = "Does ablating the suppressed channels cost more than ablating random active ones?"
    details, more, less = [], 0, 0
    for cond, s in summary.items():
        e = s["ablation"]["mse"]["ablated_minus_control"]
        k = s["ablation"]["n_channels"]
        more += e["verdict"] == "costs more"
        less += e["verdict"] == "costs less"
        details.append(f"{cond} ({seedstats.fmt(k['mean'])} channels ablated on average): MSE {e['verdict']}, "
                       f"ablated minus control delta {seedstats.describe(_paired_of(e))}")
    if more:
        head = f"yes, in {more} of {len(summary)} conditions"
    elif less:
        head = f"no: it costs less than the random control in {less} of {len(summary)} conditions"
    else:
        head = f"{seedstats.NO_DIFFERENCE} ({n} seeds)"
    return {"question": question, "answer": head + _strength(n, more + less), "details": details}


def _strength(n: int, called: int) -> str:
    """What a called difference rests on with few seeds (appended to an answer)."""
    if not called:
        return ""
    if n <= 3:
        return (f" (with {n} seeds the interval is the seeds' range: every seed agrees in sign, which chance alone "
                f"gives with probability {seedstats.min_p_value(n):.3g}; p cannot be below it)")
    return f" (n = {n} seeds; p cannot be below {seedstats.min_p_value(n):.3g})"


def answers(study: Study, summary: dict[str, Any], comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The three questions of a study, each answered from the intervals with n."""
    n = len(study.seeds)
    return [_answer_data(comparisons, n), _answer_nudge(comparisons, n), _answer_ablation(summary, n)]
