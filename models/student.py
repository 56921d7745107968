"""Student checkpoints (this project's and the SimReg release's), read back into backbone + head."""
import argparse
import re

from models.backbones import build_backbone
from models.head import build_head
from models.loading import key_list, load_strict, unloaded
from utils.checkpoint import read_checkpoint
from utils.errors import SimRegError


def student_checkpoint(ckpt, path):
    """(training arguments as a dict, ``encoder_q.*``/``predict_q.*`` state) of this project's checkpoint
    (``args``) or the SimReg release's (``opt``; its ``.module`` wrappers and teacher ``encoder_t`` dropped)."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get('state_dict'), dict):
        if isinstance(ckpt.get('args'), dict):
            return ckpt['args'], ckpt['state_dict']
        if isinstance(ckpt.get('opt'), argparse.Namespace):
            state = {re.sub(r'^(encoder_q|predict_q)\.module\.', r'\1.', k): v for k, v in ckpt['state_dict'].items()
                     if not k.startswith('encoder_t.module.')}
            return vars(ckpt['opt']), state
    raise SimRegError(f'{path} is not a SimReg student checkpoint (no training arguments "args" or "opt"): '
                      f'pass a file written by train_student.py or by the original main.py')


def student_heads(state):
    """Head names of a several-teacher student (``predict_q.<name>.*``, in training order); [] for one head."""
    return list(dict.fromkeys(k.split('.')[1] for k in state
                              if k.startswith('predict_q.') and not k.split('.')[1].isdigit()))


def select_head(state, head, source):
    """The state dict with one head as ``predict_q.*``: the only one, or the one named ``head``."""
    names = student_heads(state)
    if not names:
        if head is not None:
            raise SimRegError(f'{source} has a single regression head: drop --head {head}')
        return state
    if head not in names:
        raise SimRegError(f'{source} has one head per teacher ({", ".join(names)}): pass --head with one of them'
                          + (f', not {head}' if head is not None else ''))
    prefix = f'predict_q.{head}.'
    return {**{k: v for k, v in state.items() if k.startswith('encoder_q.')},
            **{'predict_q.' + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}}


def load_student(path, arch=None, head=None, backbone_only=False):
    """(backbone, head) of a student checkpoint, loaded strictly (its dense heads dropped), in eval mode. ``arch``, when
    given, must match the file; ``head`` picks a several-teacher student's head (with ``backbone_only``, the first
    if not named)."""
    args, state = student_checkpoint(read_checkpoint(path), path)
    if backbone_only and head is None:
        head = next(iter(student_heads(state)), None)
    state = {k: v for k, v in select_head(state, head, path).items() if not k.startswith('dense_q.')}  # training only
    arch_student = args['arch_student']
    if arch is not None and arch != arch_student:
        raise SimRegError(f'{path} holds a {arch_student} student, not {arch}: pass --arch {arch_student}')
    unexpected = [k for k in state if not k.startswith(('encoder_q.', 'predict_q.'))]
    if unexpected:
        raise SimRegError(f'{path} has keys outside encoder_q./predict_q.: {key_list(unexpected)}')
    backbone_state, head_state = ({k[len(p):]: v for k, v in state.items() if k.startswith(p)}
                                  for p in ('encoder_q.', 'predict_q.'))
    linears = [k for k, v in head_state.items() if k.split('.')[0].isdigit() and k.endswith('weight') and v.ndim == 2]
    if not linears:
        raise SimRegError(f'{path} has no regression head (predict_q.*): it is not a SimReg student')
    out_dim = head_state[max(linears, key=lambda k: int(k.split('.')[0]))].shape[0]
    # image_size: the training size, which sizes a ViT student's position embedding
    backbone = unloaded(build_backbone, arch_student, args.get('image_size') or 224)
    head = unloaded(build_head, backbone.feat_dim, out_dim, args.get('n_mlp_layers', 4), args.get('linear_pred', False))
    load_strict(backbone, backbone_state, f'{path} student backbone ({arch_student})', 'SimReg')
    load_strict(head, head_state, f'{path} regression head', 'SimReg')
    return backbone.eval(), head.eval()
