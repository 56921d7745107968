"""The original's augmentations on uint8 image tensors; normalisation happens on the device.

Images are decoded straight to uint8 tensors (``data.folders.decode_rgb``) and cropped, resized and
flipped as uint8: the same crops as the original's PIL pipeline (same parameters from the same RNG)
and the same pixels within one grey level, about 1.5-2x faster per image on a CPU, and batches 4x
smaller than float32. ``normalize`` on the device then gives the values of the original's
``ToTensor() + Normalize()``.
"""
import functools
import math

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from data.folders import decode_bytes, is_jpeg
from data.gpu_views import BatchedViews, EncodedSample
from data.sampler import sample_seed

WEAK_SCALE = (0.2, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_SIGMA = (0.1, 2.0)
# the original blurred with PIL's GaussianBlur(radius=sigma): a kernel reaching 3 sigma covers it
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1


def weak_transform(size):
    """RandomResizedCrop(size, scale 0.2-1) + horizontal flip: the paper's view."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=WEAK_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def strong_transform(size):
    """The weak view plus MoCo-v2 colour jitter, grayscale and Gaussian blur, in the original's order
    (the original crashed here: ``random`` and ``ImageFilter`` were not imported)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=WEAK_SCALE, antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=0.5),
        v2.RandomHorizontalFlip(),
    ])


def eval_transform(size):
    """Resize(size * 256/224) + CenterCrop(size): the evaluation view."""
    return v2.Compose([
        v2.Resize(int(round(size * 256 / 224)), antialias=True),
        v2.CenterCrop(size),
    ])


class TwoViews:
    """Student and teacher views, with the original flags' meanings.

    The original built ``TwoCropsTransform(weak, strong)`` with (weak, strong) = (weak, strong)
    for --weak_strong, (weak, weak) for --weak_weak and (strong, strong) otherwise; the student
    got the second, the teacher the first; given both flags, --weak_strong won, as it does here.
    --single_aug returns one view, fed to both nets.
    """

    def __init__(self, size, weak_strong=False, weak_weak=False, single_aug=False):
        if weak_strong:
            teacher_t, student_t = weak_transform(size), strong_transform(size)
        elif weak_weak:
            teacher_t, student_t = weak_transform(size), weak_transform(size)
        else:
            teacher_t, student_t = strong_transform(size), strong_transform(size)
        self.student_transform, self.teacher_transform = student_t, teacher_t
        self.single_aug = single_aug

    def __call__(self, image):
        student_view = self.student_transform(image)
        if self.single_aug:
            return student_view
        return student_view, self.teacher_transform(image)

    def __repr__(self):
        return (f'TwoViews(single_aug={self.single_aug},\n student={self.student_transform},\n'
                f' teacher={self.teacher_transform})')


def decode_batch_on(device, encoded, name_of):
    """Decode a batch of encoded images on ``device``: one batched nvjpeg call for JPEGs on CUDA; files that
    are no JPEG (PNG, ...) and whatever the device decoder refuses (CMYK, ...) are decoded on the CPU
    (``decode_bytes``) and moved over; ``name_of(j)`` names the j-th file for the error message when neither
    can read it. Returns the list of uint8 (3, H, W) images."""
    if all(is_jpeg(data) for data in encoded):
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    return [decode_one_on(device, data, name_of, j) for j, data in enumerate(encoded)]


def decode_views_on(device, encoded, views, name_of, seed_of):
    """Decode a batch on ``device`` (``decode_batch_on``) and draw each image's views there, one image at a
    time, the j-th from torch's random stream seeded with ``seed_of(j)`` (its sample's seed, as the loader's
    workers do); returns what the loader would have (a batch, or two). ``--gpu_decode`` trains with the
    batched ``data.gpu_views.BatchedViews`` instead; this per-image path is its reference and its
    benchmark's "before" (``DeviceInput(batched=False)``)."""
    images = decode_batch_on(device, encoded, name_of)
    per_image = []
    for j, image in enumerate(images):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(j))
            per_image.append(views(image))
    if isinstance(per_image[0], torch.Tensor):
        return torch.stack(per_image)
    return tuple(torch.stack(view) for view in zip(*per_image))


def batched_views_on(device, samples, batched, name_of, seed_of):
    """``--gpu_decode``'s batch: ``samples`` are the loader's ``EncodedSample`` (bytes, header size, the
    views' parameters drawn in the worker by ``data.gpu_views.ViewParams``), or plain bytes. Decoded on
    ``device``, then every view made for the whole batch by ``batched`` (a ``BatchedViews``). An image
    whose parameters are missing (plain bytes, an unreadable header) or were drawn for another size than
    it decodes to has them drawn here from its sample's seed ``seed_of(j)``, as the worker would have."""
    sized = [s if isinstance(s, EncodedSample) else EncodedSample(s, None, None) for s in samples]
    images = decode_batch_on(device, [s.data for s in sized], name_of)
    params = []
    for j, (sample, image) in enumerate(zip(sized, images)):
        if sample.params is None or tuple(sample.size) != tuple(image.shape[1:]):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_of(j))
                sample = sample._replace(params=batched.draw(*image.shape[1:]))
        params.append(sample.params)
    return batched(images, torch.stack(params))


class DeviceInput:
    """A training batch from the loader -> (student input, teacher input): on the device, normalised, in the
    model's memory format; the same tensor twice when one view serves both nets. With ``--gpu_decode``
    (``gpu_views``, the view transform, given) the batch holds encoded files (with their views' parameters,
    drawn by the workers' ``data.gpu_views.ViewParams``), decoded on the device and augmented there for the
    whole batch at once (``data.gpu_views.BatchedViews``; ``batched=False``: one image at a time, the
    reference path), each image's views from its sample's seed in ``epoch`` (``data.sampler.sample_seed``);
    ``file_of(index)`` names a sample's file for the error message when it cannot be read."""

    def __init__(self, device, memory_format, single_view, gpu_views=None, file_of=None, seed=0,
                 dtype=torch.float32, batched=True):
        self.device, self.memory_format, self.single_view, self.dtype = device, memory_format, single_view, dtype
        self.gpu_views, self.file_of, self.seed, self.epoch = gpu_views, file_of, seed, 0
        self.batched = BatchedViews(gpu_views) if gpu_views is not None and batched else None

    def __call__(self, index, images):
        if self.gpu_views is not None:
            images = self.decode_views(index, images)
        if self.single_view:
            student_in = teacher_in = self.to_input(images)
        else:
            student_in, teacher_in = self.to_input(images[0]), self.to_input(images[1])
        return student_in, teacher_in

    def decode_views(self, index, samples):
        """``--gpu_decode``: the loader's encoded samples -> the uint8 view batch (or two) on the device."""
        name_of = lambda j: self.file_of(int(index[j]))
        seed_of = lambda j: sample_seed(self.seed, self.epoch, int(index[j]))
        if self.batched is not None:
            return batched_views_on(self.device, samples, self.batched, name_of, seed_of)
        encoded = [s.data if isinstance(s, EncodedSample) else s for s in samples]
        return decode_views_on(self.device, encoded, self.gpu_views, name_of, seed_of)

    def to_input(self, uint8_images):
        images = normalize(uint8_images.to(self.device, non_blocking=True), self.dtype)
        return images.contiguous(memory_format=self.memory_format)


def decode_one_on(device, data, name_of, position):
    """One encoded image on ``device``: a JPEG by the device decoder if it can, anything else by ``decode_bytes``."""
    if is_jpeg(data):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    return decode_bytes(data, name_of(position)).to(device)


@functools.lru_cache(maxsize=None)
def _mean_std_255(device):
    """The normalisation constants on ``device``, made once: building them per call is a blocking
    host-to-GPU copy, a sync on every training step."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(images, dtype=torch.float32):
    """uint8 NCHW batch on any device -> float, ImageNet mean/std normalised."""
    mean, std = _mean_std_255(images.device)
    return ((images.float() - mean) / std).to(dtype)
