"""Data: views with the original's meanings, uint8 + on-device normalisation, indexed folders."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from data.folders import build_dataset, decode_rgb
from data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TwoViews, eval_transform, normalize,
                             strong_transform, weak_transform)


@pytest.fixture
def pil_image():
    yy, xx = np.mgrid[0:80, 0:100]
    rng = np.random.RandomState(0)
    pixels = 127 + 60 * np.sin(xx[..., None] / 7 + np.arange(3)) + rng.normal(0, 20, (80, 100, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture
def image(pil_image):
    return T.PILToTensor()(pil_image)


def test_normalize_equals_totensor_plus_normalize(pil_image, image):
    reference = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(pil_image))
    assert torch.allclose(normalize(image.unsqueeze(0))[0], reference, atol=1e-5)


def test_weak_view_is_the_original_crop_and_flip(pil_image, image):
    """Same RNG -> same crop and flip as the original's PIL float pipeline, same pixels within one
    grey level (uint8 antialiased resize vs PIL's)."""
    original = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.)), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-5
    for seed in range(10):
        torch.manual_seed(seed)
        ours = normalize(weak_transform(32)(image).unsqueeze(0))[0]
        torch.manual_seed(seed)
        reference = original(pil_image)
        assert (ours - reference).abs().max() <= one_level


def test_decode_matches_pil_for_every_imagenet_oddity(tmp_path, pil_image):
    """JPEG, a PNG named .JPEG, CMYK and grayscale JPEGs decode to PIL's RGB pixels."""
    cases = {'plain.JPEG': ('RGB', 'JPEG'), 'png.JPEG': ('RGB', 'PNG'), 'cmyk.JPEG': ('CMYK', 'JPEG'),
             'gray.JPEG': ('L', 'JPEG')}
    for name, (mode, fmt) in cases.items():
        pil_image.convert(mode).save(tmp_path / name, format=fmt)
        reference = T.PILToTensor()(Image.open(tmp_path / name).convert('RGB'))
        decoded = decode_rgb(str(tmp_path / name))
        assert decoded.dtype == torch.uint8 and torch.equal(decoded, reference), name


def test_strong_view_runs_every_augmentation(image):
    torch.manual_seed(0)
    views = [strong_transform(32)(image) for _ in range(20)]
    assert all(v.dtype == torch.uint8 and v.shape == (3, 32, 32) for v in views)
    gray = [v for v in views if torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])]
    assert 0 < len(gray) < 20  # grayscale applied with p=0.2


def test_two_views_flags(image):
    torch.manual_seed(0)
    single = TwoViews(32, weak_weak=True, single_aug=True)(image)
    assert isinstance(single, torch.Tensor) and single.shape == (3, 32, 32)
    student, teacher = TwoViews(32, weak_weak=True)(image)
    assert not torch.equal(student, teacher)  # two independent weak crops
    views = TwoViews(32, weak_strong=True)
    assert 'ColorJitter' in repr(views.student_transform) and 'ColorJitter' not in repr(views.teacher_transform)
    default = TwoViews(32)  # the original without flags: strong views for both nets
    assert 'ColorJitter' in repr(default.student_transform) and 'ColorJitter' in repr(default.teacher_transform)


def test_eval_transform_resizes_then_center_crops(pil_image, image):
    out = eval_transform(64)(image)
    reference = T.Compose([T.Resize(73), T.CenterCrop(64), T.PILToTensor()])(pil_image)
    assert out.shape == (3, 64, 64)
    assert (out.int() - reference.int()).abs().max() <= 1


def test_indexed_folder_returns_indices(image_folder):
    dataset = build_dataset(image_folder, 'train', eval_transform(32))
    index, sample, label = dataset[5]
    assert index == 5 and sample.shape == (3, 32, 32) and label == dataset.targets[5]
    assert dataset.classes == ['class_0', 'class_1', 'class_2']
