"""--bn_batch: BatchNorm statistics over fixed groups of the global batch, inside a process (ghost batch norm)
or across processes (a differentiable all-reduce on gloo), with torchvision's keys."""
import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import free_port
from models.batchnorm import BNGroups, GroupBatchNorm2d, bn_groups, convert_batchnorm
from utils.errors import SimRegError


def plain_and_grouped():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6),
                        nn.BatchNorm1d(6))
    return net, convert_batchnorm(copy.deepcopy(net), BNGroups(4))


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_ghost_groups_are_plain_batchnorm_over_each_group(memory_format):
    """One process: a plain BatchNorm run on each group (outputs, gradients), running statistics from the first."""
    net, grouped = plain_and_grouped()
    assert isinstance(grouped[1], nn.BatchNorm2d) and type(grouped[1]) is GroupBatchNorm2d
    assert net.state_dict().keys() == grouped.state_dict().keys()
    net, grouped = net.to(memory_format=memory_format), grouped.to(memory_format=memory_format)
    x = (torch.randn(12, 3, 6, 6) * 3 + 2).contiguous(memory_format=memory_format)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, reference = grouped(mine), torch.cat([net(chunk) for chunk in theirs.split(4)])
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(grouped.named_parameters(), net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    first, _ = plain_and_grouped()
    first.to(memory_format=memory_format)(x[:4])
    for key, value in first.state_dict().items():
        torch.testing.assert_close(grouped.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # eval mode uses the running statistics, as a plain BatchNorm
    torch.testing.assert_close(grouped.eval()(x), first.eval()(x))


def test_ghost_groups_under_bf16_autocast():
    """Under autocast, as on GPUs: the output in the autocast dtype, the parameters' gradients in fp32."""
    net, grouped = plain_and_grouped()
    x = torch.randn(12, 3, 6, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours = grouped[:2](x)
        reference = torch.cat([net[:2](chunk) for chunk in x.split(4)])
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-2, atol=2e-2)
    weights = torch.randn_like(reference.float())
    (ours.float() * weights).sum().backward()
    (reference.float() * weights).sum().backward()
    assert grouped[1].weight.grad.dtype == torch.float32
    torch.testing.assert_close(grouped[1].weight.grad, net[1].weight.grad, rtol=5e-2, atol=5e-2)


def test_groupings_and_refusals():
    assert bn_groups(0, 256, 4, 0) is None  # per-process BatchNorm, as before
    assert bn_groups(64, 256, 4, 0) is None  # the original's: plain BatchNorm over 64 per process
    assert bn_groups(64, 256, 1, 0) == BNGroups(64)  # one GPU: 4 ghost groups of 64
    assert bn_groups(64, 32, 1, 0) is None  # a batch smaller than bn_batch is one group
    with pytest.raises(SimRegError, match='--bn_batch 48 does not group the batch of 256 evenly over 4 processes'
                                          ' of 64 images: choose a divisor of 64'):
        bn_groups(48, 256, 4, 0)
    with pytest.raises(SimRegError, match='--bn_batch -1'):
        bn_groups(-1, 256, 1, 0)


def _two_process_worker(rank, port, x, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    nn.init.uniform_(bn.weight)
    convert_batchnorm(bn, bn_groups(8, 8, 2, rank))  # a group of 8 over 2 processes of 4
    share = x[4 * rank:4 * rank + 4].clone().requires_grad_()
    y = bn(share)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    torch.save({'y': y.detach(), 'grad_x': share.grad, 'grad_w': bn.weight.grad, 'grad_b': bn.bias.grad,
                'state': bn.state_dict()}, os.path.join(out, f'{rank}.pt'))
    torch.distributed.destroy_process_group()


def test_groups_across_processes_equal_one_batchnorm_over_the_group(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 5, 5) * 3 + 2
    mp.start_processes(_two_process_worker, args=(free_port(), x, str(tmp_path)), nprocs=2, start_method='fork')
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    nn.init.uniform_(bn.weight)
    whole = x.clone().requires_grad_()
    y = bn(whole)
    (y * torch.cat([torch.arange(y[:4].numel()).view_as(y[:4])] * 2)).sum().backward()
    ranks = [torch.load(tmp_path / f'{r}.pt') for r in range(2)]
    torch.testing.assert_close(torch.cat([r['y'] for r in ranks]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r['grad_x'] for r in ranks]), whole.grad, rtol=1e-4, atol=1e-5)
    # DDP sums the parameter gradients over ranks (then averages): their sum is the whole batch's gradient
    torch.testing.assert_close(ranks[0]['grad_w'] + ranks[1]['grad_w'], bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]['grad_b'] + ranks[1]['grad_b'], bn.bias.grad, rtol=1e-4, atol=1e-5)
    for key in ('running_mean', 'running_var'):
        torch.testing.assert_close(ranks[0]['state'][key], bn.state_dict()[key], rtol=1e-5, atol=1e-6)
