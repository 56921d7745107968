"""The fill rule of the reference fixtures (their README in shared/fixtures), reusable by any test.

The fixtures record what the original SimReg models output for deterministic weights and input;
these helpers rebuild those weights and inputs so a test can write them in any checkpoint layout,
load them through ``models.loading`` and compare with the recorded output.
"""
import argparse
import functools
import json
import math
import os
import zlib
from collections import OrderedDict

import numpy as np
import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
# Wrappers of the original SimReg checkpoint keys; the fill rule hashes keys without them.
SIMREG_WRAPPERS = ('encoder_q.module.', 'predict_q.module.', 'encoder_t.module.')
TOLERANCE = 1e-4


@functools.lru_cache(maxsize=None)
def _json(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def reference_model(name):
    """``{note, input_shape, input_key, output_shape, manifest}`` of one model in reference_models.json."""
    return _json('reference_models.json')[name]


def manifest(name):
    """``[key, shape, role]`` rows: a reference model's, or an original SimReg checkpoint layout's."""
    models = _json('reference_models.json')
    if name in models:
        return models[name]['manifest']
    return _json('reference_simreg_checkpoints.json')[name]['manifest']


def uniform(key, stop, start=0):
    """``u(key, n)[start:stop]``: float64 values in [-0.5, 0.5) determined by the key."""
    values = torch.arange(start, stop, dtype=torch.int64)
    values.mul_(2654435761).add_(zlib.crc32(key.encode())).bitwise_and_(0xFFFFFFFF)
    return values.double().div_(2.0 ** 32).sub_(0.5)


def _scale_offset(role, shape):
    """The role's value as ``u * scale + offset``."""
    if role in ('conv_weight', 'linear_weight'):
        return math.sqrt(12.0) * math.sqrt(2.0 / math.prod(shape[1:])), 0.0
    # bn_var = 1 + 0.4 * (u + 0.5); the ViT roles: LayerNorm, learnt tokens (cls, pos_embed, registers,
    # mask), DINOv2's LayerScale
    return {'bias': (0.1, 0.0), 'bn_weight': (0.2, 1.0), 'bn_bias': (0.2, 0.0), 'bn_mean': (0.2, 0.0),
            'bn_var': (0.4, 1.2), 'norm_weight': (0.2, 1.0), 'norm_bias': (0.2, 0.0), 'token': (0.2, 0.0),
            'layer_scale': (0.2, 0.5)}[role]


# Filled in cache-sized chunks, below torch's multi-threading threshold: three times faster than
# whole tensors, which matters for the 375M weights of the ResNet-50x4.
_CHUNK = 1 << 15


def fill(key, shape, role):
    """The float32 tensor the fill rule gives for one manifest row."""
    if role == 'bn_count':
        return torch.zeros(shape, dtype=torch.int64)
    scale, offset = _scale_offset(role, shape)
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        out[start:stop] = uniform(key, stop, start).mul_(scale).add_(offset)
    return out.reshape(shape)


def filled_state_dict(rows, strip_prefix=SIMREG_WRAPPERS):
    """State dict with the manifest's own keys; each value hashed from its key minus a wrapper prefix."""
    state = OrderedDict()
    for key, shape, role in rows:
        hashed = next((key[len(p):] for p in strip_prefix if key.startswith(p)), key)
        state[key] = fill(hashed, shape, role)
    return state


def fixture_input(name):
    """The deterministic input of a reference model: ``u(input_key) * 4`` in its input shape."""
    ref = reference_model(name)
    return (uniform(ref['input_key'], math.prod(ref['input_shape'])) * 4.0).float().reshape(ref['input_shape'])


@functools.lru_cache(maxsize=None)
def _npz(filename):
    """Every array of one fixtures npz, read once."""
    with np.load(os.path.join(FIXTURES, filename)) as data:
        return {k: data[k] for k in data.files}


def _outputs():
    return _npz('reference_outputs.npz')


def reference_output(name):
    """What the original model computed for ``fixture_input(name)``."""
    return torch.from_numpy(_outputs()[name])


def assert_close_to_reference(out, name, tolerance=TOLERANCE):
    """``max|out - ref| <= tolerance * max|ref|``, the fixtures' parity criterion."""
    ref = reference_output(name)
    assert tuple(out.shape) == tuple(ref.shape), f'{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}'
    err = (out.detach().float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tolerance * scale, f'{name}: max abs error {err:.3g} > {tolerance} * {scale:.3g}'


@torch.no_grad()
def run_reference(model, name):
    """The model's output on the fixture input (model put in eval mode)."""
    return model.eval()(fixture_input(name))


_ORIGINAL_RUNS = {'resnet50_to_resnet18': dict(arch_student='resnet18', use_cache=False),
                  'resnet50_to_mobilenet_cached': dict(arch_student='mobilenet', use_cache=True)}


def original_simreg_checkpoint(name, **opt):
    """A checkpoint as the original main.py saved it, for a layout of reference_simreg_checkpoints.json:
    ``{'opt': argparse.Namespace, 'state_dict', 'optimizer', 'epoch'}``; ``opt`` overrides flags."""
    flags = dict(data='/data/imagenet', dataset='imagenet', base_dir='./', exp='./outputs', debug=False,
                 print_freq=100, save_freq=10, batch_size=256, num_workers=24, epochs=130, learning_rate=0.05,
                 weight_decay=1e-4, sgd_momentum=0.9, arch_teacher='resnet50', n_mlp_layers=4, linear_pred=False,
                 teacher_fc=False, single_aug=False, weak_strong=False, weak_weak=False, mse_nonorm=False,
                 weights=None, teacher_weights='moco_v2_800ep_pretrain.pth.tar', teacher_feats=None, resume='',
                 restart=False, ckpt_dir='exp/outputs/checkpoints', logs_dir='exp/outputs/logs', start_epoch=1)
    flags.update(_ORIGINAL_RUNS[name], **opt)
    state = filled_state_dict(manifest(name))
    n_params = sum(1 for k in state if 'running_' not in k and 'num_batches' not in k and 'encoder_t' not in k)
    optimizer = {'state': {}, 'param_groups': [{'lr': 0.05, 'momentum': 0.9, 'dampening': 0, 'weight_decay': 1e-4,
                                                'nesterov': False, 'params': list(range(n_params))}]}
    return {'opt': argparse.Namespace(**flags), 'state_dict': state, 'optimizer': optimizer, 'epoch': 130}


# --- the ViT fixtures (tests/fixtures/vit_*, recorded by tests/fixtures/record_vit_references.py from each
# release's own code: DINO, DINOv2, MoCo v3, DeiT) -----------------------------------------------------

def vit_reference(name):
    """``{release, project_arch, image_size, input_key, input_shape, output_shape, manifest, ...}``."""
    return _json('vit_reference_models.json')[name]


def vit_reference_names():
    return list(_json('vit_reference_models.json'))


def _vit_outputs():
    return _npz('vit_reference_outputs.npz')


def vit_reference_output(name):
    """What the release's backbone computed for ``vit_input(name)`` (float32 of a float64 run)."""
    return torch.from_numpy(_vit_outputs()[name])


def vit_state_dict(name):
    """The release backbone's state dict, keys as its code names them, filled by the rule; role ``fixed``
    rows (MoCo v3's sin-cos table) are the values the release's model held, stored in the npz."""
    state = OrderedDict()
    for key, shape, role in vit_reference(name)['manifest']:
        state[key] = (torch.from_numpy(_vit_outputs()[f'{name}/{key}']).float() if role == 'fixed'
                      else fill(key, shape, role))
    return state


def vit_input(name):
    ref = vit_reference(name)
    return (uniform(ref['input_key'], math.prod(ref['input_shape'])) * 4.0).float().reshape(ref['input_shape'])


def relative_error(out, ref):
    """``||out - ref|| / ||ref||``, the ViT fixtures' parity measure."""
    return ((out.detach().double() - ref.double()).norm() / ref.double().norm()).item()
