"""CLIP and SigLIP image towers through open_clip (``--arch open_clip/<model name>``): the feature is open_clip's
``encode_image`` output, not normalised. The weights are the whole CLIP model's state dict as open_clip saves it
(text tower included), or a pretrained tag read from the local Hugging Face / open_clip cache: nothing is downloaded.
"""
import logging
import os

import huggingface_hub
import open_clip
import torch
import torch.nn as nn
from open_clip.model import resize_pos_embed
from safetensors.torch import load_file

from models.backbones import OPENCLIP
from models.loading import load_strict
from utils.checkpoint import read_checkpoint
from utils.errors import SimRegError

LIST_NAMES = 'python -c "import open_clip; print(*open_clip.list_models())" lists the valid names'


class ImageTower(nn.Module):
    """``clip.encode_image`` as a backbone, with ``feat_dim`` and the input the model expects: ``input_size`` (px)
    and ``input_mean``/``input_std`` (0-1 units), those of its pretrained releases. At another size its position
    embedding is resampled from the trained one as open_clip does when it loads a model at another size."""

    def __init__(self, clip, arch, weights=None):
        super().__init__()
        name = arch.removeprefix(OPENCLIP)
        self.visual = clip.visual
        config = open_clip.get_model_config(name)
        self.feat_dim = config['embed_dim']
        size = config['vision_cfg']['image_size']
        self.input_size = size if isinstance(size, int) else size[0]
        # ``weights``: a pretrained tag says its release; a file says nothing: the model's first release's
        is_tag = weights and not os.path.isfile(weights)
        tags = [weights] if is_tag else open_clip.list_pretrained_tags_by_model(name)[:1]
        release = open_clip.get_pretrained_cfg(name, tags[0]) if tags else {}
        self.input_mean = tuple(release.get('mean', open_clip.OPENAI_DATASET_MEAN))
        self.input_std = tuple(release.get('std', open_clip.OPENAI_DATASET_STD))
        self.arch, self.size = arch, (self.input_size,) * 2
        self.register_buffer('trained_pos', None, persistent=False)  # set at the first resize

    def forward(self, images):
        self.resize(tuple(images.shape[-2:]))
        return self.visual(images)  # = CLIP.encode_image(images, normalize=False)

    @torch.inference_mode(False)
    @torch.no_grad()
    def resize(self, size):
        """Resample the position embedding for ``size`` (h, w) from the trained one: open_clip's
        ``resize_pos_embed`` for its own ViTs, timm's ``set_input_size`` for timm towers (SigLIP)."""
        if size == self.size:
            return
        trunk = getattr(self.visual, 'trunk', None)
        timm = hasattr(trunk, 'set_input_size')
        owner, name = (trunk, 'pos_embed') if timm else (self.visual, 'positional_embedding')
        if not isinstance(getattr(owner, name, None), nn.Parameter) or not (timm or hasattr(self.visual, 'grid_size')):
            raise SimRegError(f'{self.arch} takes {self.input_size}px images only: pass --teacher_image_size '
                              f'{self.input_size} (or --image_size {self.input_size} to evaluate it)')
        if self.trained_pos is None:
            self.trained_pos = getattr(owner, name).detach().clone()
        setattr(owner, name, nn.Parameter(self.trained_pos.clone(), requires_grad=False))
        if timm:  # from the trained grid: timm resamples from the grid it was last set to
            trunk.patch_embed.set_input_size(img_size=(self.input_size,) * 2)
            trunk.set_input_size(img_size=size)
        else:
            patch = self.visual.conv1.kernel_size
            self.visual.grid_size = (size[0] // patch[0], size[1] // patch[1])
            state = {'visual.positional_embedding': self.trained_pos}
            resize_pos_embed(state, self)
            self.visual.positional_embedding = nn.Parameter(state['visual.positional_embedding'], requires_grad=False)
        self.size = size


def create_clip(arch):
    """open_clip's model ``arch`` names, randomly initialised (on the CPU: open_clip makes buffers the state dict
    does not hold, which the meta device would leave empty)."""
    name = arch.removeprefix(OPENCLIP)
    if name not in open_clip.list_models():
        raise SimRegError(f'open_clip has no model {name!r} ({arch}): {LIST_NAMES}')
    logging.disable(logging.WARNING)  # open_clip warns that the model is random: its weights come next
    try:
        return open_clip.create_model(name)
    finally:
        logging.disable(logging.NOTSET)


def weights_file(arch, spec):
    """The file ``spec`` names: itself, or for an open_clip arch its pretrained tag's file in the local Hugging Face
    cache (``HF_HOME``/``HF_HUB_CACHE``) or open_clip's (~/.cache/clip). Other archs' specs are returned as given."""
    if not (arch or '').startswith(OPENCLIP) or os.path.isfile(spec):
        return spec
    name = arch.removeprefix(OPENCLIP)
    release = open_clip.get_pretrained_cfg(name, spec)
    if not release:
        tags = ', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'
        raise SimRegError(f'{spec} is neither a file nor a pretrained tag of open_clip\'s {name} (its tags: {tags}): '
                          f'pass the weights file or one of the tags')
    candidates = []
    if release.get('hf_hub'):
        repo, filename = os.path.split(release['hf_hub'])  # 'org/model/': open_clip's default file name
        filename = filename or 'open_clip_pytorch_model.bin'
        safe = 'open_clip_model' if filename == 'open_clip_pytorch_model.bin' else os.path.splitext(filename)[0]
        candidates += [huggingface_hub.try_to_load_from_cache(repo, f) for f in (safe + '.safetensors', filename)]
    if release.get('url'):
        candidates.append(os.path.join(os.path.expanduser('~/.cache/clip'), os.path.basename(release['url'])))
    found = next((c for c in candidates if isinstance(c, str) and os.path.isfile(c)), None)
    if found is None:
        where = release.get('hf_hub') or release.get('url')
        raise SimRegError(f'open_clip\'s {name} {spec} ({where}) is not in the local cache and nothing is downloaded '
                          f'here: fetch it once with open_clip.create_model(\'{name}\', pretrained=\'{spec}\'), '
                          f'or pass the weights file')
    return found


def load_clip(arch, spec):
    """The whole CLIP model of ``arch`` with the weights ``spec`` (a file or a pretrained tag), strictly, in eval
    mode."""
    path = weights_file(arch, spec)
    state = load_file(path) if path.endswith('.safetensors') else read_checkpoint(path)
    clip = create_clip(arch)
    return load_strict(clip, state, f'{path} as {arch}', 'open_clip state dict').eval()


def load_image_tower(arch, spec):
    """``ImageTower`` of ``arch`` with the weights ``spec``, in eval mode."""
    return ImageTower(load_clip(arch, spec), arch, spec).eval()
