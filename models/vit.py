"""Vision Transformers: the released ViT teachers (DINO, DINOv2, MoCo v3, DeiT) and timm ViT students, all timm's
``VisionTransformer`` with timm's keys. A teacher is built at its release's training size, resizes its position
embedding per forward the way its release does (``RESIZE``), and its feature is the CLS token after the final norm.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SwiGLUPacked, resample_abs_pos_embed
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from utils.errors import SimRegError

_S, _B, _L = dict(embed_dim=384, num_heads=6), dict(embed_dim=768, num_heads=12), dict(embed_dim=1024, num_heads=16)
_DINOV2 = dict(patch_size=14, img_size=518, init_values=1e-5)
_REG = dict(reg_tokens=4, no_embed_class=True)  # timm's layout: the CLS position folded into the CLS token

# arch -> (timm VisionTransformer kwargs, the release whose resize rule it has without a file to tell)
VIT_TEACHERS = {
    'vit_small_patch16': (dict(patch_size=16, **_S), 'DINO'),
    'vit_base_patch16': (dict(patch_size=16, **_B), 'DINO'),
    'vit_small_patch8': (dict(patch_size=8, **_S), 'DINO'),
    'vit_base_patch8': (dict(patch_size=8, **_B), 'DINO'),
    'mocov3_vit_small': (dict(patch_size=16, embed_dim=384, num_heads=12), 'MoCo v3'),
    'vit_small_patch14_dinov2': (dict(**_DINOV2, **_S), 'DINOv2'),
    'vit_base_patch14_dinov2': (dict(**_DINOV2, **_B), 'DINOv2'),
    'vit_large_patch14_dinov2': (dict(**_DINOV2, **_L, depth=24), 'DINOv2'),
    'vit_small_patch14_reg4_dinov2': (dict(**_DINOV2, **_S, **_REG), 'DINOv2 registers'),
    'vit_base_patch14_reg4_dinov2': (dict(**_DINOV2, **_B, **_REG), 'DINOv2 registers'),
    'vit_large_patch14_reg4_dinov2': (dict(**_DINOV2, **_L, depth=24, **_REG), 'DINOv2 registers'),
    # SwiGLU packed as timm's GluMlp: fc1 = DINOv2's w12 (2 x 4096), fc2 = w3
    'vit_giant_patch14_dinov2': (dict(**_DINOV2, embed_dim=1536, num_heads=24, depth=40, mlp_ratio=2.66667 * 2,
                                      mlp_layer=SwiGLUPacked, act_layer=nn.SiLU), 'DINOv2'),
}
# arch -> the kwargs of timm's model of that name + '_224' (the export loads into timm.create_model(it))
VIT_STUDENTS = {'vit_tiny_patch16': dict(patch_size=16, embed_dim=192, num_heads=3),
                'vit_small_patch16': dict(patch_size=16, **_S)}
VIT_ARCHS = tuple(dict.fromkeys((*VIT_TEACHERS, *VIT_STUDENTS)))

# release -> how it resizes the position embedding: offset (interpolate_with_offset), size (bicubic to the target grid),
# size_antialias (the same, antialiased), sincos (sincos_pos_embed rebuilt for the target grid)
RESIZE = {'DINO': 'offset', 'DINOv2': 'offset', 'DINOv2 registers': 'size_antialias', 'DeiT': 'size',
          'MoCo v3': 'sincos', 'timm': 'size_antialias'}


def interpolate_with_offset(patch_pos_embed, grid, offset=0.1):
    """DINO's and DINOv2's resize (timm lacks it): bicubic with ``scale_factor = (new + offset) / old``, which
    samples elsewhere than a resize to the target size. ``patch_pos_embed``: (1, old*old, dim)."""
    old = math.isqrt(patch_pos_embed.shape[1])
    dim = patch_pos_embed.shape[-1]
    square = patch_pos_embed.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=((grid[0] + offset) / old, (grid[1] + offset) / old),
                            mode='bicubic')
    assert tuple(resized.shape[-2:]) == tuple(grid)
    return resized.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patch_pos_embed.dtype)


def sincos_pos_embed(grid, dim, temperature=10000.0):
    """MoCo v3's fixed position table for a ``grid``, (1, 1 + h*w, dim), the CLS row zero: sin/cos of each grid
    coordinate at ``dim/4`` frequencies (timm's ``build_sincos2d_pos_embed`` orders the blocks differently)."""
    first, second = torch.meshgrid(torch.arange(grid[1], dtype=torch.float32),
                                   torch.arange(grid[0], dtype=torch.float32), indexing='ij')
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    a, b = first.flatten()[:, None] * omega, second.flatten()[:, None] * omega
    table = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


class ReleaseViT(VisionTransformer):
    """timm's VisionTransformer whose position embedding is resized the way ``release`` does (``RESIZE``)."""

    def __init__(self, release, **kwargs):
        super().__init__(num_classes=0, dynamic_img_size=True, **kwargs)
        self.release = release

    def resized_pos_embed(self, grid):
        grid = tuple(grid)
        if grid == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        rule = RESIZE[self.release]
        if rule == 'sincos':
            return sincos_pos_embed(grid, self.embed_dim).to(self.pos_embed)
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        if rule == 'offset':
            patches = interpolate_with_offset(self.pos_embed[:, prefix:], grid)
            return torch.cat([self.pos_embed[:, :prefix], patches], 1)
        return resample_abs_pos_embed(self.pos_embed, grid, num_prefix_tokens=prefix,
                                      antialias=rule == 'size_antialias', align_corners=False)

    def forward(self, x):
        check_size(x.shape[-2:], self.patch_embed.patch_size[0])
        return super().forward(x)

    def _pos_embed(self, x):
        batch, h, w, dim = x.shape  # dynamic_img_size: the patch embedding keeps the grid
        pos_embed = self.resized_pos_embed((h, w))
        x = x.reshape(batch, h * w, dim)
        prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x)


def build_vit(arch, image_size=None):
    """A ViT, classifier removed. ``image_size`` None: a teacher at its release's training size (the file it
    loads may change the resize rule); an int: a student of that size (``vit_small_patch16`` is both)."""
    if image_size is None and arch in VIT_TEACHERS:
        kwargs, release = VIT_TEACHERS[arch]
        model = ReleaseViT(release, **{'img_size': 224, **kwargs})
    else:
        check_size((image_size or 224,) * 2, VIT_STUDENTS[arch]['patch_size'])
        model = ReleaseViT('timm', img_size=image_size or 224, **VIT_STUDENTS[arch])
        model.timm_name = f'{arch}_224'  # timm's model of these shapes and keys
    model.image_size = model.patch_embed.img_size[0]
    model.feat_dim = model.num_features
    model.classifier_path = 'head'  # timm's classifier (DeiT's; MoCo v3's projector)
    return model


def check_size(size, patch):
    """Refuse a size that does not divide into whole patches."""
    if size[0] % patch or size[1] % patch:
        fits = max(patch, size[0] // patch * patch)
        raise SimRegError(f'a {size[0]}x{size[1]} input does not divide into the {patch}-pixel patches of a ViT: '
                          f'pass an --image_size that is a multiple of {patch} (e.g. {fits})')


def timm_state(state, release, arch):
    """A release's backbone tensors under timm's names: DINOv2's ``mask_token`` dropped, ``w12``/``w3`` as
    ``fc1``/``fc2``, registers as ``reg_token`` with the CLS position folded into the CLS token."""
    # refuse what the shapes let through: MoCo v3's 12-head ViT-S in DINO's/DeiT's 6-head arch, or back
    if arch == 'mocov3_vit_small' and release != 'MoCo v3':
        raise SimRegError(f'mocov3_vit_small is MoCo v3\'s ViT-Small (12 heads), but the file is a {release} '
                          f'checkpoint: use --arch_teacher vit_small_patch16')
    if release == 'MoCo v3' and arch == 'vit_small_patch16':
        raise SimRegError('the file is a MoCo v3 ViT-Small, which has 12 heads where DINO\'s and DeiT\'s have 6: '
                          'use --arch_teacher mocov3_vit_small')
    if not release.startswith('DINOv2'):
        return state
    state = {k.replace('.mlp.w12.', '.mlp.fc1.').replace('.mlp.w3.', '.mlp.fc2.'): v for k, v in state.items()
             if k != 'mask_token'}
    if 'register_tokens' in state and 'pos_embed' in state and 'cls_token' in state:
        state['reg_token'] = state.pop('register_tokens')
        state['cls_token'] = state['cls_token'] + state['pos_embed'][:, :1]
        state['pos_embed'] = state['pos_embed'][:, 1:]
    return state


def check_sincos(model, what):
    """Refuse a 'MoCo v3' file whose position embedding is not the fixed sin-cos table."""
    table = sincos_pos_embed(model.patch_embed.grid_size, model.embed_dim)
    if not torch.allclose(model.pos_embed.detach().float().cpu(), table, atol=1e-4):
        raise SimRegError(f'{what}: a MoCo v3 ViT holds the fixed sin-cos position table, this file holds '
                          f'another: it is not a MoCo v3 checkpoint; check the weights file')


def channels_last_helps(model):
    """channels_last speeds up convolutions; a ViT (timm's Eva too: DINOv3) is one patch convolution, then matrix
    products."""
    return not isinstance(model, (VisionTransformer, Eva))
