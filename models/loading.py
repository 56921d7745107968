"""Every checkpoint a user brings, loaded strictly into this project's backbones: the layout is recognised from the
keys (``LAYOUTS``), the other groups it is known to hold are dropped by name, and the rest must fit the backbone
exactly, or a one-line SimRegError names the keys and the guessed layout."""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from models import dinov3, vit
from models.backbones import OPENCLIP, build_backbone, classifier_attr, set_projection
from models.presets import PRESETS, preset_named, resolve_weights
from models.tf_resnet import tf_to_torchvision
from utils.checkpoint import read_checkpoint
from utils.errors import SimRegError


@dataclass(frozen=True)
class Layout:
    """Where a kind of checkpoint keeps the backbone, and what else it is known to hold."""
    name: str
    containers: tuple  # top-level key holding the state dict (None: the file is the state dict)
    prefix: str  # the backbone's keys start with this
    heads: tuple = ()  # projection heads outside the backbone; one inside is the backbone's classifier
    drop: tuple = ()  # other known groups, never loaded
    marker: str = ''  # key prefix that identifies the layout when ``prefix`` alone does not
    tf_names: bool = False  # TensorFlow conv2d_N / batch_normalization_N names, mapped to torchvision's
    vit: str = ''  # the release of a ViT file: how it resizes its position embedding (models.vit.RESIZE)


_ANY = (None, 'state_dict', 'model')
# Tried in order: the first layout whose container and key prefix fit the file is the guess.
LAYOUTS = (
    Layout('SimReg (original code)', ('state_dict',), 'encoder_q.module.',
           drop=('predict_q.module.', 'encoder_t.module.')),
    Layout('SimReg', ('state_dict',), 'encoder_q.', drop=('predict_q.', 'dense_q.')),
    Layout('MoCo v1/v2', ('state_dict',), 'module.encoder_q.',
           drop=('module.encoder_k.', 'module.queue', 'module.queue_ptr')),
    Layout('MoCo v3', ('state_dict',), 'module.base_encoder.', drop=('module.momentum_encoder.', 'module.predictor.'),
           vit='MoCo v3'),  # a ViT's projector is its ``head``, the backbone's classifier slot
    Layout('DINO full checkpoint', ('teacher',), 'module.backbone.', heads=('module.head.',)),
    # DINO wraps its teacher in DDP only when it has BatchNorms: a ViT teacher's keys have no ``module.``
    Layout('DINO full checkpoint (ViT)', ('teacher',), 'backbone.', heads=('head.',), vit='DINO'),
    Layout('DeiT', ('model',), '', marker='cls_token', vit='DeiT'),
    # DINOv3's hub files (models.dinov3): mask_token only masks in training (eval adds 0 * mask_token), local_cls_norm
    # only norms local crops in training; the ConvNeXt's norms.3 is its norm again, checked in models.dinov3
    Layout('DINOv3 ViT', (None,), '', marker='storage_tokens', drop=('mask_token', 'local_cls_norm.')),
    Layout('DINOv3 ConvNeXt', (None,), '', marker='downsample_layers.'),
    Layout('DINOv2 with registers', (None,), '', marker='register_tokens', vit='DINOv2 registers'),
    Layout('DINOv2', (None,), '', marker='mask_token', vit='DINOv2'),
    Layout('DINO ViT backbone', (None,), '', marker='cls_token', vit='DINO'),
    Layout('Barlow Twins / VICReg full checkpoint', ('model',), 'module.backbone.', heads=('module.projector.',),
           drop=('module.bn.',)),
    Layout('SwAV / DataParallel', _ANY, 'module.', heads=('module.projection_head.',), drop=('module.prototypes.',)),
    Layout('SimCLR ResNet-50 (TensorFlow names)', _ANY, '', marker='conv2d.', tf_names=True),
    Layout('torchvision', _ANY, ''),
)


def detect_layout(ckpt, path):
    """(layout, state dict) of a loaded checkpoint, from its top-level keys and key prefixes."""
    container, state = _state_dict(ckpt, path)
    for layout in LAYOUTS:
        if container in layout.containers and any(k.startswith(layout.marker or layout.prefix) for k in state):
            return layout, state
    raise SimRegError(f'{path}: no known checkpoint layout has its weights under "{container}" with keys '
                      f'like {key_list(list(state))}: see the accepted layouts in the README')


def _state_dict(ckpt, path):
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return None, ckpt
    for key in ('state_dict', 'model', 'teacher'):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return key, ckpt[key]
    found = f'top-level keys {key_list(list(ckpt))}' if isinstance(ckpt, dict) else f'a {type(ckpt).__name__}'
    raise SimRegError(f'{path} holds no state dict ({found}): expected a bare state dict or one under '
                      f'"state_dict", "model" or "teacher"')


def split_backbone(layout, state, classifier='fc'):
    """(backbone under the model's key names, projection head under the file's keys); unknown keys stay in
    the backbone, for the strict load to name."""
    inner_head = layout.prefix + classifier + '.'
    backbone, head = {}, {}
    for key, value in state.items():
        if key.startswith(layout.drop):
            continue
        if key.startswith((*layout.heads, inner_head)):
            head[key] = value
        else:
            name = key.removeprefix(layout.prefix)
            backbone[tf_to_torchvision(name) if layout.tf_names else name] = value
    return backbone, head


def load_strict(module, state_dict, what, layout):
    """load_state_dict(strict=True) whose error names the missing/unexpected keys and the layout; a module on
    the meta device takes the file's tensors (cast to its dtypes)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}' for k in own
                   if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    parts = [f'{name} {key_list(keys)}' for name, keys in
             (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong_shape)) if keys]
    if parts:
        raise SimRegError(f'{what} does not fit (layout guessed: {layout}): ' + '; '.join(parts)
                          + ': check --arch / the weights file')
    on_meta = any(t.is_meta for t in own.values())
    state_dict = OrderedDict((k, v.to(own[k].dtype) if on_meta else v) for k, v in state_dict.items())
    # the module's own state-dict versions: a renamed copy has none, and torchvision's MNASNet needs them
    state_dict._metadata = own._metadata
    module.load_state_dict(state_dict, strict=True, assign=on_meta)
    return module


def key_list(keys, limit=6):
    """'3 keys [a, b, c]', for error lines."""
    shown = ', '.join(keys[:limit])
    return f'{len(keys)} key{"s" if len(keys) != 1 else ""} [{shown}{", ..." if len(keys) > limit else ""}]'


def unloaded(build, *args):
    """``build(*args)`` on the meta device: every weight comes from the file, none is initialised."""
    with torch.device('meta'):
        return build(*args)


def load_backbone(arch, path, keep_fc=False):
    """Backbone ``arch`` with the weights ``path`` (a file or a preset name), in eval mode. ``keep_fc``
    (``--teacher_fc``) keeps the file's plain-Linear projection on top: ``feat_dim`` is then its output."""
    if arch.startswith(OPENCLIP):  # the whole CLIP model's state dict; imported here: models.openclip imports this
        from models.openclip import load_image_tower
        return load_image_tower(arch, path)
    preset = preset_named(path)
    if preset and arch not in PRESETS[preset].archs:
        raise SimRegError(f'preset {preset} is a {PRESETS[preset].arch_name}, not {arch}: '
                          f'use --arch_teacher {PRESETS[preset].archs[0]}')
    path = resolve_weights(path)
    layout, state = detect_layout(read_checkpoint(path), path)
    model = unloaded(build_backbone, arch)
    is_vit = arch in vit.VIT_ARCHS
    classifier = classifier_attr(model)
    backbone, head = split_backbone(layout, state, classifier)
    if arch in dinov3.DINOV3_ARCHS or layout.name in dinov3.LAYOUT_ARCHS:
        backbone = dinov3.timm_state(backbone, layout.name, arch, model, f'{path} as {arch}')
    if is_vit and layout.vit:
        backbone = vit.timm_state(backbone, layout.vit, arch)
        model.release = layout.vit  # the file, not the arch, says how to resize the position embedding
    if keep_fc:
        linear = _plain_linear(head, layout.prefix + classifier + '.', layout, path)
        set_projection(model, unloaded(nn.Linear, *reversed(linear['weight'].shape)))  # (out, in) -> Linear(in, out)
        backbone.update({f'{classifier}.{k}': v for k, v in linear.items()})
    # converted BYOL and old torchvision files lack BN counters, which only matter in training
    for key in [k for k in model.state_dict() if k.endswith('num_batches_tracked')]:
        backbone.setdefault(key, torch.zeros((), dtype=torch.long))
    load_strict(model, backbone, f'{path} as {arch}', layout.name)
    if is_vit and model.release == 'MoCo v3':
        vit.check_sincos(model, f'{path} as {arch}')
    return model.eval()


def _plain_linear(head, inner_head, layout, path):
    """The ``weight``/``bias`` of a head that is a single Linear, or an error that says what it is instead."""
    keys = sorted(head)
    if keys == [inner_head + 'bias', inner_head + 'weight'] and head[inner_head + 'weight'].ndim == 2:
        return {'weight': head[inner_head + 'weight'], 'bias': head[inner_head + 'bias']}
    found = f'a multi-layer projection head ({key_list(keys)})' if keys else 'no projection head'
    raise SimRegError(f'--teacher_fc puts the checkpoint\'s plain Linear projection on the teacher, but {path} '
                      f'({layout.name}) has {found}: drop --teacher_fc')
