"""Teacher features cached for ``--use_cache``: an fp16 ``.npy`` [N, D] in dataset order and its JSON sidecar, or
[N, K, D] with ``<name>.views.npy`` [N, K, 5] (each view's box and flip, ``data.replay``). Training memory-maps it
and gathers rows by sample index. The SimReg release's cache (a dict file name -> feature) is converted."""
import hashlib
import os
import warnings

import numpy as np
import torch

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, NetInput
from utils.checkpoint import file_digest
from utils.errors import SimRegError
from utils.store import Store, StoreMismatch, sidecar_path

FORMAT = 'simreg-teacher-features'


def views_path(npy_path):
    return os.path.splitext(npy_path)[0] + '.views.npy'


def cache_store(npy_path):
    """The features at ``npy_path``, the views of a multi-view cache beside them, and their sidecar."""
    return Store(sidecar_path(npy_path), {'features': npy_path, 'views': views_path(npy_path)})


def teacher_input_of(meta):
    """The ``NetInput`` the cache's teacher took: its sidecar's ``teacher_input``; a cache without one took
    ImageNet's normalisation at its ``image_size``."""
    recorded = meta.get('teacher_input') or {'size': meta.get('image_size'), 'mean': IMAGENET_MEAN,
                                             'std': IMAGENET_STD}
    return NetInput(recorded['size'], tuple(recorded['mean']), tuple(recorded['std']))


def dataset_fingerprint(dataset):
    """What a cache must agree with: the sample count and the file list (relative paths, in order)."""
    relative = [os.path.relpath(path, dataset.root) for path, _ in dataset.samples]
    digest = hashlib.sha256('\n'.join(relative).encode()).hexdigest()
    return {'root': os.path.abspath(dataset.root), 'num_samples': len(relative), 'file_list_sha256': digest}


class TeacherFeatureCache:
    """Read side: rows of the memory-mapped array, checked against the dataset."""

    def __init__(self, path):
        store = cache_store(path)
        if not os.path.isfile(path) or not store.exists():
            raise SimRegError(f'teacher feature cache {path} (with {store.sidecar}) not found: '
                              f'build it with cache_teacher_feats.py')
        self.path = path
        self.meta = self.read_meta(store)
        self.feat_dim = self.meta['dim']
        self.num_views = self.meta.get('views')  # K for a cache of K views per image, None for center crops
        views = (self.num_views,) if self.num_views else ()
        try:
            self.features = store.open({'features': ((self.meta['dataset']['num_samples'], *views, self.feat_dim),
                                                     np.float16)})['features']
        except StoreMismatch as exc:
            raise SimRegError(f'{exc}: the file is incomplete; rebuild it') from None
        except (OSError, ValueError, EOFError) as exc:  # numpy's reasons for a file cut short or not an .npy
            raise self.damaged(f'not a whole .npy array: {str(exc).splitlines()[0].split(". ")[0]}') from None
        extra = os.path.getsize(path) - self.features.offset - self.features.nbytes
        if extra:
            raise self.damaged(f'{extra} bytes more than its header says: not the file that was written')
        self.boxes = self.open_boxes() if self.num_views else None
        with warnings.catch_warnings():  # torch warns that the map is read-only: it is only read from
            warnings.simplefilter('ignore', UserWarning)
            self.table = torch.from_numpy(self.features).view(-1, self.feat_dim)  # a row per (sample, view)

    def damaged(self, reason, path=None):
        return SimRegError(f'teacher cache file {path or self.path} is damaged ({reason}): rebuild it with '
                           f'cache_teacher_feats.py')

    def read_meta(self, store):
        """The sidecar, refused in one line when it is not a teacher cache's or is damaged."""
        try:
            meta = store.meta()
        except (OSError, ValueError) as exc:  # JSON or UTF-8 that does not decode: cut short or overwritten
            raise self.damaged(str(exc).splitlines()[0], store.sidecar) from None
        if not isinstance(meta, dict) or meta.get('format') != FORMAT:
            raise SimRegError(f'{store.sidecar} is not a teacher feature sidecar: rebuild the '
                              f'cache with cache_teacher_feats.py')
        dataset, views = meta.get('dataset'), meta.get('views')
        fields = {'dim': meta.get('dim'), 'dataset': dataset, 'views': views or 1,
                  'dataset.num_samples': dataset.get('num_samples') if isinstance(dataset, dict) else None}
        wrong = [name for name, value in fields.items()
                 if not (isinstance(value, dict) if name == 'dataset' else type(value) is int and value > 0)]
        if wrong or not all(isinstance(dataset.get(key), str) for key in ('root', 'file_list_sha256')):
            raise self.damaged(f"no valid {', '.join(wrong) or 'dataset.root/file_list_sha256'}", store.sidecar)
        return meta

    def open_boxes(self):
        """The [N, K, 5] view boxes, refused unless they are the very file the cache was built with."""
        path = views_path(self.path)
        if not os.path.isfile(path) or file_digest(path) != self.meta.get('views_sha256'):
            state = 'is missing' if not os.path.isfile(path) else 'is not the one it was built with'
            raise SimRegError(f'{self.path} holds {self.num_views} views per image but their boxes file {path} '
                              f'{state}: delete {self.path} and rebuild it with cache_teacher_feats.py '
                              f'--cache_views {self.num_views}')
        return np.load(path, mmap_mode='r')

    def check_matches(self, dataset):
        """Refuse a cache made for other images: the rows would be other images' targets."""
        ours, theirs = dataset_fingerprint(dataset), self.meta['dataset']
        if ours['num_samples'] != theirs['num_samples']:
            raise SimRegError(f"teacher cache {self.path} has {theirs['num_samples']} rows, {ours['root']} has "
                              f"{ours['num_samples']} images: build the cache for this dataset (and --dataset)")
        if ours['file_list_sha256'] != theirs['file_list_sha256']:
            raise SimRegError(f"teacher cache {self.path} was built for another file list ({theirs['root']}) than "
                              f"{ours['root']}: the same number of images but not the same files; rebuild the cache")

    def rows(self, indices, pin_memory=False):
        """fp16 CPU tensor of the rows of these sample indices, or (sample, view) pairs [B, 2] of a multi-view
        cache; ``pin_memory=True`` gathers into page-locked memory, for an asynchronous copy to a GPU."""
        if (indices.dim() == 2) != bool(self.num_views):
            raise ValueError(f'{self.path}: {indices.dim()}-d indices for a cache of '
                             f'{self.num_views or 1} view(s) per image')
        rows = indices[:, 0] * self.num_views + indices[:, 1] if indices.dim() == 2 else indices
        out = torch.empty((len(rows), self.feat_dim), dtype=self.table.dtype, pin_memory=pin_memory)
        torch.index_select(self.table, 0, rows, out=out)
        if not torch.isfinite(torch.stack(torch.aminmax(out))).all():  # one pass, no temporary: NaN/inf propagate
            bad = int(indices[~torch.isfinite(out).all(1)][0].view(-1)[0])
            raise self.damaged(f'NaN or infinite features of sample {bad}')
        return out


def write_cache(path, blocks, meta, view_blocks=None):
    """The cache ``path`` from ``blocks`` [n_i, D] (or [n_i, K, D] with ``view_blocks`` [n_i, K, 5]) in dataset
    order, one block in memory at a time, then its sidecar, which records the views' sha256."""
    shapes = {block.shape[1:] for block in blocks}
    if len(shapes) != 1:
        raise ValueError(f'blocks of {sorted(shapes)} trailing shapes: one feature dim (and view count) expected')
    arrays = {'features': [np.asarray(block, dtype=np.float16) for block in blocks]}
    if view_blocks is not None:
        arrays['views'] = [np.asarray(block, dtype=np.int32) for block in view_blocks]
    cache_store(path).write_arrays(arrays)
    if view_blocks is not None:
        meta = {**meta, 'views_sha256': file_digest(views_path(path))}
    write_sidecar(path, meta)


def write_sidecar(path, meta):
    """The sidecar of the fp16 array at ``path``: ``format``, ``dim`` (the array's), then ``meta``: ``teacher``,
    ``dataset`` (``dataset_fingerprint``), ``transform``, ``image_size``, ``teacher_input`` (``teacher_input_of``),
    any extra keys, and a multi-view cache's ``views`` (K), ``view_spec`` and ``views_sha256``. StoreMismatch: the
    array is not [N, (K,) D]."""
    store, views = cache_store(path), [meta['views']] if meta.get('views') else []
    array = store.open({'features': ((meta['dataset']['num_samples'], *views, None), np.float16)})['features']
    store.write_meta({'format': FORMAT, 'dim': int(array.shape[-1]), **meta})


def convert_original_cache(pth_path, dataset, log=print):
    """The SimReg release's cache (a dict file name -> feature) as an ``.npy`` beside it, reused if there; its path."""
    out = os.path.splitext(pth_path)[0] + '.npy'
    if os.path.isfile(out) and cache_store(out).exists():
        return out
    try:
        by_name = torch.load(pth_path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise SimRegError(f'cannot read teacher features {pth_path} ({str(exc).splitlines()[0]}): '
                          f'pass a cache built by cache_teacher_feats.py') from None
    if not isinstance(by_name, dict):
        raise SimRegError(f'{pth_path} is not the SimReg release\'s cache format (a dict file name -> feature)')
    names = [os.path.basename(path) for path, _ in dataset.samples]
    if len(set(names)) != len(names):
        raise SimRegError(f'{pth_path} is keyed by file name, but {len(names) - len(set(names))} file names repeat '
                          f'across class folders of {dataset.root}: rebuild the cache with cache_teacher_feats.py')
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SimRegError(f'{pth_path} has no feature for {len(missing)} of {len(names)} images '
                          f'(e.g. {missing[0]}): it was made for another dataset')
    features = torch.stack([torch.as_tensor(by_name[n]).flatten() for n in names]).half().numpy()
    meta = {'teacher': {'arch': None, 'weights': None, 'source': 'original SimReg cache',
                        'converted_from': os.path.abspath(pth_path)},
            'dataset': dataset_fingerprint(dataset), 'transform': 'unknown (original cache)', 'image_size': None}
    write_cache(out, [features], meta)
    log(f'note: converted the SimReg release\'s teacher cache {pth_path} to {out} (+ .json); pass '
        f'--teacher_feats {out} from now on')
    return out


def open_teacher_cache(path, dataset, log=print):
    """Open ``--teacher_feats`` for ``dataset``: an ``.npy`` cache, or one to convert (``convert_original_cache``)."""
    if not path:
        raise SimRegError('--use_cache needs --teacher_feats PATH (built by cache_teacher_feats.py)')
    if not path.endswith('.npy'):
        path = convert_original_cache(path, dataset, log)
    cache = TeacherFeatureCache(path)
    cache.check_matches(dataset)
    return cache
