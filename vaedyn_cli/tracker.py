"""The Tracker: the training hook that records a trace step every `track.interval` optimizer steps.

It owns the run's store writer (main process) and the probes (every process); under several
processes the probes' sums are all-reduced, so the trace equals one process seeing the global
batch. Other hooks talk to it through `window` (the recent tracked steps as a trace) and
`add_events` (intervention rows for the store), never through its writer.

With `track.pooling: interval` the probes measure every step's forwards (and, with
`track.pool_validation`, the validation forwards in between) and fold them into the same on-device
sums; only the tracked step copies them to the host. The open window's sums are part of a
checkpoint (`artifacts.WINDOW_STATE_FILE`, safetensors), so a resumed run records the same steps as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from vaedyn_cli import artifacts
from vaedyn_cli import store as store_mod
from vaedyn_cli.config import RunConfig
from vaedyn_cli.hooks import TrainHook
from vaedyn_cli.probes import ChannelProbes, load_probe_batch, model_config_json, run_probe
from vaedyn_cli.store import TraceWriter

log = logging.getLogger(__name__)

class Tracker(TrainHook):
    """The TrainHook that records a trace step every track.interval optimizer steps."""

    def __init__(self, ctx: Any):
        cfg: RunConfig = ctx.cfg
        self.cfg = cfg
        self.acc = ctx.accelerator
        self.model = self.acc.unwrap_model(ctx.model)
        self.main = bool(self.acc.is_main_process)
        self.probes = ChannelProbes(self.model, cfg.track, ring=cfg.track.queue_size + 2)
        self.probe_batch = load_probe_batch(cfg) if cfg.track.source == "probe" and self.main else None
        self.tracked = False
        self.pooled = cfg.track.pooling == "interval"
        self.window_open = False  # pooled: sums of the next tracked step under way
        self.writer: TraceWriter | None = None
        self._store_attrs: dict[str, Any] | None = None
        if self.main:
            path = Path(ctx.run_dir) / artifacts.TRACE_DIR
            attrs = store_mod.store_attrs("train", cfg.run_name, cfg.to_json(), model_config_json(self.model),
                                          pooling=cfg.track.pooling)
            resume = ctx.resume_step
            self.writer = TraceWriter(
                path,
                self.probes.layout,
                attrs,
                mode="a" if resume is not None else "w",
                chunk_steps=cfg.track.chunk_steps,
                queue_size=cfg.track.queue_size,
                commit_interval_s=cfg.track.commit_interval_s,
                keep_recent=cfg.nudge.window,
            )

    def resumed(self, step: int) -> None:
        """The checkpoint of `step` has loaded: the trace continues from it (later steps and events go)."""
        if self.writer is not None:
            self.writer.truncate(step)

    def begin_step(self, step: int) -> None:
        self.tracked = step % self.cfg.track.interval == 0
        if self.pooled:
            self._open_window()
            if self.tracked:
                self.probes.capture_params(weights=self._weights_due(step))
            self.probes.arm()
            return
        if not self.tracked:
            return
        self.probes.reset()
        if self.cfg.track.source == "batch":
            self.probes.capture_params(weights=self._weights_due(step))
            self.probes.arm()

    def _open_window(self) -> None:
        """Start the sums of the next tracked step, unless they are under way (or restored from a checkpoint)."""
        if not self.window_open:
            self.probes.reset()
            self.window_open = True

    def _weights_due(self, step: int) -> bool:
        """Weight statistics on the first tracked step (step `interval`) and then on the first tracked step
        of each window of `weight_interval` steps after it (every such window holds exactly one step
        (step - interval) % weight_interval < interval that is a multiple of interval)."""
        interval = self.cfg.track.interval
        return (step - interval) % self.cfg.track.weight_interval < interval

    def after_backward(self, step: int) -> None:
        """The step's forwards are over: |grad gamma|, and the hooks' results folded now, before the
        optimizer allocates its temporaries (see `ChannelProbes.finish`)."""
        if self.pooled:
            if self.tracked and self.cfg.track.gradients:
                self.probes.capture_grads()
            self.probes.disarm()
            if self.tracked:
                self.probes.finish(self.acc)
            else:
                self.probes.fold()
            return
        if not self.tracked:
            return
        if self.cfg.track.gradients:
            self.probes.capture_grads()
        if self.cfg.track.source == "batch":
            self.probes.disarm()
            self.probes.finish(self.acc)

    def before_validation(self, step: int) -> None:
        if self.pooled and self.cfg.track.pool_validation:
            self._open_window()
            self.probes.arm()

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        """The validation forwards are folded before any later hook runs a forward of its own."""
        if self.pooled and self.probes.armed:
            self.probes.disarm()
            self.probes.fold()

    def end_step(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.tracked:
            return
        self.tracked = False
        if self.cfg.track.source == "batch":
            if self.probes.armed:  # a loop that does not call after_backward
                self.probes.disarm()
                self.probes.finish(self.acc)
        elif self.main:
            assert self.probe_batch is not None
            self.probes.capture_params(weights=self._weights_due(step))
            self.probes.arm()
            try:
                run_probe(self.model, self.probe_batch, self.cfg.data.validation_batch_size, self.acc.autocast)
            finally:
                self.probes.disarm()
            self.probes.finish()
        self.window_open = False  # the next step's forwards (or a validation in between) start new sums
        values = self._global_scalars(scalars)
        if not math.isfinite(values.get("loss", 0.0)):
            # the forward (and, unless skipped, the update) went non-finite: its statistics are no
            # measurement, so the step is left out of the trace rather than stored as if valid
            if self.main:  # with on_nonfinite=error the run stops with its own message
                level = logging.WARNING if self.cfg.train.on_nonfinite == "skip" else logging.DEBUG
                log.log(level, "step %d: non-finite loss, not recorded in the trace", step)
            return
        if self.main and self.writer is not None:
            self.writer.append(self.probes.snapshot(step, values))

    def _global_scalars(self, scalars: Mapping[str, float]) -> dict[str, float]:
        """The step's training scalars; under several processes the mean over them (equal local
        batches: the global batch's mean), as the statistics are."""
        values = {k: float(scalars[k]) for k in store_mod.SCALAR_VARS if k in scalars}
        if int(self.acc.num_processes) > 1:
            keys = [k for k in ("loss", "rec_loss", "kl_loss") if k in values]
            t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.acc.device)
            values.update(zip(keys, self.acc.reduce(t, reduction="mean").tolist(), strict=True))
        return values

    # -- what other hooks read and add (main process) ---------------------------------------

    def window(self, step: int, n: int) -> xr.Dataset:
        """The last `n` tracked steps up to `step` as an in-memory trace Dataset, with the store's
        dtypes (so the numbers equal the store's): from the writer's recent records, or from the
        store itself when a resumed run has fewer recent records than `n`."""
        writer = self.writer
        if writer is None:
            raise RuntimeError("the tracker's trace writer is closed")
        writer.flush()  # the writer thread has turned every queued step into a record
        recent = [r for r in writer.recent() if r.step <= step][-n:]
        if len(recent) < n and writer.committed_steps > len(recent):  # resumed: older steps are in the store only
            trace = store_mod.open_trace(writer.path)
            hi = int(np.searchsorted(np.asarray(trace["step"].values), step, side="right"))
            return trace.isel(step=slice(max(0, hi - n), hi)).load()
        if self._store_attrs is None:
            self._store_attrs = store_mod.check_store(writer.path)
        return store_mod.records_to_dataset(recent, writer.layout, self._store_attrs)

    def add_events(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Record intervention rows in the store's `events` group (main process; others ignore)."""
        if self.writer is not None:
            self.writer.add_events(rows)

    def before_save(self, step: int) -> None:
        """Commit the trace up to the checkpoint's step: a run resumed from it continues a complete trace."""
        if self.writer is not None:
            self.writer.flush()

    def save_state(self, folder: Path) -> None:
        """A pooled tracker's open window (its sums and counts), so that a run resumed mid-window records
        the same tracked steps as an uninterrupted one: under several processes summed onto the main
        process first (every process saves at the same step, so an uninterrupted run does the same)."""
        if not self.pooled:
            return
        probes = self.probes
        if int(self.acc.num_processes) > 1:
            probes.collect(self.acc)
        if self.main:
            from safetensors.torch import save_file

            save_file({"sums": probes.reduced.detach().cpu().contiguous(),
                       "host_counts": torch.from_numpy(probes.host_counts.copy())},
                      str(Path(folder) / artifacts.WINDOW_STATE_FILE), metadata={"open": str(int(self.window_open))})

    def load_state(self, folder: Path) -> None:
        """The open window of the checkpoint (a loading process other than the main starts from zeros)."""
        file = Path(folder) / artifacts.WINDOW_STATE_FILE
        if not self.pooled or not file.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            self.window_open = f.metadata().get("open") == "1"
            if not self.window_open:
                return
            self.probes.reset()
            if self.main:
                self.probes.reduced.copy_(f.get_tensor("sums").to(self.probes.reduced.device))
                self.probes.host_counts[:] = f.get_tensor("host_counts").numpy()

    def close(self) -> None:
        self.probes.disarm()
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


def make_tracker(ctx: Any) -> Tracker | None:
    """The hook factory: a Tracker when track.enabled."""
    if not ctx.cfg.track.enabled:
        return None
    return Tracker(ctx)

