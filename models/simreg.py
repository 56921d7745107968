"""SimReg: the trained student (backbone + regression head) and the autocast dtype (teachers:
``models.teachers``)."""
import torch
import torch.nn as nn

# --precision: the autocast dtype of each choice (fp32: autocast off)
AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def default_precision(device):
    """--precision when not given: bf16 on GPUs that compute it natively (compute capability 8.0+), fp16 with the
    grad scaler on older GPUs (V100, RTX 20xx: bf16 only emulated), fp32 on CPUs."""
    if device.type != 'cuda':
        return 'fp32'
    return 'bf16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'fp16'


class SimReg(nn.Module):
    """Student backbone ``encoder_q`` and regression head ``predict_q`` (SimReg's names, so its checkpoint keys). With
    several teachers ``predict_q`` is a ModuleDict of one head per teacher and the forward returns a dict. The frozen
    teachers stay outside: never part of DDP or the optimizer."""

    def __init__(self, encoder_q, predict_q):
        super().__init__()
        self.encoder_q = encoder_q
        self.predict_q = predict_q

    def forward(self, images):
        features = self.encoder_q(images)
        if isinstance(self.predict_q, nn.ModuleDict):
            return {name: head(features) for name, head in self.predict_q.items()}
        return self.predict_q(features)


def in_float64(model, teachers):
    """--precision fp64: the student and the live teachers compute in float64, their float32 input cast on entry
    (the student's backbone casts it, for the online k-NN too)."""
    model.double()
    for network in [model.encoder_q] + [t.network for t in teachers.values() if t.needs_view]:
        network.double().register_forward_pre_hook(_inputs_to_float64)


def _inputs_to_float64(module, inputs):
    return (inputs[0].double(), *inputs[1:])


def freeze(teacher):
    """Eval mode and no gradients: the teacher is a fixed function of its input."""
    return teacher.eval().requires_grad_(False)
