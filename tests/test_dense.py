"""Feature maps and dense targets (models/dense.py) and the segmentation probe (eval_dense.py).

The DINOv2 references (tests/fixtures/dense_reference_*) were recorded by running facebookresearch/dinov2's own
code on the ViT fixtures' weights (tests/fixtures/record_dense_references.py)."""
import functools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import read_json, write_student_checkpoint
from fixture_weights import FIXTURES, uniform, vit_state_dict
from models import load_backbone
from models.backbones import build_backbone
from evaluation.dense_probe import open_splits
from models.dense import feature_and_map, feature_map
from utils.errors import SimRegError, exit_on_user_error

# one network of every family (students, and the BYOL teacher's ResNet), the input size it is checked at
FAMILY_ARCHS = [('resnet18', 64), ('resnext50_32x4d', 64), ('byol_resnet50', 64), ('regnet_y_400mf', 64),
                ('shufflenet_v2_x0_5', 64), ('densenet121', 64), ('mobilenet', 64), ('mobilenet_v3_small', 64),
                ('efficientnet_b0', 64), ('mnasnet0_5', 64), ('convnext_tiny', 64), ('vgg11', 64), ('alexnet', 64),
                ('swin_t', 64), ('swin_v2_t', 64), ('maxvit_t', 224), ('resnet10t', 64), ('vit_tiny_patch16', 64),
                ('vit_small_patch14_reg4_dinov2', 56), ('vit_b_16', 224)]


@pytest.mark.parametrize('arch, size', FAMILY_ARCHS)
def test_the_map_pooled_as_the_backbone_pools_is_its_feature(one_thread, arch, size):
    """The feature computed from the map (a ViT: from the same tokens) is the backbone's own forward."""
    torch.manual_seed(0)
    model = build_backbone(arch, size if arch == 'vit_tiny_patch16' else None).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        (feature, fmap), expected = feature_and_map(model, images), model(images)
        assert fmap.ndim == 4 and fmap.shape[-1] > 0 and torch.equal(fmap, feature_map(model, images))
    assert feature.shape == expected.shape == (2, model.feat_dim)
    assert torch.allclose(feature, expected, atol=1e-5, rtol=1e-5)


def test_torchvision_vit_map_is_its_patch_tokens(one_thread):
    """torchvision's ViT pools by taking the class token: its map is the other tokens of the same encoder run."""
    torch.manual_seed(0)
    model = build_backbone('vit_b_16').eval()
    tokens = {}
    model.encoder.register_forward_hook(lambda module, inputs, output: tokens.update(out=output))
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fmap = feature_map(model, images)
        feature = model(images)
    assert fmap.shape == (1, 768, 14, 14)
    assert torch.equal(tokens['out'][:, 0], feature)
    assert torch.allclose(fmap.flatten(2).transpose(1, 2), tokens['out'][:, 1:], atol=1e-5)
    with pytest.raises(SimRegError, match='vit_b_16 takes 224x224 images only'):
        feature_map(model, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize('arch', ['vit_tiny_patch16', 'vit_small_patch14_reg4_dinov2'])
def test_vit_map_is_the_normed_patch_tokens_as_a_grid(one_thread, arch):
    """timm's own route to the last block's normed patch tokens (prefix tokens dropped) gives the same grid."""
    torch.manual_seed(0)
    model = build_backbone(arch, 64 if arch == 'vit_tiny_patch16' else None).eval()
    patch = model.patch_embed.patch_size[0]
    images = torch.randn(2, 3, 4 * patch, 3 * patch)
    with torch.no_grad():
        fmap = feature_map(model, images)
        timm_map = model.forward_intermediates(images, indices=1, norm=True, output_fmt='NCHW',
                                               intermediates_only=True)[0]
    assert fmap.shape == (2, model.embed_dim, 4, 3)
    assert torch.equal(fmap, timm_map)
    with pytest.raises(SimRegError, match='does not divide into the'):
        feature_map(model, torch.randn(1, 3, 4 * patch + 1, 3 * patch))


def test_a_network_without_a_map_is_refused_in_one_line():
    with pytest.raises(SimRegError, match='Linear has no feature map here: the families with one are resnet, '):
        feature_map(torch.nn.Linear(3, 3), torch.zeros(1, 3))


# --- DINOv2 patch tokens vs the release -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _dense_references():
    with np.load(os.path.join(FIXTURES, 'dense_reference_outputs.npz')) as data:
        return {k: torch.from_numpy(data[k]).float() for k in data.files}


@pytest.mark.parametrize('name', ['dinov2_vits14_patchtokens', 'dinov2_vits14_reg4_patchtokens'])
def test_dinov2_dense_targets_are_the_releases_x_norm_patchtokens(tmp_path, one_thread, name):
    ref = read_json(os.path.join(FIXTURES, 'dense_reference_models.json'))[name]
    path = tmp_path / 'dinov2.pth'
    torch.save(vit_state_dict(ref['weights']), path)  # DINOv2's hub file: the backbone's bare state dict
    teacher = load_backbone(ref['project_arch'], str(path))
    images = (uniform(ref['input_key'], int(np.prod(ref['input_shape']))) * 4.0).float().reshape(ref['input_shape'])
    with torch.no_grad():
        targets = feature_map(teacher, images)
    assert list(targets.shape) == [2, 384, *ref['grid']]
    tokens = targets.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major over the grid like the release's
    reference = _dense_references()[name]
    assert tokens.shape == reference.shape
    cosine = F.cosine_similarity(tokens.double(), reference.double(), dim=-1)
    assert cosine.min().item() >= 0.9999, cosine.min().item()


# --- the segmentation probe ---------------------------------------------------------------------------------

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]
STRIPE = slice(28, 36)  # rows of grey, labelled 255 (ignored) in every mask


def make_segmentation_folder(root, per_class=3, size=64):
    """``root/<split>/{images,masks}``: each image one flat colour (its class) with a grey stripe labelled 255."""
    for split in ('train', 'val'):
        for folder in ('images', 'masks'):
            os.makedirs(os.path.join(root, split, folder), exist_ok=True)
        for c, colour in enumerate(COLOURS):
            for i in range(per_class):
                image = np.empty((size, size, 3), np.uint8)
                image[:] = colour
                image[STRIPE] = 128 + 10 * i
                mask = np.full((size, size), c, np.uint8)
                mask[STRIPE] = 255
                Image.fromarray(image).save(os.path.join(root, split, 'images', f'{c}_{i}.png'))
                Image.fromarray(mask).save(os.path.join(root, split, 'masks', f'{c}_{i}.png'))
    return str(root)


@pytest.fixture
def seg_workspace(tmp_path):
    make_segmentation_folder(tmp_path / 'seg')
    torch.manual_seed(0)
    torch.save({'state_dict': build_backbone('resnet18').state_dict()}, tmp_path / 'resnet18.pth')
    return tmp_path


def eval_dense(ws, *args, weights=('--weights', 'resnet18.pth', '-a', 'resnet18'), save='out'):
    """eval_dense.py in this process, as its command line runs it (a SimRegError: one line, exit 2)."""
    import eval_dense
    argv = [str(ws / 'seg'), weights[0], str(ws / weights[1]), *weights[2:], '--image_size', '64', '-j', '0',
            '--num_classes', '3', '--save', str(ws / save), *args]
    return exit_on_user_error(lambda: eval_dense.main(eval_dense.get_args_parser().parse_args(argv)))


def refused(capsys, run):
    """The error line of a command that exits 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run()
    assert exit.value.code == 2
    return capsys.readouterr().err.strip()


def test_probe_segments_colours_perfectly_and_reuses_its_cache(seg_workspace, one_thread, capsys):
    ws = seg_workspace
    report = eval_dense(ws, '--epochs', '20', '--lr', '0.01')
    assert report['miou'] == 100.0 and report['per_class_iou'] == [100.0] * 3
    assert read_json(ws / 'out' / 'dense_results.json')['miou'] == 100.0
    assert report['settings']['layout'] == 'folder' and report['settings']['map_shape'] == [512, 2, 2]
    assert report['train_loss'][-1] < report['train_loss'][0]
    capsys.readouterr()
    again = eval_dense(ws, '--epochs', '20', '--lr', '0.01', '--load_cache')
    assert 'train feature maps: reusing the cache' in capsys.readouterr().out
    assert again['train_loss'] == report['train_loss'] and again['miou'] == 100.0
    assert 'were made with image_size=64, not for this run' in refused(
        capsys, lambda: eval_dense(ws, '--image_size', '32', '--load_cache'))
    write_student_checkpoint(ws / 'student.pth', seed=0)  # the same resnet18 as resnet18.pth, with a head
    student = eval_dense(ws, '--epochs', '20', '--lr', '0.01', weights=('--weights', 'student.pth'), save='student')
    assert student['train_loss'] == report['train_loss'] and student['settings']['epoch'] == 1


def _bad_size(ws):
    path = ws / 'seg' / 'val' / 'masks' / '1_2.png'
    Image.fromarray(np.zeros((60, 64), np.uint8)).save(path)
    return f'error: mask {path} is 64x60, its image {ws}/seg/val/images/1_2.png is 64x64: a mask must have its ' \
           f'image\'s size'


def _bad_label(ws):
    path = ws / 'seg' / 'train' / 'masks' / '0_1.png'
    Image.fromarray(np.full((64, 64), 3, np.uint8)).save(path)
    return f'error: mask {path} holds label 3, above the 3 classes of this folder dataset (255 = ignore): fix the ' \
           f'mask or pass --num_classes'


def _no_mask(ws):
    path = ws / 'seg' / 'val' / 'masks' / '2_0.png'
    os.remove(path)
    return f'error: no mask of {ws}/seg/val/images/2_0.png: {path} does not exist; every image needs a PNG mask ' \
           f'of the same stem (remove the image or add its mask)'


def _colour_mask(ws):
    path = ws / 'seg' / 'train' / 'masks' / '2_2.png'
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    return f'error: mask {path} is a RGB image, not an index mask (PNG of mode L or P, one class index per pixel): ' \
           f'convert it'


@pytest.mark.parametrize('damage', [_bad_size, _bad_label, _no_mask, _colour_mask])
def test_bad_masks_are_one_line_and_exit_2_with_nothing_written(seg_workspace, capsys, damage):
    expected = damage(seg_workspace)
    assert refused(capsys, lambda: eval_dense(seg_workspace)) == expected
    assert not os.path.exists(seg_workspace / 'out')


def test_a_plain_folder_needs_its_class_count(seg_workspace):
    with pytest.raises(SimRegError, match=r'seg is a plain images/ \+ masks/ folder: pass --num_classes'):
        open_splits(str(seg_workspace / 'seg'), 64)
    with pytest.raises(SimRegError, match='is not a segmentation dataset this probe reads: a folder with train/'):
        open_splits(str(seg_workspace), 64)


def _png(path, values, palette=False):
    values = np.asarray(values, np.uint8)
    image = Image.frombytes('P' if palette else 'L', values.shape[::-1], values.tobytes())
    if palette:
        image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 756 + [224, 224, 192])  # VOC's colours
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def _jpg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(path)


MASK = np.tile(np.arange(64) % 4, (64, 1))  # columns 0 1 2 3 0 1 ...


def test_voc_layout_is_read_with_its_lists_and_palette_masks(tmp_path):
    voc = tmp_path / 'VOCdevkit' / 'VOC2012'
    lists = {'train': ['2007_000032', '2007_000039'], 'val': ['2007_000033']}
    for split, names in lists.items():
        os.makedirs(voc / 'ImageSets' / 'Segmentation', exist_ok=True)
        (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text('\n'.join(names) + '\n')
        for name in names:
            _jpg(voc / 'JPEGImages' / f'{name}.jpg')
            _png(voc / 'SegmentationClass' / f'{name}.png', np.where(MASK == 3, 255, MASK), palette=True)
    _jpg(voc / 'JPEGImages' / '2007_000099.jpg')  # not in a list: not used
    splits = open_splits(str(tmp_path), 56)  # 56: resized to 64, then the centre 56 x 56
    assert [len(splits[s]) for s in ('train', 'val')] == [2, 1] and splits['val'].num_classes == 21
    assert splits['train'].samples[1] == (str(voc / 'JPEGImages' / '2007_000039.jpg'),
                                          str(voc / 'SegmentationClass' / '2007_000039.png'))
    assert torch.equal(splits['val'].mask(0), torch.from_numpy(np.where(MASK == 3, 255, MASK)[4:60, 4:60]).byte())
    with pytest.raises(SimRegError, match='VOC has 21 classes: drop --num_classes 3'):
        open_splits(str(tmp_path), 56, 3)


def test_ade20k_layout_ignores_other_and_shifts_labels(tmp_path):
    ade = tmp_path / 'ADEChallengeData2016'
    for split, folder in (('train', 'training'), ('val', 'validation')):
        _jpg(ade / 'images' / folder / f'ADE_{split}_00000001.jpg')
        _png(ade / 'annotations' / folder / f'ADE_{split}_00000001.png', np.where(MASK == 3, 150, MASK))
    splits = open_splits(str(ade), 56)
    assert splits['train'].layout == 'ADE20k' and splits['train'].num_classes == 150
    expected = np.select([MASK == 0, MASK == 3], [255, 149], MASK - 1)[4:60, 4:60]
    assert torch.equal(splits['train'].mask(0), torch.from_numpy(expected).byte())
    _png(ade / 'annotations' / 'validation' / 'ADE_val_00000001.png', np.full((64, 64), 151))
    with pytest.raises(SimRegError, match='holds label 151, above the 150 classes of this ADE20k dataset'):
        open_splits(str(tmp_path), 56)['val'].mask(0)
