"""cache_teacher_feats.py --cache_views: the cached rows are the live teacher on the stored views, the views
are the same however the build runs, cached training equals live-teacher training on the replayed views,
and caches whose views cannot be replayed are refused."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import cache_teacher_feats
import train_student
from conftest import build_cache, cache_workspace, resumed_from, run_command, torchrun, train as run
from data.folders import build_dataset
from data.replay import ReplayedViews
from data.sampler import derive_seed
from data.teacher_cache import TeacherFeatureCache, open_teacher_cache, sidecar_path, views_path
from data.transforms import normalize, weak_transform
from models.loading import load_backbone
from models.simreg import CachedTeacher, LiveTeacher
from utils.errors import SimRegError

pytestmark = pytest.mark.usefixtures('one_thread')

VIEWS = 2
# 21 images in shards of 5 (the last takes the remainder), 2 views each, batches of 4 views
BUILD = ['--arch_teacher', 'resnet18', '--image_size', '32', '--batch_size', '4', '--num_workers', '0',
         '--shard_size', '5', '--cache_views', str(VIEWS)]


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """<ws>/data (3 classes x 7 images of 40 px), <ws>/teacher.pth (a seeded resnet18) and a 2-view cache."""
    ws = cache_workspace(tmp_path_factory.mktemp('cache_views'))
    build(ws, 'views.npy')
    return ws


def build(ws, output, *extra):
    return build_cache(ws, output, *BUILD, *extra)


def same_files(ws, a, b):
    return all((ws / x).read_bytes() == (ws / y).read_bytes()
               for x, y in [(a, b), (views_path(a), views_path(b))])


def test_rows_are_the_live_teacher_on_the_replayed_views(ws):
    dataset = build_dataset(str(ws / 'data'), 'train', None)
    views, cached = np.load(views_path(str(ws / 'views.npy'))), np.load(ws / 'views.npy')
    assert views.dtype == np.int32 and views.shape == (21, VIEWS, 5)
    assert cached.dtype == np.float16 and cached.shape == (21, VIEWS, 512)
    images = []
    for i in range(len(dataset)):
        image = dataset[i][1]
        for k in range(VIEWS):
            top, left, height, width, flip = views[i, k].tolist()
            view = TF.resized_crop(image, top, left, height, width, [32, 32], antialias=True)
            images.append(TF.horizontal_flip(view) if flip else view)
            # the stored view is the one torchvision's weak view draws from the view's seed
            torch.manual_seed(derive_seed(0, i, k))
            assert torch.equal(weak_transform(32)(image), images[-1])
    assert len({tuple(v) for v in views.reshape(-1, 5).tolist()}) == 21 * VIEWS and 0 < views[..., 4].mean() < 1
    teacher = LiveTeacher(load_backbone('resnet18', str(ws / 'teacher.pth')), {})
    live = teacher(None, normalize(torch.stack(images)))
    np.testing.assert_allclose(cached.reshape(-1, 512).astype(np.float32), live.numpy(), rtol=1e-3, atol=1e-3)
    with open(sidecar_path(str(ws / 'views.npy'))) as f:
        meta = json.load(f)
    assert meta['views'] == VIEWS and meta['dim'] == 512 and meta['image_size'] == 32
    assert meta['view_spec']['seed'] == 0 and meta['view_spec']['columns'] == ['top', 'left', 'height', 'width',
                                                                                'flip']
    cache = TeacherFeatureCache(str(ws / 'views.npy'))
    rows = cache.rows(torch.tensor([[3, 1], [0, 0], [3, 1]]))
    assert np.array_equal(rows.numpy(), cached[[3, 0, 3], [1, 0, 1]])
    with pytest.raises(ValueError, match='1-d indices'):
        cache.rows(torch.tensor([3, 0]))


class Interrupted(Exception):
    """Stands for the job being killed mid-shard."""


def test_views_are_the_same_however_the_build_runs(ws, monkeypatch):
    build(ws, 'again.npy')
    assert same_files(ws, 'views.npy', 'again.npy')
    # interrupted after two shards, then rerun: only the missing shards are computed, the same files result
    real, calls = cache_teacher_feats.extract_features, []

    def interrupted_at_the_third_shard(*args, **kwargs):
        if len(calls) == 2:
            raise Interrupted
        calls.append(kwargs['desc'])
        return real(*args, **kwargs)
    monkeypatch.setattr(cache_teacher_feats, 'extract_features', interrupted_at_the_third_shard)
    with pytest.raises(Interrupted):
        build(ws, 'resumed.npy')
    assert sorted(os.listdir(ws / 'resumed.npy.shards')) == [
        'shard_00000.json', 'shard_00000.npy', 'shard_00000.views.npy',
        'shard_00001.json', 'shard_00001.npy', 'shard_00001.views.npy']
    calls.clear()
    monkeypatch.setattr(cache_teacher_feats, 'extract_features',
                        lambda *a, **k: calls.append(k['desc']) or real(*a, **k))
    build(ws, 'resumed.npy')
    assert calls == ['shard 3/4', 'shard 4/4'] and same_files(ws, 'views.npy', 'resumed.npy')
    # other shards give the same views; the features differ at most by an fp16 step (other batches)
    build(ws, 'one_shard.npy', '--shard_size', '100')
    assert (ws / views_path('views.npy')).read_bytes() == (ws / views_path('one_shard.npy')).read_bytes()
    np.testing.assert_allclose(np.load(ws / 'one_shard.npy').astype(np.float32),
                               np.load(ws / 'views.npy').astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_two_process_build_draws_the_same_views(ws):
    run_command(torchrun('cache_teacher_feats.py', str(ws / 'data'), '--teacher_weights', str(ws / 'teacher.pth'),
                         '--output', str(ws / 'two.npy'), *BUILD))
    assert (ws / views_path('views.npy')).read_bytes() == (ws / views_path('two.npy')).read_bytes()
    np.testing.assert_allclose(np.load(ws / 'two.npy').astype(np.float32),
                               np.load(ws / 'views.npy').astype(np.float32), rtol=2e-3, atol=2e-3)
    with open(ws / 'two.json') as f, open(ws / 'views.json') as g:
        assert json.load(f) == json.load(g)


def train_args(ws, exp, *extra):
    return ['--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18', '--arch_student', 'resnet18',
            '--image_size', '32', '--batch_size', '4', '--num_workers', '0', '--print_freq', '100', '--weak_weak',
            *extra, str(ws / 'data')]


def cached_args(ws, exp, *extra, cache='views.npy'):
    return train_args(ws, exp, '--use_cache', '--teacher_feats', str(ws / cache), *extra)


def last_state(ws, exp):
    return torch.load(ws / 'runs' / 'exp' / exp / 'checkpoints' / 'last.pth', weights_only=True)['state_dict']


def recorded_steps(monkeypatch):
    """Every step's student input and targets, from now on."""
    steps, real = [], train_student.train_step

    def recording(model, teachers, batch, *rest):
        targets = {}

        def recorded(name, teacher):  # the teacher, its targets kept as the step makes them
            return lambda *args: targets.setdefault(name, teacher(*args))
        losses = real(model, {name: recorded(name, t) for name, t in teachers.items()}, batch, *rest)
        steps.append((batch[1].clone(), {name: t.clone() for name, t in targets.items()}))
        return losses
    monkeypatch.setattr(train_student, 'train_step', recording)
    return steps


@pytest.mark.slow
def test_cached_training_equals_live_training_on_the_replayed_views(ws, monkeypatch):
    """Bit for bit: the teacher runs one view at a time in the build and in the live run, so its float
    rounding cannot depend on which other views share its batch. (With batches, a target may land one fp16
    step away, and BatchNorm over 4 samples of 1x1 maps amplifies that into visibly different weights
    within a few steps: a tolerance on the weights would prove little.)"""
    build(ws, 'one_by_one.npy', '--batch_size', '1')
    assert (ws / views_path('one_by_one.npy')).read_bytes() == (ws / views_path('views.npy')).read_bytes()
    # the cached run, recording which (image, view) rows it reads
    read, real_rows = [], CachedTeacher.__call__
    monkeypatch.setattr(CachedTeacher, '__call__', lambda self, index, *a: read.append(index.clone())
                        or real_rows(self, index, *a))
    cached_steps = recorded_steps(monkeypatch)
    run(cached_args(ws, 'cached_one_by_one', '--epochs', '2', cache='one_by_one.npy'))
    assert len(read) == 10 and all(r.shape == (4, 2) for r in read)  # 5 steps of 4 per epoch
    chosen = [dict(torch.cat(read[e * 5:(e + 1) * 5]).tolist()) for e in range(2)]  # image -> view, per epoch
    assert any(chosen[0][i] != chosen[1][i] for i in chosen[0].keys() & chosen[1].keys())
    assert {0, 1} <= set(chosen[0].values())

    # the live teacher on the same views: the loader replays the cache's views, the teacher sees one view at
    # a time and its output is rounded to fp16 as the cache stores it; the student starts from the cached
    # run's initial weights (building a live teacher draws random numbers that a cached one does not)
    monkeypatch.undo()
    stored = TeacherFeatureCache(str(ws / 'one_by_one.npy'))
    real_make_loader, real_call = train_student.make_loader, LiveTeacher.__call__

    def replaying_loader(dataset, args, *rest):
        return real_make_loader(ReplayedViews(dataset, stored.boxes, args.image_size), args, *rest)

    def one_view_at_a_time(self, index, views, amp_dtype=None):
        return torch.cat([real_call(self, index, view[None], amp_dtype) for view in views]).half()
    monkeypatch.setattr(train_student, 'make_loader', replaying_loader)
    monkeypatch.setattr(LiveTeacher, '__call__', one_view_at_a_time)
    live_steps = recorded_steps(monkeypatch)
    initial = ws / 'runs' / 'exp' / 'cached_one_by_one' / 'checkpoints' / 'ckpt_epoch_0.pth'
    run(train_args(ws, 'live', '--teacher_weights', str(ws / 'teacher.pth'), '--single_aug', '--epochs', '2',
                   '--weights', str(initial)))

    assert len(cached_steps) == len(live_steps) == 10
    for (cached_in, cached_target), (live_in, live_target) in zip(cached_steps, live_steps):
        assert torch.equal(cached_in, live_in)  # the student sees the pixels the teacher saw
        assert torch.equal(cached_target['resnet18'], live_target['resnet18'])
    cached, live = last_state(ws, 'cached_one_by_one'), last_state(ws, 'live')
    assert cached.keys() == live.keys()
    assert all(torch.equal(value, live[key]) for key, value in cached.items())


@pytest.mark.slow
def test_cached_view_training_resumes_exactly(ws):
    run(cached_args(ws, 'cached', '--epochs', '2', '--save_freq', '1'))
    interrupted = ws / 'runs' / 'exp' / 'resumed' / 'checkpoints'
    interrupted.mkdir(parents=True)
    shutil.copy(ws / 'runs' / 'exp' / 'cached' / 'checkpoints' / 'ckpt_epoch_1.pth', interrupted / 'last.pth')
    run(cached_args(ws, 'resumed', '--epochs', '2', '--resume', 'auto'))
    assert resumed_from(ws / 'runs' / 'exp' / 'resumed') == 1
    straight, resumed = last_state(ws, 'cached'), last_state(ws, 'resumed')
    assert all(torch.equal(value, resumed[key]) for key, value in straight.items())


def test_views_that_do_not_belong_to_the_cache_are_refused(ws, tmp_path):
    dataset = build_dataset(str(ws / 'data'), 'train', None)
    for suffix in ('.npy', '.json', '.views.npy'):
        shutil.copy(ws / f'views{suffix}', tmp_path / f'copy{suffix}')
    os.remove(tmp_path / 'copy.views.npy')
    with pytest.raises(SimRegError, match=r'2 views per image but their boxes file .*copy.views.npy is missing: '
                                          r'delete .*copy.npy and rebuild it with cache_teacher_feats.py '
                                          r'--cache_views 2'):
        open_teacher_cache(str(tmp_path / 'copy.npy'), dataset)
    build(ws, 'seed1.npy', '--seed', '1')
    assert (ws / views_path('seed1.npy')).read_bytes() != (ws / views_path('views.npy')).read_bytes()
    shutil.copy(ws / views_path('seed1.npy'), tmp_path / 'copy.views.npy')
    with pytest.raises(SimRegError, match='is not the one it was built with: delete'):
        open_teacher_cache(str(tmp_path / 'copy.npy'), dataset)
    # the builder does not take a cache of other views for its own
    with pytest.raises(SimRegError, match='another view_spec: pass another --output'):
        build(ws, 'views.npy', '--seed', '1')
    with pytest.raises(SimRegError, match='--cache_views 0: give the number of views'):
        build(ws, 'x.npy', '--cache_views', '0')


def test_training_refuses_what_cannot_replay_the_views(ws):
    build(ws, 'seed1.npy', '--seed', '1')
    single = ws / 'single.npy'
    cache_teacher_feats.main(cache_teacher_feats.get_args_parser().parse_args(
        [str(ws / 'data'), '--teacher_weights', str(ws / 'teacher.pth'), '--output', str(single),
         *BUILD[:-2]]))
    views, seed1 = str(ws / 'views.npy'), str(ws / 'seed1.npy')
    refused = {
        'cropped to 32px, the student would replay them at 48px: pass --image_size 32':
            cached_args(ws, 'r', '--image_size', '48'),
        r'train with --weak_weak \(without --weak_strong\)$': [a for a in cached_args(ws, 'r') if a != '--weak_weak'],
        r'train with --weak_weak \(without --weak_strong, --gpu_decode\)': cached_args(ws, 'r', '--gpu_decode'),
        r'train with --weak_weak \(without --weak_strong\)': cached_args(ws, 'r', '--weak_strong'),
        r'teacher\(s\) resnet18_0 cannot target them: give every teacher a cache built with the same --cache_views':
            train_args(ws, 'r', '--arch_teacher', 'resnet18,resnet18', '--teacher_weights',
                       f'{ws / "teacher.pth"},', '--use_cache', '--teacher_feats', f',{views}'),
        r'teacher\(s\) resnet18_1 cannot target them':
            train_args(ws, 'r', '--arch_teacher', 'resnet18,resnet18', '--use_cache',
                       '--teacher_feats', f'{views},{single}'),
        'hold different views: build them with the same --cache_views, --seed and --image_size':
            train_args(ws, 'r', '--arch_teacher', 'resnet18,resnet18', '--use_cache',
                       '--teacher_feats', f'{views},{seed1}'),
    }
    for message, argv in refused.items():
        with pytest.raises(SimRegError, match=message):
            run(argv)
