"""Randomness that depends only on what it is for, never on how work is split or resumed.

The data order of an epoch depends only on (seed, epoch); the posterior noise of an image only on
(seed, epoch, its position in the epoch's order); a random nudge of a channel only on (seed, step,
layer, channel); a random control of a layer only on (seed, layer). So any epoch, step or channel
can be replayed: a resumed run, or one on another number of processes, draws the same numbers.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from several integers (well mixed, so nearby inputs give unrelated streams)."""
    entropy = [int(p) % (1 << 63) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class EpochSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch that depends only on (seed, epoch), so any epoch can be replayed."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


class SampleNoise:
    """One generator per image of a micro-batch, seeded by (seed, epoch, position of the image in the
    epoch's order): the posterior noise of an image does not depend on how images are grouped into
    micro-batches and processes (diffusers draws image i's noise from generator i)."""

    def __init__(self, device: torch.device, seed: int, batch_size: int, process_index: int, num_processes: int):
        self.device, self.seed, self.batch_size = device, seed, batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self._pool: list[torch.Generator] = []

    def generators(self, epoch: int, batch_in_epoch: int, n: int) -> list[torch.Generator]:
        """For this process's micro-batch `batch_in_epoch` (of n images) of `epoch`."""
        while len(self._pool) < n:
            self._pool.append(torch.Generator(device=self.device))
        first = (batch_in_epoch * self.num_processes + self.process_index) * self.batch_size
        for i, gen in enumerate(self._pool[:n]):
            gen.manual_seed(mix_seed(self.seed, epoch, first + i))
        return self._pool[:n]


def channel_generator(seed: int, step: int, layer: str, index: int) -> torch.Generator:
    """A generator per (seed, step, layer, channel), so that a channel's draw does not depend on which
    other channels are drawn for."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step, zlib.crc32(layer.encode()), index])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))


def layer_rng(seed: int, layer: str) -> np.random.Generator:
    """A numpy generator per (seed, layer)."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(layer.encode())]))
