"""The ResNets of the TensorFlow releases (BYOL's, SimCLR v1's x1/x2/x4), built from torchvision's so that the keys
match, and SimCLR's TensorFlow key names mapped to torchvision's (``tf_to_torchvision``)."""
import math
import re

import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models.resnet import Bottleneck, ResNet


def pad_same(x, kernel, stride, dilation=(1, 1), value=0.0):
    """Pad an NCHW tensor so that a padding-0 window op gives TensorFlow's ``SAME`` output, which depends on the
    input size and puts the odd pixel after."""
    pad = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pad = [total // 2, total - total // 2] + pad  # F.pad lists the last dimension first
    return F.pad(x, pad, value=value)


class Conv2dSame(nn.Conv2d):
    """Conv2d (built with padding 0) preceded by ``SAME`` padding for the actual input size."""

    def forward(self, x):
        return super().forward(pad_same(x, self.kernel_size, self.stride, self.dilation))


class MaxPool2dSame(nn.MaxPool2d):
    """MaxPool2d (int kernel and stride, padding 0) with ``SAME`` padding; padded cells never win, as in TensorFlow."""

    def forward(self, x):
        kernel, stride = (self.kernel_size,) * 2, (self.stride,) * 2
        return super().forward(pad_same(x, kernel, stride, value=float('-inf')))


def byol_resnet50():
    """torchvision ResNet-50 (same keys) with ``SAME`` padding at every conv and at the max-pool."""
    model = tvm.resnet50(weights=None)
    for parent in list(model.modules()):
        for name, conv in parent.named_children():
            if type(conv) is nn.Conv2d:
                same = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
                setattr(parent, name, same)
    model.maxpool = MaxPool2dSame(3, 2)
    model.feat_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def simclr_resnet50(width=1):
    """SimCLR v1 ResNet-50 x ``width``: stem ``64w``, stages ``64w..512w``, output ``2048w``; stride on the
    3x3 conv (torchvision V1.5), as in the release."""
    model = ResNet(Bottleneck, [3, 4, 6, 3])
    if width != 1:
        model.inplanes = 64 * width
        model.conv1 = nn.Conv2d(3, 64 * width, kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(64 * width)
        for i, blocks in enumerate([3, 4, 6, 3]):
            layer = model._make_layer(Bottleneck, 64 * 2 ** i * width, blocks, stride=1 if i == 0 else 2)
            setattr(model, f'layer{i + 1}', layer)
    model.feat_dim = 2048 * width
    model.fc = nn.Identity()
    return model


def _tf_resnet50_names():
    """torchvision (conv, bn) names of a ResNet-50 in TensorFlow graph order: the stem, then per block the
    shortcut projection (if any) and the three convs."""
    pairs = [('conv1', 'bn1')]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            name = f'layer{stage}.{block}.'
            if block == 0:
                pairs.append((name + 'downsample.0', name + 'downsample.1'))
            pairs += [(f'{name}conv{i}', f'{name}bn{i}') for i in (1, 2, 3)]
    return pairs


_TF_NAMES = _tf_resnet50_names()
_TF_KEY = re.compile(r'(conv2d|batch_normalization)(?:_(\d+))?\.(\w+)')


def tf_to_torchvision(key):
    """``conv2d_5.weight`` -> ``layer1.1.conv1.weight``; other keys (``fc.*``) unchanged."""
    match = _TF_KEY.fullmatch(key)
    if not match or int(match.group(2) or 0) >= len(_TF_NAMES):
        return key
    conv, bn = _TF_NAMES[int(match.group(2) or 0)]
    return f'{conv if match.group(1) == "conv2d" else bn}.{match.group(3)}'
