"""DINOv3 teachers (facebookresearch/dinov3) loaded from its release files: the ViTs as timm's Eva (RoPE, 4 storage
tokens, LayerScale), the ConvNeXts as timm's ConvNeXt. The feature is what the release's ``forward`` returns: the
ViT's CLS token after the final norm, the ConvNeXt's global average after the final norm."""
import re

import timm
import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

from models.vit import check_size
from utils.errors import SimRegError

# the release's hub names -> timm's models of those shapes (the _qkvb ViTs hold the q and v biases the release has)
DINOV3_VITS = {'dinov3_vits16': 'vit_small_patch16_dinov3_qkvb',
               'dinov3_vits16plus': 'vit_small_plus_patch16_dinov3_qkvb',
               'dinov3_vitb16': 'vit_base_patch16_dinov3_qkvb',
               'dinov3_vitl16': 'vit_large_patch16_dinov3_qkvb',
               'dinov3_vith16plus': 'vit_huge_plus_patch16_dinov3_qkvb',
               'dinov3_vit7b16': 'vit_7b_patch16_dinov3'}  # no qkv bias in the release
DINOV3_CONVNEXTS = {f'dinov3_convnext_{size}': f'convnext_{size}' for size in ('tiny', 'small', 'base', 'large')}
DINOV3_ARCHS = (*DINOV3_VITS, *DINOV3_CONVNEXTS)
LAYOUT_ARCHS = {'DINOv3 ViT': DINOV3_VITS, 'DINOv3 ConvNeXt': DINOV3_CONVNEXTS}  # models.loading's layout names
# the release's training crops (its ViT-L distillation config: 256; its ConvNeXt ones keep the default 224) and the
# ImageNet mean/std its README gives for the LVD-1689M weights
INPUT_SIZE = {'DINOv3 ViT': 256, 'DINOv3 ConvNeXt': 224}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# release key -> timm key, for the ViTs (the q/k/v biases are split apart in vit_state)
_VIT_NAMES = (('storage_tokens', 'reg_token'), ('rope_embed.', 'rope.'), ('.ls1.gamma', '.gamma_1'),
              ('.ls2.gamma', '.gamma_2'), ('.mlp.w1.', '.mlp.fc1_g.'), ('.mlp.w2.', '.mlp.fc1_x.'),
              ('.mlp.w3.', '.mlp.fc2.'))
_CONVNEXT_NAMES = ((r'^downsample_layers\.0\.', 'stem.'), (r'^downsample_layers\.(\d)\.', r'stages.\1.downsample.'),
                   (r'^stages\.(\d)\.(\d+)\.', r'stages.\1.blocks.\2.'), (r'\.dwconv\.', '.conv_dw.'),
                   (r'\.pwconv(\d)\.', r'.mlp.fc\1.'), (r'^norm\.', 'head.norm.'))


class FileRope(RotaryEmbeddingDinoV3):
    """timm's DINOv3 RoPE on the periods of the file, as the release's forward uses them (timm recomputes them; the
    released files hold them rounded to bfloat16), kept in float32 when the model is cast to a half precision."""

    def _apply(self, fn, recurse=True):
        periods = self.periods
        nn.Module._apply(self, fn, recurse)  # not timm's, which recomputes periods cast below float32
        if torch.finfo(self.periods.dtype).bits < 32:
            self.periods = periods.float().to(self.periods.device)
        return self


def build_dinov3(arch):
    """A DINOv3 backbone of the release's shapes and its input attributes; its weights come from a release file."""
    if arch in DINOV3_VITS:
        model = timm.create_model(DINOV3_VITS[arch], num_classes=0, global_pool='token')
        model.rope.__class__ = FileRope  # the module timm built; only how it is cast changes
        # the release's files hold the RoPE periods and the k bias (masked to zero): loaded, as the release does
        model.rope._non_persistent_buffers_set.discard('periods')
        for block in model.blocks:
            block.attn._non_persistent_buffers_set.discard('k_bias')
        model.register_forward_pre_hook(lambda _, inputs: check_size(inputs[0].shape[-2:], 16))
        model.input_size = INPUT_SIZE['DINOv3 ViT']
    else:
        model = timm.create_model(DINOV3_CONVNEXTS[arch], num_classes=0)
        model.input_size = INPUT_SIZE['DINOv3 ConvNeXt']
    model.input_mean, model.input_std = IMAGENET_MEAN, IMAGENET_STD
    model.feat_dim = model.num_features
    model.classifier_path = model.default_cfg['classifier']  # timm's (an Identity): the release has no classifier
    return model


def vit_state(state):
    """A release ViT's tensors under timm's names; its qkv bias times its ``bias_mask`` (what the release adds) split
    into timm's q, k and v biases."""
    out = {}
    for key, value in state.items():
        if key.endswith('.qkv.bias') and key + '_mask' in state:
            prefix = key.removesuffix('qkv.bias')
            out.update(zip((prefix + 'q_bias', prefix + 'k_bias', prefix + 'v_bias'),
                           (value * state[key + '_mask']).chunk(3)))
        elif not (key.endswith('.qkv.bias_mask') and key.removesuffix('_mask') in state):
            for old, new in _VIT_NAMES:
                key = key.replace(old, new)
            out[key] = value
    return out


def convnext_state(state):
    """A release ConvNeXt's tensors under timm's names; ``norms.3`` (its ``norm`` listed again) is dropped when it
    equals ``norm``, else left for the strict load to name (the release would load it over ``norm``)."""
    out = {}
    for key, value in state.items():
        alias = key.replace('norms.3.', 'norm.', 1)
        if key.startswith('norms.3.') and alias in state and torch.equal(value, state[alias]):
            continue
        for pattern, new in _CONVNEXT_NAMES:
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


def timm_state(state, layout, arch, model, what):
    """The tensors of a DINOv3 release file (``layout``) for ``model`` (``arch``), under timm's names; refuses a file
    of another layout, or one of another DINOv3 arch, naming the arch it is."""
    archs = LAYOUT_ARCHS.get(layout)
    if archs is None:
        raise SimRegError(f'{what}: {arch} loads a DINOv3 release file (the backbone .pth that '
                          f'facebookresearch/dinov3\'s hub entry loads), this one looks like a {layout} checkpoint: '
                          f'pass the DINOv3 file')
    state = vit_state(state) if archs is DINOV3_VITS else convnext_state(state)
    shapes = lambda tensors: {k: tuple(v.shape) for k, v in tensors.items()}
    if arch in archs and shapes(model.state_dict()) == shapes(state):
        return state
    for other in archs:
        with torch.device('meta'):
            if shapes(build_dinov3(other).state_dict()) == shapes(state):
                raise SimRegError(f'{what}: the file is DINOv3\'s {other}, not {arch}: pass --arch_teacher {other} '
                                  f'(--arch {other} to the evaluation scripts)')
    if arch not in archs:
        raise SimRegError(f'{what}: the file is a {layout} release file: pass its arch, one of {", ".join(archs)}')
    return state  # the strict load names what does not fit
