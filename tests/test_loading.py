"""Checkpoint interop: every accepted layout, built from the reference fixtures, loads to the original
outputs; files that do not fit fail with the keys and the guessed layout named.

The layouts' key names and shapes are those of the official releases (MoCo v1/v2/v3, SwAV, DINO,
Barlow Twins, VICReg, torchvision, SimCLR converted, BYOL converted) and of the original SimReg
training checkpoints; the values come from the fixtures' fill rule.
"""
import argparse
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fixture_weights import (assert_close_to_reference, fill, filled_state_dict, fixture_input, manifest,
                             original_simreg_checkpoint, reference_output, run_reference)
from models import load_backbone, load_student, presets, resolve_weights
from models.loading import LAYOUTS
from utils.checkpoint import read_checkpoint
from utils.errors import SimRegError

pytestmark = pytest.mark.usefixtures('one_thread')


def linear(name, out_dim, in_dim, bias=True):
    rows = [(f'{name}.weight', [out_dim, in_dim], 'linear_weight')]
    return rows + [(f'{name}.bias', [out_dim], 'bias')] if bias else rows


def bn(name, dim, affine=True):
    rows = [(f'{name}.weight', [dim], 'bn_weight'), (f'{name}.bias', [dim], 'bn_bias')] if affine else []
    return rows + [(f'{name}.running_mean', [dim], 'bn_mean'), (f'{name}.running_var', [dim], 'bn_var'),
                   (f'{name}.num_batches_tracked', [], 'bn_count')]


def group(prefix, rows):
    """Tensors for a non-backbone group (heads, predictors...), keyed ``prefix + name``."""
    return {prefix + key: fill(prefix + key, shape, role) for key, shape, role in rows}


def prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def save(path, obj, legacy=False):
    """torch.save; ``legacy`` writes the pre-1.6 format the 2019-2020 releases (MoCo, SwAV) use."""
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


SGD = {'state': {}, 'param_groups': [{'lr': 0.03, 'momentum': 0.9, 'weight_decay': 1e-4, 'params': [0, 1]}]}
MOCO_V1_FC = linear('fc', 128, 2048)
MOCO_V2_FC = linear('fc.0', 2048, 2048) + linear('fc.2', 128, 2048)
MOCO_V3_PROJECTOR = linear('fc.0', 4096, 2048, bias=False) + bn('fc.1', 4096) + linear('fc.3', 256, 4096, bias=False) \
    + bn('fc.4', 256, affine=False)
MOCO_V3_PREDICTOR = linear('0', 4096, 256, bias=False) + bn('1', 4096) + linear('3', 256, 4096, bias=False)
SWAV_HEAD = linear('0', 2048, 2048) + bn('1', 2048) + linear('3', 128, 2048)
DINO_HEAD = linear('mlp.0', 2048, 2048) + linear('mlp.2', 2048, 2048) + linear('mlp.4', 256, 2048) \
    + [('last_layer.weight_g', [4096, 1], 'bn_weight'), ('last_layer.weight_v', [4096, 256], 'linear_weight')]
# Projector widths shrunk from 8192 to keep the files small; the key names are the releases'.
BARLOW_PROJECTOR = linear('0', 1024, 2048, bias=False) + bn('1', 1024) + linear('3', 1024, 1024, bias=False)
VICREG_PROJECTOR = linear('0', 1024, 2048) + bn('1', 1024) + linear('3', 1024, 1024, bias=False)
CLASSIFIER = linear('fc', 1000, 2048)


def moco_v1_v2(backbone, fc_rows):
    query = {**prefixed('module.encoder_q.', backbone), **group('module.encoder_q.', fc_rows)}
    key = {k.replace('encoder_q', 'encoder_k'): v for k, v in query.items()}
    state = {**query, **key, 'module.queue': fill('module.queue', [128, 65536], 'bias'),
             'module.queue_ptr': torch.zeros(1, dtype=torch.long)}
    return {'epoch': 200, 'arch': 'resnet50', 'state_dict': state, 'optimizer': SGD}


def moco_v3(backbone):
    base = {**prefixed('module.base_encoder.', backbone), **group('module.base_encoder.', MOCO_V3_PROJECTOR)}
    momentum = {k.replace('base_encoder', 'momentum_encoder'): v for k, v in base.items()}
    state = {**base, **momentum, **group('module.predictor.', MOCO_V3_PREDICTOR)}
    scaler = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
              '_growth_tracker': 0}
    return {'epoch': 1000, 'arch': 'resnet50', 'state_dict': state, 'optimizer': SGD, 'scaler': scaler}


def swav(backbone):
    return {**prefixed('module.', backbone), **group('module.projection_head.', SWAV_HEAD),
            **group('module.prototypes.', [('weight', [3000, 128], 'linear_weight')])}


def dino_full(backbone):
    network = {**prefixed('module.backbone.', backbone), **group('module.head.', DINO_HEAD)}
    return {'student': network, 'teacher': network, 'optimizer': SGD, 'epoch': 100,
            'args': argparse.Namespace(arch='resnet50', out_dim=4096, optimizer='sgd'),
            'dino_loss': {'center': torch.zeros(1, 4096)}}


def barlow_twins_full(backbone):
    model = {**prefixed('module.backbone.', backbone), **group('module.projector.', BARLOW_PROJECTOR),
             **group('module.', bn('bn', 1024, affine=False))}
    return {'epoch': 1000, 'model': model, 'optimizer': SGD}


def vicreg_full(backbone):
    model = {**prefixed('module.backbone.', backbone), **group('module.projector.', VICREG_PROJECTOR)}
    return {'epoch': 1000, 'model': model, 'optimizer': SGD}


def torchvision_supervised(backbone):
    return {**backbone, **group('', CLASSIFIER)}


def simclr_converted(backbone):
    return {'state_dict': {**backbone, **group('', CLASSIFIER)}}


# name -> (arch, build the file from the torchvision-named backbone state, legacy serialization)
RESNET50_LAYOUTS = {
    'MoCo v1': ('resnet50', lambda b: moco_v1_v2(b, MOCO_V1_FC), True),
    'MoCo v2': ('resnet50', lambda b: moco_v1_v2(b, MOCO_V2_FC), True),
    'MoCo v3': ('resnet50', moco_v3, False),
    'SwAV': ('resnet50', swav, True),
    'backbone only (DINO, Barlow Twins, VICReg)': ('resnet50', dict, False),
    'DINO full': ('resnet50', dino_full, False),
    'Barlow Twins full': ('resnet50', barlow_twins_full, False),
    'VICReg full': ('resnet50', vicreg_full, False),
    'torchvision supervised': ('sup_resnet50', torchvision_supervised, False),
    'SimCLR v1 converted 1x': ('resnet50x1', simclr_converted, False),
}


@pytest.fixture(scope='module')
def resnet50_state():
    return filled_state_dict(manifest('resnet50'))


@pytest.fixture(scope='module')
def layout_file(resnet50_state, tmp_path_factory):
    """Write a named layout once per module; tests share the files."""
    folder, written = tmp_path_factory.mktemp('layouts'), {}

    def get(name):
        if name not in written:
            _, build, legacy = RESNET50_LAYOUTS[name]
            written[name] = save(folder / (re.sub(r'\W+', '_', name) + '.pth'), build(resnet50_state), legacy)
        return written[name]
    return get


@pytest.mark.parametrize('name', list(RESNET50_LAYOUTS))
def test_resnet50_layout_gives_original_output(layout_file, name):
    model = load_backbone(RESNET50_LAYOUTS[name][0], layout_file(name))
    assert not model.training and model.feat_dim == 2048
    assert_close_to_reference(run_reference(model, 'resnet50'), 'resnet50')


# --- SimReg students: the original code's checkpoints and this project's ----------------------------

@pytest.fixture(scope='module')
def original_resnet18_student(tmp_path_factory):
    path = tmp_path_factory.mktemp('original') / 'ckpt_epoch_130.pth'
    return save(path, original_simreg_checkpoint('resnet50_to_resnet18'))


def test_original_simreg_checkpoint_gives_backbone_and_head_outputs(original_resnet18_student):
    assert_close_to_reference(run_reference(load_backbone('resnet18', original_resnet18_student), 'resnet18'),
                              'resnet18')
    backbone, head = load_student(original_resnet18_student)
    assert not backbone.training and not head.training
    assert_close_to_reference(run_reference(backbone, 'resnet18'), 'resnet18')
    assert_close_to_reference(run_reference(head, 'mlp4_resnet18'), 'mlp4_resnet18')


def test_original_cached_teacher_mobilenet_student(tmp_path):
    path = save(tmp_path / 'ckpt.pth', original_simreg_checkpoint('resnet50_to_mobilenet_cached'))
    backbone, head = load_student(path)
    assert_close_to_reference(run_reference(backbone, 'mobilenet_v2'), 'mobilenet_v2')
    assert_close_to_reference(run_reference(head, 'mlp4_mobilenet_v2'), 'mlp4_mobilenet_v2')


def test_project_checkpoint_gives_backbone_and_head_outputs(tmp_path):
    state = {**prefixed('encoder_q.', filled_state_dict(manifest('resnet18'))),
             **prefixed('predict_q.', filled_state_dict(manifest('mlp4_resnet18')))}
    args = {'arch_student': 'resnet18', 'arch_teacher': 'resnet50', 'n_mlp_layers': 4, 'linear_pred': False,
            'image_size': 224}
    teacher = {'arch': 'resnet50', 'weights': '/w/moco.pth', 'sha256': '0' * 64, 'feat_dim': 2048}
    path = save(tmp_path / 'last.pth', {'epoch': 3, 'state_dict': state, 'optimizer': SGD, 'scaler': {},
                                        'args': args, 'teacher': teacher})
    backbone, head = load_student(path, arch='resnet18')
    assert_close_to_reference(run_reference(backbone, 'resnet18'), 'resnet18')
    assert_close_to_reference(run_reference(head, 'mlp4_resnet18'), 'mlp4_resnet18')
    assert_close_to_reference(run_reference(load_backbone('resnet18', path), 'resnet18'), 'resnet18')


def test_original_linear_pred_student_has_bn_linear_head(tmp_path):
    ckpt = original_simreg_checkpoint('resnet50_to_resnet18', linear_pred=True)
    ckpt['state_dict'] = {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('predict_q.')}
    head_rows = bn('0', 512) + linear('1', 2048, 512)
    ckpt['state_dict'].update(group('predict_q.module.', head_rows))
    _, head = load_student(save(tmp_path / 'ckpt.pth', ckpt))
    assert [type(m) for m in head] == [nn.BatchNorm1d, nn.Linear]
    p = {k: fill('predict_q.module.' + k, s, r) for k, s, r in head_rows}
    x = fixture_input('mlp4_resnet18')
    expected = F.linear(F.batch_norm(x, p['0.running_mean'], p['0.running_var'], p['0.weight'], p['0.bias']),
                        p['1.weight'], p['1.bias'])
    torch.testing.assert_close(head(x), expected)


def test_student_of_another_arch_is_named(original_resnet18_student):
    with pytest.raises(SimRegError, match='holds a resnet18 student, not mobilenet'):
        load_student(original_resnet18_student, arch='mobilenet')


def test_teacher_file_is_not_a_student(layout_file):
    with pytest.raises(SimRegError, match='not a SimReg student checkpoint'):
        load_student(layout_file('MoCo v2'))


# --- files that do not fit -------------------------------------------------------------------------

def test_wrong_arch_names_keys_and_layout(layout_file, original_resnet18_student):
    with pytest.raises(SimRegError) as err:
        load_backbone('resnet18', layout_file('MoCo v2'))
    message = str(err.value)
    assert 'layout guessed: MoCo v1/v2' in message and 'layer1.0.conv3.weight' in message
    assert 'wrong shape' in message and '\n' not in message
    with pytest.raises(SimRegError, match=r'SimReg \(original code\).*missing .*layer1\.0\.conv3\.weight'):
        load_backbone('resnet50', original_resnet18_student)


def test_unexpected_backbone_key_is_named(resnet50_state, tmp_path):
    ckpt = moco_v1_v2(resnet50_state, MOCO_V2_FC)
    ckpt['state_dict']['module.encoder_q.layer4.2.conv4.weight'] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(SimRegError, match=r'MoCo v1/v2\): unexpected 1 key \[layer4\.2\.conv4\.weight\]'):
        load_backbone('resnet50', save(tmp_path / 'extra.pth', ckpt))


def test_unknown_group_is_not_dropped(resnet50_state, tmp_path):
    state = {**swav(resnet50_state), 'module.extra_head.weight': torch.zeros(3, 3)}
    with pytest.raises(SimRegError, match=r'SwAV / DataParallel\): unexpected 1 key \[extra_head\.weight\]'):
        load_backbone('resnet50', save(tmp_path / 'swav_extra.pth', state))


@pytest.mark.parametrize('legacy', [False, True])
def test_truncated_file_is_reported(tmp_path, legacy):
    path = save(tmp_path / 'full.pth', {'state_dict': filled_state_dict(manifest('mlp4_resnet18'))}, legacy)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(SimRegError, match=r'cannot read checkpoint .*PyTorch checkpoint.*truncated'):
        load_backbone('resnet18', path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.mark.parametrize('legacy', [False, True])
def test_pickle_that_runs_code_is_refused(tmp_path, legacy):
    marker = str(tmp_path / 'code_ran')
    path = save(tmp_path / 'evil.pth', {'state_dict': {}, 'payload': _RunsCode(marker)}, legacy)
    with pytest.raises(SimRegError, match='refusing to load .*os.makedirs'):
        read_checkpoint(path)
    assert not os.path.exists(marker)


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(SimRegError, match='not found: give a checkpoint path or one of the presets moco_v1_200ep'):
        load_backbone('resnet50', str(tmp_path / 'nope.pth'))
    with pytest.raises(SimRegError, match='holds no state dict'):
        load_backbone('resnet50', save(tmp_path / 'list.pth', [torch.zeros(3)]))


# --- --teacher_fc: only a plain Linear projection can be kept --------------------------------------

def test_teacher_fc_keeps_plain_linear(layout_file):
    model = load_backbone('resnet50', layout_file('MoCo v1'), keep_fc=True)
    weight, bias = (fill('module.encoder_q.' + k, s, r) for k, s, r in MOCO_V1_FC)
    assert model.feat_dim == 128
    expected = reference_output('resnet50') @ weight.T + bias
    out = run_reference(model, 'resnet50')
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_teacher_fc_keeps_supervised_classifier(layout_file):
    model = load_backbone('sup_resnet50', layout_file('torchvision supervised'), keep_fc=True)
    assert model.feat_dim == 1000 and isinstance(model.fc, nn.Linear)
    assert torch.equal(model.fc.weight, fill('fc.weight', [1000, 2048], 'linear_weight'))


@pytest.mark.parametrize('name, found', [('MoCo v2', r'a multi-layer projection head \(4 keys \[module.encoder_q.fc.0'),
                                         ('MoCo v3', 'a multi-layer projection head'),
                                         ('SwAV', r'a multi-layer .*module.projection_head.0.bias'),
                                         ('backbone only (DINO, Barlow Twins, VICReg)', 'no projection head')])
def test_teacher_fc_explains_why_not(layout_file, name, found):
    with pytest.raises(SimRegError, match=f'--teacher_fc .*has {found}.*drop --teacher_fc'):
        load_backbone('resnet50', layout_file(name), keep_fc=True)


# --- presets: official downloads, resolved through a pre-filled or faked torch hub cache -------------


def test_presets_point_at_official_releases():
    layouts = {layout.name for layout in LAYOUTS}
    for name, preset in presets.PRESETS.items():
        assert preset.url.startswith(('https://dl.fbaipublicfiles.com/', 'https://download.pytorch.org/')), name
        assert preset.layout in layouts, name
    assert presets.PRESETS['moco_v2_800ep'].url == \
        'https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar'


def test_preset_from_prefilled_cache(hub_dir, layout_file, resnet50_state):
    os.makedirs(hub_dir / 'checkpoints')
    os.symlink(layout_file('MoCo v2'), hub_dir / 'checkpoints' / 'moco_v2_800ep.pth')
    model = load_backbone('resnet50', 'moco_v2_800ep')
    assert torch.equal(model.layer4[2].conv3.weight, resnet50_state['layer4.2.conv3.weight'])


def _fake_download(monkeypatch, source, calls):
    def download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        with open(source, 'rb') as f, open(dst, 'wb') as out:
            out.write(f.read())
    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)


def test_preset_downloads_once_and_checks_layout(hub_dir, layout_file, monkeypatch):
    calls = []
    _fake_download(monkeypatch, layout_file('backbone only (DINO, Barlow Twins, VICReg)'), calls)
    path = resolve_weights('dino_resnet50')
    assert calls == [presets.PRESETS['dino_resnet50'].url]
    assert path == os.path.join(str(hub_dir), 'checkpoints', 'dino_resnet50.pth')
    assert resolve_weights('dino_resnet50') == path and len(calls) == 1
    assert os.listdir(hub_dir / 'checkpoints') == ['dino_resnet50.pth']


@pytest.mark.parametrize('name, source, error', [
    ('moco_v2_800ep', 'MoCo v2', 'downloaded file has md5 .* the release says a04e12f8'),
    ('swav_800ep', 'MoCo v2', 'looks like MoCo v1/v2, not SwAV / DataParallel')])
def test_preset_that_fails_its_check_is_not_kept(hub_dir, layout_file, monkeypatch, name, source, error):
    _fake_download(monkeypatch, layout_file(source), [])
    with pytest.raises(SimRegError, match=error):
        resolve_weights(name)
    assert os.listdir(hub_dir / 'checkpoints') == []


def test_preset_for_another_arch_is_refused(hub_dir, layout_file):
    with pytest.raises(SimRegError, match='preset moco_v2_800ep is a ResNet-50 .* not byol_resnet50'):
        load_backbone('byol_resnet50', 'moco_v2_800ep')
    # the scripts resolve the name to its cached file first (a preset is downloaded by rank 0 only)
    os.makedirs(hub_dir / 'checkpoints')
    os.symlink(layout_file('MoCo v2'), hub_dir / 'checkpoints' / 'moco_v2_800ep.pth')
    with pytest.raises(SimRegError, match='preset moco_v2_800ep is a ResNet-50 .* not byol_resnet50'):
        load_backbone('byol_resnet50', resolve_weights('moco_v2_800ep'))
