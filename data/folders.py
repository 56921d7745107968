"""Image folders: ImageFolder with sample indices, unlabelled images (a folder at any depth or a list of files),
image decoding with clear errors, the one subsetter (ImageNet-100, the k-NN train subset) and the --dataset flag."""
import contextlib
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


def read_checked(path):
    """``read_bytes`` for ``--gpu_decode``'s workers: a JPEG over PIL's decompression-bomb limit is refused there, from
    its header, before the device decoder sees it (other files are decoded by ``decode_bytes``, which checks them)."""
    data = read_bytes(path)
    if is_jpeg(data):  # a damaged header is left to the main process's decode, which names the file
        with contextlib.suppress(OSError, ValueError, SyntaxError), bomb_refused(path), \
                Image.open(io.BytesIO(data.numpy().tobytes())):  # the header only
            pass
    return data


@contextlib.contextmanager
def bomb_refused(name):
    """PIL's DecompressionBombError (raised from the header, before any pixel is decoded) as a SimRegError."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise SimRegError(f"cannot read image {name} ({str(exc).split(', could')[0]}: PIL's decompression-bomb "
                          f'limit): shrink the image or delete the file') from None


JPEG_MAGIC = b'\xff\xd8\xff'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
WHITE = (255, 255, 255, 255)  # what transparent pixels show


def is_jpeg(data):
    """Whether an encoded image (uint8 tensor) starts like a JPEG: only those go to torchvision's decoders
    (its PNG decoder crashes the process on a truncated PNG)."""
    return len(data) >= 3 and bytes(data[:3].tolist()) == JPEG_MAGIC


def decode_bytes(data, name):
    """Decode a file's bytes (uint8 tensor) to a uint8 RGB tensor (C, H, W): JPEGs with torchvision, the rest (ImageNet
    has a PNG named .JPEG, CMYK JPEGs) with PIL (``to_rgb``), a PNG checked for truncation first. Unreadable, or
    over PIL's decompression-bomb limit (checked from the header, before decoding): SimRegError naming the file."""
    raw = data.numpy().tobytes()
    try:
        with bomb_refused(name), Image.open(io.BytesIO(raw)) as image:  # reads the header; refuses a bomb
            if raw.startswith(JPEG_MAGIC):
                with contextlib.suppress(RuntimeError, ValueError):
                    return decode_jpeg(data, mode=ImageReadMode.RGB)
            check_png_rows(raw)
            return pil_to_tensor(to_rgb(image))
    except UnidentifiedImageError:
        reason = 'not an image format PIL knows, or corrupt'
    except (OSError, ValueError, SyntaxError, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise SimRegError(f'cannot read image {name} ({reason}): delete or replace the file')


_16_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB: 16-bit samples scaled (their high byte), 32-bit integer ones too when
    they fit 16 bits, floats in [0, 1] times 255, other integer or float ranges stretched from min..max to 0..255
    (never clipped); transparent pixels over white; LAB, HSV, CMYK, YCbCr converted. Animated: the first frame."""
    if image.mode in _16_BIT + ('I', 'F'):
        return Image.fromarray(scaled_to_8_bits(np.asarray(image), image.mode)).convert('RGB')
    if image.mode == 'La':  # premultiplied alpha, which PIL converts only to LA
        image = image.convert('LA')
    if image.has_transparency_data:
        return Image.alpha_composite(Image.new('RGBA', image.size, WHITE), image.convert('RGBA')).convert('RGB')
    return image.convert('RGB')


def scaled_to_8_bits(pixels, mode):
    """uint8 of a 16-bit, 32-bit integer or float array (see ``to_rgb``); ValueError for NaN or infinite pixels."""
    if mode in _16_BIT:
        return (pixels.astype(np.uint16) >> 8).astype(np.uint8)
    pixels = pixels.astype(np.float64 if mode == 'I' else np.float32)
    if not np.isfinite(pixels).all():
        raise ValueError('it holds NaN or infinite pixel values')
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if mode == 'I' and low >= 0 and high <= 65535:
        return (pixels // 256).astype(np.uint8)
    if mode == 'F' and low >= 0 and high <= 1:
        return np.rint(pixels * 255).astype(np.uint8)
    return np.rint((pixels - low) * (255 / max(high - low, 1e-12))).astype(np.uint8)


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
        chunk = raw[pos + 8:pos + 8 + length] if kind == b'IDAT' else b''
        while chunk and got < needed:  # in bounded pieces: counted, never held
            got += len(inflate.decompress(chunk, min(needed - got, 1 << 22)))
            chunk = inflate.unconsumed_tail
        pos += 12 + length
    if got < needed:
        raise ValueError(f'PNG data ends before the {width}x{height} pixels its header promises')


# The files a folder's images may be: torchvision's extensions and the other raster formats PIL reads (a fixed
# list, so that every process of a run lists the same files whatever its PIL was built with)
IMAGE_EXTENSIONS = datasets.folder.IMG_EXTENSIONS + (
    '.jpe', '.jfif', '.gif', '.apng', '.pbm', '.pnm', '.pfm', '.dib', '.ico', '.cur', '.tga', '.jp2', '.j2k',
    '.jpx', '.jpf', '.pcx', '.sgi', '.bw', '.qoi', '.psd', '.avif', '.dds', '.icns', '.xbm', '.xpm', '.msp', '.ras')


class IndexedImageFolder(datasets.ImageFolder):
    """``(index, image, label)`` samples, the index addressing cached teacher features; ``encoded=True`` gives
    each file's bytes undecoded (``--gpu_decode``). Files that are not images (by extension) or hidden are left
    out, and ``skipped`` says how many of each, in one line that the first process prints."""

    def __init__(self, root, transform=None, encoded=False):
        if not os.path.isdir(root):
            raise SimRegError(f'data folder {root} does not exist: pass the dataset root that holds '
                              f'train/ (and val/) with one sub-folder per class')
        if not any(e.is_dir() for e in os.scandir(root)):
            raise SimRegError(f'data folder {root} has no class sub-folders: lay images out as {root}/<class>/<image>')
        left_out = {}
        try:
            super().__init__(root, transform=transform, loader=read_checked if encoded else decode_rgb,
                             is_valid_file=lambda path: is_image_file(path, left_out))
        except FileNotFoundError as exc:
            raise SimRegError(f'{exc} in {root}: every class folder needs at least one image') from None
        self.skipped = skipped_line(root, left_out)

    def __getitem__(self, index):
        return index, *super().__getitem__(index)


def is_image_file(path, left_out):
    """Whether ``path`` is one of a folder's images; if not, counted in ``left_out`` {kind: count}."""
    name = os.path.basename(path)
    kind = 'hidden' if name.startswith('.') else os.path.splitext(name)[1].lower() or 'no extension'
    if kind in IMAGE_EXTENSIONS:
        return True
    left_out[kind] = left_out.get(kind, 0) + 1
    return False


def skipped_line(root, left_out):
    """The one line that says which files of ``root`` were left out (printed by the first process), or None."""
    if not left_out:
        return None
    kinds = ', '.join(f'{n} {kind}' for kind, n in sorted(left_out.items(), key=lambda item: (-item[1], item[0])))
    line = (f'note: {root}: left out {sum(left_out.values())} files that are not images ({kinds}); to use them, '
            f'convert them to one of {" ".join(e[1:] for e in IMAGE_EXTENSIONS[:9])} ...')
    if os.environ.get('RANK', '0') == '0':
        print(line, flush=True)
    return line


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
    of the classes of ``split`` (so train and val agree). The train split of a ``data_root`` without ``train/`` is
    its images at any depth, or those a text file ``data_root`` lists, unlabelled (``unlabelled_images``)."""
    if split == 'train' and not is_labelled(data_root):
        if not os.path.exists(data_root):
            raise SimRegError(f'data folder {data_root} does not exist: pass a folder of images (at any depth), a '
                              f'text file listing image paths, or a dataset root holding train/<class>/<image>')
        if dataset != 'imagenet':
            raise SimRegError(f'--dataset {dataset} picks classes of {data_root}/train/<class>, which does not '
                              f'exist: drop --dataset for a folder of unlabelled images')
        return unlabelled_images(data_root, transform, encoded)
    folder = IndexedImageFolder(os.path.join(data_root, split), transform=transform, encoded=encoded)
    if dataset == 'imagenet100':
        if len(folder.classes) < 100:
            raise SimRegError(f'--dataset imagenet100 needs at least 100 classes, '
                              f'{data_root}/{split} has {len(folder.classes)}')
        restrict_folder(folder, imagenet100_classes(folder.classes))
    return folder


def is_labelled(data_root):
    """Whether the training images are class folders (``<data_root>/train/<class>/<image>``)."""
    return os.path.isdir(os.path.join(data_root, 'train'))


class ImageList(torch.utils.data.Dataset):
    """``(index, image, 0)`` samples of image files without classes, decoded (or left encoded) as
    ``IndexedImageFolder``'s; ``root``: the folder the paths are keyed relative to (teacher caches)."""

    def __init__(self, root, paths, transform=None, encoded=False, skipped=None):
        self.root, self.transform, self.skipped = root, transform, skipped
        self.loader = read_checked if encoded else decode_rgb
        self.samples = [(path, 0) for path in paths]
        self.targets = [0] * len(paths)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image = self.loader(self.samples[index][0])
        return index, self.transform(image) if self.transform is not None else image, 0


def unlabelled_images(source, transform=None, encoded=False):
    """An ImageList of the images in the folder ``source`` and its sub-folders (hidden ones left out, paths
    sorted), or of the files a text file ``source`` lists, one per line, relative to its folder or absolute."""
    if os.path.isfile(source):
        root, paths, skipped = os.path.dirname(os.path.abspath(source)), read_image_list(source), None
    else:
        root, left_out, paths = source, {}, []
        for folder, subfolders, names in os.walk(source, onerror=unreadable_folder, followlinks=True):
            subfolders[:] = [name for name in subfolders if not name.startswith('.')]
            paths += [os.path.join(folder, name) for name in names if is_image_file(name, left_out)]
        if not paths:
            raise SimRegError(f'{source} holds no images (at any depth): put images in it (e.g. '
                              f'{" ".join(e[1:] for e in IMAGE_EXTENSIONS[:5])}), or pass another folder')
        paths, skipped = sorted(paths), skipped_line(source, left_out)
    return ImageList(root, paths, transform, encoded, skipped)


def unreadable_folder(exc):
    raise SimRegError(f'cannot read folder {exc.filename} ({exc.strerror}): make it readable, or pass another folder')


def read_image_list(path):
    """The image paths a text file lists, one per line (blank lines skipped), each checked to be a file."""
    try:
        with open(path, encoding='utf-8') as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise SimRegError(f'cannot read {path} as a list of image paths ({str(exc).splitlines()[0]}): pass a '
                          f'folder of images or a text file with one image path per line') from None
    folder = os.path.dirname(os.path.abspath(path))
    paths = [os.path.join(folder, line) for line in lines if line]  # an absolute line stays as it is
    if not paths:
        raise SimRegError(f'image list {path} names no images: write one image path per line (relative to '
                          f'{folder}, or absolute)')
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SimRegError(f'image list {path} names {len(missing)} file(s) that do not exist (e.g. {missing[0]}): '
                          f'fix the list (paths are relative to {folder}, or absolute)')
    return paths
