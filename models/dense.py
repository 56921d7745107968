"""Feature maps: what a backbone computes per location before it pools (``feature_map``; with the pooled feature
from the same forward, ``feature_and_map``), a student's map and a teacher's dense targets, one function per
family. Each map is the tensor the backbone's own pooling takes: pooled the way the backbone pools (its avgpool and
what follows it up to the removed Linear), it gives the backbone's feature. ViTs pool by taking the class token:
their map is the patch tokens after the final norm, class token and registers excluded, as a grid."""
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from timm.models.eva import Eva
from timm.models.resnet import ResNet as TimmResNet
from timm.models.vision_transformer import VisionTransformer

from models.backbones import classifier_attr, torchvision_family
from models.vit import check_size
from utils.errors import SimRegError


def _resnet(m, x):  # torchvision ResNet, ResNeXt, Wide ResNet; the BYOL and SimCLR teachers
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _shufflenet(m, x):
    return m.conv5(m.stage4(m.stage3(m.stage2(m.maxpool(m.conv1(x))))))


def _maxvit(m, x):
    x = m.stem(x)
    for block in m.blocks:
        x = block(x)
    return x


def _cnn(map_of):
    """A convolutional family: its map, and the backbone's own pooling of it (torchvision's forward from the map
    on: avgpool, or the mean, then what is left of the classifier; timm's forward_head)."""
    def forward(m, x):
        fmap = map_of(m, x)
        pooled = m.avgpool(fmap) if hasattr(m, 'avgpool') else fmap.mean((2, 3), keepdim=True)
        tail = m.get_submodule(classifier_attr(m).split('.')[0])  # its final Linear is an Identity
        return tail(pooled if family(m) in ('convnext', 'maxvit') else pooled.flatten(1)), fmap
    return forward


def _timm_cnn(m, x):  # timm's ResNet-T, DINOv3's ConvNeXt (its last stage's map): timm's own head pools it
    fmap = m.forward_features(x)
    return m.forward_head(fmap), fmap


def _as_grid(tokens, images, patch):
    """(B, h*w, D) patch tokens -> (B, D, h, w) for ``images`` cut into ``patch``-pixel patches."""
    return tokens.transpose(1, 2).reshape(len(tokens), -1, images.shape[-2] // patch, images.shape[-1] // patch)


def _torchvision_vit(m, x):
    tokens = m._process_input(x)  # checks the size; (B, h*w, D)
    tokens = m.encoder(torch.cat([m.class_token.expand(len(x), -1, -1), tokens], dim=1))  # ends with its norm
    return m.heads(tokens[:, 0]), _as_grid(tokens[:, 1:], x, m.patch_size)


def _timm_vit(m, x):  # models/vit.py's ViTs, DINOv3's (timm's Eva): the class token and registers are the prefix
    patch = m.patch_embed.patch_size[0]
    check_size(x.shape[-2:], patch)
    tokens = m.forward_features(x)
    return m.forward_head(tokens), _as_grid(tokens[:, m.num_prefix_tokens:], x, patch)


_features = lambda m, x: m.features(x)
# family -> (pooled feature, map) from one forward. Where ``features`` is the map, what follows the pool is part of
# the feature: convnext (a LayerNorm), mobilenetv3 (Linear + Hardswish), vgg and alexnet (fc6, fc7: their map is
# the last convolution's, 512 or 256 channels, not the 4096-d feature).
FAMILIES = {
    'resnet': _cnn(_resnet),
    'regnet': _cnn(lambda m, x: m.trunk_output(m.stem(x))),
    'shufflenetv2': _cnn(_shufflenet),
    'densenet': _cnn(lambda m, x: F.relu(m.features(x))),  # the backbone's forward applies this ReLU before pooling
    'mobilenetv2': _cnn(_features),
    'mobilenetv3': _cnn(_features),
    'efficientnet': _cnn(_features),
    'mnasnet': _cnn(lambda m, x: m.layers(x)),
    'convnext': _cnn(_features),
    'vgg': _cnn(_features),
    'alexnet': _cnn(_features),
    'swin_transformer': _cnn(lambda m, x: m.permute(m.norm(m.features(x)))),  # NHWC -> NCHW, as before its pool
    'maxvit': _cnn(_maxvit),
    'vision_transformer': _torchvision_vit,
    'timm_resnet': _timm_cnn,  # resnet10t, resnet14t
    'timm_vit': _timm_vit,
    'dinov3_vit': _timm_vit,  # the patch tokens after the final norm, class and storage tokens excluded
    'dinov3_convnext': _timm_cnn,
}


def family(network):
    """The key of ``network`` in ``FAMILIES``, None for a network without a feature map here."""
    if isinstance(network, VisionTransformer):
        return 'timm_vit'
    if isinstance(network, TimmResNet):
        return 'timm_resnet'
    if isinstance(network, (Eva, TimmConvNeXt)):  # timm's models of DINOv3's (models.dinov3)
        return 'dinov3_vit' if isinstance(network, Eva) else 'dinov3_convnext'
    if isinstance(network, tvm.ResNet):
        return 'resnet'
    return torchvision_family(getattr(network, 'torchvision_name', None))


def feature_and_map(backbone, images):
    """(feature (B, D), map (B, C, h, w)) from one forward: ``backbone(images)`` and the map before its pooling."""
    name = family(backbone)
    if name not in FAMILIES:
        raise SimRegError(f'{type(backbone).__name__} has no feature map here: the families with one are '
                          f'{", ".join(FAMILIES)}')
    for hook in backbone._forward_pre_hooks.values():  # as its forward runs them: size checks, fp64's cast
        images = (hook(backbone, (images,)) or (images,))[0]
    return FAMILIES[name](backbone, images)


def feature_map(backbone, images):
    """(B, C, h, w): the backbone's map before its pooling; ViTs: the patch tokens after the final norm (DINOv2's
    ``x_norm_patchtokens``). A new family adds its (feature, map) function to ``FAMILIES``, its test to ``family``."""
    return feature_and_map(backbone, images)[1]
