"""Backbones that return the pooled feature, with torchvision's (or timm's) key names. A torchvision classification
model whose logits come from one final Linear is a student: only that Linear becomes ``nn.Identity``, so an export
loads into ``torchvision.models.<name>()``. Each carries ``feat_dim`` and ``classifier_path`` (the removed Linear)."""
import timm
import torch
import torch.nn as nn
import torchvision.models as tvm

from models.dinov3 import DINOV3_ARCHS, build_dinov3
from models.tf_resnet import byol_resnet50, simclr_resnet50
from models.vit import VIT_ARCHS, VIT_STUDENTS, VIT_TEACHERS, build_vit
from utils.errors import SimRegError

TORCHVISION_RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
                       'resnext50_32x4d', 'resnext101_32x8d', 'wide_resnet50_2', 'wide_resnet101_2')

# torchvision family (the module of a model's builder) -> its final Linear, whose input is the feature; what
# sits before it stays (MobileNet-v3's 1280-d Linear + Hardswish, VGG's fc6 and fc7, MaxViT's Linear + Tanh).
FINAL_LINEAR = {
    'resnet': 'fc',  # resnet*, resnext*, wide_resnet*
    'regnet': 'fc',
    'shufflenetv2': 'fc',
    'densenet': 'classifier',
    'mobilenetv2': 'classifier.1',
    'mobilenetv3': 'classifier.3',
    'efficientnet': 'classifier.1',  # b0-b7, v2_s/m/l
    'mnasnet': 'classifier.1',
    'convnext': 'classifier.2',
    'vgg': 'classifier.6',
    'alexnet': 'classifier.6',
    'swin_transformer': 'head',  # swin_*, swin_v2_*
    'vision_transformer': 'heads.head',  # vit_b_16, ..., vit_h_14
    'maxvit': 'classifier.5',
}
# torchvision builds these for one input size (the ViTs' position embedding, MaxViT's attention grid)
FIXED_SIZE = {'vision_transformer': 224, 'maxvit': 224}
# The classification models that cannot be a student, and why.
REFUSED = {
    'squeezenet': 'its classifier is a 1x1 convolution on the feature map, pooled afterwards: no final Linear '
                  'takes a pooled feature',
    'googlenet': 'in training its forward also returns two auxiliary classifiers\' logits, which are part of '
                 'its torchvision state dict',
    'inception': 'in training its forward also returns an auxiliary classifier\'s logits, which are part of its '
                 'torchvision state dict',
}

# timm's ResNets smaller than resnet18 ("ResNet strikes back"), built without a classifier: timm's keys, whole
TIMM_STUDENTS = ('resnet10t', 'resnet14t')

TORCHVISION_CLASSIFIERS = tuple(tvm.list_models(module=tvm))  # classification only: not detection, video...


def torchvision_family(name):
    """The torchvision module that builds classification model ``name`` (``'mobilenetv3'``), None for others."""
    return tvm.get_model_builder(name).__module__.rsplit('.', 1)[1] if name in TORCHVISION_CLASSIFIERS else None


TORCHVISION_STUDENTS = tuple(n for n in TORCHVISION_CLASSIFIERS if torchvision_family(n) in FINAL_LINEAR)
# Every --arch_student (argparse choices); 'mobilenet' is MobileNet-v2
STUDENT_ARCHS = ('mobilenet',) + TORCHVISION_STUDENTS + TIMM_STUDENTS + tuple(VIT_STUDENTS)
TEACHER_ARCHS = TORCHVISION_RESNETS + ('sup_resnet50', 'byol_resnet50', 'resnet50x1', 'resnet50x2',
                                       'resnet50x4') + tuple(VIT_TEACHERS) + DINOV3_ARCHS
OPENCLIP = 'open_clip/'  # --arch open_clip/<name>: a CLIP or SigLIP image tower (models/openclip.py)
ALIASES = {'mobilenet': 'mobilenet_v2', 'sup_resnet50': 'resnet50'}  # this project's names of torchvision models
LIST_STUDENTS = 'python -c "import models.backbones as b; print(*b.STUDENT_ARCHS)" lists them'


def is_teacher_arch(arch):
    """Whether ``arch`` can be a teacher: one of TEACHER_ARCHS, or open_clip/<name>."""
    return arch in TEACHER_ARCHS or arch.startswith(OPENCLIP)


def _torchvision_classifier(name):
    """torchvision's ``name`` with its final Linear, and a Dropout right before it, replaced by Identity: that
    Dropout belongs to the classifier and would zero part of the feature in training."""
    family = torchvision_family(name)
    if family == 'regnet' and torch.get_default_device().type == 'meta':
        # RegNet computes its stage widths with tensors (.tolist()), which have no data on the meta device
        with torch.device('cpu'):
            model = tvm.get_model(name, weights=None).to('meta')
    else:
        model = tvm.get_model(name, weights=None)
    path = FINAL_LINEAR[family]
    final = model.get_submodule(path)
    if not isinstance(final, nn.Linear):
        raise SimRegError(f'{name}: torchvision\'s {path} is a {type(final).__name__}, not the final Linear this '
                          f'project removes: this torchvision version is not supported, use another model')
    parent_path, _, attr = path.rpartition('.')
    parent = model.get_submodule(parent_path)
    index = list(parent._modules).index(attr)
    if isinstance(parent, nn.Sequential) and index > 0 and isinstance(parent[index - 1], nn.Dropout):
        parent[index - 1] = nn.Identity()
    model.set_submodule(path, nn.Identity())
    model.feat_dim = final.in_features
    model.classifier_path = path
    model.torchvision_name = name  # what an export loads into: torchvision.models.<name>()
    model.classifier_keys = tuple(f'{path}.{k}' for k, _ in final.named_parameters())  # what it then misses
    if family in FIXED_SIZE:
        model.register_forward_pre_hook(_input_size_check(name, FIXED_SIZE[family]))
    return model


def _input_size_check(name, size):
    """A forward pre-hook refusing inputs other than ``size`` x ``size`` with one line."""
    def check(module, inputs):
        if tuple(inputs[0].shape[-2:]) != (size, size):
            raise SimRegError(f'{name} takes {size}x{size} images only (torchvision builds it for that size), not '
                              f'{"x".join(map(str, inputs[0].shape[-2:]))}: pass --image_size {size}')
    return check


def build_backbone(arch, image_size=None):
    """The network for an arch name, its final Linear removed; ``image_size``: a ViT student's size."""
    if arch in VIT_ARCHS:
        return build_vit(arch, image_size)
    if arch in DINOV3_ARCHS:
        return build_dinov3(arch)
    if arch.startswith(OPENCLIP):  # open_clip's own initialisation; imported here: models.openclip imports this
        from models.openclip import ImageTower, create_clip
        return ImageTower(create_clip(arch), arch)
    if arch == 'byol_resnet50':
        return byol_resnet50()
    if arch in ('resnet50x1', 'resnet50x2', 'resnet50x4'):
        return simclr_resnet50(width=int(arch[-1]))
    if arch in TIMM_STUDENTS:  # built without a classifier: the pooled feature, timm's keys (nothing missing)
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        model.feat_dim = model.num_features
        model.classifier_path = model.default_cfg.get('classifier', 'fc')
        model.timm_name = arch  # what an export loads into: timm.create_model(arch, num_classes=0)
        return model
    name = ALIASES.get(arch, arch)
    family = torchvision_family(name)
    if family in FINAL_LINEAR:
        return _torchvision_classifier(name)
    if family in REFUSED:
        raise SimRegError(f'{arch} cannot be a student: {REFUSED[family]}; choose another torchvision '
                          f'classification model ({LIST_STUDENTS})')
    raise SimRegError(f'unknown architecture \'{arch}\': students are torchvision\'s classification models by name '
                      f'(mobilenet_v3_large, efficientnet_b0, convnext_tiny, ...; mobilenet = MobileNet-v2; '
                      f'timm\'s {", ".join(TIMM_STUDENTS)}; '
                      f'{LIST_STUDENTS}); teachers are {", ".join(TEACHER_ARCHS)}')


def classifier_attr(model):
    """Dotted name of the (removed) classifier Linear: ``fc`` for ResNets, ``classifier.3`` for MobileNet-v3."""
    return getattr(model, 'classifier_path', 'fc')


def set_projection(model, fc):
    """Put a pretrained projection/classifier (``--teacher_fc``) back on top of the pooled feature."""
    model.set_submodule(classifier_attr(model), fc)
    model.feat_dim = fc.out_features
    return model

