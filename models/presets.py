"""Teacher weights that have an official download, by name: ``--teacher_weights moco_v2_800ep``.

URLs are the ones the releases' READMEs link (facebookresearch/moco, moco-v3 CONFIG.md, swav, dino,
barlowtwins, vicreg; torchvision's ``ResNet50_Weights.IMAGENET1K_V1``). A file is downloaded once
into ``torch.hub.get_dir()/checkpoints``, checked, and only then put under its final name, so a
file found there is always a complete, checked one.
"""
import os
from dataclasses import dataclass

import torch

from utils.checkpoint import file_digest
from utils.errors import SimRegError

# Every preset is a ResNet-50 with torchvision's padding.
PRESET_ARCHS = ('resnet50', 'sup_resnet50')


@dataclass(frozen=True)
class Preset:
    url: str
    layout: str  # the layout models.loading must recognise in the downloaded file
    md5: str = ''  # digest prefix published with the release, when there is one
    sha256: str = ''


_MOCO = 'https://dl.fbaipublicfiles.com/moco/moco_checkpoints'
_MOCO_V3 = 'https://dl.fbaipublicfiles.com/moco-v3'
_BARLOW = ('https://dl.fbaipublicfiles.com/barlowtwins/'
           'epochs1000_bs2048_lr0.2_lambd0.0051_proj_8192_8192_8192_scale0.024')

PRESETS = {
    'moco_v1_200ep': Preset(f'{_MOCO}/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar', 'MoCo v1/v2', md5='b251726a'),
    'moco_v2_200ep': Preset(f'{_MOCO}/moco_v2_200ep/moco_v2_200ep_pretrain.pth.tar', 'MoCo v1/v2', md5='59fd9945'),
    'moco_v2_800ep': Preset(f'{_MOCO}/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar', 'MoCo v1/v2', md5='a04e12f8'),
    'moco_v3_100ep': Preset(f'{_MOCO_V3}/r-50-100ep/r-50-100ep.pth.tar', 'MoCo v3'),
    'moco_v3_300ep': Preset(f'{_MOCO_V3}/r-50-300ep/r-50-300ep.pth.tar', 'MoCo v3'),
    'moco_v3_1000ep': Preset(f'{_MOCO_V3}/r-50-1000ep/r-50-1000ep.pth.tar', 'MoCo v3'),
    'swav_800ep': Preset('https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar',
                         'SwAV / DataParallel'),
    'dino_resnet50': Preset('https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth',
                            'torchvision'),
    'barlowtwins_resnet50': Preset(f'{_BARLOW}/resnet50.pth', 'torchvision'),
    'vicreg_resnet50': Preset('https://dl.fbaipublicfiles.com/vicreg/resnet50.pth', 'torchvision'),
    'torchvision_resnet50': Preset('https://download.pytorch.org/models/resnet50-0676ba61.pth', 'torchvision',
                                   sha256='0676ba61'),
}


def preset_path(name):
    """Where the preset's file lives in the torch hub cache (named after the preset: two releases
    both call their file ``resnet50.pth``)."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', f'{name}.pth')


def preset_named(spec):
    """The preset that ``spec`` names, as a name or as the cached file it resolves to; None for any
    other file (an existing file called like a preset is that file)."""
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
            if not digest.startswith(expected):
                os.remove(dst)
                raise SimRegError(f'preset {name}: downloaded file has {algorithm} {digest[:8]}, the release '
                                  f'says {expected}: the download is corrupt; run again')

