"""The dormancy heatmap shows the inactive channels it is about, whatever the channel count: the report's
page is rendered by headless Chromium and the planted channels' rows are read back from its pixels.

Where a row lies in the picture comes from the data behind the figure (`figures.heatmap_panels`: which
channels each drawn row holds) and the figure's own axes (`Axes.get_label()` names the panel), not from
the PNG itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_report import make_run
from vaedyn_cli import figures
from vaedyn_cli import store as store_mod
from vaedyn_cli.config import RunConfig
from vaedyn_cli.figures import DPI, fig_heatmap, heatmap_panels
from vaedyn_cli.report import INDEX_FILE, build_report
from vaedyn_cli.report_data import ReportData

HEATMAP = "dormancy_heatmap.png"


def sdxl_layers() -> list[tuple[str, int, str, bool]]:
    """The 52 GroupNorm layers of the width-1 SDXL VAE in module (registration) order: 19,840 channels."""
    widths = (128, 256, 512, 512)
    layers = []
    prev = widths[0]
    for b, w in enumerate(widths):  # encoder down blocks: 2 resnets each
        for r in range(2):
            layers += [(f"encoder.down_blocks.{b}.resnets.{r}.norm1", prev if r == 0 else w, "encoder", True),
                       (f"encoder.down_blocks.{b}.resnets.{r}.norm2", w, "encoder", True)]
            prev = w
    mid = [("mid_block.attentions.0.group_norm", False)] + [
        (f"mid_block.resnets.{r}.norm{k}", True) for r in range(2) for k in (1, 2)]
    layers += [(f"encoder.{n}", 512, "encoder", a) for n, a in mid] + [("encoder.conv_norm_out", 512, "encoder", True)]
    rev = widths[::-1]
    prev = rev[0]
    for b, w in enumerate(rev):  # decoder up blocks (registered before the mid block): 3 resnets each
        for r in range(3):
            layers += [(f"decoder.up_blocks.{b}.resnets.{r}.norm1", prev if r == 0 else w, "decoder", True),
                       (f"decoder.up_blocks.{b}.resnets.{r}.norm2", w, "decoder", True)]
            prev = w
    layers += [(f"decoder.{n}", 512, "decoder", a) for n, a in mid] + [("decoder.conv_norm_out", 128, "decoder", True)]
    return layers


# (layer, channel index, activity relative to the layer, from step position): a handful among 19,840,
# one just under the threshold (0.09, as the glyphs run's 0.06 to 0.11 that the old heatmap smoothed away)
PLANTED = [
    ("encoder.down_blocks.0.resnets.0.norm1", 5, 0.09, 0),
    ("encoder.mid_block.attentions.0.group_norm", 100, 0.05, 0),  # no activation follows: its std counts
    ("decoder.mid_block.resnets.0.norm1", 7, 0.0, 3),  # dead from the fourth step on
    ("decoder.up_blocks.1.resnets.2.norm2", 300, 0.06, 0),
    ("decoder.up_blocks.3.resnets.2.norm2", 127, 0.08, 0),
    ("decoder.conv_norm_out", 0, 0.02, 0),
]
N_STEPS = 6


def write_sdxl_trace(path: Path, tmp_path: Path) -> Path:
    """A 19,840-channel trace with the PLANTED channels (few steps: the check is about rows, not time)."""
    layers = sdxl_layers()
    layout = store_mod.ChannelLayout.from_layers(layers)
    n = layout.n_channels
    assert n == 19_840
    rng = np.random.default_rng(0)
    offsets = np.cumsum([0] + [w for _, w, _, _ in layers])
    start = {name: int(o) for (name, *_), o in zip(layers, offsets[:-1], strict=True)}
    has_act = np.concatenate([np.full(w, a) for _, w, _, a in layers])
    records = []
    for i in range(N_STEPS):
        base = 1.0 + 0.03 * rng.standard_normal(n)
        for layer, c, level, first in PLANTED:
            if i >= first:
                base[start[layer] + c] = level
        std = base.copy()
        act_std = np.where(has_act, base, np.nan)
        records.append(store_mod.TraceRecord(step=10 * (i + 1), channels={
            "in_std": np.ones(n), "mean": np.zeros(n), "mean_abs": 0.8 * std, "std": std,
            "act_mean": 0.3 * act_std, "act_std": act_std, "gn_weight": np.ones(n), "gn_bias": np.zeros(n),
            "gn_weight_grad": np.full(n, 1e-3), "out_weight_norm": np.ones(n),
        }))
    cfg = RunConfig.model_validate({"run_name": "sdxl", "output_dir": str(tmp_path)})
    attrs = store_mod.store_attrs("train", "sdxl", cfg.model_dump_json(), json.dumps({"norm_num_groups": 32}))
    return store_mod.write_records(path, records, layout, attrs, chunk_steps=N_STEPS)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot_of_figure(report: Path, figure: str, size: tuple[int, int], out: Path) -> np.ndarray:
    """The report's own page rendered by headless Chromium, with everything hidden but one figure, drawn
    at its natural size at the top left; returns the screenshot as (H, W, 3) uint8."""
    from PIL import Image

    page = (report / INDEX_FILE).read_text()
    css = ("<style>html,body{margin:0!important;padding:0!important;max-width:none!important;background:#fff}"
           f'body *{{visibility:hidden}}img[src="{figure}"]{{visibility:visible;position:absolute;left:0;top:0;'
           "max-width:none!important;border:0!important}</style>")
    shot_page = report / "_shot.html"  # beside index.html, so that the image's relative path resolves the same way
    shot_page.write_text(page.replace("</head>", css + "</head>", 1))
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--force-device-scale-factor=1", f"--window-size={size[0]},{size[1]}", f"--screenshot={out}",
         shot_page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert out.is_file(), f"no screenshot; chromium said: {proc.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("RGB"))


def is_red(rgb: np.ndarray) -> np.ndarray:
    """The heatmap's 'at or below the threshold' colours (dark to bright red); no blue, grey or white is."""
    rgb = rgb.astype(int)
    return rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2]) > 60


class Geometry:
    """Pixel centre of a (row, step column) cell of a heatmap panel, read from the figure the report drew
    (after it was saved: the layout is final) and the data it drew it from."""

    def __init__(self, d: ReportData, fig: Any):
        self.panels = {p.name: p for p in heatmap_panels(d)}
        self.fig = fig
        self.scale = DPI / fig.dpi  # display coordinates -> the saved PNG's pixels
        self.axes = {ax.get_label(): ax for ax in fig.axes if ax.get_label() in self.panels}
        self.size = tuple(int(round(v * DPI)) for v in fig.get_size_inches())

    def row_of(self, panel: str, channel: int) -> int:
        rows = [i for i, r in enumerate(self.panels[panel].rows) if channel in r.tolist()]
        assert len(rows) == 1, f"channel {channel} is in {len(rows)} rows of panel {panel}"
        return rows[0]

    def pixel(self, panel: str, row: int, col: int) -> tuple[int, int]:
        x, y = self.axes[panel].transData.transform((col, row)) * self.scale
        return int(x), int(self.size[1] - y)


def _position(d: ReportData, layer: str, index: int) -> int:
    ch = d.channels
    hit = np.flatnonzero((ch.layer == layer) & (ch.channel_index == index))
    assert len(hit) == 1
    return int(hit[0])


def check_rows(shot: np.ndarray, geo: Geometry, d: ReportData, planted: list[tuple[str, int, list[int]]],
               controls: list[tuple[str, int]]) -> None:
    """Every planted channel's row is red at each step where it is inactive, in the inactive panel and in its
    part's every-channel panel, and its layer's row of the layer strip; the controls' rows are not red."""
    n_cols = len(d.heat_idx)
    assert geo.size == (shot.shape[1], shot.shape[0])
    for layer, index, cols in planted:
        pos = _position(d, layer, index)
        part = layer.split(".", 1)[0]
        for panel in ("inactive", part, "layers"):
            row = geo.row_of(panel, pos)
            for col in cols:
                x, y = geo.pixel(panel, row, col)
                assert is_red(shot[y, x]), f"{layer} #{index} not marked in panel {panel} at column {col}: {shot[y, x]}"
    for layer, index in controls:
        pos = _position(d, layer, index)
        part = layer.split(".", 1)[0]
        row = geo.row_of(part, pos)
        assert not any(is_red(shot[geo.pixel(part, row, c)[1], geo.pixel(part, row, c)[0]]) for c in range(n_cols)), \
            f"{layer} #{index} (active) drawn red"
    marked = {geo.row_of("inactive", _position(d, layer, index)) for layer, index, _ in planted}
    assert marked == set(range(len(geo.panels["inactive"].rows))), "the inactive panel holds other channels"


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ReportData, Any]]:
    """The data and the figure of every heatmap the report draws while the test runs."""
    seen: list[tuple[ReportData, Any]] = []

    def heatmap(d: ReportData) -> Any:
        fig = fig_heatmap(d)
        seen.append((d, fig))
        return fig

    monkeypatch.setitem(figures.FIGURE_FUNCS, HEATMAP, heatmap)
    return seen


@pytest.fixture
def chromium() -> str:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (the CI script installs it)")
    return browser


def test_planted_channels_of_a_small_trace_are_marked_in_the_rendered_heatmap(chromium: str, drawn: list,
                                                                              tmp_path: Path) -> None:
    report = build_report(make_run(tmp_path, events=False, validation=False))
    (d, fig), = drawn
    geo = Geometry(d, fig)
    shot = screenshot_of_figure(report, HEATMAP, geo.size, tmp_path / "shot.png")
    # tests/test_report.planted: encoder channels 0, 1 die at step 10 (column 5 on); the attention channel 2
    # and the decoder's conv_norm_out channel 3 are inactive throughout; up0 channel 5 until step 16
    check_rows(shot, geo, d, [
        ("encoder.down_blocks.0.resnets.0.norm1", 0, list(range(5, 20))),
        ("encoder.down_blocks.0.resnets.0.norm1", 1, list(range(5, 20))),
        ("encoder.mid_block.attentions.0.group_norm", 2, list(range(20))),
        ("decoder.conv_norm_out", 3, list(range(20))),
        ("decoder.up_blocks.0.resnets.0.norm2", 5, list(range(9))),
    ], controls=[("encoder.down_blocks.0.resnets.0.norm1", 4), ("decoder.conv_norm_out", 6)])


def test_a_handful_of_inactive_channels_among_19840_is_marked_in_the_rendered_heatmap(chromium: str, drawn: list,
                                                                                         tmp_path: Path) -> None:
    report = build_report(write_sdxl_trace(tmp_path / "sdxl.zarr", tmp_path))
    (d, fig), = drawn
    geo = Geometry(d, fig)
    assert max(p.pooled for p in geo.panels.values()) > 1  # more channels than pixel rows: rows are pooled
    assert geo.size[1] < 2600  # one screen-sized picture, not 19,840 rows
    shot = screenshot_of_figure(report, HEATMAP, geo.size, tmp_path / "shot.png")
    planted = [(layer, c, list(range(first, N_STEPS))) for layer, c, _, first in PLANTED]
    # controls: the same channel of the next layer in data-flow order (a row at most one band away; a layer
    # holds a single pooled row here, so its own other channels share the planted one's row)
    controls = [("encoder.down_blocks.0.resnets.0.norm2", 5), ("encoder.mid_block.resnets.1.norm1", 100),
                ("decoder.mid_block.resnets.0.norm2", 7), ("decoder.up_blocks.2.resnets.0.norm1", 300),
                ("decoder.up_blocks.3.resnets.2.norm1", 127)]
    check_rows(shot, geo, d, planted, controls)
    # the decoder's mid block is drawn before its up blocks (data flow), though registered after them
    labels = geo.panels["layers"].labels
    assert labels.index("dec mid.r0.norm1") < labels.index("dec up0.r0.norm1")
