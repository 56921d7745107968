"""Bad input ends train_student.py with one clear line on stderr and exit code 2."""
import os
import shutil
import sys

import pytest
import torch

from conftest import ROOT, make_image_folder, run_command
from models.backbones import build_backbone


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad')
    make_image_folder(root / 'data', n_classes=2, per_class=8, size=40, splits=('train',))
    torch.save(build_backbone('resnet18').state_dict(), root / 'r18.pth')
    return root


def train(ws, data, *extra, teacher='r18.pth', arch_teacher='resnet18', expect=2):
    cmd = [sys.executable, os.path.join(ROOT, 'train_student.py'), str(data), '--base_dir', str(ws / 'runs'),
           '--arch_teacher', arch_teacher, '--arch_student', 'resnet18', '--batch_size', '8',
           '--image_size', '32', '--num_workers', '1', '--print_freq', '1', '--single_aug', '--weak_weak',
           *extra]
    if teacher:
        cmd += ['--teacher_weights', str(ws / teacher)]
    return run_command(cmd, expect=expect)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last


def test_missing_data_folder(ws):
    assert_user_error(train(ws, ws / 'nowhere', '--exp', 'e0'), 'does not exist', 'train/')


def test_empty_data_folder(ws):
    (ws / 'empty' / 'train').mkdir(parents=True)
    assert_user_error(train(ws, ws / 'empty', '--exp', 'e1'), 'no class sub-folders')


def test_class_folder_without_images(ws):
    shutil.copytree(ws / 'data', ws / 'hole')
    (ws / 'hole' / 'train' / 'class_9').mkdir()
    assert_user_error(train(ws, ws / 'hole', '--exp', 'e2'), 'class_9', 'at least one image')


def test_unreadable_image(ws):
    shutil.copytree(ws / 'data', ws / 'corrupt')
    bad = ws / 'corrupt' / 'train' / 'class_1' / '003.jpg'
    bad.write_bytes(b'not a jpeg at all')
    assert_user_error(train(ws, ws / 'corrupt', '--exp', 'e3'), 'cannot read image', str(bad),
                      'delete or replace')


def test_teacher_of_the_wrong_architecture(ws):
    proc = train(ws, ws / 'data', '--exp', 'e4', arch_teacher='resnet50')
    assert_user_error(proc, 'resnet50', 'missing', 'layer1.0.conv3.weight')


def test_no_teacher(ws):
    assert_user_error(train(ws, ws / 'data', '--exp', 'e5', teacher=None), '--teacher_weights')


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ws):
    train(ws, ws / 'data', '--exp', 'nan', '--epochs', '2', expect=0)
    last = ws / 'runs' / 'exp' / 'nan' / 'checkpoints' / 'last.pth'
    # pretend epoch 2 is still to do, then diverge there with an absurd learning rate
    (last.parent / 'ckpt_epoch_2.pth').unlink()
    state = torch.load(last, weights_only=True)
    state['epoch'] = 1
    torch.save(state, last)
    good = last.read_bytes()
    proc = train(ws, ws / 'data', '--exp', 'nan', '--epochs', '2', '--resume', 'auto',
                 '--learning_rate', '1e30')
    assert_user_error(proc, 'loss is', 'last good checkpoint is kept')
    assert last.read_bytes() == good
