"""The original's augmentations, producing uint8 tensors; normalisation happens on the device.

Shipping uint8 instead of float32 makes batches 4x smaller; ``normalize`` on the device then
gives the same values as the original ``ToTensor() + Normalize()`` on the CPU.
"""
import torch
from PIL import ImageFilter
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PILGaussianBlur:
    """SimCLR's blur as the original applies it: PIL GaussianBlur, radius ~ U(sigma).

    The original forgot to import ``random`` and ``ImageFilter`` and crashed on every strong
    view; the radius is drawn from torch's RNG here so runs are seeded like the rest.
    """

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        lo, hi = self.sigma
        radius = lo + (hi - lo) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f'{type(self).__name__}(sigma={self.sigma})'


def weak_transform(size):
    """RandomResizedCrop(size, scale 0.2-1) + horizontal flip: the paper's view."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])


def strong_transform(size):
    """The weak view plus MoCo-v2 colour jitter, grayscale and blur, in the original's order."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])


def eval_transform(size):
    """Resize(size * 256/224) + CenterCrop(size): the evaluation view."""
    return v2.Compose([
        v2.Resize(int(round(size * 256 / 224)), antialias=True),
        v2.CenterCrop(size),
        v2.PILToTensor(),
    ])


class TwoViews:
    """Student and teacher views, with the original flags' meanings.

    The original built ``TwoCropsTransform(weak, strong)`` with (weak, strong) = (weak, strong)
    for --weak_strong, (weak, weak) for --weak_weak and (strong, strong) otherwise; the student
    got the second, the teacher the first. --single_aug returns one view, fed to both nets.
    """

    def __init__(self, size, weak_strong=False, weak_weak=False, single_aug=False):
        if weak_weak:
            teacher_t, student_t = weak_transform(size), weak_transform(size)
        elif weak_strong:
            teacher_t, student_t = weak_transform(size), strong_transform(size)
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


def normalize(images, dtype=torch.float32):
    """uint8 NCHW batch on any device -> float, ImageNet mean/std normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).to(dtype)
