"""The demo dataset: byte-for-byte reproducible, safely reused, and learnable from its shapes."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from data.folders import IndexedImageFolder
from demo import synthetic
from evaluation import dense_probe
from conftest import run_command
from utils.errors import SimRegError

SMALL = dict(num_classes=10, train_per_class=3, val_per_class=2, image_size=32)


def file_hashes(root):
    """``{relative path: sha256}`` of every file under ``root``."""
    hashes = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                hashes[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def mtimes(root):
    return {path: os.stat(os.path.join(root, path)).st_mtime_ns for path in file_hashes(root)}


def test_same_seed_gives_identical_bytes_and_another_seed_different_images(tmp_path):
    first = file_hashes(synthetic.generate(tmp_path / 'a', seed=3, **SMALL))
    second = file_hashes(synthetic.generate(tmp_path / 'b', seed=3, **SMALL))
    other = file_hashes(synthetic.generate(tmp_path / 'c', seed=4, **SMALL))
    assert first == second
    images = [path for path in first if path.endswith('.jpg')]
    assert len(images) == 50
    assert all(first[path] != other[path] for path in images)


def test_an_image_does_not_depend_on_the_counts(tmp_path):
    few = file_hashes(synthetic.generate(tmp_path / 'few', seed=0, **SMALL))
    many = file_hashes(synthetic.generate(tmp_path / 'many', seed=0, **{**SMALL, 'train_per_class': 5}))
    assert all(many[path] == digest for path, digest in few.items() if path.endswith('.jpg'))


def test_layout_counts_and_image_format(tmp_path):
    root = synthetic.generate(tmp_path / 'd', num_classes=4, train_per_class=3, val_per_class=2,
                              image_size=40)
    names = ['00_circle', '01_square', '02_triangle', '03_star']
    assert sorted(os.listdir(root)) == ['synthetic.json', 'train', 'val']
    for split, per_class in (('train', 3), ('val', 2)):
        folder = IndexedImageFolder(os.path.join(root, split))
        assert folder.classes == names
        assert folder.targets == [c for c in range(4) for _ in range(per_class)]
        for path, _ in folder.samples:
            with Image.open(path) as image:
                assert (image.format, image.mode, image.size) == ('JPEG', 'RGB', (40, 40))
    with open(os.path.join(root, 'synthetic.json')) as f:
        assert json.load(f)['train_per_class'] == 3
    assert [e for e in os.listdir(tmp_path) if e != 'd'] == []  # no partial folder left behind


def test_a_complete_dataset_is_reused_without_writing(tmp_path, monkeypatch):
    root = synthetic.generate(tmp_path / 'd', **SMALL)
    before = mtimes(root)

    def refuse(*args):
        raise AssertionError('a complete dataset was written again')
    monkeypatch.setattr(synthetic, 'write_split', refuse)
    assert synthetic.generate(tmp_path / 'd', **SMALL) == root
    assert mtimes(root) == before


def test_other_settings_or_missing_files_regenerate_cleanly(tmp_path):
    root = synthetic.generate(tmp_path / 'd', seed=0, **SMALL)
    seed_one = file_hashes(synthetic.generate(tmp_path / 'seed1', seed=1, **SMALL))
    assert file_hashes(synthetic.generate(root, seed=1, **SMALL)) == seed_one

    os.remove(os.path.join(root, 'val', '03_star', '0001.jpg'))
    assert file_hashes(synthetic.generate(root, seed=1, **SMALL)) == seed_one
    assert sorted(os.listdir(tmp_path)) == ['d', 'seed1']


def test_an_interrupted_generation_never_looks_complete(tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(synthetic, 'draw', crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path / 'd', **SMALL)
    assert os.listdir(tmp_path) == []


def test_a_folder_it_did_not_make_is_never_overwritten(tmp_path):
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'holiday.jpg').write_bytes(b'precious')
    with pytest.raises(SimRegError, match='holds no synthetic dataset'):
        synthetic.generate(tmp_path / 'photos', **SMALL)
    assert (tmp_path / 'photos' / 'holiday.jpg').read_bytes() == b'precious'
    with pytest.raises(SimRegError, match='--num_classes must be between 2 and 10'):
        synthetic.generate(tmp_path / 'd', **{**SMALL, 'num_classes': 11})


def test_command_writes_then_reuses(tmp_path):
    command = [sys.executable, '-m', 'demo.synthetic', str(tmp_path / 'd'), '--num_classes', '3',
               '--train_per_class', '2', '--val_per_class', '1', '--image_size', '32', '--seed', '5']
    wrote, reused = run_command(command), run_command(command)
    assert wrote.stdout.startswith('wrote 9 images of 3 classes (32px, seed 5)')
    assert reused.stdout.startswith('reused 9 images')
    bad = run_command(command + ['--image_size', '8'], expect=2)
    assert 'error: --image_size must be at least 16' in bad.stderr


def standardised_pixels(root, split):
    """Every image of a split as float tensors, each channel of each image scaled to zero mean and
    unit spread, so that a small network need not first learn to ignore colour."""
    folder = IndexedImageFolder(os.path.join(root, split), transform=v2.PILToTensor())
    images = torch.stack([image for _, image, _ in folder]).float()
    mean, std = images.mean((2, 3), keepdim=True), images.std((2, 3), keepdim=True)
    return (images - mean) / (std + 10), torch.tensor(folder.targets)


def dihedral(images):
    """A random flip/transpose of a batch: shape kind is invariant to it, so it is free data."""
    if torch.rand(()) < 0.5:
        images = images.flip(3)
    if torch.rand(()) < 0.5:
        images = images.flip(2)
    if torch.rand(()) < 0.5:
        images = images.transpose(2, 3)
    return images


def tiny_cnn(width=16, num_classes=10):
    """Three conv blocks and a global max pool: translation invariant, as shape position is noise."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                         *block(2 * width, 4 * width), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


@pytest.mark.slow
def test_classes_are_learnable_from_shape(tmp_path):
    """A tiny CNN trained for seconds beats chance (10%) by far. Colour and position do not give
    the class away (a linear probe on these raw pixels stays near chance), so this measures shape."""
    root = synthetic.generate(tmp_path / 'd', train_per_class=100, val_per_class=30, image_size=32)
    train_x, train_y = standardised_pixels(root, 'train')
    val_x, val_y = standardised_pixels(root, 'val')
    torch.manual_seed(0)
    net = tiny_cnn()
    epochs, batch_size = 12, 64
    optimizer = torch.optim.Adam(net.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 1e-2, epochs=epochs, steps_per_epoch=-(-len(train_x) // batch_size))
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(train_x)).split(batch_size):
            loss = F.cross_entropy(net(dihedral(train_x[batch])), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(val_x).argmax(1) == val_y).float().mean().item()
    print(f'tiny CNN val accuracy {accuracy:.3f}')
    assert accuracy >= 0.5  # 0.65-0.72 over data and init seeds 0-3


def test_masks_are_the_drawings_and_the_layout_is_what_eval_dense_reads(tmp_path):
    root = synthetic.generate(tmp_path / 'd', **SMALL)
    dense = synthetic.generate_dense(root, tmp_path / 'd_dense')
    splits = dense_probe.open_splits(dense, 32, num_classes=11)  # 10 shapes and the background
    assert {name: (split.layout, len(split)) for name, split in splits.items()} == {'train': ('folder', 30),
                                                                                   'val': ('folder', 20)}
    settings = json.loads((tmp_path / 'd' / 'synthetic.json').read_text())
    for label in range(10):
        name = synthetic.class_names(10)[label]
        image_path = os.path.join(dense, 'val', 'images', f'{name}_0001.jpg')
        with open(image_path, 'rb') as f, open(os.path.join(root, 'val', name, '0001.jpg'), 'rb') as g:
            assert f.read() == g.read()  # the dataset's own JPEG
        with Image.open(os.path.join(dense, 'val', 'masks', f'{name}_0001.png')) as mask:
            assert (mask.mode, mask.size) == ('L', (32, 32))
            mask = np.asarray(mask)
        coverage = synthetic.shape_mask(synthetic.SHAPES[label], 32, shape_rng(settings, 'val', label, 1))
        assert np.array_equal(mask == label, coverage >= 128) and set(np.unique(mask)) == {label, 10}
        # the shape's pixels are the ones of another colour: each mean is far from the other's
        pixels = np.asarray(Image.open(image_path)).astype(float)
        assert np.linalg.norm(pixels[mask == label].mean(0) - pixels[mask == 10].mean(0)) > 60
    before = mtimes(dense)
    assert synthetic.generate_dense(root, tmp_path / 'd_dense') == dense and mtimes(dense) == before  # reused
    assert sorted(os.listdir(tmp_path)) == ['d', 'd_dense']  # no partial folder left


def shape_rng(settings, split, label, index):
    """The image's RNG where its shape is drawn: after its background's draws."""
    rng = synthetic.image_rng(settings, split, label, index)
    synthetic.background(settings['image_size'], rng)
    return rng


def test_dense_command_and_a_folder_without_a_dataset(tmp_path):
    command = [sys.executable, '-m', 'demo.synthetic', str(tmp_path / 'd'), '--num_classes', '3',
               '--train_per_class', '2', '--val_per_class', '1', '--image_size', '32', '--dense', str(tmp_path / 'm')]
    assert f'their masks (class 3: background) and images in {tmp_path / "m"}' in run_command(command).stdout
    assert len(os.listdir(tmp_path / 'm' / 'train' / 'masks')) == 6
    with pytest.raises(SimRegError, match='holds no synthetic dataset: make it first'):
        synthetic.generate_dense(str(tmp_path / 'nothing'), str(tmp_path / 'n'))
