"""The regression head: the one definition shared by training and evaluation.

Module indices follow the original ``mlp_arch.py`` so that original checkpoints
(``predict_q.module.<i>.*``) load unchanged.
"""
import torch.nn as nn

from utils.errors import SimRegError


def build_head(in_dim, out_dim, n_mlp_layers=4, linear_pred=False):
    """Regressor from the student feature (``in_dim``) to the teacher feature (``out_dim``).

    n_mlp_layers=4 (paper default): Linear(d,2d) BN ReLU Linear(2d,d) Linear(d,2d) BN ReLU Linear(2d,D);
    there is no BN/ReLU after the second Linear, as in the original.
    n_mlp_layers=2: Linear(d,2d) Linear(2d,D), with nothing in between, as the original builds it.
    linear_pred: BN(d) Linear(d,D) (the original crashes on an undefined ``proj_dim`` here).
    """
    if linear_pred:
        return nn.Sequential(nn.BatchNorm1d(in_dim), nn.Linear(in_dim, out_dim))
    if n_mlp_layers == 4:
        return nn.Sequential(
            nn.Linear(in_dim, 2 * in_dim), nn.BatchNorm1d(2 * in_dim), nn.ReLU(inplace=True),
            nn.Linear(2 * in_dim, in_dim),
            nn.Linear(in_dim, 2 * in_dim), nn.BatchNorm1d(2 * in_dim), nn.ReLU(inplace=True),
            nn.Linear(2 * in_dim, out_dim),
        )
    if n_mlp_layers == 2:
        return nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.Linear(2 * in_dim, out_dim))
    raise SimRegError(f'--n_mlp_layers {n_mlp_layers} is not supported: use 2 or 4 (or --linear_pred)')
