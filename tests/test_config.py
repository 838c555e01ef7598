"""Config: shipped files, round trip, overrides, clear errors, schema in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vaedyn_cli import config as cm
from vaedyn_cli.errors import VaedynError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("study-"))  # studies: test_study
ORIGINAL_EXPERIMENTS = {
    "cifar10_test", "cifar10_baseline", "cifar10_nudge", "imagenette_baseline", "imagenette_nudge",
    "fonts_baseline", "fonts_nudge", "pokemon",
}


def test_original_experiments_and_quickstarts_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert ORIGINAL_EXPERIMENTS | {"quickstart", "glyphs"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_names_the_schema(path: Path) -> None:
    cfg = cm.load_config(path)
    assert cfg.run_name == path.stem
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/vaedyn.schema.json"


def test_original_hyperparameters_ported() -> None:
    c = cm.load_config(ROOT / "configs" / "cifar10_nudge.yaml")
    assert (c.model.pretrained, c.data.dataset_name, c.data.image_column) == ("stabilityai/sdxl-vae", "uoft-cs/cifar10", "img")
    assert (c.data.resolution, c.data.batch_size, c.train.num_train_epochs, c.train.learning_rate) == (64, 64, 50, 5e-5)
    assert (c.train.kl_weight, c.train.max_grad_norm, c.train.mixed_precision) == (1e-6, 1.0, "no")
    assert (c.nudge.enabled, c.nudge.strategy, c.nudge.factor, c.nudge.max_scale, c.nudge.every) == (
        True, "gn_scale_nudge", 1.1, 1.5, 20)
    assert (c.classify.method, c.classify.threshold) == ("mean_abs_threshold", 0.2)
    fonts = cm.load_config(ROOT / "configs" / "fonts_nudge.yaml")
    assert (fonts.nudge.factor, fonts.nudge.every, fonts.track.interval, fonts.data.resolution) == (1.2, 20, 20, 256)
    test = cm.load_config(ROOT / "configs" / "cifar10_test.yaml")
    assert (test.data.max_samples, test.data.validation_max_samples, test.train.num_train_epochs) == (100, 50, 10)


# The original experiments as its train.py resolved them (SPEC of olegroshka/vae-channel-dynamics @
# 60f3390): tracking interval, tracked layers, near-zero (threshold, mode, interval), nudge (factor, period).
CONV_IN, ENC, DEC0, DEC1 = ("encoder.conv_in", "encoder.down_blocks.0.resnets.0.norm1",
                            "decoder.up_blocks.0.resnets.0.norm1", "decoder.up_blocks.1.resnets.0.norm1")
FAITHFUL = {
    "cifar10_test": (10, [CONV_IN, ENC, DEC0, DEC1], (1e-3, "both", 10), (1.05, 20)),
    "cifar10_baseline": (10, [CONV_IN, ENC, DEC1], (1e-8, "absolute", 10), None),
    "cifar10_nudge": (20, [CONV_IN, ENC, DEC1], (1e-8, "absolute", 20), (1.10, 20)),
    "imagenette_baseline": (20, [CONV_IN, ENC, DEC1], (1e-8, "absolute", 200), None),
    "imagenette_nudge": (20, [CONV_IN, ENC, DEC1], (1e-8, "absolute", 200), (1.10, 20)),
    "fonts_baseline": (10, [CONV_IN, ENC, DEC1], (1e-8, "absolute", 10), None),
    "fonts_nudge": (20, [CONV_IN, ENC, DEC1], (1e-8, "absolute", 20), (1.20, 20)),
}


@pytest.mark.parametrize("name", sorted(FAITHFUL))
def test_faithful_copies_of_the_original_experiments(name: str) -> None:
    interval, layers, (threshold, mode, nz_interval), nudge = FAITHFUL[name]
    c = cm.load_config(ROOT / "configs" / f"{name}.yaml")
    t = c.track
    assert (t.interval, t.layers, t.module_types, t.capture) == (interval, layers, ["GroupNorm", "Conv2d"], "output")
    assert (t.pooling, t.pool_validation, t.weight_interval) == ("interval", True, nz_interval)
    assert (t.near_zero.params, t.near_zero.mode, t.near_zero.abs_threshold) == ("all", mode, threshold)
    assert (c.data.do_validation, c.train.validation_unit, c.train.validation_interval) == (True, "epoch", 1)
    assert c.nudge.enabled == (nudge is not None)
    if nudge is not None:  # classified and nudged: the two resnet norm1 layers, at mean |y| < 0.2, moments kept
        assert (c.nudge.factor, c.nudge.every, c.nudge.window, c.nudge.max_scale) == (*nudge, 1, 1.5)
        assert c.nudge.select == ["state=dormant,dead", f"layer={ENC},{DEC1}"]
        assert (c.classify.method, c.classify.threshold, c.classify.min_persist) == ("mean_abs_threshold", 0.2, 1)
        assert c.nudge.reset_optimizer_state is False
    ext = cm.load_config(ROOT / "configs" / f"{name}_all.yaml") if name != "cifar10_test" else None
    if ext is not None:  # the extension differs in scope only
        assert ext.track.layers == [CONV_IN, "*norm*"]
        assert ext.nudge.select == (["state=dormant,dead"] if nudge is not None else c.nudge.select)
        same = c.model_copy(update={"run_name": ext.run_name, "track": ext.track, "nudge": ext.nudge})
        assert same.model_dump() == ext.model_dump()
        assert ext.track.model_copy(update={"layers": layers}) == t
    assert "Reproduces the original study's" in (ROOT / "configs" / f"{name}.yaml").read_text()


def test_faithful_tracked_layers_on_the_model() -> None:
    """On the SDXL architecture the faithful files track exactly the named modules, the extensions
    conv_in and every GroupNorm."""
    from tests.conftest import TINY_WIDTH
    from vaedyn_cli.model import build_preset
    from vaedyn_cli.probes import select_layers

    model = build_preset(TINY_WIDTH, 0)
    faithful = cm.load_config(ROOT / "configs" / "cifar10_nudge.yaml").track
    assert [la.name for la in select_layers(model, faithful)] == [CONV_IN, ENC, DEC1]
    every = select_layers(model, cm.load_config(ROOT / "configs" / "cifar10_nudge_all.yaml").track)
    assert len(every) == 53 and [la.module_type for la in every].count("GroupNorm") == 52


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = cm.load_config(ROOT / "configs" / "quickstart.yaml", ["train.learning_rate=3e-4", "track.layers=[decoder.*]"])
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    again = cm.load_config(p)
    assert again == cfg
    assert again.train.learning_rate == 3e-4 and again.track.layers == ["decoder.*"]
    assert cm.config_from_text(cfg.to_json(), "x") == cfg


def test_overrides_create_nested_keys_and_parse_yaml_values() -> None:
    cfg = cm.load_config(None, ["data.resolution=64", "train.max_grad_norm=null", "log.report_to=none", "seed=7"])
    assert (cfg.data.resolution, cfg.train.max_grad_norm, cfg.log.report_to, cfg.seed) == (64, None, "none", 7)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.learnig_rate=1"], "did you mean 'train.learning_rate'"),
        (["trian.max_steps=1"], "did you mean 'train'"),
        (["data.resolution=abc"], "data.resolution"),
        (["data.resolution=30"], "multiple of 8"),
        (["model.width=0.3"], "32*width"),
        (["train.max_steps=null"], "set train.max_steps or train.num_train_epochs"),
        (["train.mixed_precision=fp8"], "train.mixed_precision"),
        (["nudge.enabled=true", "nudge.every=15"], "multiple of track.interval"),
        (["run_name=a/b"], "plain folder name"),
        (["novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_values_give_one_clear_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(VaedynError) as e:
        cm.load_config(None, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(VaedynError, match=r"YAML syntax error in .*bad.yaml line \d+"):
        cm.load_config(p)


def test_schema_file_is_in_sync() -> None:
    assert cm.SCHEMA_PATH.read_text() == cm.schema_text(), "run `vaedyn config schema` and commit the result"


def test_every_field_is_described() -> None:
    def walk(model: type[cm.BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, f in model.model_fields.items():
            if not f.description:
                missing.append(prefix + name)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, cm.BaseModel):
                missing += walk(ann, f"{prefix}{name}.")
        return missing

    assert walk(cm.RunConfig, "") == []


def test_commented_yaml_is_valid_and_documented() -> None:
    cfg = cm.load_config(ROOT / "configs" / "glyphs.yaml")
    text = cm.commented_yaml(cfg)
    assert "# Peak learning rate." in text
    assert cm.RunConfig.model_validate(yaml.safe_load(text)) == cfg


def test_cli_config_commands(cli, tmp_path: Path) -> None:
    r = cli("config", "show", "-c", ROOT / "configs" / "quickstart.yaml", "--set", "seed=3")
    assert r.exit_code == 0 and yaml.safe_load(r.stdout)["seed"] == 3
    r = cli("config", "validate", *SHIPPED)
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == len(SHIPPED)
    r = cli("config", "show", "--set", "train.lr=1")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert "unknown key 'train.lr'" in r.stderr and "valid keys: num_train_epochs, max_steps" in r.stderr
    r = cli("config", "show", "-c", tmp_path / "missing.yaml")
    assert r.exit_code == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "schema.json"
    r = cli("config", "schema", "--out", out)
    assert r.exit_code == 0 and r.stdout.strip() == str(out) and out.read_text() == cm.schema_text()
