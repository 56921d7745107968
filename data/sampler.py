"""Global batches and per-sample randomness: what a training step sees does not depend on the number of
processes, loader workers or where a run was resumed.

- The epoch's order is a permutation drawn from (seed, epoch) alone.
- Step s of an epoch is the slice [s * batch_size, (s + 1) * batch_size) of that order (``batch_size``
  is the total over all processes); each process takes its contiguous share of it. An epoch has
  floor(N / batch_size) steps (drop_last).
- Every sample is drawn as ``(epoch, index)``; ``SeededSamples`` seeds torch's random stream from
  (seed, epoch, index) before making it, so its augmentations are the same whichever worker or rank makes it.
"""
import contextlib

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils.errors import SimRegError


def derive_seed(*numbers):
    """A 32-bit seed that is a function of ``numbers`` alone (numpy's SeedSequence): the project's one way to
    derive seeds, the same in every process, worker and rerun."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def sample_seed(seed, epoch, index):
    """The seed of sample ``index`` in ``epoch``."""
    return derive_seed(seed, epoch, index)


@contextlib.contextmanager
def seeded(seed):
    """Torch's CPU random stream seeded with ``seed`` inside the block and restored after it: the stream of
    ``fork_rng(devices=[])`` + ``torch.manual_seed``, without seeding every other back-end (slow when absent)."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def epoch_order(num_samples, seed, epoch):
    """The epoch's permutation of the sample indices, from (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


class GlobalBatchSampler(Sampler):
    """This process's share of each global batch, as lists of ``(epoch, index)`` pairs; ``set_epoch(epoch,
    start_step)`` chooses the epoch and its first step (a resumed run skips those done), ``len`` the steps left."""

    def __init__(self, num_samples, batch_size, world_size, rank, seed):
        if batch_size % world_size:
            raise SimRegError(f'--batch_size {batch_size} must divide by the {world_size} processes')
        if num_samples < batch_size:
            raise SimRegError(f'{num_samples} training images give no full batch of {batch_size}: '
                              f'lower --batch_size')
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.per_rank = batch_size // world_size
        self.offset = rank * self.per_rank
        self.steps = num_samples // batch_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return self.steps - self.start_step

    def __iter__(self):
        order = epoch_order(self.num_samples, self.seed, self.epoch).tolist()
        for step in range(self.start_step, self.steps):
            first = step * self.batch_size + self.offset
            yield [(self.epoch, index) for index in order[first:first + self.per_rank]]


class SeededSamples(Dataset):
    """``dataset[(epoch, index)]`` is ``dataset[index]`` made with torch's random stream seeded from
    (seed, epoch, index), the caller's stream left as it was."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with seeded(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]
