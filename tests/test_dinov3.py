"""DINOv3 teachers (models/dinov3.py): parity with facebookresearch/dinov3's own code, its release files loaded
strictly, the refusals, and the pipeline with a DINOv3 teacher.

The references (tests/fixtures/vit_reference_*, the dinov3_* records) were recorded by running the release's model
code on weights filled by tests/fixture_weights.py's rule (tests/fixtures/record_vit_references.py --release dinov3).
Here the same weights are written as the release's hub file (the backbone's bare state dict) and loaded through
models.loading.
"""
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_cache, cache_workspace, read_json, train
from fixture_weights import _vit_outputs, fill, relative_error, vit_input, vit_reference, vit_reference_output, \
    vit_state_dict
from models import load_backbone
from models.backbones import TEACHER_ARCHS, build_backbone
from models.dinov3 import DINOV3_ARCHS
from models.loading import detect_layout
from utils.checkpoint import read_checkpoint
from utils.errors import SimRegError

TOLERANCE = 1e-4
NAMES = ['dinov3_vits16_224', 'dinov3_vits16_112', 'dinov3_vits16plus_112', 'dinov3_convnext_tiny_224',
         'dinov3_convnext_tiny_112']


def release_state(name):
    """The state dict of the release's file for reference ``name``, filled by the rule: role ``fixed`` rows (RoPE
    periods, the qkv bias masks) from the npz, ``alias:<key>`` rows (ConvNeXt's norms.3 = norm) the same tensor."""
    state = OrderedDict()
    for key, shape, role in vit_reference(name)['manifest']:
        state[key] = (state[role.removeprefix('alias:')] if role.startswith('alias:') else
                      torch.from_numpy(_vit_outputs()[f'{name}/{key}']) if role == 'fixed' else fill(key, shape, role))
    return state


def write(tmp_path, state):
    torch.save(state, tmp_path / 'dinov3.pth')
    return str(tmp_path / 'dinov3.pth')


@pytest.mark.parametrize('name', NAMES)
def test_parity_with_release(tmp_path, one_thread, name):
    ref = vit_reference(name)
    model = load_backbone(ref['project_arch'], write(tmp_path, release_state(name)))
    with torch.no_grad():
        out = model(vit_input(name))
    expected = vit_reference_output(name)
    assert model.feat_dim == out.shape[1] == ref['output_shape'][1]
    assert F.cosine_similarity(out.double(), expected.double()).min() >= 0.9999
    assert relative_error(out, expected) <= TOLERANCE


def test_release_file_loads_strictly(tmp_path, one_thread):
    """Every tensor of the file is used as the release uses it: qkv.bias times bias_mask as timm's q, k (zero) and v
    biases, the file's RoPE periods (timm's recomputed ones move the output away from the release's), kept through a
    cast to bfloat16."""
    name = 'dinov3_vits16_112'
    state = release_state(name)
    path = write(tmp_path, state)
    assert detect_layout(read_checkpoint(path), path)[0].name == 'DINOv3 ViT'
    model = load_backbone('dinov3_vits16', path)
    bias = state['blocks.0.attn.qkv.bias']
    assert torch.equal(model.blocks[0].attn.q_bias, bias[:384]) and torch.equal(model.blocks[0].attn.v_bias, bias[768:])
    assert not model.blocks[0].attn.k_bias.any() and bias[384:768].abs().min() > 0
    assert torch.equal(model.rope.periods, state['rope_embed.periods'])
    assert not torch.equal(model.rope.periods, model.rope._compute_periods())
    with torch.no_grad():
        error = relative_error(model(vit_input(name)), vit_reference_output(name))
        model.rope.periods = model.rope._compute_periods()
        assert relative_error(model(vit_input(name)), vit_reference_output(name)) > 10 * error
    model = load_backbone('dinov3_vits16', path).to(torch.bfloat16)  # a live teacher on a GPU, under autocast
    assert model.rope.periods.dtype == torch.float32 and torch.equal(model.rope.periods, state['rope_embed.periods'])
    with torch.no_grad():
        out = model(vit_input(name).bfloat16())
    assert out.dtype == torch.bfloat16
    assert F.cosine_similarity(out.double(), vit_reference_output(name).double()).min() > 0.99
    assert (model.input_size, model.input_mean, model.input_std) == (256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    convnext_path = write(tmp_path, release_state('dinov3_convnext_tiny_112'))
    assert detect_layout(read_checkpoint(convnext_path), convnext_path)[0].name == 'DINOv3 ConvNeXt'
    assert load_backbone('dinov3_convnext_tiny', convnext_path).input_size == 224


def _renamed(state, old, new):
    state[new] = state.pop(old)


@pytest.mark.parametrize('name, edit, error', [
    ('dinov3_vits16_112', lambda s: s.pop('blocks.3.ls1.gamma'), r'missing 1 key \[blocks.3.gamma_1\]'),
    ('dinov3_vits16_112', lambda s: _renamed(s, 'blocks.5.attn.proj.weight', 'blocks.5.attn.out.weight'),
     r'missing 1 key \[blocks.5.attn.proj.weight\]; unexpected 1 key \[blocks.5.attn.out.weight\]'),
    ('dinov3_vits16_112', lambda s: s.pop('rope_embed.periods'), r'missing 1 key \[rope.periods\]'),
    ('dinov3_vits16_112', lambda s: s.pop('blocks.0.attn.qkv.bias_mask'),
     r'missing 3 keys \[blocks.0.attn.q_bias, blocks.0.attn.v_bias, blocks.0.attn.k_bias\]; '
     r'unexpected 1 key \[blocks.0.attn.qkv.bias\]'),
    ('dinov3_convnext_tiny_112', lambda s: s.pop('stages.2.4.gamma'), r'missing 1 key \[stages.2.blocks.4.gamma\]'),
    # the release loads norms.3 over norm: one that differs is not silently dropped
    ('dinov3_convnext_tiny_112', lambda s: s.update({'norms.3.bias': s['norm.bias'] + 1}),
     r'unexpected 1 key \[norms.3.bias\]')])
def test_key_that_does_not_fit_is_named(tmp_path, name, edit, error):
    state = release_state(name)
    edit(state)
    layout = 'ViT' if 'vit' in name else 'ConvNeXt'
    with pytest.raises(SimRegError, match=rf'dinov3.pth as {vit_reference(name)["project_arch"]} does not fit '
                                          rf'\(layout guessed: DINOv3 {layout}\): {error}: check --arch'):
        load_backbone(vit_reference(name)['project_arch'], write(tmp_path, state))


@pytest.mark.parametrize('name, arch, error', [
    ('dinov3_vits16_224', 'dinov3_vitb16', "the file is DINOv3's dinov3_vits16, not dinov3_vitb16: pass "
                                           r"--arch_teacher dinov3_vits16 \(--arch dinov3_vits16 to the evaluation"),
    ('dinov3_vits16_224', 'dinov3_vits16plus', "DINOv3's dinov3_vits16, not dinov3_vits16plus"),
    ('dinov3_vits16plus_112', 'dinov3_vits16', "DINOv3's dinov3_vits16plus, not dinov3_vits16"),
    ('dinov3_convnext_tiny_224', 'dinov3_convnext_small', "DINOv3's dinov3_convnext_tiny, not dinov3_convnext_small"),
    ('dinov3_convnext_tiny_224', 'dinov3_vits16', "DINOv3's dinov3_convnext_tiny, not dinov3_vits16"),
    ('dinov3_vits16_224', 'vit_small_patch16', "DINOv3's dinov3_vits16, not vit_small_patch16")])
def test_file_of_another_arch_is_refused(tmp_path, name, arch, error):
    with pytest.raises(SimRegError, match=error):
        load_backbone(arch, write(tmp_path, release_state(name)))


def test_file_of_another_release_is_refused(tmp_path):
    path = write(tmp_path, vit_state_dict('dinov2_vits14_224'))
    with pytest.raises(SimRegError, match=r'as dinov3_vits16: dinov3_vits16 loads a DINOv3 release file \(the '
                                          r'backbone .pth that facebookresearch/dinov3\'s hub entry loads\), this one '
                                          r'looks like a DINOv2 checkpoint: pass the DINOv3 file'):
        load_backbone('dinov3_vits16', path)


def test_every_dinov3_arch_builds(one_thread):
    """Each hub name is a teacher arch whose feature is its width; on the meta device (no weights initialised)."""
    dims = {'vits16': 384, 'vits16plus': 384, 'vitb16': 768, 'vitl16': 1024, 'vith16plus': 1280, 'vit7b16': 4096,
            'convnext_tiny': 768, 'convnext_small': 768, 'convnext_base': 1024, 'convnext_large': 1536}
    assert sorted(f'dinov3_{k}' for k in dims) == sorted(DINOV3_ARCHS)
    for name, dim in dims.items():
        with torch.device('meta'):
            model = build_backbone(f'dinov3_{name}')
        assert f'dinov3_{name}' in TEACHER_ARCHS and model.feat_dim == dim, name
        assert model.input_size == (224 if 'convnext' in name else 256), name
    model = build_backbone('dinov3_vits16').eval()
    with pytest.raises(SimRegError, match=r'a 72x72 input does not divide into the 16-pixel patches .* \(e.g. 64\)'):
        model(torch.zeros(1, 3, 72, 72))


def test_dinov3_teacher_caches_and_trains(tmp_path, one_thread):
    """A DINOv3 ViT-S teacher at 64 px: the cache holds its features of the center crops, a student trains live
    and from the cache."""
    from data.folders import build_dataset
    from data.transforms import eval_transform, normalize
    ws = cache_workspace(tmp_path)
    teacher = write(tmp_path, release_state('dinov3_vits16_112'))
    build_cache(ws, 'dinov3.npy', '--arch_teacher', 'dinov3_vits16', '--teacher_weights', teacher,
                '--image_size', '64', '--num_workers', '0')
    cached = torch.from_numpy(np.load(ws / 'dinov3.npy').astype(np.float32))
    dataset = build_dataset(str(ws / 'data'), 'train', eval_transform(64))
    with torch.no_grad():
        live = load_backbone('dinov3_vits16', teacher)(normalize(torch.stack([dataset[i][1] for i in range(21)])))
    assert cached.shape == (21, 384) and F.cosine_similarity(cached, live).min() > 0.9999
    common = [str(ws / 'data'), '--arch_student', 'resnet18', '--image_size', '64', '--batch_size', '7',
              '--epochs', '1', '--num_workers', '0', '--single_aug', '--base_dir', str(tmp_path)]
    train(common + ['--exp', 'live', '--arch_teacher', 'dinov3_vits16', '--teacher_weights', teacher])
    info = read_json(tmp_path / 'exp' / 'live' / 'logs' / 'train_args.json')['teachers']['dinov3_vits16']
    assert info['feat_dim'] == 384 and info['weights'] == teacher
    train(common + ['--exp', 'cached', '--arch_teacher', 'dinov3_vits16', '--use_cache',
                    '--teacher_feats', str(ws / 'dinov3.npy')])
    ckpt = torch.load(tmp_path / 'exp' / 'cached' / 'checkpoints' / 'last.pth', weights_only=True)
    assert ckpt['state_dict']['predict_q.7.weight'].shape[0] == 384
