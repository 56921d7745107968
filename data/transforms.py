"""The training and evaluation views on uint8 image tensors (``data.folders.decode_rgb``), and their
normalisation on the device (``normalize``, ``DeviceInput``): the values of ``ToTensor() + Normalize()``.
"""
import functools
import math
import queue
import threading

import torch
from torchvision.transforms import v2

WEAK_SCALE = (0.2, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_SIGMA = (0.1, 2.0)
# MoCo-v2's blur is PIL's GaussianBlur(radius=sigma): a kernel reaching 3 sigma covers it
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1


def weak_transform(size):
    """RandomResizedCrop(size, scale 0.2-1) + horizontal flip: the paper's view."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=WEAK_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def strong_transform(size):
    """The weak view plus MoCo-v2 colour jitter, grayscale and Gaussian blur, in SimReg's order."""
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
    """(student view, teacher view): teacher weak and student strong for --weak_strong (which wins when both flags
    are given), both weak for --weak_weak, both strong otherwise; --single_aug: one student view, fed to both nets.
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


class DeviceInput:
    """A training batch from the loader -> (student input, teacher input): on the device, normalised, in the
    model's memory format; the same tensor twice when one view serves both nets. On CUDA with an autocast
    ``dtype`` the input is written once in that dtype; ``batches`` makes it one batch ahead."""

    def __init__(self, device, memory_format, single_view, dtype=None):
        self.device, self.memory_format, self.single_view = device, memory_format, single_view
        self.dtype = dtype if device.type == 'cuda' else None  # the CPU keeps float32 inputs

    def __call__(self, index, images, epoch):
        if self.single_view:
            student_in = teacher_in = self.to_input(images)
        else:
            student_in, teacher_in = self.to_input(images[0]), self.to_input(images[1])
        return student_in, teacher_in

    def batches(self, loader, epoch):
        """The loader's batches as (index, (student input, teacher input), label)."""
        return ahead(loader, lambda batch: (batch[0], self(batch[0], batch[1], epoch), batch[2]), self.device)

    def to_input(self, uint8_images):
        images = uint8_images.to(self.device, non_blocking=True)
        if self.dtype is not None:
            return normalize_as(images, self.dtype, self.memory_format)
        return normalize(images).contiguous(memory_format=self.memory_format)


@functools.lru_cache(maxsize=None)
def _mean_std_255(device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The normalisation constants on ``device``, made once: building them per call is a blocking
    host-to-GPU copy, a sync on every training step."""
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 NCHW batch on any device -> float32, normalised with ``mean``/``std`` (0-1 units; ImageNet's)."""
    mean, std = _mean_std_255(images.device, tuple(mean), tuple(std))
    return (images.float() - mean) / std


def normalize_as(images, dtype, memory_format):
    """``normalize`` as one kernel that reads the uint8 batch once and writes ``dtype`` in ``memory_format`` once:
    x / std - mean / std, in float32."""
    shift, scale = _shift_scale(images.device)
    out = torch.empty(images.shape, dtype=dtype, device=images.device, memory_format=memory_format)
    return torch.addcmul(shift, images, scale, out=out)


@functools.lru_cache(maxsize=None)
def _shift_scale(device):
    mean, std = _mean_std_255(device)
    return -mean / std, 1 / std


def ahead(loader, make, device):
    """``make(batch)`` for the loader's batches. On CUDA one batch ahead, on a thread and a stream of their own
    (host-to-device copies included), so the loop's wait for an item is the step's wait for its input; elsewhere
    in turn."""
    if device.type != 'cuda':
        return map(make, loader)
    stream = torch.cuda.Stream(device)

    def on_stream(batch):
        with torch.cuda.stream(stream):
            out = make(batch)
        stream.synchronize()  # done: the batch's host buffers can go back to the allocator
        return out

    def on_compute_stream(out):
        for tensor in out[1]:  # its memory is not reused for the side stream while the step reads it
            tensor.record_stream(torch.cuda.current_stream(device))
        return out
    return map(on_compute_stream, in_thread(iter(loader), on_stream, lambda: torch.cuda.set_device(stream.device)))


_DONE = object()


def in_thread(items, fn, setup=None):
    """``fn(item)`` for each of ``items``, computed on a thread one item ahead of the consumer; its exception is
    raised in the consumer; closing the generator stops the thread."""
    results, stop = queue.Queue(maxsize=1), threading.Event()

    def put(entry):
        while not stop.is_set():
            try:
                return results.put(entry, timeout=0.1)
            except queue.Full:
                pass

    def work():
        try:
            if setup is not None:
                setup()
            for item in items:
                put((fn(item), None))
                if stop.is_set():
                    return
            put((_DONE, None))
        except BaseException as exc:  # noqa: B036 (handed to the consumer, which raises it)
            put((None, exc))

    thread = threading.Thread(target=work, name='input-ahead', daemon=True)
    thread.start()
    try:
        while True:
            out, exc = results.get()
            if exc is not None:
                raise exc
            if out is _DONE:
                return
            yield out
    finally:
        stop.set()
        thread.join()
