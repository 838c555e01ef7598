"""The report's near-zero figure shows what the original study's Figure 1 showed: the 10 parameter
tensors (norms' weights and biases included) with the highest peak share, by their full names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.conftest import TINY_WIDTH
from vaedyn_cli import store
from vaedyn_cli.config import TrackConfig
from vaedyn_cli.figures import fig_near_zero
from vaedyn_cli.model import build_preset
from vaedyn_cli.probes import ChannelProbes
from vaedyn_cli.report_data import gather


def test_the_ten_tensors_with_the_highest_peak_are_labelled_by_name(tmp_path: Path):
    model = build_preset(TINY_WIDTH, 0)
    probes = ChannelProbes(model, TrackConfig(layers=["decoder.conv_norm_out"]))
    names = list(probes.layout.params)
    with torch.no_grad():  # planted: the output norm's bias all zero, half its scale
        model.decoder.conv_norm_out.bias.zero_()
        model.decoder.conv_norm_out.weight[::2] = 0.0
        model.decoder.conv_norm_out.weight[1::2] = 1.0
    probes.reset()
    probes.capture_params()
    measured = probes.snapshot(0).resolve().near_zero_frac
    i_bias, i_weight = names.index("decoder.conv_norm_out.bias"), names.index("decoder.conv_norm_out.weight")
    assert (measured[i_bias], measured[i_weight]) == (1.0, 0.5)

    # a trace whose peaks rank: the norm's bias, then its weight, then 9 others in a known order
    peaks = np.zeros(len(names))
    peaks[i_bias], peaks[i_weight] = 1.0, 0.5
    others = [i for i in range(len(names)) if i not in (i_bias, i_weight)][:9]
    peaks[others] = np.linspace(0.4, 0.05, 9)
    records = [store.TraceRecord(step=10 * k, near_zero_frac=peaks * (k + 1) / 3) for k in range(3)]
    path = store.write_records(tmp_path / "t.zarr", records, probes.layout, store.store_attrs("train", "t", "{}", "{}"))
    fig = fig_near_zero(gather(path, store.open_trace(path)))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [names[i] for i in (i_bias, i_weight, *others[:8])]
    assert "per parameter tensor" in fig.axes[0].get_title()
