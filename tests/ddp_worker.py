"""Run by torchrun in tests: train, then dump this rank's weights and the samples it drew."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_student  # noqa: E402
from data.folders import build_dataset  # noqa: E402

out, argv = sys.argv[1], sys.argv[2:]
args = train_student.get_args_parser().parse_args(argv)
rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
loader = train_student.make_loader(build_dataset(args.data, 'train', None), args, world_size, rank)
loader.batch_sampler.set_epoch(1)
indices = [i for batch in loader.batch_sampler for _, i in batch]
model = train_student.main(args)
os.makedirs(out, exist_ok=True)
params = {k: v.detach() for k, v in model.named_parameters()}
torch.save({'params': params, 'indices': indices}, os.path.join(out, f'rank{rank}.pt'))
