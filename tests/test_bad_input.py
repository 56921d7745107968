"""Bad input ends train_student.py with one clear line on stderr and exit code 2."""
import os
import shutil
import sys

import pytest
import torch

from conftest import ROOT, make_image_folder, resumed_from, run_command
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


def checkpoint_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_a_finished_experiment_is_not_started_over_without_overwrite(ws):
    train(ws, ws / 'data', '--exp', 'done', '--epochs', '1', expect=0)
    ckpt_dir = ws / 'runs' / 'exp' / 'done' / 'checkpoints'
    before = checkpoint_files(ckpt_dir)
    assert_user_error(train(ws, ws / 'data', '--exp', 'done', '--epochs', '1'), 'already holds checkpoints',
                      'ckpt_epoch_1.pth', '--resume auto to continue it', '--overwrite to start it again')
    assert checkpoint_files(ckpt_dir) == before
    train(ws, ws / 'data', '--exp', 'done', '--epochs', '1', '--overwrite', expect=0)
    assert torch.load(ckpt_dir / 'last.pth', weights_only=True)['epoch'] == 1


@pytest.mark.slow
def test_resume_auto_skips_a_damaged_last_checkpoint_and_a_killed_write(ws):
    """A truncated (or unsafe) last.pth: --resume auto says so and takes the newest checkpoint that loads;
    a temp file that a killed write left is removed at the start."""
    train(ws, ws / 'data', '--exp', 'damaged', '--epochs', '2', '--save_freq', '1', expect=0)
    ckpt_dir = ws / 'runs' / 'exp' / 'damaged' / 'checkpoints'
    last = ckpt_dir / 'last.pth'
    last.write_bytes(last.read_bytes()[:1000])
    (ckpt_dir / '.last.pth1a2b3c.tmp').write_bytes(b'half a checkpoint')
    intact = (ckpt_dir / 'ckpt_epoch_2.pth').read_bytes()
    proc = train(ws, ws / 'data', '--exp', 'damaged', '--epochs', '3', '--resume', 'auto', expect=0)
    assert 'note: removed .last.pth1a2b3c.tmp' in proc.stdout
    assert f'note: cannot read checkpoint {last}' in proc.stdout + proc.stderr
    assert 'trying the previous checkpoint' in proc.stdout + proc.stderr and 'Traceback' not in proc.stderr
    assert resumed_from(ws / 'runs' / 'exp' / 'damaged') == 2
    assert (ckpt_dir / 'ckpt_epoch_2.pth').read_bytes() == intact
    assert torch.load(last, weights_only=True)['epoch'] == 3
    assert not list(ckpt_dir.glob('.*.tmp'))
    # unsafe: a pickle that would run code is not unpickled, and the intact one is taken instead
    import pickle
    last.write_bytes(pickle.dumps(print))
    proc = train(ws, ws / 'data', '--exp', 'damaged', '--epochs', '3', '--resume', 'auto', expect=0)
    assert 'refusing to load' in proc.stdout + proc.stderr and resumed_from(ws / 'runs' / 'exp' / 'damaged') == 3
