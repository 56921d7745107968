"""BatchNorm over fixed groups of the global batch (``--bn_batch``, the paper's 64): the same statistics whatever
the number of processes. Each student BatchNorm computes its statistics over consecutive groups of ``bn_batch``
samples of the global batch:

- inside a process, when its share is larger (ghost batch norm: one ``F.batch_norm`` per group);
- across a group of processes, when the share is smaller: on GPUs ``nn.SyncBatchNorm``'s fused kernels and
  collectives over the group; elsewhere per-channel mean and mean square averaged with a differentiable
  all-reduce, which runs on gloo;
- as a plain BatchNorm when they are equal.

Running statistics come from each process's first group; rank 0's, the first ``bn_batch`` samples of the global
batch, are the ones saved. ``convert_batchnorm`` swaps each BatchNorm's class in place: keys stay torchvision's.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm  # what nn.SyncBatchNorm runs

from utils.errors import SimRegError


@dataclass(frozen=True)
class BNGroups:
    """How a process's share of the batch is grouped: ``size`` samples per group inside the process
    (``span`` 1), or the whole share as part of a group of ``span`` processes (``process_group``)."""
    size: int
    span: int = 1
    process_group: object = None


def bn_groups(bn_batch, batch_size, world_size, rank):
    """The grouping of ``--bn_batch`` for this process, or None where a plain BatchNorm computes it
    (``bn_batch`` 0, or equal to the share of a process). Every rank must call it (it makes the process
    groups)."""
    if bn_batch < 0:
        raise SimRegError(f'--bn_batch {bn_batch}: give the images per BatchNorm group (64, the paper\'s), '
                          f'or 0 for BatchNorm over each process\'s share')
    per_rank = batch_size // world_size
    size = min(bn_batch, batch_size)  # a global batch smaller than bn_batch is one group
    if bn_batch == 0 or size == per_rank:
        return None
    if size < per_rank:
        if per_rank % size:
            raise bad_grouping(bn_batch, batch_size, world_size)
        return BNGroups(size)
    if size % per_rank or batch_size % size:
        raise bad_grouping(bn_batch, batch_size, world_size)
    span, mine = size // per_rank, None
    for first in range(0, world_size, span):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(first, first + span)))
        if first <= rank < first + span:
            mine = group
    return BNGroups(per_rank, span, mine)


def bad_grouping(bn_batch, batch_size, world_size):
    per_rank = batch_size // world_size
    return SimRegError(f'--bn_batch {bn_batch} does not group the batch of {batch_size} evenly over {world_size} '
                       f'processes of {per_rank} images: choose a divisor of {per_rank}, or a multiple of '
                       f'{per_rank} that divides {batch_size} (or 0 for BatchNorm over each process\'s share)')


class _GroupStats:
    """The training forward of a BatchNorm with statistics over ``self.groups``."""

    groups = None

    def forward(self, x):
        if not self.training or self.groups is None:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(int(self.track_running_stats))  # off: in frozen_running_stats
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if self.groups.span == 1:
            first = 0 if self.track_running_stats else -1  # the chunk that updates the running statistics
            chunks = x.split(self.groups.size)
            return torch.cat([F.batch_norm(chunk, self.running_mean if i == first else None,
                                           self.running_var if i == first else None, self.weight, self.bias,
                                           True, momentum, self.eps) for i, chunk in enumerate(chunks)])
        if x.is_cuda:
            return sync_batch_norm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                         momentum, self.groups.process_group, self.groups.span)
        return self._across_processes(x, momentum)

    def _across_processes(self, x, momentum):
        """Gloo (CPU): per-channel mean and mean square, all-reduced over the group and differentiated."""
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(xf, dims, unbiased=False)
        moments = dist_fn.all_reduce(torch.stack([mean, var + mean * mean]), group=self.groups.process_group)
        mean, square = moments / self.groups.span
        var = (square - mean * mean).clamp_min(0)
        count = xf.numel() // xf.shape[1] * self.groups.span
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * count / max(count - 1, 1), momentum)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


class GroupBatchNorm1d(_GroupStats, nn.BatchNorm1d):
    pass


class GroupBatchNorm2d(_GroupStats, nn.BatchNorm2d):
    pass


GROUPED = {nn.BatchNorm1d: GroupBatchNorm1d, nn.BatchNorm2d: GroupBatchNorm2d}


@contextlib.contextmanager
def frozen_running_stats(module):
    """Inside the block the training BatchNorms of ``module`` leave their running statistics as they are: the
    micro-batches of a step after its first, so that one step updates them once, as without accumulation."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def convert_batchnorm(module, groups):
    """Make every BatchNorm1d/2d in ``module`` compute its training statistics over ``groups`` (in place;
    nothing changes when ``groups`` is None)."""
    if groups is None:
        return module
    for m in module.modules():
        if type(m) in GROUPED:
            m.__class__ = GROUPED[type(m)]
            m.groups = groups
    return module
