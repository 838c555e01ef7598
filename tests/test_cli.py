"""The command line as a user meets it: --help, and the paths commands print."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config_dict
from vaedyn_cli.cli import PIPELINE, app


def _help(*args: str) -> str:
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, [*args, "--help"], catch_exceptions=False, terminal_width=100)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_help_lists_commands_in_pipeline_order_and_flags_as_flags() -> None:
    text = _help()
    listed = [m.group(1) for m in re.finditer(r"^│ (\w+) ", text.split("Commands")[1], re.M)]
    assert listed == list(PIPELINE) == ["config", "train", "track", "classify", "nudge", "eval", "report", "study",
                                        "store"]
    assert re.search(r"--debug +Show tracebacks", text) and "<bool>" not in text
    commands = [[c] for c in PIPELINE if c not in ("config", "store")] + [["config", "show"], ["store", "info"]]
    assert ["study"] in commands
    for cmd in commands:
        assert "<bool>" not in _help(*cmd), cmd  # e.g. --overwrite, --no-write, --compare, --json, --help
    assert re.search(r"--overwrite +Replace", _help("nudge"))


def test_track_and_nudge_help() -> None:
    track = _help("track")
    assert "Usage: vaedyn track [OPTIONS] [CHECKPOINT]..." in track
    assert "more" not in track and "so that" not in track  # no implementation note
    nudge = _help("nudge")
    for flag in ("--shrink", "--perturb-std", "--seed", "--factor", "--max-scale"):
        assert flag in nudge


def test_every_command_prints_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    """Given relative paths, every command that prints a path prints it absolute; the shrink_perturb
    flags and --seed reach nudge.json, and compare names the nudged model by its strategy."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config_dict(tmp_path, output_dir="runs", train={"max_steps": 2, "save_interval": 100,
                                                                "validation_interval": 100})
    Path("tiny.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "tiny"

    def printed(*args: str) -> Path:
        res = cli(*args)
        assert res.exit_code == 0, res.stderr
        line = res.stdout.strip()
        assert Path(line).is_absolute() and Path(line).exists(), (args, line)
        return Path(line)

    assert printed("train", "-c", "tiny.yaml") == run
    assert printed("config", "validate", "tiny.yaml") == tmp_path / "tiny.yaml"
    assert printed("config", "schema", "--out", "schema.json") == tmp_path / "schema.json"
    assert printed("track", "--checkpoint", "runs/tiny", "--out", "t.zarr") == tmp_path / "t.zarr"
    assert printed("report", "runs/tiny") == run / "report"
    labels = cli("classify", "runs/tiny", "--format", "json", "--no-write").stdout
    Path("labels.json").write_text(labels)
    nudged = printed("nudge", "--checkpoint", "runs/tiny", "--targets", "labels.json", "--select", "state=active",
                     "--max-fraction", "0.1", "--strategy", "shrink_perturb", "--shrink", "0.5", "--perturb-std",
                     "0.02", "--seed", "7")
    assert nudged == run / "nudged-shrink_perturb"
    params = json.loads((nudged / "nudge.json").read_text())["params"]
    assert params == {"shrink": 0.5, "perturb_std": 0.02, "max_fraction": 0.1, "seed": 7}
    quick = ("--max-samples", "2", "--num-samples-to-save", "0")
    base = printed("eval", "--checkpoint", "runs/tiny", *quick)
    assert base == run / "eval" / "test" / "metrics.json"
    other = printed("eval", "--checkpoint", "runs/tiny/nudged-shrink_perturb", *quick)
    assert other == run / "eval" / "nudged-shrink_perturb" / "test" / "metrics.json"
    table = cli("eval", "--compare", str(base.relative_to(tmp_path)), str(other.relative_to(tmp_path))).stdout
    assert [c.strip() for c in table.splitlines()[0].split("|")[2:4]] == ["tiny", "tiny nudged shrink_perturb"]
