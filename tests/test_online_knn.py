"""Online k-NN (train_student.py --knn_every): the class-balanced train subset, and in tiny runs the logged
values equal eval_knn.py's on the same checkpoint and subset, in one process and sharded over two."""
import json
import os
import sys

import pytest

from conftest import ROOT, make_image_folder, run_command, torchrun, train, train_log, write_teacher_checkpoint
from data.folders import build_dataset, restrict_folder
from utils.errors import SimRegError

PER_CLASS = 5


def test_subset_is_class_balanced_fixed_by_the_seed_and_in_dataset_order(tmp_path):
    root = make_image_folder(tmp_path / 'data', n_classes=3, per_class=9, size=16, splits=('train',))
    pick = lambda seed, n=4: restrict_folder(build_dataset(root, 'train', None), per_class=n, seed=seed)
    first, again, other = pick(0), pick(0), pick(1)
    assert first.samples == again.samples and first.samples != other.samples
    assert first.targets == [0] * 4 + [1] * 4 + [2] * 4 == [y for _, y in first.samples]
    assert first.samples == sorted(first.samples)
    assert len(pick(0, n=50)) == 27  # a class with fewer images keeps them all
    with pytest.raises(SimRegError, match='at least 1'):
        pick(0, n=0)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp('online_knn')
    make_image_folder(ws / 'data', n_classes=3, per_class=10, size=40)
    write_teacher_checkpoint(ws / 'teacher.pth')
    return ws


def train_args(ws, exp, *extra):
    return ['--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18', '--arch_student',
            'mobilenet', '--teacher_weights', str(ws / 'teacher.pth'), '--batch_size', '10', '--image_size', '32',
            '--num_workers', '0', '--print_freq', '10', '--single_aug', '--weak_weak', '--epochs', '2',
            '--save_freq', '1', '--knn_every', '1', '--knn_train_per_class', str(PER_CLASS), '--seed', '3',
            *extra, str(ws / 'data')]


def eval_knn(ws, weights, save, *extra):
    """eval_knn.py on the online k-NN's subset (--seed 3 chose it), in a fresh process; its 1/20-NN top-1."""
    run_command([sys.executable, os.path.join(ROOT, 'eval_knn.py'), '--weights', str(weights), '--save', str(save),
                 '--image_size', '32', '-b', '10', '-j', '0', '--train_per_class', str(PER_CLASS),
                 '--subset_seed', '3', *extra, str(ws / 'data')])
    report = json.loads((save / 'knn_results.json').read_text())
    assert report['settings']['num_train'] == 3 * PER_CLASS and report['settings']['num_val'] == 30
    return {k: report['majority_top1'][k] for k in ('1', '20')}


@pytest.mark.slow
def test_logged_values_equal_eval_knn_on_the_same_checkpoints(workspace, one_thread):
    train(train_args(workspace, 'one'))
    exp = workspace / 'runs' / 'exp' / 'one'
    start = train_log(exp, 'start')[-1]
    epochs = train_log(exp, 'epoch')
    assert [r['epoch'] for r in epochs if 'knn' in r] == [1, 2]
    ckpts = exp / 'checkpoints'
    assert start['knn_teacher'] == eval_knn(workspace, workspace / 'teacher.pth', exp / 'eval_teacher',
                                            '--arch', 'resnet18')
    assert start['knn_init'] == eval_knn(workspace, ckpts / 'ckpt_epoch_0.pth', exp / 'eval_init')
    assert epochs[-1]['knn'] == eval_knn(workspace, ckpts / 'ckpt_epoch_2.pth', exp / 'eval_2')
    # resumed after the run: nothing is trained, the start values are not measured again
    train(train_args(workspace, 'one', '--resume', 'auto'))
    assert 'knn_init' not in train_log(exp, 'start')[-1] and len(train_log(exp, 'epoch')) == 2


def test_the_teachers_value_is_measured_at_its_own_input(workspace, one_thread, monkeypatch):
    """A live teacher at 48 px with CLIP's normalisation: its k-NN features are of the center crops cut at 48 px and
    normalised CLIP's way, not of the student's 32 px crops."""
    import torch
    import torch.nn.functional as F
    import train_student
    from data.folders import decode_rgb
    from data.transforms import NORMS, NetInput, eval_transform, normalize
    from evaluation import knn
    from evaluation.online_knn import OnlineKnn
    from models.loading import load_backbone
    from models.simreg import LiveTeacher
    args = train_student.get_args_parser().parse_args(train_args(workspace, 'own_input'))
    online = OnlineKnn(args, torch.device('cpu'), None)
    net = NetInput(48, *NORMS['clip'])
    teacher = LiveTeacher(load_backbone('resnet18', str(workspace / 'teacher.pth')), {}, net)
    seen = []
    monkeypatch.setattr(knn, 'evaluate', lambda train, *rest, **kw: seen.append(train) or {'majority': {1: 0, 20: 0}})
    online.at_start({'resnet18': teacher}, load_backbone('resnet18', str(workspace / 'teacher.pth')),
                    torch.contiguous_format)
    crops = torch.stack([eval_transform(48)(decode_rgb(path)) for path, _ in online.train.samples])
    with torch.no_grad():
        expected = F.normalize(teacher.network(normalize(crops, net.mean, net.std)), dim=1)
    assert F.cosine_similarity(seen[0].float(), expected).min() > 0.9999  # the teacher's; float16 rows
    assert not teacher.network.training  # left as it was found: frozen, in eval mode


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_values(workspace, one_thread):
    if not (workspace / 'runs' / 'exp' / 'one').exists():
        train(train_args(workspace, 'one'))
    run_command(torchrun(os.path.join(ROOT, 'train_student.py'), *train_args(workspace, 'two', '--epochs', '1')))
    one, two = (train_log(workspace / 'runs' / 'exp' / e, 'start')[0] for e in ('one', 'two'))
    assert two['world_size'] == 2
    assert (two['knn_teacher'], two['knn_init']) == (one['knn_teacher'], one['knn_init'])
    # after a step, rank 1's BatchNorm statistics are its own: the shards are extracted with rank 0's
    exp = workspace / 'runs' / 'exp' / 'two'
    assert train_log(exp, 'epoch')[-1]['knn'] == eval_knn(workspace, exp / 'checkpoints' / 'ckpt_epoch_1.pth',
                                                          exp / 'eval_1')


def test_without_val_split_it_is_one_line_naming_the_fix(tmp_path):
    make_image_folder(tmp_path / 'data', n_classes=2, per_class=2, size=16, splits=('train',))
    write_teacher_checkpoint(tmp_path / 'teacher.pth')
    args = ['--base_dir', str(tmp_path / 'runs'), '--arch_teacher', 'resnet18', '--arch_student', 'resnet18',
            '--teacher_weights', str(tmp_path / 'teacher.pth'), '--batch_size', '4', '--image_size', '16',
            '--num_workers', '0', '--epochs', '1', '--knn_every', '1', str(tmp_path / 'data')]
    with pytest.raises(SimRegError, match='--knn_every 1 .*val.* or pass --knn_every 0'):
        train(args)
