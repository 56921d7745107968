"""Data: views with the original's meanings, uint8 + on-device normalisation, indexed folders."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from data.folders import build_dataset, decode_rgb
from data.sampler import SeededSamples
from data.transforms import (IMAGENET_MEAN, IMAGENET_STD, DeviceInput, TwoViews, eval_transform, in_thread, normalize,
                             normalize_as, strong_transform, weak_transform)


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


def total_variation(image):
    """The sum of the absolute differences of neighbouring pixels: a blur lowers it."""
    image = image.int()
    return (image.diff(dim=-1).abs().sum() + image.diff(dim=-2).abs().sum()).item()


def test_strong_view_runs_every_augmentation(image):
    """MoCo-v2's strong view: RandomResizedCrop (scale 0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8,
    grayscale with p=0.2, Gaussian blur (sigma 0.1-2) with p=0.5, horizontal flip. Replayed one op at a
    time from each view's seed, every op does its part in about its share of the views, and the ops in
    turn make exactly the views strong_transform makes."""
    strong = strong_transform(32)
    crop, jitter, gray, blur, flip = strong.transforms
    assert isinstance(crop, v2.RandomResizedCrop) and crop.size == (32, 32) and crop.scale == (0.2, 1.0)
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8 and isinstance(jitter.transforms[0], v2.ColorJitter)
    assert [getattr(jitter.transforms[0], name) for name in ('brightness', 'contrast', 'saturation', 'hue')] == \
        [pytest.approx((0.6, 1.4))] * 3 + [pytest.approx((-0.1, 0.1))]
    assert isinstance(gray, v2.RandomGrayscale) and gray.p == 0.2
    assert isinstance(blur, v2.RandomApply) and blur.p == 0.5 and isinstance(blur.transforms[0], v2.GaussianBlur)
    assert list(blur.transforms[0].sigma) == [0.1, 2.0]
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5

    views, areas, done = 60, [], {'jitter': 0, 'gray': 0, 'blur': 0, 'flip': 0}
    height, width = image.shape[1:]
    for seed in range(views):
        torch.manual_seed(seed)
        view = strong(image)
        assert view.dtype == torch.uint8 and view.shape == (3, 32, 32)

        torch.manual_seed(seed)
        box = crop.make_params([image])  # what crop(image) draws
        areas.append(box['height'] * box['width'] / (height * width))
        assert 0.19 < areas[-1] <= 1 and 0.7 < box['width'] / box['height'] < 1.4, box
        cropped = crop.transform(image, box)
        assert torch.equal(cropped, v2.functional.resized_crop(
            image, box['top'], box['left'], box['height'], box['width'], [32, 32], antialias=True))
        jittered = jitter(cropped)
        if not torch.equal(jittered, cropped):
            done['jitter'] += 1  # brightness x0.6-1.4; contrast, saturation and hue keep the mean grey level
            assert 0.5 < jittered.float().mean() / cropped.float().mean() < 1.5
        grayed = gray(jittered)
        if not torch.equal(grayed, jittered):
            done['gray'] += 1
            assert torch.equal(grayed[0], grayed[1]) and torch.equal(grayed[1], grayed[2])
        blurred = blur(grayed)
        if not torch.equal(blurred, grayed):
            done['blur'] += 1
            assert total_variation(blurred) < total_variation(grayed)
        flipped = flip(blurred)
        if not torch.equal(flipped, blurred):
            done['flip'] += 1
            assert torch.equal(flipped, blurred.flip(-1))
        assert torch.equal(flipped, view), seed  # nothing else happens, in this order
    assert min(areas) < 0.4 and max(areas) > 0.8  # the crops span the scale range
    # each op in about its share p of the views (within 3 standard deviations); a blur with a sigma near
    # 0.1 leaves the pixels as they were, and counts as not done
    for op, p in [('jitter', 0.8), ('gray', 0.2), ('blur', 0.5), ('flip', 0.5)]:
        margin = 3 * (views * p * (1 - p)) ** 0.5
        assert p * views - margin - (6 if op == 'blur' else 0) <= done[op] <= p * views + margin, (op, done)


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


def test_seeded_samples_draw_the_manual_seed_streams(image):
    """SeededSamples' cheap seeding gives the streams of fork_rng + torch.manual_seed, and leaves the caller's."""
    from benchmarks.reference import ManualSeededSamples

    class Views:
        def __getitem__(self, index):
            return strong_transform(32)(image), torch.rand(4)
    ours, reference = SeededSamples(Views(), 7), ManualSeededSamples(Views(), 7)
    torch.manual_seed(0)
    for key in [(1, 0), (1, 5), (2, 5), (3, 123456)]:
        a, b = ours[key], reference[key]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), key
    assert not torch.equal(ours[(1, 0)][1], ours[(1, 1)][1])
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)  # the caller's stream went on as if nothing was drawn


def test_normalize_as_writes_the_autocast_dtype_once():
    """CUDA's fused normalise (run here on the CPU): normalize's values, rounded once to the dtype, channels_last."""
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float16):
        out = normalize_as(images, dtype, torch.channels_last)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, normalize(images).to(dtype), rtol=2 ** -7, atol=1e-6)


def test_device_input_batches_in_turn_on_the_cpu():
    """On the CPU, batches() is DeviceInput applied to each loader batch in turn, float32 as before."""
    loader = [(torch.arange(2) + 2 * k, torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.zeros(2))
              for k in range(3)]
    to_device = DeviceInput(torch.device('cpu'), torch.contiguous_format, True, torch.bfloat16)
    out = list(to_device.batches(loader, 1))
    assert len(out) == 3
    for (index, (student_in, teacher_in), _), (expected_index, images, _) in zip(out, loader):
        assert torch.equal(index, expected_index) and student_in is teacher_in
        assert torch.equal(student_in, normalize(images))


def test_in_thread_keeps_order_raises_and_stops():
    """The decode-ahead thread: results in order, a failure raised in the consumer, closing stops it early."""
    assert list(in_thread(iter(range(20)), lambda x: x * x)) == [x * x for x in range(20)]

    def fail(x):
        if x == 3:
            raise ValueError('bad batch 3')
        return x
    got = []
    with pytest.raises(ValueError, match='bad batch 3'):
        for x in in_thread(iter(range(10)), fail):
            got.append(x)
    assert got == [0, 1, 2]
    seen = []
    items = in_thread(iter(range(1000)), seen.append)
    next(items)
    items.close()  # joins the thread
    assert len(seen) < 10
