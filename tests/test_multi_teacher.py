"""Several teachers: one head each, mean loss, checkpoints, resume, evaluation per head; and the
single-teacher step unchanged."""

import numpy as np
import pytest
import torch

from benchmarks.reference import fixed_step
from conftest import make_image_folder, resumed_from, train as run, train_log
from data.folders import build_dataset
from data.teacher_cache import dataset_fingerprint, write_cache
from models.backbones import build_backbone
from models.head import build_head
from models.simreg import SimReg
from models.student import load_student
from evaluation import features
from utils.errors import SimRegError
import train_student
from train_student import regression_loss

CACHED_DIM = 64


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp('multi')
    make_image_folder(root / 'data', n_classes=3, per_class=16, size=40, splits=('train',))
    torch.manual_seed(1)
    torch.save(build_backbone('resnet18').state_dict(), root / 'live.pth')
    dataset = build_dataset(str(root / 'data'), 'train', None)
    # a cached teacher: a fixed random feature per image, which the student can only fit by image identity
    features_ = np.random.RandomState(0).randn(len(dataset), CACHED_DIM)
    write_cache(str(root / 'cached.npy'), [features_.astype(np.float16)],
                {'teacher': {'arch': 'random'}, 'dataset': dataset_fingerprint(dataset), 'transform': 'eval',
                 'image_size': 32})
    return root


def args_for(ws, exp, *extra):
    return ['--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18,resnet50',
            '--teacher_weights', f'{ws / "live.pth"},', '--use_cache', '--teacher_feats', f',{ws / "cached.npy"}',
            '--arch_student', 'resnet18', '--batch_size', '16', '--image_size', '32', '--num_workers', '0',
            '--print_freq', '100', '--single_aug', '--weak_weak', '--learning_rate', '0.1', *extra,
            str(ws / 'data')]


def checkpoint(ws, exp, name):
    return torch.load(ws / 'runs' / 'exp' / exp / 'checkpoints' / name, weights_only=True)


@pytest.mark.slow
def test_two_teachers_train_both_heads_and_resume(ws):
    run(args_for(ws, 'two', '--epochs', '3', '--save_freq', '1'))
    per_epoch = train_log(ws / 'runs' / 'exp' / 'two', 'epoch')
    assert len(per_epoch) == 3
    live, cached = [[e[f'loss_{name}'] for e in per_epoch] for name in ('resnet18', 'resnet50')]
    assert live[-1] < live[0] and cached[-1] < cached[0]

    state = checkpoint(ws, 'two', 'ckpt_epoch_3.pth')
    heads = {k.split('.')[1] for k in state['state_dict'] if k.startswith('predict_q.')}
    assert heads == {'resnet18', 'resnet50'}
    assert state['state_dict']['predict_q.resnet50.7.weight'].shape == (CACHED_DIM, 1024)
    assert set(state['teachers']) == {'resnet18', 'resnet50'} and 'cache' in state['teachers']['resnet50']

    # a job preempted after epoch 1 resumes to the same weights
    resumed = ws / 'runs' / 'exp' / 'two_resumed' / 'checkpoints'
    resumed.mkdir(parents=True)
    (resumed / 'last.pth').write_bytes((ws / 'runs' / 'exp' / 'two' / 'checkpoints' / 'ckpt_epoch_1.pth').read_bytes())
    run(args_for(ws, 'two_resumed', '--epochs', '3', '--save_freq', '1', '--resume', 'auto'))
    assert resumed_from(ws / 'runs' / 'exp' / 'two_resumed') == 1
    again = checkpoint(ws, 'two_resumed', 'last.pth')['state_dict']
    assert all(torch.equal(v, again[k]) for k, v in state['state_dict'].items())

    # evaluation picks a head by name; the backbone needs none
    path = str(ws / 'runs' / 'exp' / 'two' / 'checkpoints' / 'ckpt_epoch_3.pth')
    x = torch.randn(2, 3, 32, 32)
    for name, dim in [('resnet18', 512), ('resnet50', CACHED_DIM)]:
        backbone, head = load_student(path, head=name)
        assert head(backbone(x)).shape == (2, dim)
        assert features.load_feature_model(path, stage='head', head_name=name)(x).shape == (2, dim)
    assert features.load_feature_model(path)(x).shape == (2, 512)
    with pytest.raises(SimRegError, match=r'one head per teacher \(resnet18, resnet50\).*--head'):
        load_student(path)


def test_teacher_lists_must_align(ws):
    argv = args_for(ws, 'bad', '--epochs', '1')
    argv[argv.index('--teacher_feats') + 1] = str(ws / 'cached.npy')
    with pytest.raises(SimRegError, match='--teacher_feats lists 1 entries for 2 teachers'):
        run(argv)


def test_single_teacher_step_is_the_plain_simreg_step():
    """train_step with one teacher gives bit for bit what the plain loop computes."""
    def build():
        torch.manual_seed(0)
        model = SimReg(build_backbone('resnet18'), build_head(512, 256))
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32), torch.randn(4, 256)) for _ in range(3)]
    ours, our_opt = build()
    plain, plain_opt = build()
    ctx = train_student.Context(torch.device('cpu'))
    for images, target in batches:
        losses = fixed_step(ours, images, {'resnet50': target}, our_opt, ctx)
        loss = regression_loss(plain(images), target)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
        assert losses.shape == (1,) and torch.equal(losses[0], loss.detach())
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
