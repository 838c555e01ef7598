"""In-training nudges: the training hook that, every `nudge.every` steps, classifies the live trace's
recent window, selects channels and applies the strategy to the model being trained."""

from __future__ import annotations

import logging
from typing import Any

from vaedyn_cli import anatomy
from vaedyn_cli.classification import classify_trace
from vaedyn_cli.config import RunConfig
from vaedyn_cli.errors import VaedynError
from vaedyn_cli.hooks import TrainContext, TrainHook
from vaedyn_cli.labels import to_records
from vaedyn_cli.selection import Target, parse_select, select_targets
from vaedyn_cli.strategies import apply, get_strategy
from vaedyn_cli.tracker import Tracker

log = logging.getLogger(__name__)


class TrainingNudge(TrainHook):
    """Every `nudge.every` steps: classify the last `nudge.window` tracked steps of the live trace
    with `classify_trace` and the config's classify section (exactly what `vaedyn classify
    --from-step A --to-step B` gives on the store), select targets with `nudge.select` and
    `nudge.max_fraction`, apply the strategy in place to the unwrapped model, zero the Adam moments
    of the touched slices (`nudge.reset_optimizer_state`), and record the events in the store's
    `events` group (through the tracker) and as `nudge/n_targets`, `nudge/n_events` scalars.

    Random strategies draw from generators seeded by (seed, step, layer, channel) and the optimizer
    state is checkpointed, so a resumed run repeats an uninterrupted one. Under several processes
    the main process classifies (its tracker holds the all-reduced statistics) and broadcasts the
    targets; every process applies them; the main one records.
    """

    def __init__(self, ctx: TrainContext, tracker: Tracker):
        self.cfg: RunConfig = ctx.cfg
        self.acc = ctx.accelerator
        self.model = self.acc.unwrap_model(ctx.model)
        self.optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)  # the torch optimizer under accelerate
        self.tracker = tracker
        self.spec = get_strategy(self.cfg.nudge.strategy)
        parse_select(self.cfg.nudge.select)
        self.sizes = anatomy.channel_counts(self.model)
        self.main = bool(self.acc.is_main_process)

    def end_step(self, step: int, scalars: Any) -> None:
        if step % self.cfg.nudge.every:
            return
        targets = self._share(self.targets(step) if self.main else None)
        events = apply(
            self.model, targets, self.spec.name, self.cfg.nudge, optimizer=self.optimizer, step=step, seed=self.cfg.seed
        )
        if self.main:
            self.tracker.add_events(events)
        self.acc.log({"nudge/n_targets": len(targets), "nudge/n_events": len(events)}, step=step)
        if self.main:
            log.info("step %d: %s on %d channels in %d layers (%d parameter slices)", step, self.spec.name,
                     len(targets), len({t.layer for t in targets}), len(events))

    def targets(self, step: int) -> list[Target]:
        """Classify the window and select the channels to nudge (main process)."""
        labels = classify_trace(self.tracker.window(step, self.cfg.nudge.window), self.cfg.classify)
        layers = {name: self.sizes[name] for name in dict.fromkeys(labels["layer"].values.tolist())
                  if name in self.sizes}  # GroupNorms: a tracked conv is observed, not nudged
        return select_targets(to_records(labels), self.cfg.nudge.select, self.cfg.nudge.max_fraction, layers)

    def _share(self, targets: list[Target] | None) -> list[Target]:
        """The main process's targets on every process."""
        if int(self.acc.num_processes) <= 1:
            return targets or []
        from accelerate.utils import broadcast_object_list

        box = [[(t.layer, t.channel_index, t.score) for t in targets] if targets is not None else None]
        broadcast_object_list(box, from_process=0)
        return [Target(*t) for t in box[0] or []]


def make_training_nudge(ctx: TrainContext) -> TrainingNudge | None:
    """The hook factory: a TrainingNudge when nudge.enabled (it reads the tracker built before it)."""
    if not ctx.cfg.nudge.enabled:
        return None
    tracker = next((h for h in ctx.hooks if isinstance(h, Tracker)), None)
    if tracker is None:
        raise VaedynError("nudge.enabled needs the live trace: set track.enabled=true (in-training nudges classify it)")
    return TrainingNudge(ctx, tracker)
