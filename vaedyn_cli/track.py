"""`vaedyn track`: a trace from saved checkpoints, one step per checkpoint on a fixed probe set."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vaedyn_cli import artifacts, inputs, settings
from vaedyn_cli import store as store_mod
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.probes import ChannelProbes, load_probe_batch, model_config_json, probe_split, run_probe
from vaedyn_cli.store import TraceWriter

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# `vaedyn track`: a trace from saved checkpoints


def _expand(sources: Sequence[str]) -> list[str]:
    """A run's `checkpoints/` folder (or any folder of step-* folders) stands for its checkpoints."""
    out: list[str] = []
    for src in sources:
        path = Path(src).expanduser()
        steps = []
        if path.is_dir() and not (path / artifacts.MODEL_CONFIG_FILE).is_file():
            steps = sorted(
                (s, p) for p in path.iterdir() if p.is_dir() and (s := artifacts.parse_step(p.name)) is not None
            )
        if steps:
            out.extend(str(p) for _, p in steps)
        elif path.is_dir() and path.name == artifacts.CHECKPOINTS_DIR:
            raise VaedynError(f"{path} holds no step-* checkpoints; train longer than train.save_interval steps")
        else:
            out.append(src)
    return out


def _default_out(checkpoints: Sequence[Any]) -> Path:
    runs = {c.run_dir.resolve() for c in checkpoints if c.run_dir is not None}
    if len(runs) != 1 or any(c.run_dir is None for c in checkpoints):
        raise VaedynError(
            "pass --out STORE: the checkpoints do not all belong to one run folder "
            f"(the default is <run>/{artifacts.TRACK_TRACE_DIR})"
        )
    return runs.pop() / artifacts.TRACK_TRACE_DIR


def _check_out(out: Path, what: str) -> None:
    """`vaedyn track` replaces only a store it wrote (a vaedyn trace store with source `track`)."""
    is_store = out.is_dir() and (out / store_mod.ZARR_JSON).is_file()
    if is_store:
        attrs = store_mod.check_store(out)
        if attrs.get("source") != "track":
            raise VaedynError(
                f"{out} is a trace written by `vaedyn {attrs.get('source')}`; `vaedyn track` replaces only its own "
                "stores: choose another --out"
            )
    artifacts.check_replaceable(out, artifacts.TRACE, what, legacy=lambda _: is_store)


# Fields of a diffusers config.json that decide which channels a trace holds.
ARCHITECTURE_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "latent_channels", "norm_num_groups", "mid_block_add_attention",
)


def _check_same_architecture(checkpoints: Sequence[Any]) -> None:
    """Checkpoints with a config.json on disk must describe one architecture, checked before any is loaded
    (hub ids and single files are checked when loaded)."""
    first: tuple[Any, dict[str, Any]] | None = None
    for ckpt in checkpoints:
        file = Path(ckpt.path) / artifacts.MODEL_CONFIG_FILE if ckpt.path is not None else None
        if file is None or not file.is_file():
            continue
        record = inputs.read_json(file, "model config", f"checkpoint {ckpt.source} is damaged")
        if not isinstance(record, dict):
            raise VaedynError(f"model config {file} is not a JSON object: checkpoint {ckpt.source} is damaged")
        arch = {k: record.get(k) for k in ARCHITECTURE_KEYS}
        if first is None:
            first = (ckpt, arch)
            continue
        diff = next((k for k in ARCHITECTURE_KEYS if arch[k] != first[1][k]), None)
        if diff is not None:
            raise VaedynError(
                f"checkpoint {ckpt.source} has another architecture than {first[0].source} ({diff} {arch[diff]} vs "
                f"{first[1][diff]}); track them into separate stores"
            )


def _device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def track_checkpoints(
    cfg: RunConfig | None,
    checkpoints: Sequence[str],
    out: Path | None = None,
    overrides: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> Path:
    """Evaluate each checkpoint on the fixed probe set (eval mode, no grad) and write one trace step
    per checkpoint at its global step (0 for a pretrained model); returns the store path."""
    from vaedyn_cli import model as model_mod

    if not checkpoints:
        raise VaedynError("no checkpoint given: pass --checkpoint CKPT (a run folder, step folder, diffusers folder or hub id)")
    ckpts = [model_mod.resolve_checkpoint(src) for src in _expand(checkpoints)]
    ckpts.sort(key=lambda c: c.step)
    for a, b in zip(ckpts, ckpts[1:], strict=False):
        if a.step == b.step:
            raise VaedynError(f"two checkpoints at step {a.step} ({a.source}, {b.source}): a trace has one entry per step")
    _check_same_architecture(ckpts)
    cfg = settings.resolve(
        next((c.config for c in ckpts if c.config is not None), None), given=cfg, overrides=overrides,
        stored_in="the checkpoint",
        missing="the checkpoints carry no vaedyn config (a hub id or a bare diffusers folder): pass -c CFG "
        "(it names the probe data: data.* and track.probe_*)",
    )
    what = "--out" if out is not None else "trace store"
    out = Path(out) if out is not None else _default_out(ckpts)
    _check_out(out, what)
    batch = load_probe_batch(cfg)
    dev = torch.device(device) if device is not None else _device()
    with artifacts.atomic_folder(out) as tmp:
        writer: TraceWriter | None = None
        try:
            for ckpt in ckpts:
                log.info("tracking %s (step %d)", ckpt.source, ckpt.step)
                model = ckpt.load().to(dev)
                probes = ChannelProbes(model, cfg.track)
                if writer is None:
                    attrs = store_mod.store_attrs("track", cfg.run_name, cfg.to_json(), model_config_json(model))
                    attrs["checkpoints"] = json.dumps([{"source": c.source, "step": c.step} for c in ckpts])
                    attrs["probe"] = json.dumps(
                        {"split": probe_split(cfg), "samples": int(batch.shape[0]), "dataset": cfg.data.dataset_name}
                    )
                    writer = TraceWriter(tmp, probes.layout, attrs, mode="w", chunk_steps=cfg.track.chunk_steps)
                elif probes.layout != writer.layout:
                    raise VaedynError(
                        f"checkpoint {ckpt.source} has another architecture than {ckpts[0].source}; track them into "
                        "separate stores"
                    )
                probes.reset()
                probes.capture_params()
                probes.arm()
                try:
                    run_probe(model, batch, cfg.data.validation_batch_size)
                finally:
                    probes.disarm()
                probes.finish()
                writer.append(probes.snapshot(ckpt.step).resolve())
                del model, probes
        except BaseException:
            if writer is not None:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    writer.close()
            raise
        assert writer is not None
        writer.close()
    return out

