"""Issue 21, items 3, 8 and 9: outputs never replace their inputs, every train_student.py flag is checked before
anything is written, and the evaluations file their results under the checkpoint's epoch. Each refusal is one
line, exit 2, the files that were there unchanged (sha256) and no temp file left."""
import hashlib
import os
import sys

import pytest
import torch

import cache_teacher_feats
import eval_knn
import eval_linear
import export_student
import train_student
from conftest import ROOT, cache_workspace, make_image_folder, run_command, write_student_checkpoint
from evaluation import common
from utils.errors import exit_on_user_error


def digests(folder):
    """{relative path: sha256} of every file under ``folder`` (temp files included: none may be left)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def refused(capsys, main, *fragments):
    """Run ``main`` as an entry point does; assert exit 2 and one ``error:`` line holding ``fragments``."""
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(main)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_cli_refusal(proc, *fragments):
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def training_checkpoint(path, epoch=3):
    """A student checkpoint as train_student.py writes it: weights, optimizer and epoch."""
    write_student_checkpoint(path)
    state = torch.load(path, weights_only=True)
    state.update(epoch=epoch, optimizer={'state': {}, 'param_groups': []})
    torch.save(state, path)
    return path


# ---------------------------------------------------------------- item 3: outputs never replace their inputs

@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp('export')
    training_checkpoint(folder / 'ckpt_epoch_3.pth')
    training_checkpoint(folder / 'other_run.pth', epoch=7)
    return folder


def test_export_student_x_x_leaves_the_checkpoint_whole(ckpts):
    """The issue's repro: ``export_student.py X X`` turned a training checkpoint into a bare backbone."""
    before = digests(ckpts)
    x = str(ckpts / 'ckpt_epoch_3.pth')
    proc = run_command([sys.executable, os.path.join(ROOT, 'export_student.py'), x, x], expect=2)
    assert_cli_refusal(proc, f'OUTPUT {x} is the checkpoint {x}', 'name another file for OUTPUT')
    assert digests(ckpts) == before


@pytest.mark.parametrize('link', ['symlink', 'hardlink', 'relative'])
def test_export_refuses_the_checkpoint_under_another_name(ckpts, tmp_path, capsys, monkeypatch, link):
    x = ckpts / 'ckpt_epoch_3.pth'
    output = tmp_path / 'out.pth'
    if link == 'symlink':
        output.symlink_to(x)
    elif link == 'hardlink':
        os.link(x, output)
    else:
        monkeypatch.chdir(ckpts)
        output = os.path.join('.', 'sub', '..', 'ckpt_epoch_3.pth')
        os.makedirs(ckpts / 'sub', exist_ok=True)
    before, around = digests(ckpts), digests(tmp_path)
    args = export_student.get_args_parser().parse_args([str(x), str(output)])
    refused(capsys, lambda: export_student.main(args), 'is the checkpoint', 'name another file for OUTPUT')
    assert digests(ckpts) == before and digests(tmp_path) == around


def test_export_refuses_to_overwrite_another_training_checkpoint(ckpts, capsys):
    before = digests(ckpts)
    args = export_student.get_args_parser().parse_args([str(ckpts / 'ckpt_epoch_3.pth'),
                                                        str(ckpts / 'other_run.pth')])
    refused(capsys, lambda: export_student.main(args), 'is a training checkpoint', 'name another file')
    assert digests(ckpts) == before


def test_export_refuses_one_file_for_output_and_onnx(ckpts, tmp_path, capsys):
    args = export_student.get_args_parser().parse_args([str(ckpts / 'ckpt_epoch_3.pth'), str(tmp_path / 'b.pth'),
                                                        '--onnx', str(tmp_path / 'b.pth')])
    refused(capsys, lambda: export_student.main(args), 'OUTPUT and --onnx are one file')
    assert not os.listdir(tmp_path)


def test_export_may_replace_an_earlier_export(ckpts, tmp_path):
    """A state dict written before is no training checkpoint: exporting again replaces it."""
    out = str(tmp_path / 'r18.pth')
    for _ in range(2):
        export_student.main(export_student.get_args_parser().parse_args([str(ckpts / 'ckpt_epoch_3.pth'), out]))
    assert not common.is_training_checkpoint(out) and sorted(os.listdir(tmp_path)) == ['r18.pth']


@pytest.fixture(scope='module')
def cache_ws(tmp_path_factory):
    return cache_workspace(tmp_path_factory.mktemp('cache'))


@pytest.mark.parametrize('case', ['symlink', 'hardlink', 'sidecar', 'checkpoint'])
def test_cache_teacher_feats_output_never_replaces_the_teacher(cache_ws, tmp_path, capsys, case):
    teacher = cache_ws / 'teacher.pth'
    output = tmp_path / 'feats.npy'
    if case == 'symlink':
        output.symlink_to(teacher)
    elif case == 'hardlink':
        os.link(teacher, output)
    elif case == 'sidecar':  # the .json written beside the .npy
        (tmp_path / 'feats.json').symlink_to(teacher)
    else:
        training_checkpoint(output)
    before, around = digests(cache_ws), digests(tmp_path)
    args = cache_teacher_feats.get_args_parser().parse_args(
        [str(cache_ws / 'data'), '--arch_teacher', 'resnet18', '--teacher_weights', str(teacher), '--output',
         str(output), '--image_size', '32', '--num_workers', '0'])
    fragment = 'is a training checkpoint' if case == 'checkpoint' else f'is --teacher_weights {teacher}'
    refused(capsys, lambda: cache_teacher_feats.main(args), fragment)
    assert digests(cache_ws) == before and digests(tmp_path) == around


def test_eval_refuses_an_output_folder_that_holds_the_weights(tmp_path, capsys):
    make_image_folder(tmp_path / 'data', n_classes=2, per_class=2, size=32)
    (tmp_path / 'runs').mkdir()
    training_checkpoint(tmp_path / 'runs' / 'ckpt_epoch_3.pth')
    before = digests(tmp_path)
    for module in (eval_knn, eval_linear):
        args = module.get_args_parser().parse_args(['--weights', str(tmp_path / 'runs' / 'ckpt_epoch_3.pth'),
                                                    '--save', str(tmp_path / 'runs'), str(tmp_path / 'data')])
        refused(capsys, lambda: module.main(args), 'lies in the output folder', 'pass another --save')
        assert digests(tmp_path) == before


# ---------------------------------------------------------------- item 8: every flag checked before anything is written

BAD_FLAGS = [
    (['--batch_size', '0'], '--batch_size 0: give the images per step'),
    (['--batch_size', '-8'], '--batch_size -8: give the images per step'),
    (['--batch_size', '1'], '--batch_size 1: give the images per step'),
    (['--bn_batch', '1'], '--bn_batch 1: give the images per BatchNorm group, 2 or more'),
    (['--bn_batch', '-64'], '--bn_batch -64: give the images per BatchNorm group'),
    (['--bn_batch', '3'], '--bn_batch 3 does not group the batch of 8'),
    (['--learning_rate', '-0.1'], '--learning_rate -0.1: give a finite base learning rate'),
    (['--learning_rate', 'nan'], '--learning_rate nan: give a finite'),
    (['--learning_rate', 'inf'], '--learning_rate inf: give a finite'),
    (['--weight_decay=-1e-4'], '--weight_decay -0.0001: give a finite weight decay'),
    (['--sgd_momentum', '1.5'], '--sgd_momentum 1.5: give a momentum'),
    (['--image_size', '0'], '--image_size 0 is below the 16 pixels training needs'),
    (['--image_size', '8'], '--image_size 8 is below the 16 pixels'),
    (['--epochs', '-1'], '--epochs -1: give the epochs to train, 1 or more'),
    (['--epochs', '0'], '--epochs 0: give the epochs to train, 1 or more'),
    (['--num_workers', '-1'], '--num_workers -1: give the loader processes'),
    (['--save_freq', '0'], '--save_freq 0: give the epochs between kept checkpoints, 1 or more'),
    (['--print_freq', '0'], '--print_freq 0: give the steps per log line, 1 or more'),
    (['--knn_every', '-1'], '--knn_every -1: give the epochs between online k-NN measures'),
    (['--knn_every', '1', '--knn_train_per_class', '0'], '--knn_train_per_class 0'),
    (['--ckpt_every_steps', '-5'], '--ckpt_every_steps -5'),
    (['--ckpt_every_min', '-1'], '--ckpt_every_min -1.0'),
    (['--stop_deadline', '0'], '--stop_deadline 0.0'),
    (['--dist_timeout', '-1'], '--dist_timeout -1.0'),
    (['--seed', '-1'], '--seed -1: give the seed, 0 or more'),
    (['--exp', ''], "--exp '': give a name"),
    (['--exp', '../elsewhere'], "--exp '../elsewhere': give a name"),
    (['--restart'], '--restart takes the weights of --resume'),
    (['--teacher_feats', 'feats.npy'], '--teacher_feats is read only with --use_cache'),
    (['--use_cache'], '--use_cache needs --teacher_feats PATH'),
]


@pytest.fixture(scope='module')
def train_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp('flags')
    make_image_folder(ws / 'data', n_classes=2, per_class=8, size=32, splits=('train',))
    torch.save({'state_dict': {}}, ws / 'teacher.pth')  # never read: the flags are refused first
    return ws


def train_argv(ws, *extra):
    return [str(ws / 'data'), '--base_dir', str(ws / 'runs'), '--arch_teacher', 'resnet18', '--teacher_weights',
            str(ws / 'teacher.pth'), '--arch_student', 'resnet18', '--image_size', '32', '--batch_size', '8',
            '--num_workers', '0', '--single_aug', '--weak_weak', '--epochs', '1', *extra]


@pytest.mark.parametrize('flags, fragment', BAD_FLAGS, ids=[' '.join(f) or 'empty' for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_before_anything_is_written(train_ws, capsys, monkeypatch, flags, fragment):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    before = digests(train_ws)
    args = train_student.get_args_parser().parse_args(train_argv(train_ws, *flags))
    refused(capsys, lambda: train_student.main(args), fragment)
    assert digests(train_ws) == before and not (train_ws / 'runs').exists()


def test_a_batch_that_the_processes_cannot_share_is_refused_before_they_meet(train_ws, capsys, monkeypatch):
    """Under torchrun (WORLD_SIZE 2) a batch of 7: refused before the process group or any folder."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    args = train_student.get_args_parser().parse_args(train_argv(train_ws, '--batch_size', '7'))
    refused(capsys, lambda: train_student.main(args), '--batch_size 7 must divide by the 2 processes')
    args = train_student.get_args_parser().parse_args(train_argv(train_ws, '--batch_size', '2', '--bn_batch', '0'))
    refused(capsys, lambda: train_student.main(args), "--bn_batch 0 normalises over each process's 1 image")
    assert not (train_ws / 'runs').exists()


def test_the_defaults_and_the_papers_settings_pass():
    parser = train_student.get_args_parser()
    train_student.check_args(parser.parse_args(['DIR']))
    train_student.check_args(parser.parse_args(['DIR', '--batch_size', '8', '--image_size', '32', '--bn_batch', '4',
                                                '--learning_rate', '0', '--ckpt_every_min', '0', '--knn_every', '1']))


def test_batch_size_minus_8_on_the_command_line(train_ws):
    """The issue's repro: it exited 0 after writing an untrained ckpt_epoch_1.pth and last.pth."""
    proc = run_command([sys.executable, os.path.join(ROOT, 'train_student.py'),
                        *train_argv(train_ws, '--batch_size', '-8')], expect=2)
    assert_cli_refusal(proc, '--batch_size -8: give the images per step over all processes, 2 or more')
    assert not (train_ws / 'runs').exists()


# ---------------------------------------------------------------- item 9: the epoch is the checkpoint's

@pytest.fixture(scope='module')
def eval_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp('epoch')
    make_image_folder(ws / 'data', n_classes=2, per_class=3, size=32)
    training_checkpoint(ws / 'last.pth', epoch=3)  # the name says nothing: the epoch is inside
    return ws


def knn_args(ws, save, *extra, weights='last.pth'):
    return eval_knn.get_args_parser().parse_args(['--weights', str(ws / weights), '--save', str(ws / save),
                                                  '--image_size', '32', '-j', '0', '-b', '4', *extra,
                                                  str(ws / 'data')])


def test_an_epoch_that_disagrees_with_the_checkpoint_is_refused(eval_ws):
    before = digests(eval_ws)
    proc = run_command([sys.executable, os.path.join(ROOT, 'eval_knn.py'), '--weights', str(eval_ws / 'last.pth'),
                        '--epoch', '7', '--save', str(eval_ws / 'out'), str(eval_ws / 'data')], expect=2)
    assert_cli_refusal(proc, f'--epoch 7 disagrees with {eval_ws / "last.pth"}, whose epoch is 3',
                       'pass --epoch 3 or leave --epoch out')
    assert digests(eval_ws) == before and not (eval_ws / 'out').exists()


def test_eval_linear_refuses_a_disagreeing_epoch_too(eval_ws, capsys):
    before = digests(eval_ws)
    args = eval_linear.get_args_parser().parse_args(['--weights', str(eval_ws / 'last.pth'), '--epoch', '7',
                                                     '--save', str(eval_ws / 'lin'), str(eval_ws / 'data')])
    assert args.epochs == 40  # --epoch is its own flag, no longer an abbreviation of the probe's --epochs
    refused(capsys, lambda: eval_linear.main(args), '--epoch 7 disagrees', 'whose epoch is 3')
    assert digests(eval_ws) == before


@pytest.mark.slow
def test_results_are_filed_under_the_checkpoints_epoch(eval_ws):
    report = eval_knn.main(knn_args(eval_ws, 'knn'))
    assert report['settings']['epoch'] == 3
    assert {f'nn_{k}_acc_epoch_003.txt' for k in (1, 20)} <= set(os.listdir(eval_ws / 'knn'))
    assert eval_knn.main(knn_args(eval_ws, 'knn', '--epoch', '3', '--load_cache'))['settings']['epoch'] == 3
    linear = eval_linear.main(eval_linear.get_args_parser().parse_args(
        ['--weights', str(eval_ws / 'last.pth'), '--save', str(eval_ws / 'lin'), '--use_cache', '--epochs', '1',
         '--image_size', '32', '-j', '0', '-b', '4', str(eval_ws / 'data')]))
    assert linear['settings']['epoch'] == 3 and linear['settings']['epochs'] == 1


def test_checkpoint_epoch_sources(tmp_path):
    """The 'epoch' entry of a student, else the name ckpt_epoch_<n>.pth (older files), else --epoch (a teacher)."""
    old = tmp_path / 'ckpt_epoch_5.pth'
    write_student_checkpoint(old)
    state = torch.load(old, weights_only=True)
    del state['epoch']
    torch.save(state, old)
    assert common.checkpoint_epoch(str(old)) == common.checkpoint_epoch(str(old), 5) == 5
    with pytest.raises(common.SimRegError, match='--epoch 7 disagrees .* whose epoch is 5 \\(its file name says\\)'):
        common.checkpoint_epoch(str(old), 7)
    teacher = tmp_path / 'teacher.pth'
    torch.save({'state_dict': {}, 'epoch': 800}, teacher)  # a MoCo file's epoch is its pretraining's, not ours
    assert common.checkpoint_epoch(str(teacher)) is None and common.checkpoint_epoch(str(teacher), 0) == 0
