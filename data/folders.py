"""ImageFolder that returns each sample's index, with checks that fail early and clearly."""
import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.functional import pil_to_tensor

from utils.errors import SimRegError


def read_bytes(path):
    """A file's bytes as a uint8 tensor, in ordinary memory so DataLoader workers can pass it on."""
    try:
        with open(path, 'rb') as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    except OSError as exc:
        raise SimRegError(f'cannot read image {path} ({exc.strerror}): check the file') from None


def decode_rgb(path):
    """Decode an image file to a uint8 RGB tensor (C, H, W)."""
    return decode_bytes(read_bytes(path), path)


def decode_bytes(data, name):
    """Decode an encoded image (uint8 tensor of the file's bytes) to a uint8 RGB tensor (C, H, W).

    ``decode_image`` reads JPEG, PNG (ImageNet has a PNG named .JPEG), CMYK and grayscale JPEGs;
    PIL is the fallback for anything else, and a file neither can read gets a message naming it.
    """
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        pass
    try:
        return pil_to_tensor(Image.open(io.BytesIO(data.numpy().tobytes())).convert('RGB'))
    except UnidentifiedImageError:
        reason = 'not an image format PIL knows, or corrupt'
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise SimRegError(f'cannot read image {name} ({reason}): delete or replace the file')


def encoded_collate(batch):
    """Batch of (index, encoded bytes, label): the byte strings differ in length, so they stay a list."""
    indices, encoded, labels = zip(*batch)
    return torch.tensor(indices), list(encoded), torch.tensor(labels)


class IndexedImageFolder(datasets.ImageFolder):
    """``(index, image, label)`` samples; the index addresses cached teacher features.

    ``encoded=True`` returns each file's bytes undecoded, for decoding on the GPU (``--gpu_decode``).
    """

    def __init__(self, root, transform=None, encoded=False):
        check_image_root(root)
        try:
            super().__init__(root, transform=transform, loader=read_bytes if encoded else decode_rgb)
        except FileNotFoundError as exc:
            raise SimRegError(f'{exc} in {root}: every class folder needs at least one image') from None

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        return index, image, label


def check_image_root(root):
    """A split folder must exist and hold class sub-folders."""
    if not os.path.isdir(root):
        raise SimRegError(f'data folder {root} does not exist: pass the dataset root that holds '
                          f'train/ (and val/) with one sub-folder per class')
    if not any(e.is_dir() for e in os.scandir(root)):
        raise SimRegError(f'data folder {root} has no class sub-folders: lay images out as '
                          f'{root}/<class>/<image>')


def imagenet100_classes(classes, num_classes=100, seed=1234):
    """The original's ImageNet-100: a numpy seed-1234 permutation of the sorted classes, first 100,
    kept in sorted order."""
    order = np.random.RandomState(seed).permutation(len(classes))[:num_classes]
    return [classes[i] for i in sorted(order)]


def keep_classes(dataset, keep):
    """Restrict an ImageFolder to ``keep`` classes, relabelled 0..len(keep)-1 in sorted order.

    The original wrote the new mapping to a misspelt ``classes_to_idx`` and never imported
    numpy; both are fixed here, and ``targets`` stays consistent with ``samples``.
    """
    new_label = {dataset.class_to_idx[c]: i for i, c in enumerate(keep)}
    dataset.samples = [(p, new_label[y]) for p, y in dataset.samples if y in new_label]
    dataset.imgs = dataset.samples
    dataset.targets = [y for _, y in dataset.samples]
    dataset.classes = list(keep)
    dataset.class_to_idx = {c: i for i, c in enumerate(keep)}
    return dataset


def build_dataset(data_root, split, transform, dataset='imagenet', encoded=False):
    """``<data_root>/<split>`` as an IndexedImageFolder; ``dataset='imagenet100'`` keeps the original's
    100-class subset (chosen from the classes of ``split``, so train and val agree)."""
    folder = IndexedImageFolder(os.path.join(data_root, split), transform=transform, encoded=encoded)
    if dataset == 'imagenet100':
        if len(folder.classes) < 100:
            raise SimRegError(f'--dataset imagenet100 needs at least 100 classes, '
                              f'{data_root}/{split} has {len(folder.classes)}')
        keep_classes(folder, imagenet100_classes(folder.classes))
    elif dataset != 'imagenet':
        raise SimRegError(f"unknown --dataset '{dataset}': use imagenet or imagenet100")
    return folder
