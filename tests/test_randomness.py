"""Randomness over epochs: the data order, the posterior noise and the random flips of an epoch
depend on (seed, epoch[, position]) — they differ between epochs and repeat for the same triple —
and the training loop really passes the epoch on. (Bitwise-resume tests compare a run with itself,
so they cannot see a stream that ignores the epoch.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config_dict
from vaedyn_cli import data as data_mod
from vaedyn_cli import randomness
from vaedyn_cli import train as train_mod
from vaedyn_cli.config import DataConfig, RunConfig


def _seed_of(seed: int, epoch: int, position: int) -> int:
    """The documented mixing, written out: SeedSequence([seed, epoch, position]) -> one uint64."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, dtype=np.uint64)[0])


def test_sample_noise_is_seeded_by_seed_epoch_and_position_in_the_epoch() -> None:
    # process 1 of 2, micro-batches of 3: micro-batch 2 of this process holds positions (2 * 2 + 1) * 3 + i
    noise = randomness.SampleNoise(torch.device("cpu"), seed=7, batch_size=3, process_index=1, num_processes=2)
    seeds = [g.initial_seed() for g in noise.generators(epoch=4, batch_in_epoch=2, n=3)]
    assert seeds == [_seed_of(7, 4, 15 + i) for i in range(3)]
    other_epoch = [g.initial_seed() for g in noise.generators(epoch=5, batch_in_epoch=2, n=3)]
    assert other_epoch == [_seed_of(7, 5, 15 + i) for i in range(3)]
    assert not set(seeds) & set(other_epoch)
    # the same triple again: the same streams (the generator pool is reused, and reseeded)
    again = noise.generators(epoch=4, batch_in_epoch=2, n=3)
    assert [g.initial_seed() for g in again] == seeds
    draws = [torch.randn(2, generator=g) for g in again]
    assert all(torch.equal(d, torch.randn(2, generator=torch.Generator().manual_seed(s))) for d, s in zip(draws, seeds,
                                                                                                         strict=True))


def test_epoch_sampler_permutation_depends_on_seed_and_epoch_only() -> None:
    s = randomness.EpochSampler(50, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        s.set_epoch(epoch)
        orders.append(list(s))
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([3, 1]).generate_state(1, dtype=np.uint64)[0]))
    assert orders[1] == torch.randperm(50, generator=gen).tolist()
    assert orders[0] == orders[2] != orders[1]


def _flips(ds: data_mod.ImageDataset, epoch: int) -> list[bool]:
    """Which images come out mirrored at `epoch` (each image compared with its unflipped tensor)."""
    plain = data_mod.ImageDataset(ds.ds, ds.column, ds.resolution, ds.name, flip=False)
    ds.epoch = epoch
    out = []
    for i in range(len(ds)):
        x, ref = ds[i], plain[i]
        assert torch.equal(x, ref) or torch.equal(x, ref.flip(-1))
        out.append(not torch.equal(x, ref))
    return out


def test_random_flips_depend_on_seed_epoch_and_index() -> None:
    cfg = DataConfig(dataset_name="builtin:natural", resolution=16, max_samples=24, random_flip=True)
    ds = data_mod.train_dataset(cfg, seed=5)
    by_epoch = {e: _flips(ds, e) for e in (0, 1, 2)}
    for e, flips in by_epoch.items():
        assert flips == [bool(np.random.default_rng([5, e, i]).integers(2)) for i in range(24)]
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]
    assert _flips(ds, 1) == by_epoch[1]


def test_training_passes_each_epoch_to_the_noise_and_the_flips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three epochs of 2 micro-batches: the loop asks for noise of (epoch, micro-batch) 0..2 x 0..1 and
    the dataset is read at epochs 0, 1, 2 in turn."""
    noise_calls: list[tuple[int, int]] = []
    real_generators = randomness.SampleNoise.generators

    def generators(self, epoch: int, batch_in_epoch: int, n: int):  # noqa: ANN001, ANN202
        noise_calls.append((epoch, batch_in_epoch))
        return real_generators(self, epoch, batch_in_epoch, n)

    read_epochs: list[int] = []
    real_getitem = data_mod.ImageDataset.__getitem__

    def getitem(self, index: int):  # noqa: ANN001, ANN202
        if self.flip:
            read_epochs.append(self.epoch)
        return real_getitem(self, index)

    monkeypatch.setattr(randomness.SampleNoise, "generators", generators)
    monkeypatch.setattr(data_mod.ImageDataset, "__getitem__", getitem)
    cfg = RunConfig.model_validate(tiny_config_dict(
        tmp_path, data={"max_samples": 8, "random_flip": True, "do_validation": False},
        train={"max_steps": 6, "save_interval": 100}, track={"enabled": False},
    ))
    train_mod.train(cfg)
    assert noise_calls == [(e, b) for e in range(3) for b in range(2)]
    assert sorted(set(read_epochs)) == [0, 1, 2]
    assert read_epochs == sorted(read_epochs)  # epoch by epoch, never back


def test_an_unshuffled_sampler_gives_the_data_in_order_every_epoch() -> None:
    from vaedyn_cli.randomness import EpochSampler

    sampler = EpochSampler(5, seed=3, shuffle=False)
    assert list(sampler) == [0, 1, 2, 3, 4] and len(sampler) == 5
    sampler.set_epoch(7)
    assert list(sampler) == [0, 1, 2, 3, 4]
