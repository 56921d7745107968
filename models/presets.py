"""Teacher weights with an official download (the URL the release's README links), by name (``--teacher_weights
moco_v2_800ep``): downloaded once into the torch hub cache, put under its final name once its digest and layout fit."""
import os
from dataclasses import dataclass

import torch

from utils.checkpoint import file_digest, read_checkpoint
from utils.errors import SimRegError

@dataclass(frozen=True)
class Preset:
    url: str
    layout: str  # the layout models.loading must recognise in the downloaded file
    md5: str = ''  # digest prefix published with the release, when there is one
    sha256: str = ''
    archs: tuple = ('resnet50', 'sup_resnet50')  # the --arch_teacher values the file fits
    arch_name: str = 'ResNet-50 with torchvision padding'  # what it is, for the error on another arch


def _vit(url, layout, arch, name, sha256=''):
    return Preset(url, layout, sha256=sha256, archs=(arch,), arch_name=f'{name} ({arch})')


_MOCO = 'https://dl.fbaipublicfiles.com/moco/moco_checkpoints'
_MOCO_V3 = 'https://dl.fbaipublicfiles.com/moco-v3'
_BARLOW = ('https://dl.fbaipublicfiles.com/barlowtwins/'
           'epochs1000_bs2048_lr0.2_lambd0.0051_proj_8192_8192_8192_scale0.024')
_DINO = 'https://dl.fbaipublicfiles.com/dino'
_DINOV2 = 'https://dl.fbaipublicfiles.com/dinov2'

PRESETS = {
    'moco_v1_200ep': Preset(f'{_MOCO}/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar', 'MoCo v1/v2', md5='b251726a'),
    'moco_v2_200ep': Preset(f'{_MOCO}/moco_v2_200ep/moco_v2_200ep_pretrain.pth.tar', 'MoCo v1/v2', md5='59fd9945'),
    'moco_v2_800ep': Preset(f'{_MOCO}/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar', 'MoCo v1/v2', md5='a04e12f8'),
    'moco_v3_100ep': Preset(f'{_MOCO_V3}/r-50-100ep/r-50-100ep.pth.tar', 'MoCo v3'),
    'moco_v3_300ep': Preset(f'{_MOCO_V3}/r-50-300ep/r-50-300ep.pth.tar', 'MoCo v3'),
    'moco_v3_1000ep': Preset(f'{_MOCO_V3}/r-50-1000ep/r-50-1000ep.pth.tar', 'MoCo v3'),
    'swav_800ep': Preset('https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar',
                         'SwAV / DataParallel'),
    'dino_resnet50': Preset(f'{_DINO}/dino_resnet50_pretrain/dino_resnet50_pretrain.pth', 'torchvision'),
    'barlowtwins_resnet50': Preset(f'{_BARLOW}/resnet50.pth', 'torchvision'),
    'vicreg_resnet50': Preset('https://dl.fbaipublicfiles.com/vicreg/resnet50.pth', 'torchvision'),
    'torchvision_resnet50': Preset('https://download.pytorch.org/models/resnet50-0676ba61.pth', 'torchvision',
                                   sha256='0676ba61'),
    # DINO, DINOv2 and MoCo v3 publish no checksum (the layout is checked); DeiT's file names end with their sha256
    'dino_vits16': _vit(f'{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth', 'DINO ViT backbone',
                        'vit_small_patch16', 'DINO ViT-S/16'),
    'dino_vits8': _vit(f'{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth', 'DINO ViT backbone',
                       'vit_small_patch8', 'DINO ViT-S/8'),
    'dino_vitb16': _vit(f'{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth', 'DINO ViT backbone',
                        'vit_base_patch16', 'DINO ViT-B/16'),
    'dino_vitb8': _vit(f'{_DINO}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth', 'DINO ViT backbone',
                       'vit_base_patch8', 'DINO ViT-B/8'),
    'mocov3_vits': _vit('https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar', 'MoCo v3',
                        'mocov3_vit_small', 'MoCo v3 ViT-S/16 (12 heads)'),
    'mocov3_vitb': _vit('https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar', 'MoCo v3',
                        'vit_base_patch16', 'MoCo v3 ViT-B/16'),
    'deit_small': _vit('https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth', 'DeiT',
                       'vit_small_patch16', 'DeiT-S/16', sha256='cd65a155'),
    'deit_base': _vit('https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth', 'DeiT',
                      'vit_base_patch16', 'DeiT-B/16', sha256='b5f2ef4d'),
}
for _size, _name in (('s', 'small'), ('b', 'base'), ('l', 'large')):
    PRESETS[f'dinov2_vit{_size}14'] = _vit(f'{_DINOV2}/dinov2_vit{_size}14/dinov2_vit{_size}14_pretrain.pth',
                                           'DINOv2', f'vit_{_name}_patch14_dinov2', f'DINOv2 ViT-{_size.upper()}/14')
    PRESETS[f'dinov2_vit{_size}14_reg'] = _vit(
        f'{_DINOV2}/dinov2_vit{_size}14/dinov2_vit{_size}14_reg4_pretrain.pth', 'DINOv2 with registers',
        f'vit_{_name}_patch14_reg4_dinov2', f'DINOv2 ViT-{_size.upper()}/14 with registers')


def preset_path(name):
    """The preset's file in the torch hub cache, named after the preset (two releases call theirs ``resnet50.pth``)."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', f'{name}.pth')


def preset_named(spec):
    """The preset ``spec`` names, by name or by its cached file; None for any other file (an existing
    file called like a preset is that file)."""
    if spec in PRESETS and not os.path.isfile(spec):
        return spec
    return next((name for name in PRESETS if os.path.abspath(spec) == os.path.abspath(preset_path(name))), None)


def download_preset(name, dst):
    """Download the preset's file to ``dst`` with a progress bar and check its published digest."""
    preset = PRESETS[name]
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    print(f'downloading {name} from {preset.url} to {dst}', flush=True)
    try:
        torch.hub.download_url_to_file(preset.url, dst, progress=True)
    except Exception as exc:  # urllib/http/socket errors all mean the same to the user
        raise SimRegError(f'cannot download preset {name} from {preset.url} ({type(exc).__name__}: {exc}): '
                          f'check the network, or download the file yourself and pass its path') from None
    for algorithm, expected in (('md5', preset.md5), ('sha256', preset.sha256)):
        if expected:
            digest = file_digest(dst, algorithm)
            if not digest.startswith(expected):  # resolve_weights removes the file
                raise SimRegError(f'preset {name}: downloaded file has {algorithm} {digest[:8]}, the release '
                                  f'says {expected}: the download is corrupt; run again')


def resolve_weights(spec):
    """Path of the weights ``spec`` names: an existing file as is, or a preset (downloaded once, checked)."""
    from models.loading import detect_layout  # here, not at the top: models.loading imports this module
    if os.path.isfile(spec):
        return spec
    if spec not in PRESETS:
        raise SimRegError(f'weights {spec} not found: give a checkpoint path or one of the presets '
                          f'{", ".join(PRESETS)}')
    path = preset_path(spec)
    if not os.path.isfile(path):
        partial = f'{path}.{os.getpid()}.partial'
        try:
            download_preset(spec, partial)
            layout, _ = detect_layout(read_checkpoint(partial), spec)
            if layout.name != PRESETS[spec].layout:
                raise SimRegError(f'preset {spec}: the downloaded file looks like {layout.name}, not '
                                  f'{PRESETS[spec].layout}: the release changed; download it yourself and '
                                  f'pass the path')
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return path
