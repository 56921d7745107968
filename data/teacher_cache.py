"""Teacher features cached on disk: an fp16 ``.npy`` [N, D] in dataset order + a JSON sidecar.

Training memory-maps the array and gathers a batch's target rows by the sample indices the
loader returns, one vectorised read per batch. The original instead kept a Python dict
file name -> tensor of every feature in RAM (42 GB for a ResNet-50x4 teacher) and copied rows one
by one each step; such a file is converted once (``convert_original_cache``).

A multi-view cache (``cache_teacher_feats.py --cache_views K``) holds [N, K, D] features of K weak
views per image, and beside it ``<name>.views.npy``, each view's crop box and flip [N, K, 5]
(``data.transforms.VIEW_COLUMNS``): training replays a stored view for the student
(``ReplayedViews``) and regresses that view's row, so teacher and student see the same pixels.
"""
import hashlib
import json
import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from data.transforms import replay_weak_view
from utils.checkpoint import file_sha256, write_text_atomic
from utils.errors import SimRegError

FORMAT = 'simreg-teacher-features'


def sidecar_path(npy_path):
    return os.path.splitext(npy_path)[0] + '.json'


def views_path(npy_path):
    """Where a multi-view cache keeps its views (crop box + flip of each cached view)."""
    return os.path.splitext(npy_path)[0] + '.views.npy'


def dataset_fingerprint(dataset):
    """What a cache must agree with: sample count and the file list (relative paths, in order)."""
    relative = [os.path.relpath(path, dataset.root) for path, _ in dataset.samples]
    digest = hashlib.sha256('\n'.join(relative).encode()).hexdigest()
    return {'root': os.path.abspath(dataset.root), 'num_samples': len(relative),
            'file_list_sha256': digest}


class TeacherFeatureCache:
    """Read side: rows of the memory-mapped array, checked against the dataset."""

    def __init__(self, path):
        if not os.path.isfile(path) or not os.path.isfile(sidecar_path(path)):
            raise SimRegError(f'teacher feature cache {path} (with {sidecar_path(path)}) not found: '
                              f'build it with cache_teacher_feats.py')
        with open(sidecar_path(path)) as f:
            self.meta = json.load(f)
        if self.meta.get('format') != FORMAT:
            raise SimRegError(f'{sidecar_path(path)} is not a teacher feature sidecar: rebuild the '
                              f'cache with cache_teacher_feats.py')
        self.path = path
        self.features = np.load(path, mmap_mode='r')
        views = (self.num_views,) if self.num_views else ()
        expected = (self.meta['dataset']['num_samples'], *views, self.meta['dim'])
        if self.features.shape != expected or self.features.dtype != np.float16:
            raise SimRegError(f'{path} holds {self.features.dtype} {self.features.shape}, its sidecar '
                              f'says float16 {expected}: the file is incomplete; rebuild it')
        self.boxes = self.open_boxes() if self.num_views else None
        with warnings.catch_warnings():  # torch warns that the map is read-only: it is only read from
            warnings.simplefilter('ignore', UserWarning)
            self.table = torch.from_numpy(self.features).view(-1, self.feat_dim)  # a row per (sample, view)

    @property
    def feat_dim(self):
        return self.meta['dim']

    @property
    def num_views(self):
        """K for a cache of K views per image, None for one center crop per image."""
        return self.meta.get('views')

    def open_boxes(self):
        """The [N, K, 5] view boxes (crop box + flip), refused unless they are the very file the cache was built with."""
        path = views_path(self.path)
        if not os.path.isfile(path) or file_sha256(path) != self.meta.get('views_sha256'):
            state = 'is missing' if not os.path.isfile(path) else 'is not the one it was built with'
            raise SimRegError(f'{self.path} holds {self.num_views} views per image but their boxes file {path} '
                              f'{state}: delete {self.path} and rebuild it with cache_teacher_feats.py '
                              f'--cache_views {self.num_views}')
        return np.load(path, mmap_mode='r')

    def check_matches(self, dataset):
        """Refuse a cache made for other images: the rows would be other images' targets."""
        ours, theirs = dataset_fingerprint(dataset), self.meta['dataset']
        if ours['num_samples'] != theirs['num_samples']:
            raise SimRegError(f"teacher cache {self.path} has {theirs['num_samples']} rows, "
                              f"{ours['root']} has {ours['num_samples']} images: build the cache for "
                              f"this dataset (and --dataset)")
        if ours['file_list_sha256'] != theirs['file_list_sha256']:
            raise SimRegError(f"teacher cache {self.path} was built for another file list "
                              f"({theirs['root']}) than {ours['root']}: the same number of images but "
                              f"not the same files; rebuild the cache")

    def rows(self, indices, pin_memory=False):
        """fp16 CPU tensor of the rows for these sample indices (one index_select on the memmap); for a
        multi-view cache ``indices`` holds (sample, view) pairs [B, 2], as ``ReplayedViews`` returns.

        ``pin_memory=True`` gathers into page-locked memory from torch's caching host allocator, so the
        copy to a GPU is truly asynchronous, and a buffer is reused only once its copy is done."""
        if (indices.dim() == 2) != bool(self.num_views):
            raise ValueError(f'{self.path}: {indices.dim()}-d indices for a cache of '
                             f'{self.num_views or 1} view(s) per image')
        rows = indices[:, 0] * self.num_views + indices[:, 1] if indices.dim() == 2 else indices
        out = torch.empty((len(rows), self.feat_dim), dtype=self.table.dtype, pin_memory=pin_memory)
        return torch.index_select(self.table, 0, rows, out=out)


class ReplayedViews(Dataset):
    """Training samples for a multi-view cache: each time a sample is drawn it picks one of its K stored
    views at random (torch's RNG, which ``data.sampler.SeededSamples`` seeds from (seed, epoch, index) like
    every augmentation, so any worker, rank or resumed run makes the same choice) and returns ``((index, view), the replayed view, label)``; the teacher's
    target is that view's row."""

    def __init__(self, dataset, boxes, size):
        self.dataset = dataset
        self.boxes = boxes
        self.size = size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        path, label = self.dataset.samples[index]
        view = int(torch.randint(self.boxes.shape[1], ()))
        image = replay_weak_view(self.dataset.loader(path), self.boxes[index, view], self.size)
        return torch.tensor([index, view]), image, label


def write_cache(path, blocks, meta, view_blocks=None):
    """Write the arrays ``blocks`` ([n_i, D] each, in dataset order) one after another as the fp16 cache
    ``path``, then its sidecar. One block at a time is read (memory-mapped blocks are welcome), never
    all N x D; the array appears atomically and the sidecar last, so a cache without one was interrupted.

    A multi-view cache has blocks [n_i, K, D] and ``view_blocks`` [n_i, K, 5] (``VIEW_COLUMNS``), written
    to ``views_path(path)`` before the sidecar, which records their sha256 (``meta`` has ``views: K``)."""
    shapes = {block.shape[1:] for block in blocks}
    if len(shapes) != 1:
        raise ValueError(f'blocks of {sorted(shapes)} trailing shapes: one feature dim (and view count) expected')
    for stale in (sidecar_path(path), views_path(path)):
        if os.path.exists(stale):
            os.remove(stale)  # never pair a new array with an old sidecar or old views
    write_blocks(path, blocks, np.float16)
    if view_blocks is not None:
        write_blocks(views_path(path), view_blocks, np.int32)
        meta = {**meta, 'views_sha256': file_sha256(views_path(path))}
    write_sidecar(path, meta)


def write_blocks(path, blocks, dtype):
    """Concatenate ``blocks`` along their first axis into the ``.npy`` at ``path``, one block in memory
    at a time; the file appears atomically."""
    tmp = path + '.tmp.npy'
    try:
        out = np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype,
                                        shape=(sum(len(block) for block in blocks), *blocks[0].shape[1:]))
        row = 0
        for block in blocks:
            out[row:row + len(block)] = block
            row += len(block)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_sidecar(path, meta):
    """The one writer of the sidecar of the fp16 ``.npy`` at ``path``: ``format`` and ``dim`` (read from
    the array, whose rows must match ``meta['dataset']['num_samples']``) plus ``meta``: ``teacher``,
    ``dataset`` (``dataset_fingerprint``), ``transform``, ``image_size`` and any extra keys; a multi-view
    cache's ``views`` (K, its array is [N, K, D]), ``view_spec`` and ``views_sha256``."""
    array = np.load(path, mmap_mode='r')
    views = (meta['views'],) if meta.get('views') else ()
    if (array.dtype != np.float16 or array.ndim != 2 + len(views) or array.shape[1:-1] != views
            or len(array) != meta['dataset']['num_samples']):
        raise ValueError(f"{path} holds {array.dtype} {array.shape}, expected float16 rows of "
                         f"{views[0] if views else 1} view(s) for {meta['dataset']['num_samples']} images")
    write_text_atomic(json.dumps({'format': FORMAT, 'dim': int(array.shape[-1]), **meta}, indent=2) + '\n',
                      sidecar_path(path))


def convert_original_cache(pth_path, dataset, log=print):
    """The original's cache (a torch-saved dict image file name -> feature) as an ``.npy`` beside it,
    rows in dataset order. Returns the new path; reused when it exists and matches."""
    out = os.path.splitext(pth_path)[0] + '.npy'
    if os.path.isfile(out) and os.path.isfile(sidecar_path(out)):
        return out
    try:
        by_name = torch.load(pth_path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise SimRegError(f'cannot read teacher features {pth_path} ({str(exc).splitlines()[0]}): '
                          f'pass a cache built by cache_teacher_feats.py') from None
    if not isinstance(by_name, dict):
        raise SimRegError(f'{pth_path} is not the original cache format (a dict file name -> feature)')
    names = [os.path.basename(path) for path, _ in dataset.samples]
    if len(set(names)) != len(names):
        raise SimRegError(f'{pth_path} is keyed by file name, but {len(names) - len(set(names))} file names '
                          f'repeat across class folders of {dataset.root}: rebuild the cache with '
                          f'cache_teacher_feats.py')
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SimRegError(f'{pth_path} has no feature for {len(missing)} of {len(names)} images '
                          f'(e.g. {missing[0]}): it was made for another dataset')
    features = torch.stack([torch.as_tensor(by_name[n]).flatten() for n in names]).half().numpy()
    meta = {'teacher': {'arch': None, 'weights': None, 'source': 'original SimReg cache',
                        'converted_from': os.path.abspath(pth_path)},
            'dataset': dataset_fingerprint(dataset), 'transform': 'unknown (original cache)',
            'image_size': None}
    write_cache(out, [features], meta)
    log(f'note: converted the original teacher cache {pth_path} to {out} (+ .json); pass '
        f'--teacher_feats {out} from now on')
    return out


def open_teacher_cache(path, dataset, log=print):
    """Open ``--teacher_feats`` for ``dataset``: an ``.npy`` cache, or the original format, converted."""
    if not path:
        raise SimRegError('--use_cache needs --teacher_feats PATH (built by cache_teacher_feats.py)')
    if not path.endswith('.npy'):
        path = convert_original_cache(path, dataset, log)
    cache = TeacherFeatureCache(path)
    cache.check_matches(dataset)
    return cache
