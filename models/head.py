"""The regression head, shared by training and evaluation. Its module indices are those of the SimReg release
code's ``mlp_arch.py``, whose checkpoints (``predict_q.module.<i>.*``) thus load unchanged."""
import torch.nn as nn

from utils.errors import SimRegError


def build_head(in_dim, out_dim, n_mlp_layers=4, linear_pred=False, dense=False):
    """Regressor from the student feature (``in_dim``, d) to the teacher feature (``out_dim``, D). n_mlp_layers=4
    (paper default): Linear(d,2d) BN ReLU Linear(2d,d) Linear(d,2d) BN ReLU Linear(2d,D); n_mlp_layers=2:
    Linear(d,2d) Linear(2d,D); linear_pred: BN(d) Linear(d,D). ``dense``: the same per location of a (B, d, h, w)
    map, 1x1 convolutions and BatchNorm2d in place of Linear and BatchNorm1d (the dense head)."""
    linear, norm = (lambda i, o: nn.Conv2d(i, o, 1), nn.BatchNorm2d) if dense else (nn.Linear, nn.BatchNorm1d)
    if linear_pred:
        return nn.Sequential(norm(in_dim), linear(in_dim, out_dim))
    if n_mlp_layers == 4:
        return nn.Sequential(
            linear(in_dim, 2 * in_dim), norm(2 * in_dim), nn.ReLU(inplace=True),
            linear(2 * in_dim, in_dim),
            linear(in_dim, 2 * in_dim), norm(2 * in_dim), nn.ReLU(inplace=True),
            linear(2 * in_dim, out_dim),
        )
    if n_mlp_layers == 2:
        return nn.Sequential(linear(in_dim, 2 * in_dim), linear(2 * in_dim, out_dim))
    raise SimRegError(f'--n_mlp_layers {n_mlp_layers} is not supported: use 2 or 4 (or --linear_pred)')
