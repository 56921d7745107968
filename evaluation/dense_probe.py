"""The segmentation probe (eval_dense.py): a frozen backbone's feature map (``models.dense``), L2-normalised per
location and cached, a linear 1x1 classifier trained on it, its logits upsampled (bilinear) to the mask, mean IoU
over classes. Layouts: a plain folder (``<split>/images`` + ``<split>/masks``), Pascal VOC 2012 and ADE20k as
distributed; each mask is checked before anything is computed or written."""
import glob
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from data.folders import IMAGE_EXTENSIONS, decode_rgb
from data.teacher_cache import dataset_fingerprint
from data.transforms import eval_transform
from evaluation.probe import Standardize
from models.dense import feature_map
from utils.errors import SimRegError
from utils.store import Store, StoreMismatch, differing

IGNORE = 255
SPLITS = ('train', 'val')
STATS_CHUNK = 256
LAYOUTS_HELP = ('a folder with train/ and val/, each holding images/ and masks/ (PNG index masks of the same stem, '
                '255 = ignore); Pascal VOC 2012 (VOCdevkit/VOC2012); or ADE20k (ADEChallengeData2016)')


class Split(Dataset):
    """(index, image, 0) of one split, the image on the evaluation view; ``samples``: (image, mask) paths,
    ``labels``: the layout's mask value -> class (255: ignore) as a 256-entry table."""

    def __init__(self, root, samples, layout, num_classes, labels, size):
        self.root, self.samples, self.layout, self.num_classes = root, samples, layout, num_classes
        self.labels, self.transform = labels, eval_transform(size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return index, self.transform(decode_rgb(self.samples[index][0])), 0

    def mask(self, index):
        """The checked class mask of sample ``index`` (S, S) uint8, on the evaluation view (nearest)."""
        return self.transform(self.checked_mask(index))[0].as_subclass(torch.Tensor)

    def checked_mask(self, index):
        """The class mask of sample ``index`` at its file's size, (1, H, W) uint8, checked against its image."""
        image, path = self.samples[index]
        try:
            with Image.open(path) as mask:
                mode, values = mask.mode, np.asarray(mask)
            with Image.open(image) as picture:
                size = picture.size
        except (OSError, ValueError, SyntaxError) as exc:
            raise SimRegError(f'cannot read {image} or its mask {path} ({exc}): delete or replace the file') from None
        if mode not in ('L', 'P'):
            raise SimRegError(f'mask {path} is a {mode} image, not an index mask (PNG of mode L or P, one class '
                              f'index per pixel): convert it')
        if values.shape[::-1] != size:
            raise SimRegError(f'mask {path} is {values.shape[1]}x{values.shape[0]}, its image {image} is '
                              f'{size[0]}x{size[1]}: a mask must have its image\'s size')
        classes = self.labels[values]
        bad = classes[(classes >= self.num_classes) & (classes != IGNORE)]
        if bad.size:
            raise SimRegError(f'mask {path} holds label {int(values[classes == bad[0]][0])}, above the '
                              f'{self.num_classes} classes of this {self.layout} dataset (255 = ignore): fix the '
                              f'mask' + (' or pass --num_classes' if self.layout == 'folder' else ''))
        return tv_tensors.Mask(torch.from_numpy(classes)[None])


class _Masks(Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        return self.split.mask(index)


def read_masks(split, workers):
    """Every mask of ``split``, checked, as (N, S, S) uint8."""
    loader = DataLoader(_Masks(split), batch_size=64, num_workers=workers)
    return torch.cat(list(loader))


def _pairs(images, masks, names=None):
    """(image, mask) paths: the images of folder ``images`` (or the stems ``names`` as .jpg), each with
    ``masks/<stem>.png``; an image without its mask is refused."""
    if names is None:
        paths = sorted(p for p in glob.glob(os.path.join(images, '*')) if p.lower().endswith(IMAGE_EXTENSIONS))
    else:
        paths = [os.path.join(images, f'{name}.jpg') for name in names]
    pairs = [(p, os.path.join(masks, os.path.splitext(os.path.basename(p))[0] + '.png')) for p in paths]
    for image, mask in pairs:
        for path, what in ((image, 'image'), (mask, f'mask of {image}')):
            if not os.path.isfile(path):
                raise SimRegError(f'no {what}: {path} does not exist; every image needs a PNG mask of the same '
                                  f'stem (remove the image or add its mask)')
    if not pairs:
        raise SimRegError(f'no images in {images}: {LAYOUTS_HELP}')
    return pairs


def open_splits(root, size, num_classes=None):
    """{split: Split} of the dataset at ``root`` (the layout recognised from its folders)."""
    voc = next((d for d in (root, os.path.join(root, 'VOC2012'), os.path.join(root, 'VOCdevkit', 'VOC2012'))
                if os.path.isdir(os.path.join(d, 'ImageSets', 'Segmentation'))), None)
    ade = next((d for d in (root, os.path.join(root, 'ADEChallengeData2016'))
                if os.path.isdir(os.path.join(d, 'annotations', 'training'))), None)
    identity = np.arange(256, dtype=np.uint8)
    if voc:
        layout, classes, labels = 'VOC', 21, identity  # 0 background, 20 objects, 255 borders

        def pairs(split):
            with open(os.path.join(voc, 'ImageSets', 'Segmentation', f'{split}.txt')) as f:
                names = f.read().split()
            return _pairs(os.path.join(voc, 'JPEGImages'), os.path.join(voc, 'SegmentationClass'), names)
    elif ade:
        layout, classes = 'ADE20k', 150
        labels = np.concatenate([[IGNORE], np.arange(255)]).astype(np.uint8)  # 0 'other' ignored, 1..150 -> 0..149
        folder = {'train': 'training', 'val': 'validation'}
        pairs = lambda split: _pairs(os.path.join(ade, 'images', folder[split]),
                                     os.path.join(ade, 'annotations', folder[split]))
    elif all(os.path.isdir(os.path.join(root, s, 'images')) for s in SPLITS):
        if num_classes is None:
            raise SimRegError(f'{root} is a plain images/ + masks/ folder: pass --num_classes (labels 0..n-1)')
        layout, classes, labels = 'folder', num_classes, identity
        pairs = lambda split: _pairs(os.path.join(root, split, 'images'), os.path.join(root, split, 'masks'))
    else:
        raise SimRegError(f'{root} is not a segmentation dataset this probe reads: {LAYOUTS_HELP}')
    if num_classes not in (None, classes):
        raise SimRegError(f'{layout} has {classes} classes: drop --num_classes {num_classes}')
    return {split: Split(root, pairs(split), layout, classes, labels, size) for split in SPLITS}


class DenseModel(nn.Module):
    """The backbone's feature map, as features.extract_features runs a model."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return feature_map(self.backbone, images)


class DenseCache:
    """The maps of each split (float16, L2-normalised per location) in ``<folder>/dense_<split>_feats.npy`` with a
    sidecar; reused only when made from the same weights, images, size, layout and --amp."""

    CHECKED = ('weights_sha256', 'layout', 'image_size', 'amp', 'split', 'num_samples', 'file_list_sha256')

    def __init__(self, folder, weights_sha256, image_size, amp):
        self.folder, self.recipe = folder, dict(weights_sha256=weights_sha256, image_size=image_size, amp=amp)

    def store(self, split):
        path = os.path.join(self.folder, f'dense_{split}_feats')
        return Store(path + '.json', {'features': path + '.npy'})

    def expected(self, split, dataset):
        return {**self.recipe, 'layout': dataset.layout, 'split': split, 'num_samples': len(dataset),
                'file_list_sha256': dataset_fingerprint(dataset)['file_list_sha256']}

    def load(self, split, dataset):
        store = self.store(split)
        if not store.exists():
            return None
        recorded = store.meta()
        hint = 'delete those files, pass another --save, or run without --load_cache to recompute them'
        wrong = differing(recorded, self.expected(split, dataset), self.CHECKED)
        if wrong:
            raise SimRegError(f'cached {split} feature maps {store.sidecar} were made with {wrong[0]}='
                              f'{recorded.get(wrong[0])}, not for this run: {hint}')
        try:
            features = store.open({'features': ((len(dataset), *recorded['shape']), np.float16)}, mmap=False)
        except (StoreMismatch, FileNotFoundError):
            raise SimRegError(f'cached {split} feature maps in {self.folder} are incomplete: {hint}') from None
        return torch.from_numpy(features['features'])

    def save(self, split, dataset, features):
        meta = {**self.expected(split, dataset), 'shape': list(features.shape[1:]), 'dtype': 'float16',
                'l2_normalized': 'per location', 'created': time.strftime('%Y-%m-%d %H:%M:%S')}
        self.store(split).write({'features': features.numpy()}, meta)


@torch.no_grad()
def build_classifier(features, num_classes):
    """Standardise each channel with the train maps' statistics, then a 1x1 convolution to the classes."""
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in features.split(STATS_CHUNK):
        chunk = chunk.double()
        total += chunk.sum((0, 2, 3))
        total_sq += (chunk * chunk).sum((0, 2, 3))
    n = features.shape[0] * features.shape[2] * features.shape[3]
    mean = total / n
    var = ((total_sq - n * mean * mean) / max(n - 1, 1)).clamp_min(0)
    return nn.Sequential(Standardize(var.float()[:, None, None], mean.float()[:, None, None]),
                         nn.Conv2d(features.shape[1], num_classes, 1))


def logits_at(classifier, features, size):
    """The classifier's logits, upsampled (bilinear) to the masks' ``size``."""
    return F.interpolate(classifier(features.float()), size=size, mode='bilinear', align_corners=False)


def train(classifier, features, masks, epochs, lr, weight_decay, batch_size, device, generator):
    """AdamW with a cosine schedule, cross-entropy over the labelled pixels; the mean loss of each epoch."""
    classifier.to(device).train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(len(features) / batch_size))
    losses = []
    for _ in range(epochs):
        total = pixels = 0.0
        for rows in torch.randperm(len(features), generator=generator).split(batch_size):
            target = masks[rows].to(device).long()
            logits = logits_at(classifier, features[rows].to(device), target.shape[-2:])
            labelled = (target != IGNORE).sum()
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction='sum') / labelled.clamp_min(1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, pixels = total + loss.item() * labelled.item(), pixels + labelled.item()
        losses.append(total / max(pixels, 1))
    return losses


@torch.no_grad()
def evaluate(classifier, features, masks, num_classes, batch_size, device):
    """{miou, per_class_iou} in %: IoU = TP / (TP + FP + FN) over the labelled pixels of all masks; a class that
    is neither in the masks nor predicted has no IoU (None) and is left out of the mean."""
    classifier.to(device).eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for rows in torch.arange(len(features)).split(batch_size):
        target = masks[rows].to(device).long()
        predicted = logits_at(classifier, features[rows].to(device), target.shape[-2:]).argmax(1)
        labelled = target != IGNORE
        confusion += torch.bincount(target[labelled] * num_classes + predicted[labelled],
                                    minlength=num_classes * num_classes)
    confusion = confusion.view(num_classes, num_classes).double().cpu()
    hits = confusion.diag()
    iou = hits / (confusion.sum(0) + confusion.sum(1) - hits)  # NaN where the class is nowhere
    return {'miou': 100 * iou.nanmean().item(),
            'per_class_iou': [None if math.isnan(v) else 100 * v for v in iou.tolist()]}
