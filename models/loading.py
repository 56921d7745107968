"""Checkpoint reading and strict loading (minimal first version: torchvision/MoCo layouts and
this project's own checkpoints)."""
import argparse
import os
import pickle
import zipfile

import torch

from models.backbones import build_backbone, set_projection
from models.head import build_head
from utils.errors import SimRegError


def read_checkpoint(path):
    """torch.load with weights_only=True (argparse.Namespace allowed for original SimReg files)."""
    if not os.path.isfile(path):
        raise SimRegError(f'checkpoint {path} does not exist: check the path')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SimRegError(f'refusing to load {path}: it holds objects other than tensors and plain '
                          f'data ({str(exc).splitlines()[0]})') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise SimRegError(f'cannot read checkpoint {path} ({str(exc).splitlines()[0]}): the file is '
                          f'truncated or not a PyTorch checkpoint; download or copy it again') from None


def _unwrap(ckpt):
    for key in ('state_dict', 'model'):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def load_strict(module, state_dict, what, layout):
    """load_state_dict(strict=True) whose error names the missing/unexpected keys and the layout."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f'missing {_names(missing)}')
        if unexpected:
            parts.append(f'unexpected {_names(unexpected)}')
        if wrong_shape:
            parts.append('wrong shape ' + _names([f'{k} {tuple(state_dict[k].shape)} vs '
                                                  f'{tuple(own[k].shape)}' for k in wrong_shape]))
        raise SimRegError(f'{what} does not fit (layout guessed: {layout}): ' + '; '.join(parts)
                          + ': check --arch / the weights file')
    module.load_state_dict(state_dict, strict=True)
    return module


def _names(keys, limit=6):
    shown = ', '.join(keys[:limit])
    return f'{len(keys)} keys [{shown}{", ..." if len(keys) > limit else ""}]'


def load_backbone(arch, path, keep_fc=False):
    """Backbone of ``arch`` with the weights in ``path``, in eval mode; ``keep_fc`` keeps a plain
    Linear ``fc`` from the file (``--teacher_fc``)."""
    state = _unwrap(read_checkpoint(path))
    for prefix in ('module.encoder_q.', 'encoder_q.module.', 'encoder_q.', 'module.'):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    model = build_backbone(arch)
    fc = {k[3:]: v for k, v in state.items() if k.startswith('fc.')}
    state = {k: v for k, v in state.items() if not k.startswith('fc.')}
    if keep_fc:
        if set(fc) != {'weight', 'bias'} or fc['weight'].ndim != 2:
            raise SimRegError(f'--teacher_fc needs a single Linear fc in {path}, found fc keys '
                              f'{sorted(fc) or "none"}')
        load_strict(model, state, f'{path} for {arch}', 'torchvision')
        linear = torch.nn.Linear(fc['weight'].shape[1], fc['weight'].shape[0])
        linear.load_state_dict(fc)
        set_projection(model, linear)
    else:
        load_strict(model, state, f'{path} for {arch}', 'torchvision')
    return model.eval()


def student_from_state(state, arch, n_mlp_layers=4, linear_pred=False):
    """Build backbone + head from an ``encoder_q.*`` / ``predict_q.*`` state dict and load it strictly."""
    backbone = build_backbone(arch)
    head_state = {k[len('predict_q.'):]: v for k, v in state.items() if k.startswith('predict_q.')}
    last = max((k for k in head_state if k.endswith('weight') and head_state[k].ndim == 2),
               key=lambda k: int(k.split('.')[0]))
    head = build_head(backbone.feat_dim, head_state[last].shape[0], n_mlp_layers, linear_pred)
    load_strict(backbone, {k[len('encoder_q.'):]: v for k, v in state.items()
                           if k.startswith('encoder_q.')}, f'student backbone ({arch})', 'simreg')
    load_strict(head, head_state, 'regression head', 'simreg')
    return backbone, head


def load_student(path):
    """(backbone, head) of a student checkpoint written by train_student.py, both in eval mode."""
    ckpt = read_checkpoint(path)
    args = ckpt.get('args') or {}
    if not args:
        raise SimRegError(f'{path} is not a SimReg student checkpoint (no args)')
    backbone, head = student_from_state(ckpt['state_dict'], args['arch_student'],
                                        args['n_mlp_layers'], args['linear_pred'])
    return backbone.eval(), head.eval()
