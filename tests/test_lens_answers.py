"""The linear lens's R^2 in `vaedyn eval --grids`, recomputed independently: the layer's SiLU output
captured by a hook of the test's own, the 16 px images as targets (area downsampling to the layer's
16 x 16 is the identity), least squares with numpy on the even images, R^2 pooled over the three
colour outputs on the odd ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tests.test_eval_grids import DEAD, LAYER, run, tracked_run  # noqa: F401 (fixtures)
from vaedyn_cli import artifacts, data
from vaedyn_cli.model import resolve_checkpoint
from vaedyn_cli.selection import store_classification


def _r2(features: np.ndarray, targets: np.ndarray, fit: np.ndarray, test: np.ndarray) -> float:
    design = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
    w, *_ = np.linalg.lstsq(design[fit], targets[fit], rcond=None)
    resid = targets[test] - design[test] @ w
    centred = targets[test] - targets[test].mean(axis=0)
    return 1.0 - float((resid**2).sum()) / float((centred**2).sum())


def test_lens_r2_equals_an_independent_least_squares(cli, run: Path) -> None:  # noqa: F811
    res = cli("eval", "--checkpoint", run, "--grids", LAYER, "--num-samples-to-save", "0")
    assert res.exit_code == 0, res.stderr
    got = json.loads((run / "eval" / "test" / artifacts.METRICS_FILE).read_text())["grids"][LAYER]

    ckpt = resolve_checkpoint(str(run))
    model = ckpt.load().eval()
    ds = data.image_dataset(ckpt.config.data, "test", max_samples=8, seed=ckpt.config.seed)
    images = torch.stack([ds[i] for i in range(8)])
    captured = []
    handle = model.get_submodule(LAYER).register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    with torch.no_grad():
        model(images, sample_posterior=False)
    handle.remove()
    maps = torch.nn.functional.silu(captured[0]).double().numpy()  # (8, 8, 16, 16)
    features = maps.transpose(0, 2, 3, 1).reshape(-1, 8)
    targets = images.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    image_of_row = np.repeat(np.arange(8), 16 * 16)
    fit, test = image_of_row % 2 == 0, image_of_row % 2 == 1

    states = {r["channel_index"]: r["state"] for r in store_classification(run)["channels"] if r["layer"] == LAYER}
    assert Counter(states.values())["dead"] == 1 and states[DEAD] == "dead"
    subsets = {"all": list(range(8)), "active": [c for c in range(8) if states[c] == "active"],
               "dormant": [c for c in range(8) if states[c] != "active"]}
    for name, chans in subsets.items():
        want = _r2(features[:, chans], targets, fit, test)
        assert abs(got["r2"][name] - want) < 1e-4, (name, got["r2"][name], want)
    # the dead channel is a constant column: its lens predicts the fit images' mean colour, no better
    assert got["r2"]["dormant"] < 0.0
