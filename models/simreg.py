"""SimReg: the trained student (backbone + regression head), the frozen teacher, the loss."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SimReg(nn.Module):
    """Student backbone ``encoder_q`` followed by the regression head ``predict_q``.

    Only these two are trained and stored, under the original's names, so that
    checkpoints keep the ``encoder_q.*`` / ``predict_q.*`` layout. The teacher lives
    outside this module: it is frozen and never part of DDP or the optimizer.
    """

    def __init__(self, encoder_q, predict_q):
        super().__init__()
        self.encoder_q = encoder_q
        self.predict_q = predict_q

    def forward(self, images):
        return self.predict_q(self.encoder_q(images))


def freeze(teacher):
    """Eval mode and no gradients: the teacher is a fixed function of its input."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def regression_loss(prediction, target, mse_nonorm=False):
    """Mean over the batch of ``2 - 2 cos(prediction, target)``, the MSE of unit vectors.

    ``mse_nonorm`` regresses the raw (un-normalised) vectors with a summed squared error,
    as the original's flag help says; the original normalised both sides first, which made
    the flag a no-op (see README).
    """
    prediction, target = prediction.float(), target.float()
    if mse_nonorm:
        return ((prediction - target) ** 2).sum(dim=1).mean()
    cos = (F.normalize(prediction, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
    return (2 - 2 * cos).mean()


@torch.no_grad()
def cosine_to_target(prediction, target):
    """Per-sample cosine between head output and teacher feature (how well the student imitates)."""
    return F.cosine_similarity(prediction.float(), target.float(), dim=1)
