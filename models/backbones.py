"""Backbones that return the pooled feature, with torchvision's key names.

Torchvision provides every ResNet and MobileNet-v2; only what it lacks is written by
hand (TensorFlow SAME padding for BYOL, the SimCLR wide ResNets). Each backbone carries
``feat_dim``, the size of the feature its ``forward`` returns.
"""
import torch.nn as nn
import torchvision.models as tvm

from models.vit import VIT_ARCHS, VIT_STUDENTS, VIT_TEACHERS, build_vit
from utils.errors import SimRegError

TORCHVISION_RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
                       'resnext50_32x4d', 'resnext101_32x8d', 'wide_resnet50_2', 'wide_resnet101_2')
STUDENT_ARCHS = TORCHVISION_RESNETS + ('mobilenet',)
TEACHER_ARCHS = TORCHVISION_RESNETS + ('sup_resnet50', 'byol_resnet50', 'resnet50x1', 'resnet50x2',
                                       'resnet50x4')


def _torchvision_resnet(name):
    model = getattr(tvm, name)(weights=None)
    model.feat_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def _mobilenet_v2():
    model = tvm.mobilenet_v2(weights=None)
    model.feat_dim = model.last_channel
    model.classifier = nn.Identity()
    return model


def build_backbone(arch, image_size=None):
    """The network for an original arch name, classifier removed (``fc``/``classifier`` = Identity).
    ``image_size``: a student's training size, which only the ViTs need (models/vit.py)."""
    if arch in VIT_ARCHS:
        return build_vit(arch, image_size)
    if arch in TORCHVISION_RESNETS:
        return _torchvision_resnet(arch)
    if arch == 'sup_resnet50':
        return _torchvision_resnet('resnet50')
    if arch == 'mobilenet':
        return _mobilenet_v2()
    if arch == 'byol_resnet50':
        from models.tf_resnet import byol_resnet50
        return byol_resnet50()
    if arch in ('resnet50x1', 'resnet50x2', 'resnet50x4'):
        from models.tf_resnet import simclr_resnet50
        return simclr_resnet50(width=int(arch[-1]))
    raise SimRegError(f"unknown architecture '{arch}': choose one of {', '.join(STUDENT_ARCHS + TEACHER_ARCHS[len(TORCHVISION_RESNETS):])}")


def classifier_attr(model):
    """Name of the (removed) classifier attribute: ``fc`` for ResNets, ``classifier`` for MobileNet."""
    return 'classifier' if isinstance(model, tvm.MobileNetV2) else 'fc'


def set_projection(model, fc):
    """Put a pretrained projection/classifier (``--teacher_fc``) back on top of the pooled feature."""
    setattr(model, classifier_attr(model), fc)
    model.feat_dim = fc.out_features
    return model


# timm's ViTs: the released ViT teachers and the ViT students (models/vit.py)
STUDENT_ARCHS += tuple(VIT_STUDENTS)
TEACHER_ARCHS += tuple(VIT_TEACHERS)
