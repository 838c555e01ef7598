"""`vaedyn nudge`: a checkpoint's labelled channels nudged offline, written as a new diffusers folder.

Reads the classify JSON (a file or stdin), selects channels (`vaedyn_cli.selection`), applies a
strategy (`vaedyn_cli.strategies`) and writes the model with the checkpoint's config and step plus
`nudge.json` (strategy, parameters, selection, one event per touched parameter slice).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vaedyn_cli import artifacts, inputs, settings
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.selection import (
    check_classification_fits,
    norm_layers,
    parse_classification,
    parse_select,
    select_targets,
)
from vaedyn_cli.strategies import apply, get_strategy

log = logging.getLogger(__name__)


def _read_targets_text(targets: str | Path) -> tuple[str, str]:
    if str(targets) == "-":
        text = inputs.read_stdin("--targets -", "pipe in `vaedyn classify STORE --format json`")
        if not text.strip():
            raise VaedynError("no targets on stdin; pipe in `vaedyn classify STORE --format json`")
        return text, "from stdin"
    path = Path(targets)
    if not path.is_file():
        raise VaedynError(f"targets file {path} not found; write it with `vaedyn classify STORE --format json > FILE`")
    return inputs.read_text(path, "targets file", "write it with `vaedyn classify STORE --format json > FILE`"), str(path)



def default_out(ckpt: Any, strategy: str) -> Path:
    """<run>/nudged-<strategy> inside a run, else <checkpoint>-nudged-<strategy> beside it."""
    name = f"nudged-{strategy}"
    if ckpt.run_dir is not None:
        return Path(ckpt.run_dir) / name
    if ckpt.path is not None:
        base = Path(ckpt.path)
        stem = base.stem if base.is_file() else base.name
        return base.parent / f"{stem}-{name}"
    return Path(f"{ckpt.source.replace('/', '--')}-{name}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise VaedynError(f"output {out} already exists; pass --overwrite to replace it or choose --out")
    artifacts.check_replaceable(out, artifacts.NUDGED, "output")




def nudge_checkpoint(
    checkpoint: str,
    targets: str | Path,
    *,
    out: Path | None = None,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    nudge_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    seed: int | None = None,
) -> Path:
    """Nudge a checkpoint's target channels; writes a diffusers folder with nudge.json and returns its path.

    Everything is checked (checkpoint, targets, config, output) before anything is written. `seed` seeds the
    random strategies (default: the config's seed); nudge.json records it, the carried config keeps its own.
    """
    from vaedyn_cli.model import resolve_checkpoint, save_model

    if (nudge_options or {}).get("strategy") is not None:
        get_strategy(nudge_options["strategy"])  # a did-you-mean answer before pydantic's
    # Targets first: in `vaedyn train | vaedyn classify - | vaedyn nudge --checkpoint RUN --targets -`
    # the run folder exists only once stdin is complete.
    text, where = _read_targets_text(targets)
    ckpt = resolve_checkpoint(checkpoint)
    cfg = settings.resolve(ckpt.config, config_path=config_path, overrides=overrides,
                           options={"nudge": nudge_options or {}}, stored_in="the checkpoint")
    spec = get_strategy(cfg.nudge.strategy)
    data = parse_classification(text, where)
    parse_select(cfg.nudge.select)
    out = Path(out) if out is not None else default_out(ckpt, spec.name)
    _check_out(out, overwrite)

    model = ckpt.load()
    check_classification_fits(data, model, where, f"checkpoint {checkpoint}")
    chosen = select_targets(data["channels"], cfg.nudge.select, cfg.nudge.max_fraction,
                            norm_layers(data["layers"], model, "vaedyn nudge"))
    if not chosen:
        log.warning("no channel matches --select %s: writing an unchanged copy", " ".join(cfg.nudge.select))
    seed = cfg.seed if seed is None else seed
    events = apply(model, chosen, spec.name, cfg.nudge, step=ckpt.step, seed=seed)

    params: dict[str, Any] = {p: getattr(cfg.nudge, p) for p in spec.params}
    params["max_fraction"] = cfg.nudge.max_fraction
    if spec.random:
        params["seed"] = seed
    record = {
        "checkpoint": str(checkpoint),
        "step": ckpt.step,
        "strategy": spec.name,
        "params": params,
        "select": list(cfg.nudge.select),
        "classification": {k: data.get(k) for k in ("store", "method", "steps")},
        "n_targets": len(chosen),
        "events": events,
    }
    # The folder carries the config the weights came from; its nudge section says what was done.
    carried = ckpt.config.model_copy(update={"nudge": cfg.nudge}) if ckpt.config and config_path else cfg

    with artifacts.atomic_folder(out, artifacts.NUDGED) as folder:
        save_model(model, folder, carried, step=ckpt.step)
        (folder / artifacts.NUDGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "%s: %d channels in %d layers, %d parameter slices -> %s",
        spec.name, len(chosen), len({t.layer for t in chosen}), len(events), out,
    )
    return out

