"""SimReg: the trained student (backbone + regression head), the frozen teacher, the loss."""
import torch
import torch.nn as nn
import torch.nn.functional as F

# --precision: the autocast dtype of each choice (fp32: autocast off)
AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class SimReg(nn.Module):
    """Student backbone ``encoder_q`` followed by the regression head ``predict_q``.

    Only these two are trained and stored, under the original's names, so that
    checkpoints keep the ``encoder_q.*`` / ``predict_q.*`` layout. With several teachers,
    ``predict_q`` is a ModuleDict of one head per teacher (``predict_q.<teacher>.*``) and the
    forward returns a dict of predictions. Teachers live outside this module: they are frozen
    and never part of DDP or the optimizer.
    """

    def __init__(self, encoder_q, predict_q):
        super().__init__()
        self.encoder_q = encoder_q
        self.predict_q = predict_q

    def forward(self, images):
        features = self.encoder_q(images)
        if isinstance(self.predict_q, nn.ModuleDict):
            return {name: head(features) for name, head in self.predict_q.items()}
        return self.predict_q(features)


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


class LiveTeacher:
    """A frozen network run on the teacher's view of each batch."""

    needs_view = True
    views = None

    def __init__(self, network, info):
        self.network = freeze(network)
        self.feat_dim = network.feat_dim
        self.info = info

    def to(self, device, memory_format=torch.contiguous_format):
        self.network.to(device, memory_format=memory_format)
        return self

    def targets(self, indices, view, amp_dtype):
        with torch.inference_mode(), torch.autocast(view.device.type, dtype=amp_dtype,
                                                    enabled=amp_dtype is not None):
            features = self.network(view)
        # cloned outside inference mode: an inference tensor cannot be saved for the loss's backward
        return features.clone()


class CachedTeacher:
    """Teacher features read from a ``data.teacher_cache`` by sample index, or by (sample index, view)
    for a multi-view cache, whose stored ``views`` the student replays; no network, no view."""

    needs_view = False

    def __init__(self, cache, info):
        self.cache = cache
        self.feat_dim = cache.feat_dim
        self.info = info
        self.views = cache.views
        self.device = torch.device('cpu')

    def to(self, device, memory_format=None):
        self.device = device
        return self

    def targets(self, indices, view, amp_dtype):
        return self.cache.rows(indices, pin_memory=self.device.type == 'cuda').to(self.device, non_blocking=True)
