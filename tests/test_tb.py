"""The TensorBoard view's numbers, not only its steps: planted dead and dormant channels are counted
exactly, and the |gamma| histograms hold the planted zeros."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import tiny_config_dict
from vaedyn_cli import artifacts
from vaedyn_cli import train as train_mod
from vaedyn_cli.config import RunConfig
from vaedyn_cli.hooks import TrainContext, TrainHook

# gamma 0, beta 0: constant output, dead; gamma 1e-3: an output std of ~1e-3 against ~1 for its
# neighbours, dormant (score <= 0.1) but above the dead threshold (1e-6)
DEAD = [("encoder.down_blocks.0.resnets.0.norm1", 1), ("encoder.down_blocks.1.resnets.1.norm2", 0),
        ("encoder.mid_block.resnets.0.norm2", 5)]
DORMANT = [("decoder.up_blocks.2.resnets.0.norm1", 3), ("decoder.conv_norm_out", 0)]


class PlantAndCount(TrainHook):
    """Plants DEAD and DORMANT, then on every logged step counts inactive channels by hand: float64
    copies of each GroupNorm's output, activity = std of silu(y) where a SiLU follows (norm1, norm2,
    conv_norm_out) else of y, inactive when activity / layer mean <= 0.1 or activity <= 1e-6."""

    counts: dict[int, dict[str, tuple[int, int]]] = {}

    def __init__(self, ctx: TrainContext):
        model = ctx.accelerator.unwrap_model(ctx.model)
        self.norms = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)]
        modules = dict(model.named_modules())
        with torch.no_grad():
            for layer, c in DEAD:
                modules[layer].weight[c] = 0.0
                modules[layer].bias[c] = 0.0
            for layer, c in DORMANT:
                modules[layer].weight[c] = 1e-3
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def begin_step(self, step: int) -> None:
        if step % 2 == 0:
            for name, m in self.norms:
                self.handles.append(m.register_forward_hook(
                    lambda _m, _i, out, name=name: self.outputs.__setitem__(name, out.detach().double())))

    def end_step(self, step: int, scalars) -> None:  # noqa: ANN001
        if not self.handles:
            return
        for h in self.handles:
            h.remove()
        self.handles = []
        per_part = {"encoder": [0, 0], "decoder": [0, 0]}
        for name, _ in self.norms:
            y = self.outputs.pop(name)
            if not name.endswith("group_norm"):
                y = torch.nn.functional.silu(y)
            activity = y.transpose(0, 1).reshape(y.shape[1], -1).std(dim=1, unbiased=False).numpy()
            dead = activity <= 1e-6
            inactive = (activity <= 0.1 * activity.mean()) | dead
            part = per_part[name.split(".")[0]]
            part[0] += int(inactive.sum())
            part[1] += int(dead.sum())
        type(self).counts[step] = {p: tuple(v) for p, v in per_part.items()}


def test_tensorboard_counts_the_planted_channels(tmp_path: Path) -> None:
    """A learning rate of 1e-12 keeps the planted gammas where they are for the 4 steps: the dead
    counts are exactly the planted ones; the inactive counts (the planted ones, plus channels that a
    single batch of a fresh tiny VAE happens to leave quiet) equal the hand count of the same forward."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = RunConfig.model_validate(tiny_config_dict(
        tmp_path, log={"report_to": "tensorboard", "log_interval": 2}, track={"enabled": False},
        data={"do_validation": False}, train={"max_steps": 4, "save_interval": 100, "learning_rate": 1e-12},
    ))
    PlantAndCount.counts = {}
    run = train_mod.train(cfg, hooks=(PlantAndCount, *train_mod.DEFAULT_HOOKS))
    ea = EventAccumulator(str(run / artifacts.LOGS_DIR), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    values = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]
              if tag.startswith("channels/")}
    hand = PlantAndCount.counts
    assert sorted(hand) == [2, 4]
    assert values == {
        f"channels/{kind}_{part}": [(s, float(hand[s][part][k])) for s in (2, 4)]
        for part in ("encoder", "decoder") for k, kind in enumerate(("inactive", "dead"))
    }
    assert all(hand[s]["encoder"][1] == 3 and hand[s]["decoder"][1] == 0 for s in (2, 4))
    assert all(hand[s]["encoder"][0] >= 3 and hand[s]["decoder"][0] >= 2 for s in (2, 4))
    hist = ea.Histograms("gamma_abs/encoder")[0].histogram_value
    # 520 encoder channels: 517 at |gamma| 1 and the 3 planted ones at ~0 (moved by ~1e-12 at most)
    assert hist.num == 520 and hist.min < 1e-9 and abs(hist.sum - 517) < 1e-6
