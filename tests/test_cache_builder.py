"""cache_teacher_feats.py: the cache equals the live teacher on the eval view, resumes by shard, is the
same under torchrun, refuses to overwrite another cache, and feeds --use_cache training."""
import json
import os

import numpy as np
import pytest
import torch

import cache_teacher_feats
import models
import train_student
from conftest import build_cache, cache_workspace, run_command, torchrun, train_log
from data.folders import build_dataset
from data.teacher_cache import dataset_fingerprint, open_teacher_cache, sidecar_path
from data.transforms import TwoViews, eval_transform, normalize
from models.loading import load_backbone
from models.simreg import LiveTeacher
from evaluation import features
from utils.checkpoint import file_digest
from utils.errors import SimRegError

# 21 images in shards of 5: [0,5) [5,10) [10,15) [15,21), so the last shard takes the remainder and
# two processes split shards unevenly
pytestmark = pytest.mark.usefixtures('one_thread')


BUILD = ['--arch_teacher', 'resnet18', '--image_size', '32', '--batch_size', '4', '--num_workers', '0',
         '--shard_size', '5']


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """<ws>/data (3 classes x 7 images), <ws>/teacher.pth (a seeded resnet18), and one finished build."""
    ws = cache_workspace(tmp_path_factory.mktemp('cache_builder'))
    build(ws, 'reference.npy')
    return ws


def build(ws, output, *extra):
    return build_cache(ws, output, *BUILD, *extra)


def test_cache_is_the_live_teacher_on_the_eval_view(ws):
    dataset = build_dataset(str(ws / 'data'), 'train', eval_transform(32))
    indices, images, _ = zip(*(dataset[i] for i in range(len(dataset))))
    teacher = LiveTeacher(load_backbone('resnet18', str(ws / 'teacher.pth')), {})
    live = teacher(torch.tensor(indices), normalize(torch.stack(images)))
    cached = np.load(ws / 'reference.npy')
    assert cached.dtype == np.float16 and cached.shape == (21, 512)
    np.testing.assert_allclose(cached.astype(np.float32), live.numpy(), rtol=1e-3, atol=1e-3)
    assert not os.path.exists(ws / 'reference.npy.shards')
    with open(sidecar_path(str(ws / 'reference.npy'))) as f:
        meta = json.load(f)
    assert meta['dim'] == 512 and meta['image_size'] == 32 and meta['precision'] == 'fp32'
    assert meta['dataset'] == dataset_fingerprint(dataset) and 'CenterCrop(32)' in meta['transform']
    assert meta['teacher']['arch'] == 'resnet18' and len(meta['teacher']['sha256']) == 64
    # what training opens: the same images under the training views
    training_set = build_dataset(str(ws / 'data'), 'train', TwoViews(32, single_aug=True))
    assert open_teacher_cache(str(ws / 'reference.npy'), training_set).feat_dim == 512


class Interrupted(Exception):
    """Stands for the job being killed mid-shard."""


def count_extractions(monkeypatch, interrupt_at=None):
    """Shards extracted from now on; with ``interrupt_at``, that extraction is interrupted instead."""
    real, calls = features.extract_features, []

    def counting(*args, **kwargs):
        if len(calls) == interrupt_at:
            raise Interrupted
        calls.append(kwargs['desc'])
        return real(*args, **kwargs)
    monkeypatch.setattr(cache_teacher_feats, 'extract_features', counting)
    return calls


def test_an_interrupted_build_resumes_at_the_missing_shards(ws, monkeypatch):
    count_extractions(monkeypatch, interrupt_at=2)
    with pytest.raises(Interrupted):
        build(ws, 'resumed.npy')
    shards = ws / 'resumed.npy.shards'
    assert sorted(os.listdir(shards)) == ['shard_00000.json', 'shard_00000.npy', 'shard_00001.json',
                                          'shard_00001.npy']
    assert not os.path.exists(ws / 'resumed.npy')
    # a shard recorded as made from another teacher is recomputed, never reused
    with open(shards / 'shard_00001.json') as f:
        stale = json.load(f)
    stale['teacher']['sha256'] = '0' * 64
    with open(shards / 'shard_00001.json', 'w') as f:
        json.dump(stale, f)
    calls = count_extractions(monkeypatch)
    build(ws, 'resumed.npy')
    assert calls == ['shard 2/4', 'shard 3/4', 'shard 4/4']
    assert (ws / 'resumed.npy').read_bytes() == (ws / 'reference.npy').read_bytes()
    with open(ws / 'resumed.json') as f, open(ws / 'reference.json') as g:
        assert json.load(f) == json.load(g)
    assert not os.path.exists(shards)
    os.makedirs(shards)  # as a build stopped between its sidecar and removing its shards leaves them
    build(ws, 'resumed.npy')  # finished: nothing recomputed, the leftover shards removed
    assert len(calls) == 3 and not os.path.exists(shards)


def test_a_finished_cache_of_another_teacher_is_not_overwritten(ws, tmp_path):
    torch.manual_seed(2)
    torch.save({'state_dict': models.build_backbone('resnet18').state_dict()}, tmp_path / 'other.pth')
    args = cache_teacher_feats.get_args_parser().parse_args(
        [str(ws / 'data'), '--teacher_weights', str(tmp_path / 'other.pth'), '--output', str(ws / 'reference.npy'),
         *BUILD])
    with pytest.raises(SimRegError, match='another teacher: pass another --output'):
        cache_teacher_feats.main(args)
    with pytest.raises(SimRegError, match='smaller than'):
        build(ws, 'x.npy', '--shard_size', '0')


@pytest.mark.slow
def test_two_process_build_equals_one_process(ws):
    run_command(torchrun('cache_teacher_feats.py', str(ws / 'data'), '--teacher_weights', str(ws / 'teacher.pth'),
                         '--output', str(ws / 'two.npy'), *BUILD))
    two, one = np.load(ws / 'two.npy'), np.load(ws / 'reference.npy')
    assert two.shape == one.shape == (21, 512)
    # per-process batches differ in size, which may move a value by an fp16 step
    np.testing.assert_allclose(two.astype(np.float32), one.astype(np.float32), rtol=2e-3, atol=2e-3)
    with open(ws / 'two.json') as f, open(ws / 'reference.json') as g:
        assert json.load(f) == json.load(g)


@pytest.mark.slow
def test_cached_training_end_to_end(ws):
    argv = [str(ws / 'data'), '--use_cache', '--teacher_feats', str(ws / 'reference.npy'),
            '--arch_teacher', 'resnet18', '--arch_student', 'resnet18', '--image_size', '32',
            '--batch_size', '4', '--num_workers', '0', '--epochs', '2', '--base_dir', str(ws / 'runs'),
            '--exp', 'cached']
    train_student.main(train_student.get_args_parser().parse_args(argv))
    exp = ws / 'runs' / 'exp' / 'cached'
    losses = [record['loss'] for record in train_log(exp, 'epoch')]
    assert len(losses) == 2 and losses[1] < losses[0]
    state = torch.load(exp / 'checkpoints' / 'last.pth', weights_only=True)
    assert state['epoch'] == 2 and state['teacher']['cache'] == str(ws / 'reference.npy')
    assert state['teacher']['sha256'] == file_digest(str(ws / 'teacher.pth'))
