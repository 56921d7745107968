"""Run a teacher once over ``<data>/train`` and cache its features for ``train_student.py --use_cache``.

    torchrun --nproc_per_node=8 cache_teacher_feats.py /path/to/imagenet \
        --arch_teacher resnet50 --teacher_weights moco_v2_800ep
    torchrun --nproc_per_node=8 train_student.py /path/to/imagenet --use_cache \
        --teacher_feats teacher_feats/resnet50_<sha256[:8]>_imagenet_224.npy ...

The teacher sees each image once, on the evaluation view (resize + center crop); its raw (not
normalised) outputs are stored as fp16 rows in dataset order, with the sidecar that training
checks against the dataset (``data.teacher_cache``). The work is split into shards of
``--shard_size`` images, each saved as soon as it is done: a rerun of the same command after an
interruption computes only the missing shards.

``--cache_views K`` caches K weak views per image instead (RandomResizedCrop(image_size, scale 0.2-1)
+ flip, the paper's view, each drawn from (--seed, image index, view) so that every process, shard
and rerun draws the same ones): features [N, K, D] and ``<name>.views.npy`` [N, K, 5], each view's
crop box and flip, which training replays for the student (the same pixels the teacher saw).
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from torch.utils.data import Dataset

from data.folders import build_dataset
from data.teacher_cache import dataset_fingerprint, sidecar_path, views_path, write_cache
from data.transforms import VIEW_COLUMNS, WEAK_SCALE, draw_weak_view, eval_transform, replay_weak_view, view_seed
from evaluation.features import extract_features
from models.backbones import TEACHER_ARCHS
from models.loading import load_backbone
from models.presets import resolve_weights
from models.simreg import AUTOCAST_DTYPES, default_precision
from utils.checkpoint import file_sha256, save_npy_atomic, write_text_atomic
from utils.distributed import (add_distributed_args, cleanup, get_world_size, init_distributed, is_main_process,
                               run_on_main)
from utils.errors import SimRegError, exit_on_user_error
from utils.logging import setup_logger


def get_args_parser():
    p = argparse.ArgumentParser('Cache teacher features for SimReg --use_cache training', add_help=True)
    p.add_argument('data', help='dataset root holding train/<class>/<image>')
    p.add_argument('--dataset', default='imagenet', choices=['imagenet', 'imagenet100'],
                   help="full dataset, or the original's 100-class subset (as the training run will use)")
    p.add_argument('--arch_teacher', default='resnet50', choices=TEACHER_ARCHS, help='teacher architecture')
    p.add_argument('--teacher_weights', required=True,
                   help='teacher checkpoint (any layout models.loading accepts) or a preset name')
    p.add_argument('--teacher_fc', action='store_true',
                   help="cache the teacher's pretrained projection (a plain Linear fc) output")
    p.add_argument('--image_size', type=int, default=224,
                   help='center crop size (resized to size*256/224 first); with --cache_views the views\' size')
    p.add_argument('--cache_views', type=int, metavar='K',
                   help='cache K weak views per image (random crop + flip, boxes stored beside the cache) '
                        'instead of the center crop: the student then trains on the very views the teacher saw')
    p.add_argument('--seed', type=int, default=0,
                   help='with --cache_views: view k of image i is drawn from (seed, i, k)')
    p.add_argument('--batch_size', type=int, default=256, help='total batch size over all processes')
    p.add_argument('--num_workers', type=int, default=8, help='data loading workers per process')
    p.add_argument('--precision', choices=list(AUTOCAST_DTYPES), default=None,
                   help='autocast dtype of the teacher forward (default: what training picks for a live '
                        'teacher, bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU); features '
                        'are stored as fp16 either way')
    p.add_argument('--output', help='cache .npy, its .json sidecar beside it (default: '
                                    'teacher_feats/<arch>[_fc]_<sha256[:8]>_<dataset>_<image_size>.npy)')
    p.add_argument('--shard_size', type=int, default=50000,
                   help='images per shard, the unit that an interrupted run does not redo; rank 0 holds '
                        'one shard of features in memory (shard_size x dim x 2 bytes, twice while gathering)')
    add_distributed_args(p)
    return p


def default_output(args, sha256):
    fc = '_fc' if args.teacher_fc else ''
    views = f'_views{args.cache_views}' if args.cache_views else ''
    return os.path.join('teacher_feats',
                        f'{args.arch_teacher}{fc}_{sha256[:8]}_{args.dataset}_{args.image_size}{views}.npy')


def shard_ranges(n_samples, shard_size):
    """[start, stop) of each shard; a short remainder joins the last shard instead of being one."""
    count = max(1, n_samples // shard_size)
    return [(k * shard_size, (k + 1) * shard_size if k < count - 1 else n_samples) for k in range(count)]


class ShardView(Dataset):
    """Rows [start, stop) of the dataset, each sample indexed by its position in the shard: the index
    ``extract_features`` orders its output by (a Subset would pass the dataset's index through)."""

    def __init__(self, dataset, rows):
        self.dataset = dataset
        self.start, self.stop = rows

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, position):
        _, image, label = self.dataset[self.start + position]
        return position, image, label


class ShardViews(Dataset):
    """The K weak views of each image of rows [start, stop): position p is view p % K of image
    start + p // K, returned as (p, the view, its (top, left, height, width, flip)). The dataset
    yields decoded uint8 images; the K views of an image are made from one decoding."""

    def __init__(self, dataset, rows, num_views, size, seed):
        self.dataset = dataset
        self.start, self.stop = rows
        self.num_views, self.size, self.seed = num_views, size, seed
        self.decoded = (None, None)

    def __len__(self):
        return (self.stop - self.start) * self.num_views

    def __getitem__(self, position):
        index = self.start + position // self.num_views
        if self.decoded[0] != index:
            self.decoded = (index, self.dataset[index][1])
        image = self.decoded[1]
        view = draw_weak_view(image, self.size, view_seed(self.seed, index, position % self.num_views))
        return position, replay_weak_view(image, view, self.size), torch.tensor(view)


def identity(meta):
    """What makes two caches the same: everything but where the weights file and the images lie."""
    teacher = {k: v for k, v in meta.get('teacher', {}).items() if k != 'weights'}
    dataset = {k: v for k, v in meta.get('dataset', {}).items() if k != 'root'}
    return {**meta, 'teacher': teacher, 'dataset': dataset}


class ShardStore:
    """``<output>.shards/shard_<k>.npy`` + ``.json``, the finished shards of an unfinished build.

    The json, written after the array, records what the shard was made from (the cache's sidecar
    entries and its rows); a shard whose json differs, e.g. from another teacher, is recomputed.
    """

    def __init__(self, output, recipe):
        self.folder = output + '.shards'
        self.recipe = recipe

    def array_path(self, k):
        return os.path.join(self.folder, f'shard_{k:05d}.npy')

    def is_done(self, k, rows):
        try:
            with open(sidecar_path(self.array_path(k))) as f:
                recorded = json.load(f)
            array = np.load(self.array_path(k), mmap_mode='r')
            views = np.load(views_path(self.array_path(k)), mmap_mode='r') if self.recipe.get('views') else None
        except (OSError, ValueError):
            return False
        return (identity(recorded) == identity({**self.recipe, 'rows': list(rows)})
                and array.dtype == np.float16 and len(array) == rows[1] - rows[0]
                and (views is None or len(views) == len(array)))

    def save(self, k, rows, features, views=None):
        """The shard's features (and views, for a multi-view cache), then its json: the shard is done."""
        if not np.isfinite(features).all():
            raise SimRegError(f'the teacher gave non-finite features for images {rows[0]}-{rows[1] - 1} (fp16 '
                              f'overflow or broken weights): check --teacher_weights, or use --precision fp32')
        arrays = {self.array_path(k): features}
        if views is not None:
            arrays[views_path(self.array_path(k))] = views
        for path, array in arrays.items():
            save_npy_atomic(array, path)
        write_text_atomic(json.dumps({**self.recipe, 'rows': list(rows)}, indent=2) + '\n',
                          sidecar_path(self.array_path(k)))


def existing_cache_is_ours(output, recipe):
    """True when ``output`` is already this cache, finished; an unrelated finished cache is refused."""
    if not (os.path.isfile(output) and os.path.isfile(sidecar_path(output))):
        return False
    with open(sidecar_path(output)) as f:
        recorded = json.load(f)
    recorded, ours = identity(recorded), identity(recipe)
    differs = [key for key in ours if recorded.get(key) != ours[key]]
    if differs:
        raise SimRegError(f'{output} already holds a teacher cache with another {", ".join(differs)}: pass '
                          f'another --output, or delete {output} and {sidecar_path(output)}')
    return True


def main(args):
    """Build the cache, or finish an interrupted build; returns its path."""
    device = init_distributed(args.dist_timeout)
    args.precision = args.precision or default_precision(device)
    torch.backends.cudnn.benchmark = True  # every full batch has the same shape
    log = setup_logger()
    if args.shard_size < get_world_size():
        raise SimRegError(f'--shard_size {args.shard_size} is smaller than the {get_world_size()} processes: '
                          f'raise it (each process extracts part of every shard)')
    if args.output and not args.output.endswith('.npy'):
        raise SimRegError(f'--output {args.output} must end in .npy (the sidecar goes beside it as .json)')
    if args.cache_views is not None and args.cache_views < 1:
        raise SimRegError(f'--cache_views {args.cache_views}: give the number of views per image (1 or more)')
    if args.cache_views and args.seed < 0:
        raise SimRegError(f'--seed {args.seed}: the views\' seed must be 0 or more')
    # with --cache_views the images stay decoded uint8, and ShardViews cuts each view from them
    dataset = build_dataset(args.data, 'train', None if args.cache_views else eval_transform(args.image_size),
                            args.dataset)
    run_on_main(lambda: resolve_weights(args.teacher_weights))  # a preset is downloaded once, by rank 0
    weights = resolve_weights(args.teacher_weights)

    def describe():
        teacher = {'arch': args.arch_teacher, 'weights': os.path.abspath(weights),
                   'sha256': file_sha256(weights), 'teacher_fc': args.teacher_fc}
        size = args.image_size
        recipe = {'teacher': teacher, 'dataset': dataset_fingerprint(dataset),
                  'transform': f'eval_transform: Resize({int(round(size * 256 / 224))}) + CenterCrop({size})',
                  'image_size': size, 'precision': args.precision}
        if args.cache_views:
            recipe.update(transform=f'{args.cache_views} weak views per image, boxes and flips in the .views.npy',
                          views=args.cache_views,
                          view_spec={'crop': f'RandomResizedCrop({size}, scale={WEAK_SCALE})',
                                     'flip': 'horizontal, p=0.5', 'seed': args.seed, 'columns': list(VIEW_COLUMNS)})
        return recipe

    recipe = run_on_main(describe)
    output = args.output or default_output(args, recipe['teacher']['sha256'])
    shards = ShardStore(output, recipe)
    ranges = shard_ranges(len(dataset), args.shard_size)

    def plan():
        if existing_cache_is_ours(output, recipe):
            shutil.rmtree(shards.folder, ignore_errors=True)  # a build stopped just before removing them
            return None
        return [k for k, rows in enumerate(ranges) if not shards.is_done(k, rows)]

    todo = run_on_main(plan)
    if todo is None:
        log.info(f'{output} is already built for this teacher and dataset: nothing to do')
        cleanup()
        return output
    log.info(f'{args.arch_teacher} teacher {weights} over {len(dataset)} images of {dataset.root} '
             f'({args.dataset}, {recipe["transform"]}, {args.precision}) on {get_world_size()} process(es): '
             f'{len(todo)} of {len(ranges)} shards to compute, into {output}')
    teacher = load_backbone(args.arch_teacher, weights, keep_fc=args.teacher_fc) if todo else None
    amp_dtype = AUTOCAST_DTYPES[args.precision]
    for k in todo:
        rows = ranges[k]
        extract = dict(amp=amp_dtype is not None, amp_dtype=amp_dtype, l2_normalize=False,
                       desc=f'shard {k + 1}/{len(ranges)}')
        if args.cache_views:
            views = ShardViews(dataset, rows, args.cache_views, args.image_size, args.seed)
            features, boxes = extract_features(teacher, views, args.batch_size, args.num_workers, device,
                                               with_labels=True, **extract)
            per_image = (rows[1] - rows[0], args.cache_views)
            run_on_main(lambda: shards.save(k, rows, features.numpy().reshape(*per_image, -1),
                                            boxes.numpy().reshape(*per_image, len(VIEW_COLUMNS)).astype(np.int32)))
        else:
            features = extract_features(teacher, ShardView(dataset, rows), args.batch_size, args.num_workers,
                                        device, **extract)
            run_on_main(lambda: shards.save(k, rows, features.numpy()))
    main_process = is_main_process()
    cleanup()  # rank 0 assembles alone; the others are done
    if not main_process:
        return output
    blocks = [np.load(shards.array_path(k), mmap_mode='r') for k in range(len(ranges))]
    view_blocks = ([np.load(views_path(shards.array_path(k)), mmap_mode='r') for k in range(len(ranges))]
                   if args.cache_views else None)
    write_cache(output, blocks, recipe, view_blocks)
    shutil.rmtree(shards.folder)
    shape = ' x '.join(str(n) for n in blocks[0].shape[1:])
    written = sidecar_path(output) + (f', {views_path(output)}' if args.cache_views else '')
    log.info(f'wrote {output} ({len(dataset)} x {shape} fp16) and {written}; '
             f'train with --use_cache --teacher_feats {output}')
    return output


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
