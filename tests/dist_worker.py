"""A small process of a distributed test: init_distributed (torchrun's variables, SLURM's, or none) and
exit_on_user_error, then one of:
  info         all_reduce the ranks, print {rank, world_size, local_rank, master, sum} as JSON, exit
  loop         all_reduce in a loop ('ready' on stdout after the first); ends only when a peer fails
  stall RANK   like loop, but RANK stops calling collectives after the first: the others must time out
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from utils import distributed as dist_utils  # noqa: E402
from utils.errors import exit_on_user_error  # noqa: E402


def main(args):
    dist_utils.init_distributed(args.dist_timeout)
    rank = dist_utils.get_rank()
    total = dist_utils.all_reduce_mean(torch.tensor([float(rank)])) * dist_utils.get_world_size()
    if args.mode == 'info':
        print(json.dumps({'rank': rank, 'world_size': dist_utils.get_world_size(), 'sum': total.item(),
                          'local_rank': os.environ.get('LOCAL_RANK'), 'backend': dist_utils.backend_name(),
                          'master': f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"}))
        return dist_utils.cleanup()
    print('ready', flush=True)
    while True:
        if args.mode == 'stall' and rank == args.stalled_rank:
            time.sleep(3600)
        dist_utils.all_reduce_mean(torch.ones(1000))
        time.sleep(0.01)


if __name__ == '__main__':
    parser = dist_utils.add_distributed_args(argparse.ArgumentParser())
    parser.add_argument('mode', choices=['info', 'loop', 'stall'])
    parser.add_argument('stalled_rank', type=int, nargs='?', default=1)
    exit_on_user_error(lambda: main(parser.parse_args()))
