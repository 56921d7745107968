"""Feature extraction: stages and their dims, loading rules, order and normalisation, the cache.

The 2-process (gloo) extraction is compared with the single-process one in test_eval_scripts.py,
through knn_eval.sh under torchrun."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import HEAD_DIM, make_image_folder, write_student_checkpoint, write_teacher_checkpoint
from data.folders import build_dataset
from data.transforms import eval_transform, normalize
from models.student import load_student
from evaluation import features
from utils.errors import SimRegError

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    return write_student_checkpoint(tmp_path_factory.mktemp('ckpt') / 'student.pth')


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    return write_teacher_checkpoint(tmp_path_factory.mktemp('ckpt') / 'teacher.pth')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), n_classes=3, per_class=5, size=40)


@torch.no_grad()
def test_stages_give_the_dims_they_should(student):
    backbone, head = load_student(student)
    images = torch.randn(2, 3, 32, 32)
    expected = {'backbone': 512, 'layer3': 256, 'layer4': 512, 'head': HEAD_DIM,
                'head.0': 1024, 'head.3': 512, 'head.4': 1024, 'head.7': HEAD_DIM}
    outputs = {stage: features.FeatureModel(backbone, head, stage)(images) for stage in expected}
    assert {stage: out.shape[1] for stage, out in outputs.items()} == expected
    torch.testing.assert_close(outputs['head'], head(backbone(images)))
    torch.testing.assert_close(outputs['layer4'], outputs['backbone'])
    torch.testing.assert_close(outputs['head.7'], outputs['head'])


def test_linear_head_stages_and_use_pred(tmp_path):
    path = write_student_checkpoint(tmp_path / 'linear.pth', linear_pred=True)
    model = features.load_feature_model(path, stage=features.resolve_stage(None, use_pred=True), linear_pred=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, HEAD_DIM)
    assert features.available_stages(model.backbone, load_student(path)[1]) == [
        'backbone', 'layer3', 'layer4', 'head', 'head.1']


def test_stage_flags_and_output_folders():
    assert features.resolve_stage(None, use_pred=False) == 'backbone'
    assert features.resolve_stage(None, use_pred=True) == 'head'
    with pytest.raises(SimRegError, match='pass only one'):
        features.resolve_stage('layer3', use_pred=True)
    assert features.stage_output_dir('out', 'backbone') == 'out'
    assert features.stage_output_dir('out', 'head') == os.path.join('out', 'pred_head')
    assert features.stage_output_dir('out', 'head.3') == os.path.join('out', 'stage_head.3')


def test_loading_rules(student, teacher):
    assert features.load_feature_model(teacher, arch='resnet18')(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    assert features.load_feature_model(student, arch='resnet18').stage == 'backbone'
    with pytest.raises(SimRegError, match='pass --arch'):
        features.load_feature_model(teacher)
    with pytest.raises(SimRegError, match='without a regression head'):
        features.load_feature_model(teacher, arch='resnet18', stage='head')
    with pytest.raises(SimRegError, match='does not match the student'):
        features.load_feature_model(student, arch='resnet34')
    with pytest.raises(SimRegError, match='drop --linear_pred'):
        features.load_feature_model(student, linear_pred=True)
    with pytest.raises(SimRegError, match='choose one of backbone, layer3, layer4, head'):
        features.load_feature_model(student, stage='layer2')


def test_student_files_are_told_from_plain_backbones_by_their_head():
    weight = torch.zeros(1)
    assert features._holds_student({'state_dict': {'encoder_q.conv1.weight': weight, 'predict_q.0.weight': weight}})
    assert features._holds_student({'state_dict': {'encoder_q.module.conv1.weight': weight,      # original code
                                                   'predict_q.module.0.weight': weight}})
    assert not features._holds_student({'state_dict': {'module.encoder_q.conv1.weight': weight}})  # MoCo
    assert not features._holds_student({'conv1.weight': weight})                                  # torchvision


def test_extraction_is_l2_normalised_and_in_dataset_order(student, folder):
    model = features.load_feature_model(student)
    dataset = build_dataset(folder, 'train', eval_transform(32))
    extracted = features.extract_features(model, dataset, batch_size=4, workers=0, device=torch.device('cpu'))
    images = torch.stack([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        expected = F.normalize(model(normalize(images)), dim=1)
    assert extracted.dtype == torch.float16 and extracted.shape == (15, 512)
    torch.testing.assert_close(extracted.float(), expected, atol=2e-3, rtol=0)


def test_gather_reassembles_chunked_slices(tmp_path, monkeypatch):
    """The chunked gather path, in a 1-process gloo group, with chunks smaller than the slice."""
    monkeypatch.setattr(features, 'GATHER_ROWS', 4)
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        local = torch.randn(11, 3).half()
        assert torch.equal(features.gather_in_order(local, [0, 11], torch.device('cpu')), local)
    finally:
        dist.destroy_process_group()


def recipe(**changes):
    """How the cached features of these tests are made: FeatureCache's ``recipe``."""
    return {'stage': 'backbone', 'dataset': 'imagenet', 'image_size': 32, 'amp': False, **changes}


class _MustNotRun(torch.nn.Module):
    def forward(self, images):
        raise AssertionError('features should have come from the cache')


def test_cache_is_reused_and_a_mismatch_is_refused(student, teacher, folder, tmp_path):
    dataset = build_dataset(folder, 'val', eval_transform(32))
    cache = features.FeatureCache(str(tmp_path), student, recipe(), 'delete it')
    kwargs = dict(batch_size=8, workers=0, device=torch.device('cpu'))
    model = features.load_feature_model(student)
    first, labels = features.split_features(cache, 'val', dataset, model, reuse=True, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ['val_feats.json', 'val_feats.npy', 'val_labels.npy']
    with open(tmp_path / 'val_feats.json') as f:
        sidecar = json.load(f)
    assert sidecar['num_samples'] == 15 and sidecar['dataset'] == 'imagenet' and sidecar['dtype'] == 'float16'
    assert len(sidecar['weights_sha256']) == 64
    assert torch.equal(labels, torch.tensor(dataset.targets))

    again, again_labels = features.split_features(cache, 'val', dataset, _MustNotRun(), reuse=True, **kwargs)
    assert torch.equal(again, first) and torch.equal(again_labels, labels)

    other_weights = features.FeatureCache(str(tmp_path), teacher, recipe(), 'delete it')
    with pytest.raises(SimRegError, match='weights_sha256=.*: delete it'):
        features.split_features(other_weights, 'val', dataset, _MustNotRun(), reuse=True, **kwargs)
    other_size = features.FeatureCache(str(tmp_path), student, recipe(image_size=64), 'delete it')
    with pytest.raises(SimRegError, match='image_size=32, this run has image_size=64'):
        features.split_features(other_size, 'val', dataset, _MustNotRun(), reuse=True, **kwargs)
    recomputed, _ = features.split_features(other_size, 'val', dataset, model, reuse=False, **kwargs)
    assert recomputed.shape == first.shape


def test_cache_is_reused_only_at_the_precision_it_was_extracted_at(student, folder, tmp_path):
    """An autocast (--amp) extraction is not silently reused by a full-precision run, nor the reverse."""
    dataset = build_dataset(folder, 'val', eval_transform(32))
    kwargs = dict(batch_size=8, workers=0, device=torch.device('cpu'))
    model = features.load_feature_model(student)
    cache = lambda amp: features.FeatureCache(str(tmp_path), student, recipe(amp=amp), 'delete it')
    autocast, _ = features.split_features(cache(True), 'val', dataset, model, reuse=True, **kwargs)
    with open(tmp_path / 'val_feats.json') as f:
        assert json.load(f)['amp'] is True
    again, _ = features.split_features(cache(True), 'val', dataset, _MustNotRun(), reuse=True, **kwargs)
    assert torch.equal(again, autocast)
    with pytest.raises(SimRegError, match='made with amp=True, this run has amp=False: pass --amp to reuse them, '
                                          'or delete it'):
        features.split_features(cache(False), 'val', dataset, _MustNotRun(), reuse=True, **kwargs)

    full, _ = features.split_features(cache(False), 'val', dataset, model, reuse=False, **kwargs)
    assert not torch.equal(full, autocast)          # the autocast extraction really ran in lower precision
    torch.testing.assert_close(full.float(), autocast.float(), atol=5e-2, rtol=0)
    with pytest.raises(SimRegError, match='made with amp=False, this run has amp=True: drop --amp to reuse them'):
        features.split_features(cache(True), 'val', dataset, _MustNotRun(), reuse=True, **kwargs)


def test_every_split_needs_the_classes_of_the_first(tmp_path):
    make_image_folder(tmp_path, n_classes=2, per_class=1, size=16, splits=('train', 'val'))
    make_image_folder(tmp_path, n_classes=3, per_class=1, size=16, splits=('test',))
    datasets = {split: build_dataset(str(tmp_path), split, None) for split in ('train', 'val', 'test')}
    features.check_same_classes({split: datasets[split] for split in ('train', 'val')})
    with pytest.raises(SimRegError, match=r'train/ and test/ hold different classes \(2 vs 3\): every split'):
        features.check_same_classes(datasets)
