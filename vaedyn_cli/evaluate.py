"""`vaedyn eval`: reconstruction metrics of a checkpoint on a split, sample images, and on request
the ablation check (`vaedyn_cli.ablation`) and activation grids with the linear lens
(`vaedyn_cli.grids`), all into one results folder with `metrics.json`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from vaedyn_cli import artifacts, settings
from vaedyn_cli.ablation import ChannelMeans, ablation_plan, ablation_section, plan_targets, skipped_ablation
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.grids import grids_plan, grids_section
from vaedyn_cli.metrics import GRID_IMAGES, METRICS, TABLE_FORMAT, reconstruction_metrics, write_pictures

log = logging.getLogger(__name__)


def default_out_dir(ckpt: Any, split: str) -> Path:
    """`<run>/eval/<split>` for a run's final model, `<run>/eval/<folder>/<split>` for any other
    folder of the run (a step checkpoint, a nudged copy), so evaluations never overwrite each other."""
    if ckpt.run_dir is None:
        raise VaedynError(
            f"checkpoint {ckpt.source} does not belong to a run folder, so there is no default place for the "
            "results; pass --out DIR"
        )
    base = Path(ckpt.run_dir) / artifacts.EVAL_DIR
    if ckpt.path is not None and Path(ckpt.path).resolve() == (Path(ckpt.run_dir) / artifacts.FINAL_DIR).resolve():
        return base / split
    return base / Path(ckpt.path).name / split


def evaluate(
    checkpoint: str,
    cfg: RunConfig | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    num_samples_to_save: int | None = None,
    out: Path | None = None,
    *,
    overrides: list[str] | None = None,
    ablate: list[str] | None = None,
    store: str | Path | None = None,
    grids: list[str] | None = None,
) -> Path:
    """Evaluate a checkpoint on a split; writes metrics.json, grid.png and sample pairs; returns metrics.json.

    Unset arguments come from the config's `eval` section (from -c, or stored with the checkpoint).
    Inputs (checkpoint, config, data, labels) are checked before anything is written. With `ablate`
    (select expressions as `vaedyn nudge --select`), metrics.json also gets an `ablation` section:
    the selected channels mean-ablated, and a control of as many random active channels. With
    `grids` (module paths, or globs over track.module_types), an activation grid and a linear lens per layer
    (grid-<layer>.png, lens-<layer>.png) and a `grids` section (see `grids_section`).
    """
    from vaedyn_cli import data as data_mod
    from vaedyn_cli import model as model_mod

    ckpt = model_mod.resolve_checkpoint(checkpoint)
    cfg = settings.resolve(
        ckpt.config, given=cfg, overrides=overrides or (), stored_in=f"checkpoint {checkpoint}",
        missing=f"checkpoint {checkpoint} carries no vaedyn config, so the data to evaluate on is unknown; pass -c CONFIG",
    )
    split = split or cfg.eval.split
    batch_size = batch_size if batch_size is not None else cfg.eval.batch_size
    max_samples = max_samples if max_samples is not None else cfg.eval.max_samples
    num_pairs = cfg.eval.num_samples_to_save if num_samples_to_save is None else num_samples_to_save
    if batch_size < 1 or (max_samples is not None and max_samples < 1) or num_pairs < 0:
        raise VaedynError("--batch-size and --max-samples must be at least 1 and --num-samples-to-save at least 0")
    target = Path(out) if out is not None else default_out_dir(ckpt, split)
    artifacts.check_replaceable(target, artifacts.EVALUATION, "--out" if out is not None else "results folder")
    if store is not None and not ablate and not grids:
        raise VaedynError(
            "--store only serves --ablate and --grids (where the channel labels come from); add --ablate SELECT "
            "or --grids LAYER"
        )
    plan = ablation_plan(list(ablate), store, ckpt) if ablate else None

    dataset = data_mod.image_dataset(cfg.data, split, max_samples=max_samples, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=cfg.data.num_workers
    )
    from accelerate import PartialState

    device = PartialState().device
    vae = ckpt.load().to(device).eval()
    if plan is not None:
        plan_targets(plan, vae, cfg.seed, f"checkpoint {checkpoint}")
    grid_plan = None
    if grids:
        grid_plan = grids_plan(list(grids), store, ckpt, vae, f"checkpoint {checkpoint}",
                               plan.classification if plan is not None else None, cfg.track)
    # debug only: the summary printed at the end says the same, and an image that fails to decode
    # during the pass should leave one error line on stderr
    log.debug("evaluating %s (step %d) on split %s of %s", checkpoint, ckpt.step, split, cfg.data.dataset_name)
    means = ChannelMeans(vae, plan.layers if plan is not None else [])
    with means:
        result = reconstruction_metrics(vae, loader, device=device, keep=max(num_pairs, GRID_IMAGES))

    resolved = cfg.model_copy(deep=True)
    resolved.eval.split, resolved.eval.batch_size = split, batch_size
    resolved.eval.max_samples, resolved.eval.num_samples_to_save = max_samples, num_pairs
    record = {
        "checkpoint": str(checkpoint),
        "step": ckpt.step,
        "split": split,
        "num_images": result.num_images,
        "metrics": result.metrics,
        "config": resolved.model_dump(mode="json"),
    }
    nudged = _nudge_of(ckpt)
    if nudged is not None:
        record["nudge"] = nudged
    if plan is not None:
        record["ablation"] = ablation_section(plan, vae, result.metrics, means, loader, device) if plan.targets \
            else skipped_ablation(plan)
    earlier = _earlier(target, record)
    with artifacts.atomic_folder(target, artifacts.EVALUATION) as tmp:
        if grid_plan is not None:
            record["grids"] = grids_section(grid_plan, vae, dataset, cfg.eval.grid_samples, tmp, cfg.eval.grid_scale)
        fresh = {k: record[k] for k in SECTIONS if k in record}
        kept = _keep_earlier(earlier, record, target, tmp)
        (tmp / artifacts.METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_pictures(tmp, result, num_pairs)
    if kept:
        log.info("kept from the earlier evaluation in %s: %s", target, ", ".join(kept))
    _print_metrics({**{k: v for k, v in record.items() if k not in SECTIONS}, **fresh})
    return target / artifacts.METRICS_FILE


def _nudge_of(ckpt: Any) -> dict[str, Any] | None:
    """What `vaedyn nudge` did to this checkpoint (its nudge.json, without the events), None for another model."""
    file = Path(ckpt.path) / artifacts.NUDGE_FILE if ckpt.path is not None else None
    if file is None or not file.is_file():
        return None
    try:
        done = json.loads(file.read_text())
    except ValueError:
        return None
    return {k: done.get(k) for k in ("strategy", "params", "select", "n_targets")}


SECTIONS = ("ablation", "grids")  # what separate invocations add to one evaluation
SAME_EVALUATION = ("step", "split", "num_images")  # with the checkpoint and the data config


def _same_checkpoint(a: Any, b: Any) -> bool:
    pa, pb = Path(str(a)), Path(str(b))
    return str(a) == str(b) or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _earlier(target: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier evaluation in the results folder when it is of the same checkpoint on the same images
    (so its sections stay true next to the new metrics); None otherwise, with a warning when that drops
    sections this run does not redo."""
    file = target / artifacts.METRICS_FILE
    if not file.is_file():
        return None
    try:
        old = json.loads(file.read_text())
    except ValueError:
        return None
    kept = [k for k in SECTIONS if k in old]
    same = (isinstance(old, dict) and _same_checkpoint(old.get("checkpoint"), record["checkpoint"])
            and all(old.get(k) == record[k] for k in SAME_EVALUATION)
            and (old.get("config") or {}).get("data") == record["config"]["data"])
    if not same:
        lost = [k for k in kept if k not in record]
        if lost:
            log.warning("replacing the evaluation in %s, which was of another checkpoint, split or set of images: "
                        "its %s section%s %s dropped", target, " and ".join(lost), "s" * (len(lost) > 1),
                        "are" if len(lost) > 1 else "is")
        return None
    return old


def _keep_earlier(old: dict[str, Any] | None, record: dict[str, Any], target: Path, tmp: Path) -> list[str]:
    """Carry the sections of an earlier evaluation of the same checkpoint and images that this run does not
    redo: its `ablation` unless this run ablates, its `grids` layers (and their pictures) this run does not draw.
    Returns what was carried, in words."""
    if old is None:
        return []
    said = []
    if "ablation" in old and "ablation" not in record:
        record["ablation"] = old["ablation"]
        said.append("the ablation section")
    old_grids = old.get("grids") or {}
    new_grids = record.get("grids") or {}
    carried = {layer: g for layer, g in old_grids.items() if layer not in new_grids}
    for g in carried.values():
        for key in ("grid", "lens"):
            if (target / g[key]).is_file():
                shutil.copy2(target / g[key], tmp / g[key])
    if carried:
        record["grids"] = {**carried, **new_grids}
        said.append("grids of " + ", ".join(carried))
    return said


def _print_metrics(record: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, soft_wrap=True)  # a line piped to a file or a log is never wrapped
    console.print(f"{record['checkpoint']} · step {record['step']} · split {record['split']} · {record['num_images']} images")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in METRICS:
        label, scale, digits = TABLE_FORMAT[key]
        table.add_row(label, f"{record['metrics'][key] * scale:.{digits}f}")
    console.print(table)
    for layer, g in record.get("grids", {}).items():
        r2 = ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in g["r2"].items())
        console.print(f"grids {layer}: {g['grid']}, {g['lens']} (lens R^2 {r2})")
    ab = record.get("ablation")
    if ab is None or not ab["n_channels"]:  # nothing ablated: plan_targets said so in one line
        return
    console.print(f"ablation {' '.join(ab['select'])}: {ab['n_channels']} channels, control {ab['n_control']} active ones")
    table = Table()
    for col in ("metric", "baseline", "ablated", "delta", "control", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key in METRICS:
        label, scale, digits = TABLE_FORMAT[key]
        cells = [ab["baseline"][key], ab["ablated"][key], ab["delta_ablated"][key], ab["control"][key],
                 ab["delta_control"][key]]
        table.add_row(label, *[f"{v * scale:{'+' if i in (2, 4) else ''}.{digits}f}" for i, v in enumerate(cells)])
    console.print(table)

