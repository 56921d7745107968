"""ViT teachers (models/vit.py): parity with each release's own code, its files recognised from their keys,
the refusals, presets, and the pipeline (live and cached teachers, k-NN) with a ViT teacher.

The references (tests/fixtures/vit_reference_*) were recorded by running DINO's, DINOv2's, MoCo v3's and
DeiT's own model code on weights filled by tests/fixture_weights.py's rule (see
tests/fixtures/record_vit_references.py). Here the same weights are written in each release's file layout
(with the groups those files hold besides the backbone), loaded through models.loading, and run at the
training size and at a smaller one, where each release resizes its position embedding in its own way.
"""
import argparse
import os

import numpy as np
import pytest
import torch

from conftest import build_cache, cache_workspace, make_image_folder, read_json, run_command, train
from fixture_weights import fill, relative_error, vit_input, vit_reference, vit_reference_names, \
    vit_reference_output, vit_state_dict
from models import load_backbone, presets, resolve_weights
from models.backbones import TEACHER_ARCHS, build_backbone
from models.loading import LAYOUTS, detect_layout
from models.vit import VIT_TEACHERS, interpolate_with_offset, sincos_pos_embed
from utils.checkpoint import read_checkpoint
from utils.errors import SimRegError

TOLERANCE = 1e-4
# the default suite: every release at the small size and at 224 on small models; the big ones are slow
FAST = {'dino_vit_small_patch16_112', 'dino_vit_small_patch16_224', 'dino_vit_small_patch8_112',
        'dinov2_vits14_112', 'dinov2_vits14_224', 'dinov2_vits14_reg4_112', 'dinov2_vits14_reg4_224',
        'mocov3_vit_small_112', 'mocov3_vit_small_224', 'deit_small_patch16_112', 'deit_small_patch16_224'}


# also in CI (slow): the base models at 112; on demand (SIMREG_TEST_BIG=1): the base models at 224, ViT-L
# (12 s each on a CPU) and ViT-g (1.1B weights: ~5 GB and a minute or more)
SLOW = {'dino_vit_small_patch8_224', 'dino_vit_base_patch16_112', 'dino_vit_base_patch8_112', 'deit_base_patch16_112',
        'dinov2_vitb14_112', 'dinov2_vitb14_reg4_112', 'mocov3_vit_base_112'}
BIG = pytest.mark.skipif(not os.environ.get('SIMREG_TEST_BIG'), reason='big ViT on a CPU: set SIMREG_TEST_BIG=1')


def _params():
    for name in (n for n in vit_reference_names() if not n.startswith('dinov3_')):  # DINOv3: test_dinov3.py
        marks = () if name in FAST else (pytest.mark.slow,) if name in SLOW else (pytest.mark.slow, BIG)
        yield pytest.param(name, marks=marks, id=name)


def _noise(state, seed):
    """Other weights with the same keys and shapes (a DINO student, a MoCo momentum encoder)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def write_release_file(path, release, state, full=False):
    """``state`` (a backbone's state dict, the release's own key names) saved the way the release saves it."""
    dim = state['cls_token'].shape[-1]
    if release == 'dino' and full:
        head = {'mlp.0.weight': torch.randn(64, dim), 'mlp.0.bias': torch.zeros(64),
                'last_layer.weight_g': torch.ones(100, 1), 'last_layer.weight_v': torch.randn(100, 64)}
        ckpt = {'student': {**{f'module.backbone.{k}': v for k, v in _noise(state, 1).items()},
                            **{f'module.head.{k}': v for k, v in head.items()}},
                'teacher': {**{f'backbone.{k}': v for k, v in state.items()},
                            **{f'head.{k}': v for k, v in head.items()}},
                'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 100, 'args': argparse.Namespace(arch='vit'),
                'dino_loss': {'center': torch.zeros(1, 100)}}
    elif release in ('dino', 'dinov2'):
        ckpt = state  # the hub files: the backbone's bare state dict
    elif release == 'mocov3':
        projector = {'head.0.weight': torch.randn(64, dim), 'head.1.weight': torch.ones(64),
                     'head.1.bias': torch.zeros(64), 'head.1.running_mean': torch.zeros(64),
                     'head.1.running_var': torch.ones(64), 'head.1.num_batches_tracked': torch.tensor(0)}
        encoder = {**state, **projector}
        ckpt = {'epoch': 300, 'arch': 'vit_small', 'optimizer': {'state': {}, 'param_groups': []},
                'state_dict': {**{f'module.base_encoder.{k}': v for k, v in encoder.items()},
                               **{f'module.momentum_encoder.{k}': v for k, v in _noise(encoder, 2).items()},
                               'module.predictor.0.weight': torch.randn(64, 64)}}
    elif release == 'deit':
        ckpt = {'model': {**state, 'head.weight': torch.randn(1000, dim), 'head.bias': torch.zeros(1000)}}
    else:
        raise ValueError(release)
    torch.save(ckpt, path)
    return str(path)


def file_state(name):
    """The weights a release's file holds for reference ``name``: those of its training-size record (the
    112 records of MoCo v3 hold the sin-cos table their model computes at 112, a file the one at 224)."""
    trained = name.replace('_112', '_224')
    return vit_state_dict(trained if trained in vit_reference_names() else name)


@pytest.mark.parametrize('name', list(_params()))
def test_parity_with_release(tmp_path, one_thread, name):
    ref = vit_reference(name)
    path = write_release_file(tmp_path / 'teacher.pth', ref['release'], file_state(name))
    model = load_backbone(ref['project_arch'], path)
    os.remove(path)  # ViT-L: 1.2 GB
    with torch.no_grad():
        out = model(vit_input(name))
    assert model.feat_dim == out.shape[1] == ref['output_shape'][1]
    assert relative_error(out, vit_reference_output(name)) <= TOLERANCE


@pytest.mark.parametrize('name', ['dino_vit_small_patch16_112', 'dino_vit_small_patch16_224'])
def test_dino_full_checkpoint_loads_the_teacher(tmp_path, one_thread, name):
    """The student of a DINO full checkpoint is another network: the teacher is taken, its head dropped."""
    path = write_release_file(tmp_path / 'full.pth', 'dino', file_state(name), full=True)
    assert detect_layout(read_checkpoint(path), path)[0].name == 'DINO full checkpoint (ViT)'
    model = load_backbone('vit_small_patch16', path)
    with torch.no_grad():
        assert relative_error(model(vit_input(name)), vit_reference_output(name)) <= TOLERANCE
    student = read_checkpoint(path)['student']
    assert not torch.equal(model.blocks[0].attn.qkv.weight, student['module.backbone.blocks.0.attn.qkv.weight'])


def test_same_weights_differ_by_release_at_other_sizes():
    """DINO and DeiT share vit_small_patch16 (same keys, same weights give the same output at 224); at 112
    each resizes its position embedding in its own way, which the file's layout decides."""
    assert relative_error(vit_reference_output('dino_vit_small_patch16_224'),
                          vit_reference_output('deit_small_patch16_224')) < 1e-6
    assert relative_error(vit_reference_output('dino_vit_small_patch16_112'),
                          vit_reference_output('deit_small_patch16_112')) > 10 * TOLERANCE


def test_offset_resize_is_not_resize_to_size():
    pos = fill('pos', [1, 196, 8], 'token')
    offset = interpolate_with_offset(pos, (7, 7))
    by_size = torch.nn.functional.interpolate(pos.reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(7, 7),
                                              mode='bicubic').permute(0, 2, 3, 1).reshape(1, 49, 8)
    assert offset.shape == by_size.shape and (offset - by_size).abs().max() > 1e-3
    # at the trained grid it is not the identity, so the releases (and ReleaseViT) skip it there
    assert not torch.equal(interpolate_with_offset(pos, (14, 14)), pos)
    model = build_backbone('vit_small_patch16')
    assert model.resized_pos_embed((14, 14)) is model.pos_embed


def test_mocov3_sincos_table_is_the_release_one():
    for name, grid in (('mocov3_vit_small_224', (14, 14)), ('mocov3_vit_small_112', (7, 7))):
        stored = vit_state_dict(name)['pos_embed']
        assert torch.allclose(sincos_pos_embed(grid, 384), stored, atol=1e-6), name


def _write(tmp_path, name, **kwargs):
    ref = vit_reference(name)
    return write_release_file(tmp_path / f'{name}.pth', ref['release'], file_state(name), **kwargs)


@pytest.mark.parametrize('name, arch, error', [
    ('dino_vit_small_patch16_224', 'vit_base_patch16', r'as vit_base_patch16 does not fit \(layout guessed: DINO '
                                                       r'ViT backbone\): wrong shape .*cls_token'),
    ('dinov2_vits14_reg4_224', 'vit_small_patch14_dinov2', r'DINOv2 with registers\): unexpected 1 key \[reg_token\]'),
    ('dinov2_vits14_224', 'vit_small_patch14_reg4_dinov2', r'missing 1 key \[reg_token\]'),
    ('dinov2_vits14_224', 'vit_small_patch16', r'unexpected .*blocks.0.ls1.gamma'),
    ('dino_vit_small_patch16_224', 'resnet50', r'missing .*conv1.weight.*unexpected .*cls_token'),
    ('mocov3_vit_small_224', 'vit_small_patch16', 'MoCo v3 ViT-Small, which has 12 heads .* mocov3_vit_small'),
    ('dino_vit_small_patch16_224', 'mocov3_vit_small', r'12 heads\), but the file is a DINO checkpoint'),
    ('deit_small_patch16_224', 'mocov3_vit_small', r'12 heads\), but the file is a DeiT checkpoint')])
def test_file_that_does_not_fit_the_arch_is_refused(tmp_path, name, arch, error):
    with pytest.raises(SimRegError, match=error):
        load_backbone(arch, _write(tmp_path, name))


def test_teacher_fc_keeps_deits_classifier(tmp_path, one_thread):
    path = _write(tmp_path, 'deit_small_patch16_224')
    model = load_backbone('vit_small_patch16', path, keep_fc=True)
    head = read_checkpoint(path)['model']
    x = vit_input('deit_small_patch16_112')
    with torch.no_grad():
        out = model(x)
        features = load_backbone('vit_small_patch16', path)(x)
    assert model.feat_dim == 1000 and out.shape == (2, 1000)
    assert torch.allclose(out, features @ head['head.weight'].T + head['head.bias'], atol=1e-4)
    with pytest.raises(SimRegError, match='--teacher_fc .* has no projection head'):
        load_backbone('vit_small_patch16', _write(tmp_path, 'dino_vit_small_patch16_224'), keep_fc=True)


def test_image_size_that_is_not_a_multiple_of_the_patch_is_refused():
    model = build_backbone('vit_small_patch14_dinov2').eval()
    with pytest.raises(SimRegError, match='64x64 input does not divide into the 14-pixel patches.*e.g. 56'):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(SimRegError, match='multiple of 16'):
        build_backbone('vit_tiny_patch16', 60)


def test_mocov3_file_with_another_position_table_is_refused(tmp_path):
    state = dict(file_state('mocov3_vit_small_224'))
    state['pos_embed'] = fill('pos_embed', list(state['pos_embed'].shape), 'token')
    path = write_release_file(tmp_path / 'moco.pth', 'mocov3', state)
    with pytest.raises(SimRegError, match='fixed sin-cos position table, this file holds another'):
        load_backbone('mocov3_vit_small', path)


def test_layouts_are_recognised(tmp_path):
    expect = {'dino_vit_small_patch16_224': 'DINO ViT backbone', 'dinov2_vits14_224': 'DINOv2',
              'dinov2_vits14_reg4_224': 'DINOv2 with registers', 'mocov3_vit_small_224': 'MoCo v3',
              'deit_small_patch16_224': 'DeiT'}
    for name, layout in expect.items():
        path = _write(tmp_path, name)
        assert detect_layout(read_checkpoint(path), path)[0].name == layout, name


@pytest.fixture(scope='module')
def giant():
    with torch.device('meta'):
        return build_backbone('vit_giant_patch14_dinov2')


def test_every_teacher_arch_builds_and_loads_its_own_shapes(giant):
    """Each arch name, built without weights, holds timm's keys; a file in its release layout fits it, and the
    feature is the CLS width (feat_dim). On the meta device: no weights are initialised."""
    dims = {'vit_small': 384, 'vit_base': 768, 'vit_large': 1024, 'vit_giant': 1536, 'mocov3_vit_small': 384}
    for arch in VIT_TEACHERS:
        assert arch in TEACHER_ARCHS
        with torch.device('meta'):
            model = giant if arch == 'vit_giant_patch14_dinov2' else build_backbone(arch)
        assert model.feat_dim == next(d for k, d in dims.items() if arch.startswith(k)), arch
    assert tuple(giant.blocks[0].mlp.fc1.weight.shape) == (8192, 1536)  # DINOv2's w12: 2 x 4096
    assert tuple(giant.blocks[0].mlp.fc2.weight.shape) == (1536, 4096)


def test_dinov2_giant_keys_map_to_timm(giant):
    """The giant's SwiGLU (w12/w3) keys map to timm's packed GluMlp (fc1/fc2); its parity is a BIG test."""
    from models.vit import timm_state
    own = {k: v.shape for k, v in giant.state_dict().items()}
    release = {k.replace('.mlp.fc1.', '.mlp.w12.').replace('.mlp.fc2.', '.mlp.w3.'): s for k, s in own.items()}
    release['mask_token'] = (1, 1536)
    mapped = timm_state({k: torch.empty(0) for k in release}, 'DINOv2', 'vit_giant_patch14_dinov2')
    assert set(mapped) == set(own)


# --- presets ------------------------------------------------------------------------------------------

VIT_PRESETS = ['dino_vits16', 'dino_vits8', 'dino_vitb16', 'dino_vitb8', 'dinov2_vits14', 'dinov2_vitb14',
               'dinov2_vitl14', 'dinov2_vits14_reg', 'dinov2_vitb14_reg', 'dinov2_vitl14_reg', 'mocov3_vits',
               'mocov3_vitb', 'deit_small', 'deit_base']


def test_vit_presets_name_their_release_and_arch():
    layouts = {layout.name for layout in LAYOUTS}
    for name in VIT_PRESETS:
        preset = presets.PRESETS[name]
        assert preset.url.startswith('https://dl.fbaipublicfiles.com/'), name
        assert preset.layout in layouts and preset.archs[0] in VIT_TEACHERS, name
    assert presets.PRESETS['deit_small'].sha256 == 'cd65a155'
    assert presets.PRESETS['dinov2_vits14_reg'].url == \
        'https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth'
    assert presets.PRESETS['mocov3_vits'].archs == ('mocov3_vit_small',)


@pytest.mark.parametrize('preset, name', [('dino_vits16', 'dino_vit_small_patch16_112'),
                                          ('dinov2_vits14_reg', 'dinov2_vits14_reg4_112'),
                                          ('mocov3_vits', 'mocov3_vit_small_112')])
def test_vit_preset_from_prefilled_cache(hub_dir, tmp_path, one_thread, preset, name):
    os.makedirs(hub_dir / 'checkpoints')
    ref = vit_reference(name)
    write_release_file(hub_dir / 'checkpoints' / f'{preset}.pth', ref['release'], file_state(name))
    model = load_backbone(ref['project_arch'], preset)
    with torch.no_grad():
        assert relative_error(model(vit_input(name)), vit_reference_output(name)) <= TOLERANCE


@pytest.mark.parametrize('preset, arch, error', [
    ('dino_vits16', 'vit_base_patch16', r'preset dino_vits16 is a DINO ViT-S/16 \(vit_small_patch16\), not '
                                        r'vit_base_patch16: use --arch_teacher vit_small_patch16'),
    ('mocov3_vits', 'vit_small_patch16', 'use --arch_teacher mocov3_vit_small'),
    ('moco_v2_800ep', 'vit_small_patch16', 'preset moco_v2_800ep is a ResNet-50 .* use --arch_teacher resnet50'),
    ('deit_small', 'resnet50', 'use --arch_teacher vit_small_patch16')])
def test_preset_for_another_arch_is_refused(hub_dir, preset, arch, error):
    with pytest.raises(SimRegError, match=error):
        load_backbone(arch, preset)


def test_vit_preset_download_is_checked(hub_dir, tmp_path, monkeypatch):
    """DeiT publishes a sha256 prefix: a file that does not have it is not kept."""
    source = _write(tmp_path, 'deit_small_patch16_224')

    def download(url, dst, hash_prefix=None, progress=True):
        with open(source, 'rb') as f, open(dst, 'wb') as out:
            out.write(f.read())
    monkeypatch.setattr(torch.hub, 'download_url_to_file', download)
    with pytest.raises(SimRegError, match='downloaded file has sha256 .* the release says cd65a155'):
        resolve_weights('deit_small')
    assert os.listdir(hub_dir / 'checkpoints') == []


# --- the pipeline with a ViT teacher ----------------------------------------------------------------------

def _random_dino_file(path):
    """A vit_small_patch16 teacher with random weights, in DINO's backbone layout."""
    torch.manual_seed(3)
    torch.save(build_backbone('vit_small_patch16').state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_vit_teacher_trains_a_resnet_live_and_cached(tmp_path, one_thread):
    ws = cache_workspace(tmp_path)
    teacher = _random_dino_file(tmp_path / 'dino_vits16.pth')
    common = [str(ws / 'data'), '--arch_student', 'resnet18', '--image_size', '64', '--batch_size', '6',
              '--epochs', '1', '--num_workers', '0', '--single_aug', '--weak_weak', '--print_freq', '1',
              '--base_dir', str(tmp_path)]
    train(common + ['--exp', 'live', '--arch_teacher', 'vit_small_patch16', '--teacher_weights', teacher])
    info = read_json(tmp_path / 'exp' / 'live' / 'logs' / 'train_args.json')['teachers']['vit_small_patch16']
    assert info['feat_dim'] == 384 and info['weights'] == teacher
    ckpt = torch.load(tmp_path / 'exp' / 'live' / 'checkpoints' / 'last.pth', weights_only=True)
    assert ckpt['state_dict']['predict_q.7.weight'].shape[0] == 384
    build_cache(ws, 'vit_cache.npy', '--arch_teacher', 'vit_small_patch16', '--teacher_weights', teacher,
                '--image_size', '64', '--num_workers', '0')
    feats = np.load(ws / 'vit_cache.npy', mmap_mode='r')
    assert feats.shape == (21, 384)
    # the cached rows are the live teacher's features of the same center crops
    train(common + ['--exp', 'cached', '--arch_teacher', 'vit_small_patch16,resnet18',
                    '--teacher_weights', f',{ws / "teacher.pth"}', '--use_cache',
                    '--teacher_feats', f'{ws / "vit_cache.npy"},'])
    ckpt = torch.load(tmp_path / 'exp' / 'cached' / 'checkpoints' / 'last.pth', weights_only=True)
    heads = ckpt['state_dict']
    assert heads['predict_q.vit_small_patch16.7.weight'].shape[0] == 384  # each head sized to its teacher
    assert heads['predict_q.resnet18.7.weight'].shape[0] == 512
    # --cache_views: the ViT's features of stored views, which the student replays
    build_cache(ws, 'vit_views.npy', '--arch_teacher', 'vit_small_patch16', '--teacher_weights', teacher,
                '--image_size', '64', '--num_workers', '0', '--cache_views', '2')
    assert np.load(ws / 'vit_views.npy', mmap_mode='r').shape == (21, 2, 384)
    train(common + ['--exp', 'views', '--arch_teacher', 'vit_small_patch16', '--use_cache',
                    '--teacher_feats', str(ws / 'vit_views.npy')])
    assert os.path.isfile(tmp_path / 'exp' / 'views' / 'checkpoints' / 'last.pth')


def test_channels_last_only_for_convolutional_teachers(one_thread):
    """--channels_last puts the ResNets in NHWC; a ViT (one patch convolution) stays as it is."""
    from models.simreg import LiveTeacher
    vit = LiveTeacher(build_backbone('vit_small_patch16'), {}).to('cpu', torch.channels_last)
    assert vit.network.patch_embed.proj.weight.is_contiguous()
    resnet = LiveTeacher(build_backbone('resnet18'), {}).to('cpu', torch.channels_last)
    assert resnet.network.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not resnet.network.conv1.weight.is_contiguous()


def test_vit_teacher_under_bf16_autocast(one_thread):
    from models.simreg import LiveTeacher
    torch.manual_seed(0)
    teacher = LiveTeacher(build_backbone('vit_small_patch16'), {}).to('cpu')
    view = torch.randn(2, 3, 32, 32)
    fp32, bf16 = teacher(None, view), teacher(None, view, amp_dtype=torch.bfloat16)
    assert bf16.shape == (2, 384) and not torch.equal(fp32, bf16.float())  # the matmuls ran in bf16
    assert torch.nn.functional.cosine_similarity(fp32, bf16.float()).min() > 0.99


@pytest.mark.slow
def test_knn_of_the_vit_teacher(tmp_path):
    data = make_image_folder(tmp_path / 'data', n_classes=2, per_class=4, size=40)
    teacher = _random_dino_file(tmp_path / 'dino_vits16.pth')
    out = tmp_path / 'knn'
    run_command(['python', 'eval_knn.py', data, '--arch', 'vit_small_patch16', '--weights', teacher,
                 '--image_size', '32', '-j', '0', '-b', '4', '--save', str(out)])
    results = read_json(out / 'knn_results.json')
    assert set(results['majority_top1']) >= {'1', '20'}
