"""Process groups under torchrun or SLURM's srun: one process per device, NCCL on GPUs and gloo on CPUs."""
import os
import random
import re
import subprocess
from datetime import timedelta
from itertools import product

import numpy as np
import torch
import torch.distributed as dist

from utils.errors import DistributedError, SimRegError, short_message

DEFAULT_DIST_TIMEOUT_MIN = 5.0


def add_distributed_args(parser):
    """``--dist_timeout``, for every command that may run under torchrun or srun."""
    parser.add_argument('--dist_timeout', type=float, default=DEFAULT_DIST_TIMEOUT_MIN, metavar='MINUTES',
                        help='how long a process waits for the others, to start and in each collective '
                             '(all_reduce, barrier), before it gives up with one error line: a dead or stuck peer '
                             f'ends the run within this time (default {DEFAULT_DIST_TIMEOUT_MIN:g}). Raise it when '
                             'rank 0 works alone for longer, e.g. downloading weights')
    return parser


def expand_hostlist(hostlist):
    """The host names of a SLURM host list, as ``scontrol show hostnames`` prints them: ``node[01-03,07],login5``
    -> node01 node02 node03 node07 login5 (several bracket groups in one name: every combination)."""
    hosts = []
    for name in re.findall(r'(?:[^,\[]|\[[^\]]*\])+', hostlist):  # commas outside brackets split names
        parts = re.split(r'\[([^\]]*)\]', name)  # text, group, text, group, ..., text
        choices = [[text] if i % 2 == 0 else _expand_ranges(text) for i, text in enumerate(parts)]
        hosts += [''.join(combination) for combination in product(*choices)]
    return hosts


def _expand_ranges(group):
    """'01-03,07' -> ['01', '02', '03', '07']."""
    values = []
    for item in group.split(','):
        low, _, high = item.strip().partition('-')
        if not high:
            values.append(low)
            continue
        if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
            raise SimRegError(f'cannot read the SLURM host range [{group}]: set MASTER_ADDR to the first node')
        values += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return values


def slurm_environment(env=os.environ):
    """The torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of a task of a several-task
    ``srun`` step, else None (an sbatch script has SLURM_PROCID but no SLURM_STEP_ID). The address is the step's first
    host, the port comes from the job id so that jobs sharing a node differ; MASTER_ADDR/MASTER_PORT given win."""
    if 'SLURM_STEP_ID' not in env or 'SLURM_PROCID' not in env:
        return None
    world_size = int(env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS') or 1)
    if world_size <= 1:
        return None
    nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
    if not env.get('MASTER_ADDR') and not nodelist:
        raise SimRegError('srun started this task without SLURM_JOB_NODELIST: set MASTER_ADDR to the first node')
    return {'RANK': env['SLURM_PROCID'], 'WORLD_SIZE': str(world_size), 'LOCAL_RANK': env.get('SLURM_LOCALID', '0'),
            'MASTER_ADDR': env.get('MASTER_ADDR') or expand_hostlist(nodelist)[0],
            'MASTER_PORT': env.get('MASTER_PORT') or str(10000 + int(env.get('SLURM_JOB_ID', 0)) % 20000)}


def init_distributed(timeout_min=DEFAULT_DIST_TIMEOUT_MIN):
    """Join the process group when launched by torchrun or srun (a plain ``python`` run is rank 0 of 1); returns this
    process's device. ``timeout_min`` bounds the rendezvous and every collective: a dead peer ends the run."""
    if not ('RANK' in os.environ and 'WORLD_SIZE' in os.environ):
        os.environ.update(slurm_environment() or {})  # a task of srun looks like a worker of torchrun from here on
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            local_rank, gpus = int(os.environ.get('LOCAL_RANK', 0)), torch.cuda.device_count()
            if local_rank >= gpus:
                raise SimRegError(f'process {local_rank} of this node has no GPU ({gpus} visible): start at most '
                                  f'{gpus} per node (torchrun --nproc_per_node={gpus}, srun --ntasks-per-node='
                                  f'{gpus}), or set CUDA_VISIBLE_DEVICES= to run on CPUs')
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group('nccl' if use_cuda else 'gloo', timeout=timedelta(minutes=timeout_min))
        except (dist.DistError, RuntimeError) as exc:
            raise DistributedError(
                f"the {os.environ['WORLD_SIZE']} processes did not form a process group at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} (rank {os.environ['RANK']}): "
                f'{short_message(exc)}; check that every process started and that the port is free, or raise '
                '--dist_timeout') from exc
    return torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')


def requeue_slurm_job(log, timeout_s=60):
    """``scontrol requeue $SLURM_JOB_ID`` on rank 0 after a stop signal's checkpoint, so the job resumes later; a no-op
    outside SLURM or on other ranks, a failure is logged. Returns whether the job was requeued."""
    job = os.environ.get('SLURM_JOB_ID')
    if not job or os.environ.get('RANK', '0') != '0':
        return False
    command = ['scontrol', 'requeue', job]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning('==> could not requeue SLURM job %s (%s): resubmit it to resume', job, exc)
        return False
    if done.returncode != 0:
        log.warning('==> could not requeue SLURM job %s: %s exited with %d: %s; resubmit it to resume', job,
                    ' '.join(command), done.returncode, ' '.join((done.stderr or done.stdout).split()))
        return False
    log.info('==> requeued SLURM job %s: it starts again and resumes from the last checkpoint', job)
    return True


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
    """Seed Python's, numpy's and torch's RNGs from (seed, epoch, rank)."""
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
    """Run ``fn`` on rank 0 and give its (small, picklable) result to every rank; a SimRegError raised there is
    raised on every rank instead of leaving the others waiting."""
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
