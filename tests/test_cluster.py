"""Training that a cluster cannot break: the same weights on any number of processes and loader workers,
bit-identical after kill -9 anywhere and --resume auto, and a clean stop on SIGTERM / SIGUSR1."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, build_cache, free_port, make_image_folder, torchrun, train, train_log
from models.backbones import build_backbone
from utils.errors import RESUME_EXIT_CODE

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """36 images of 3 classes at 40 px (2 steps of 16 an epoch), a seeded resnet18 teacher and its cache."""
    root = tmp_path_factory.mktemp('cluster')
    make_image_folder(root / 'data', n_classes=3, per_class=12, size=40, splits=('train',))
    torch.manual_seed(1)
    torch.save({'state_dict': build_backbone('resnet18').state_dict()}, root / 'teacher.pth')
    build_cache(root, 'teacher.npy', '--arch_teacher', 'resnet18', '--image_size', '32', '--batch_size', '8',
                '--num_workers', '0')
    return root


def train_args(ws, exp, *extra, teacher='live'):
    source = (['--teacher_weights', str(ws / 'teacher.pth')] if teacher == 'live' else
              ['--use_cache', '--teacher_feats', str(ws / 'teacher.npy')])
    return [str(ws / 'data'), '--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18',
            '--arch_student', 'resnet18', *source, '--batch_size', '16', '--bn_batch', '4', '--image_size', '32',
            '--num_workers', '1', '--print_freq', '1', '--epochs', '2', '--single_aug', '--weak_weak', *extra]


def final_state(ws, exp):
    return torch.load(ws / 'runs' / 'exp' / exp / 'checkpoints' / 'last.pth', weights_only=True)['state_dict']


def run(cmd, timeout=300):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def largest_relative_difference(a, b):
    """max over the float tensors of |a - b| / |b| (norms); the others (step counts) must be equal."""
    assert a.keys() == b.keys()
    assert all(torch.equal(value, b[key]) for key, value in a.items() if not value.is_floating_point())
    return max(((value - b[key]).norm() / b[key].norm().clamp_min(1e-12)).item()
               for key, value in a.items() if value.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize('teacher', ['live', 'cached'])
def test_same_weights_on_1_2_and_4_processes(ws, teacher):
    """--batch_size 16 --bn_batch 4: 4 ghost groups on 1 process, 2 groups each on 2, plain BatchNorm over 4
    on 4 processes; the same images per step and per sample the same crop, so only summation order differs.
    In float64: in fp32, BatchNorm over 4 samples amplifies the 1e-7 rounding of a batch-size-dependent
    matrix product (the head's first Linear) to 1e-2 within 2 steps, which would hide any real difference."""
    states = {}
    for nproc in (1, 2, 4):
        exp = f'{teacher}_{nproc}'
        argv = train_args(ws, exp, '--precision', 'fp64', teacher=teacher)
        run([sys.executable, 'train_student.py', *argv] if nproc == 1 else torchrun('train_student.py', *argv,
                                                                                    nproc=nproc))
        states[nproc] = final_state(ws, exp)
    for nproc in (2, 4):
        assert largest_relative_difference(states[nproc], states[1]) <= 1e-5, nproc
    # and the runs did learn something different from their start: the comparison is not vacuous
    start = torch.load(ws / 'runs' / 'exp' / f'{teacher}_1' / 'checkpoints' / 'ckpt_epoch_0.pth',
                       weights_only=True)['state_dict']
    assert max(((value - start[key]).norm() / start[key].norm().clamp_min(1e-12)).item()
               for key, value in states[1].items() if value.is_floating_point()) > 1e-3


@pytest.mark.slow
def test_loader_workers_do_not_change_the_weights(ws):
    states = []
    for workers in (0, 1, 3):
        train(train_args(ws, f'workers_{workers}', '--num_workers', str(workers)))
        states.append(final_state(ws, f'workers_{workers}'))
    for state in states[1:]:
        assert all(torch.equal(value, state[key]) for key, value in states[0].items())
