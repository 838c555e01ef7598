"""`vaedyn eval`: reconstruction metrics of a checkpoint on a split, sample images, and on request
the ablation check (`vaedyn_cli.ablation`) and activation grids with the linear lens
(`vaedyn_cli.grids`), all into one results folder with `metrics.json`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from vaedyn_cli import artifacts, settings
from vaedyn_cli.ablation import ChannelMeans, ablation_plan, ablation_section, plan_targets
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


def _check_out(target: Path) -> None:
    """The results folder may replace an earlier evaluation (a folder with metrics.json), nothing else."""
    if target.exists() and not target.is_dir():
        raise VaedynError(f"--out {target} is a file; pass a folder for the evaluation results")
    if target.is_dir() and any(target.iterdir()) and not (target / artifacts.METRICS_FILE).is_file():
        raise VaedynError(
            f"--out {target} exists and is not an evaluation (no {artifacts.METRICS_FILE}); choose another folder "
            "or empty it"
        )


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
    _check_out(target)
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
    if plan is not None:
        record["ablation"] = ablation_section(plan, vae, result.metrics, means, loader, device)
    with artifacts.atomic_folder(target) as tmp:
        if grid_plan is not None:
            record["grids"] = grids_section(grid_plan, vae, dataset, cfg.eval.grid_samples, tmp)
        (tmp / artifacts.METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_pictures(tmp, result, num_pairs)
    _print_metrics(record)
    return target / artifacts.METRICS_FILE


def _print_metrics(record: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
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
    if ab is None:
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

