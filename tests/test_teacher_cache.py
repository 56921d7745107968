"""Teacher feature cache: row gathering, dataset checks, the original format, cached training."""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from data.folders import build_dataset
from data.teacher_cache import (TeacherFeatureCache, dataset_fingerprint, open_teacher_cache,
                                write_cache)
from utils.errors import SimRegError


@pytest.fixture
def dataset(image_folder):
    return build_dataset(image_folder, 'train', None)


def make_cache(path, dataset, dim=16, seed=0):
    features = np.random.RandomState(seed).randn(len(dataset), dim).astype(np.float16)
    write_cache(str(path), [features], {'teacher': {'arch': 'resnet18'},
                                        'dataset': dataset_fingerprint(dataset),
                                        'transform': 'eval', 'image_size': 32})
    return features


def test_rows_follow_sample_indices(tmp_path, dataset):
    features = make_cache(tmp_path / 'f.npy', dataset)
    cache = open_teacher_cache(str(tmp_path / 'f.npy'), dataset)
    indices = torch.tensor([7, 0, 23, 7])
    rows = cache.rows(indices)
    assert rows.dtype == torch.float16 and np.array_equal(rows.numpy(), features[[7, 0, 23, 7]])
    assert cache.feat_dim == 16


def test_cache_for_another_dataset_is_refused(tmp_path, dataset):
    make_cache(tmp_path / 'f.npy', dataset)
    other = build_dataset(make_image_folder(tmp_path / 'other', n_classes=3, per_class=9), 'train', None)
    with pytest.raises(SimRegError, match='has 24 rows.*27 images'):
        open_teacher_cache(str(tmp_path / 'f.npy'), other)
    renamed = tmp_path / 'renamed'
    shutil.copytree(dataset.root, renamed)
    os.rename(renamed / 'class_2' / '000.jpg', renamed / 'class_2' / 'zzz.jpg')
    with pytest.raises(SimRegError, match='another file list'):
        open_teacher_cache(str(tmp_path / 'f.npy'), build_dataset(str(tmp_path), 'renamed', None))


def test_truncated_or_missing_cache_is_refused(tmp_path, dataset):
    make_cache(tmp_path / 'f.npy', dataset)
    np.save(tmp_path / 'f.npy', np.zeros((5, 16), np.float16))
    with pytest.raises(SimRegError, match='incomplete'):
        TeacherFeatureCache(str(tmp_path / 'f.npy'))
    with pytest.raises(SimRegError, match='cache_teacher_feats.py'):
        TeacherFeatureCache(str(tmp_path / 'none.npy'))


def test_original_format_is_converted_once(tmp_path, dataset):
    torch.save({}, tmp_path / 'ambiguous.pth')
    with pytest.raises(SimRegError, match='repeat across class folders'):
        open_teacher_cache(str(tmp_path / 'ambiguous.pth'), dataset)
    for path, _ in dataset.samples:  # ImageNet's file names are unique, like n01440764_10026.JPEG
        os.rename(path, os.path.join(os.path.dirname(path), os.path.basename(os.path.dirname(path)) + '_'
                                     + os.path.basename(path)))
    dataset = build_dataset(os.path.dirname(dataset.root), 'train', None)
    by_name = {os.path.basename(p): torch.full((8,), float(i)) for i, (p, _) in enumerate(dataset.samples)}
    torch.save(by_name, tmp_path / 'orig.pth')
    notes = []
    cache = open_teacher_cache(str(tmp_path / 'orig.pth'), dataset, notes.append)
    assert cache.path == str(tmp_path / 'orig.npy') and len(notes) == 1 and 'converted' in notes[0]
    assert np.array_equal(cache.rows(torch.arange(len(dataset)))[:, 0].numpy(), np.arange(len(dataset)))
    open_teacher_cache(str(tmp_path / 'orig.pth'), dataset, notes.append)
    assert len(notes) == 1  # reused, not converted again
