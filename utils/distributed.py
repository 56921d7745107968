"""torchrun integration: one process per device, NCCL on GPUs and gloo on CPUs."""
import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from utils.errors import SimRegError


def init_distributed():
    """Join the process group when launched by torchrun; a plain ``python`` run is rank 0 of 1.

    Returns the device this process computes on.
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            local_rank, gpus = int(os.environ.get('LOCAL_RANK', 0)), torch.cuda.device_count()
            if local_rank >= gpus:
                raise SimRegError(f'process {local_rank} of this node has no GPU ({gpus} visible): start at most '
                                  f'{gpus} per node (torchrun --nproc_per_node={gpus}), or set '
                                  'CUDA_VISIBLE_DEVICES= to run on CPUs')
            torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo', timeout=timedelta(minutes=30))
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def backend_name():
    """'nccl' or 'gloo' under torchrun, 'none' for a plain single-process run."""
    return dist.get_backend() if is_distributed() else 'none'


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def seed_everything(seed, epoch=0, rank=0):
    """Seed every RNG from (seed, epoch, rank).

    Re-seeding at each epoch start makes an epoch's randomness a function of these three
    numbers alone, so a resumed run replays exactly what an uninterrupted one would have.
    """
    s = (seed * 1_000_003 + epoch * 1_009 + rank) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def all_reduce_mean(tensor):
    """Average a tensor over ranks (in place on a copy); identity when not distributed."""
    tensor = tensor.clone()
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= get_world_size()
    return tensor


def run_on_main(fn):
    """Run ``fn`` on rank 0 and give its (small, picklable) result to every rank; a SimRegError
    raised there is raised on every rank instead of leaving the others waiting."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except SimRegError as exc:
            error = str(exc)
    if is_distributed():
        shared = [result, error]
        dist.broadcast_object_list(shared, src=0)
        result, error = shared
    if error is not None:
        raise SimRegError(error)
    return result


def requeue_slurm_job(log):
    """Placeholder until the SLURM support lands: nothing to requeue outside SLURM."""
    if os.environ.get('SLURM_JOB_ID'):
        log.warning('note: SLURM job %s is not requeued', os.environ['SLURM_JOB_ID'])
