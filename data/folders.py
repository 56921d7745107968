"""Image folders: ImageFolder with sample indices, image decoding with clear errors, the one subsetter
(ImageNet-100, the k-NN train subset) and the --dataset flag."""
import io
import os
import struct
import zlib

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from utils.errors import SimRegError


def read_bytes(path):
    """A file's bytes as a uint8 tensor, in ordinary memory so DataLoader workers can pass it on."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as exc:
        raise SimRegError(f'cannot read image {path} ({exc.strerror}): check the file') from None
    if not data:
        raise SimRegError(f'cannot read image {path} (empty file): delete or replace the file')
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(path):
    """Decode an image file to a uint8 RGB tensor (C, H, W)."""
    return decode_bytes(read_bytes(path), path)


JPEG_MAGIC = b'\xff\xd8\xff'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def is_jpeg(data):
    """Whether an encoded image (uint8 tensor) starts like a JPEG: only those go to torchvision's decoders
    (its PNG decoder crashes the process on a truncated PNG)."""
    return len(data) >= 3 and bytes(data[:3].tolist()) == JPEG_MAGIC


def decode_bytes(data, name):
    """Decode a file's bytes (uint8 tensor) to a uint8 RGB tensor (C, H, W): JPEGs with torchvision, the rest (ImageNet
    has a PNG named .JPEG, CMYK JPEGs) with PIL, a PNG checked for truncation first; unreadable: SimRegError."""
    if is_jpeg(data):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass
    raw = data.numpy().tobytes()
    try:
        check_png_rows(raw)
        return pil_to_tensor(Image.open(io.BytesIO(raw)).convert('RGB'))
    except UnidentifiedImageError:
        reason = 'not an image format PIL knows, or corrupt'
    except (OSError, ValueError, SyntaxError, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise SimRegError(f'cannot read image {name} ({reason}): delete or replace the file')


_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def check_png_rows(raw):
    """ValueError when the PNG ``raw`` inflates to fewer bytes than its header's size needs (a non-PNG passes)."""
    if not raw.startswith(PNG_MAGIC) or raw[12:16] != b'IHDR' or len(raw) < 33:
        return
    width, height, depth, colour, _, _, interlace = struct.unpack('>IIBBBBB', raw[16:29])
    bits = depth * _PNG_SAMPLES.get(colour, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    needed = 0
    for x0, y0, dx, dy in passes:
        cols, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if cols > 0 and rows > 0:
            needed += rows * (1 + (cols * bits + 7) // 8)  # a filter byte per row
    inflate, pos, got = zlib.decompressobj(), 8, 0
    while pos + 8 <= len(raw) and got < needed:
        length, kind = struct.unpack('>I4s', raw[pos:pos + 8])
        if kind == b'IDAT':
            got += len(inflate.decompress(raw[pos + 8:pos + 8 + length], needed - got))
        pos += 12 + length
    if got < needed:
        raise ValueError(f'PNG data ends before the {width}x{height} pixels its header promises')


class IndexedImageFolder(datasets.ImageFolder):
    """``(index, image, label)`` samples, the index addressing cached teacher features; ``encoded=True`` gives
    each file's bytes undecoded (``--gpu_decode``)."""

    def __init__(self, root, transform=None, encoded=False):
        if not os.path.isdir(root):
            raise SimRegError(f'data folder {root} does not exist: pass the dataset root that holds '
                              f'train/ (and val/) with one sub-folder per class')
        if not any(e.is_dir() for e in os.scandir(root)):
            raise SimRegError(f'data folder {root} has no class sub-folders: lay images out as {root}/<class>/<image>')
        try:
            super().__init__(root, transform=transform, loader=read_bytes if encoded else decode_rgb)
        except FileNotFoundError as exc:
            raise SimRegError(f'{exc} in {root}: every class folder needs at least one image') from None

    def __getitem__(self, index):
        return index, *super().__getitem__(index)


def add_dataset_arg(parser, note=''):
    """--dataset, the same in every script; ``note`` adds to its help."""
    parser.add_argument('--dataset', default='imagenet', choices=('imagenet', 'imagenet100'),
                        help="full dataset, or SimReg's 100-class subset" + note)


def imagenet100_classes(classes, num_classes=100, seed=1234):
    """SimReg's ImageNet-100: the first 100 of a numpy seed-1234 permutation of the sorted classes, in sorted order."""
    order = np.random.RandomState(seed).permutation(len(classes))[:num_classes]
    return [classes[i] for i in sorted(order)]


def restrict_folder(dataset, classes=None, per_class=None, seed=0):
    """Restrict an ImageFolder in place, its samples, targets and classes kept consistent: to ``classes``
    (relabelled 0..len(classes)-1 in that order), and/or to ``per_class`` images of every class (all of a
    smaller one), chosen by a numpy permutation seeded with ``seed``, in the dataset's order."""
    if classes is not None:
        new_label = {dataset.class_to_idx[c]: i for i, c in enumerate(classes)}
        dataset.samples = [(p, new_label[y]) for p, y in dataset.samples if y in new_label]
        dataset.classes = list(classes)
        dataset.class_to_idx = {c: i for i, c in enumerate(classes)}
    if per_class is not None:
        if per_class < 1:
            raise SimRegError(f'--knn_train_per_class / --train_per_class must be at least 1, got {per_class}')
        targets = np.array([y for _, y in dataset.samples])
        rng = np.random.RandomState(seed)
        keep = []
        for label in range(len(dataset.classes)):
            members = np.flatnonzero(targets == label)
            keep.extend(members[rng.permutation(len(members))[:per_class]].tolist())
        dataset.samples = [dataset.samples[i] for i in sorted(keep)]
    dataset.imgs = dataset.samples
    dataset.targets = [y for _, y in dataset.samples]
    return dataset


def build_dataset(data_root, split, transform, dataset='imagenet', encoded=False):
    """``<data_root>/<split>`` as an IndexedImageFolder; ``dataset='imagenet100'`` keeps ``imagenet100_classes``
    of the classes of ``split`` (so train and val agree)."""
    folder = IndexedImageFolder(os.path.join(data_root, split), transform=transform, encoded=encoded)
    if dataset == 'imagenet100':
        if len(folder.classes) < 100:
            raise SimRegError(f'--dataset imagenet100 needs at least 100 classes, '
                              f'{data_root}/{split} has {len(folder.classes)}')
        restrict_folder(folder, imagenet100_classes(folder.classes))
    return folder
