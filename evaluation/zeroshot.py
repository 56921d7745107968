"""Zero-shot classification with an open_clip teacher's text tower, of the teacher's image tower and of a student
distilled from it: the student's regression head outputs in the teacher's embedding space, so the teacher's class
embeddings classify it too. Top-1/top-5 on a labelled folder, open_clip's ImageNet prompts for ImageNet's classes."""
import os
import re

import open_clip
import torch
import torch.nn.functional as F

from models.backbones import OPENCLIP
from utils.errors import SimRegError

WNID = re.compile(r'n\d{8}')
SIMPLE_TEMPLATES = ('a photo of a {}.',)  # CLIP's plain prompt, for classes other than ImageNet's


def imagenet_names(folder, classes):
    """ImageNet's class names of ``classes`` when ``folder`` holds ImageNet's 1000 wnid folders (sorted, they are
    open_clip's IMAGENET_CLASSNAMES order), else None."""
    wnids = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if len(wnids) != len(open_clip.IMAGENET_CLASSNAMES) or not all(WNID.fullmatch(w) for w in wnids):
        return None
    return [open_clip.IMAGENET_CLASSNAMES[wnids.index(c)] for c in classes]


def prompts(folder, classes, names_file=None):
    """(class names, templates): ImageNet's names and OpenAI's 80 templates for ImageNet's folders; else the lines
    of ``names_file`` or the folder names with underscores as spaces, and CLIP's plain prompt."""
    names = imagenet_names(folder, classes)
    if names is not None and names_file is None:
        return names, open_clip.OPENAI_IMAGENET_TEMPLATES
    if names_file is None:
        return [c.replace('_', ' ') for c in classes], SIMPLE_TEMPLATES
    with open(names_file, encoding='utf-8') as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != len(classes):
        raise SimRegError(f'--class_names {names_file} has {len(names)} names for the {len(classes)} class folders '
                          f'of {folder}: give one name per line, in the folders\' sorted order')
    return names, (open_clip.OPENAI_IMAGENET_TEMPLATES if imagenet_names(folder, classes) else SIMPLE_TEMPLATES)


@torch.no_grad()
def text_classifier(clip, arch, names, templates, device):
    """[embed_dim, classes] L2-normalised class embeddings: open_clip's build_zero_shot_classifier."""
    tokenizer = open_clip.get_tokenizer(arch.removeprefix(OPENCLIP))
    return open_clip.build_zero_shot_classifier(clip.to(device).eval(), tokenizer, names, templates, device=device)


def accuracy(features, labels, classifier):
    """Top-1 and top-5 (%) of the image features ``[N, D]`` against the class embeddings ``[D, C]``."""
    logits = F.normalize(features.float(), dim=1) @ classifier.float().cpu()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {'top1': 100.0 * hits[:, 0].float().mean().item(), 'top5': 100.0 * hits.any(1).float().mean().item()}


def teacher_of(checkpoint, head, arch, weights, path):
    """(arch, weights) of the open_clip teacher: the flags, else what the student checkpoint records."""
    teachers = checkpoint.get('teachers') or {None: checkpoint.get('teacher') or {}}
    info = teachers.get(head) or (next(iter(teachers.values())) if len(teachers) == 1 else {})
    arch, weights = arch or info.get('arch'), weights or info.get('weights')
    if not arch or not arch.startswith(OPENCLIP) or not weights:
        raise SimRegError(f'{path} was not distilled from an open_clip teacher it records (teacher: {arch}): pass '
                          f'--arch_teacher open_clip/<model name> and --teacher_weights')
    return arch, weights
