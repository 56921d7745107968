"""Run a teacher once over ``<data>/train`` (or the unlabelled images of ``<data>``, as training takes them) and cache
its features for ``train_student.py --use_cache``.

    torchrun --nproc_per_node=8 cache_teacher_feats.py /path/to/imagenet \
        --arch_teacher resnet50 --teacher_weights moco_v2_800ep
    torchrun --nproc_per_node=8 train_student.py /path/to/imagenet --use_cache \
        --teacher_feats teacher_feats/resnet50_<sha256[:8]>_imagenet_224.npy ...

The raw outputs on the evaluation view (or K weak views per image, ``--cache_views``) become fp16 rows in dataset
order, built in shards of ``--shard_size`` images: a rerun after an interruption computes only the missing ones.
The view is cut at the larger of ``--image_size`` and ``--teacher_image_size``; the teacher's input is resized from
it on the device and normalised its family's way (or ``--teacher_norm``'s), as training gives a live teacher.
"""
import argparse
import os
import shutil

import numpy as np
import torch
from torch.utils.data import Dataset

from data.folders import add_dataset_arg, build_dataset
from data.replay import VIEW_COLUMNS, ShardWeakViews, view_spec
from data.teacher_cache import cache_store, dataset_fingerprint, sidecar_path, teacher_input_of, views_path, write_cache
from data.transforms import NORMS, NetInput, eval_transform
from evaluation.common import check_output
from evaluation.features import OwnInput, extract_features
from models.backbones import TEACHER_ARCHS, is_teacher_arch
from models.loading import load_backbone
from models.openclip import weights_file
from models.presets import resolve_weights
from models.simreg import AUTOCAST_DTYPES, default_precision, teacher_input
from utils.checkpoint import file_digest
from utils.distributed import (add_distributed_args, cleanup, get_world_size, init_distributed, is_main_process,
                               run_on_main)
from utils.errors import SimRegError, exit_on_user_error
from utils.logging import setup_logger
from utils.store import differing


def teacher_arch(arch):
    if not is_teacher_arch(arch):
        raise argparse.ArgumentTypeError(f'{arch!r} is no teacher: choose from {", ".join(TEACHER_ARCHS)} '
                                         f'or open_clip/<model name>')
    return arch


def get_args_parser():
    p = argparse.ArgumentParser('Cache teacher features for SimReg --use_cache training', add_help=True)
    p.add_argument('data', help='dataset root holding train/<class>/<image>; or a folder of images at any depth, or '
                                'a text file listing image paths (one per line), as train_student.py takes it')
    add_dataset_arg(p, ' (as the training run will use)')
    p.add_argument('--arch_teacher', default='resnet50', type=teacher_arch,
                   help=f'teacher architecture: {", ".join(TEACHER_ARCHS)} or open_clip/<model name>')
    p.add_argument('--teacher_weights', required=True,
                   help='teacher checkpoint (any layout models.loading accepts), a preset name, or an open_clip '
                        'pretrained tag in the local cache')
    p.add_argument('--teacher_fc', action='store_true',
                   help="cache the teacher's pretrained projection (a plain Linear fc) output")
    p.add_argument('--image_size', type=int, default=224,
                   help='center crop size (resized to size*256/224 first); with --cache_views the views\' size')
    p.add_argument('--teacher_image_size', type=int,
                   help="the teacher's input size (default: --image_size), resized on the device from the view")
    p.add_argument('--teacher_norm', choices=list(NORMS), default='',
                   help="the teacher's normalisation (default: its family's, else ImageNet's)")
    p.add_argument('--cache_views', type=int, metavar='K',
                   help='cache K weak views per image instead of the center crop: the student then trains on them')
    p.add_argument('--seed', type=int, default=0,
                   help='with --cache_views: view k of image i is drawn from (seed, i, k)')
    p.add_argument('--batch_size', type=int, default=256, help='total batch size over all processes')
    p.add_argument('--num_workers', type=int, default=8, help='data loading workers per process')
    p.add_argument('--precision', choices=list(AUTOCAST_DTYPES), default=None,
                   help='autocast dtype of the teacher (default: what training picks for a live teacher); '
                        'features are stored as fp16 either way')
    p.add_argument('--output', help='cache .npy, its .json sidecar beside it (default: '
                                    'teacher_feats/<arch>[_fc]_<sha256[:8]>_<dataset>_<image_size>.npy)')
    p.add_argument('--shard_size', type=int, default=50000,
                   help='images per shard, the unit an interrupted run does not redo (rank 0 holds one in memory)')
    add_distributed_args(p)
    return p


def check_args(args):
    if args.shard_size < get_world_size():
        raise SimRegError(f'--shard_size {args.shard_size} is smaller than the {get_world_size()} processes: '
                          f'raise it (each process extracts part of every shard)')
    if args.output and not args.output.endswith('.npy'):
        raise SimRegError(f'--output {args.output} must end in .npy (the sidecar goes beside it as .json)')
    if args.teacher_image_size is not None and args.teacher_image_size < 1:
        raise SimRegError(f'--teacher_image_size {args.teacher_image_size}: give the teacher\'s input size in pixels')
    if args.cache_views is not None and args.cache_views < 1:
        raise SimRegError(f'--cache_views {args.cache_views}: give the number of views per image (1 or more)')
    if args.cache_views and args.seed < 0:
        raise SimRegError(f'--seed {args.seed}: the views\' seed must be 0 or more')


def default_output(args, sha256):
    fc = '_fc' if args.teacher_fc else ''
    views = f'_views{args.cache_views}' if args.cache_views else ''
    own = (f'_t{args.teacher_image_size}' if args.teacher_image_size not in (None, args.image_size) else '') + (
        f'_{args.teacher_norm}' if args.teacher_norm else '')
    return os.path.join('teacher_feats',
                        f'{args.arch_teacher}{fc}_{sha256[:8]}_{args.dataset}_{args.image_size}{own}{views}.npy')


def crop_size(args):
    """The size the view is cut at: the larger of the student's and the teacher's."""
    return max(args.image_size, args.teacher_image_size or args.image_size)


def describe(args, dataset, weights, net):
    """The cache's recipe: its sidecar entries but ``format`` and ``dim``, what shards record too; ``net``: the
    teacher's ``NetInput``."""
    teacher = {'arch': args.arch_teacher, 'weights': os.path.abspath(weights),
               'sha256': file_digest(weights), 'teacher_fc': args.teacher_fc}
    size = crop_size(args)
    recipe = {'teacher': teacher, 'dataset': dataset_fingerprint(dataset),
              'transform': f'eval_transform: Resize({int(round(size * 256 / 224))}) + CenterCrop({size})',
              'image_size': args.image_size, 'teacher_input': net._asdict(), 'precision': args.precision}
    if args.cache_views:
        recipe.update(transform=f'{args.cache_views} weak views per image, boxes and flips in the .views.npy',
                      views=args.cache_views, view_spec=view_spec(size, args.seed))
    return recipe


def comparable(meta):
    """What makes two caches the same: everything but where the weights file and the images lie."""
    teacher = {k: v for k, v in meta.get('teacher', {}).items() if k != 'weights'}
    dataset = {k: v for k, v in meta.get('dataset', {}).items() if k != 'root'}
    return {**meta, 'teacher': teacher, 'dataset': dataset, 'teacher_input': teacher_input_of(meta)._asdict()}


def shard_ranges(n_samples, shard_size):
    """[start, stop) of each shard; a short remainder joins the last shard instead of being one."""
    count = max(1, n_samples // shard_size)
    return [(k * shard_size, (k + 1) * shard_size if k < count - 1 else n_samples) for k in range(count)]


class ShardImages(Dataset):
    """Rows [start, stop) of the dataset, each sample indexed by its position in the shard: the index
    ``extract_features`` orders its output by (a Subset would pass the dataset's index through)."""

    def __init__(self, dataset, rows):
        self.dataset, (self.start, self.stop) = dataset, rows

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, position):
        _, image, label = self.dataset[self.start + position]
        return position, image, label


class ShardStore:
    """``<output>.shards/shard_<k>.npy`` (+ ``.views.npy``, ``.json``), the finished shards of a build: small caches
    whose sidecar is the recipe plus their rows (a shard of another recipe is recomputed)."""

    def __init__(self, output, recipe, ranges):
        self.output, self.folder, self.recipe, self.ranges = output, output + '.shards', recipe, ranges

    def store(self, k):
        return cache_store(os.path.join(self.folder, f'shard_{k:05d}.npy'))

    def todo(self):
        """The shards still to compute; None when the output is this finished cache (one of another recipe: refused)."""
        store = cache_store(self.output)
        if not (os.path.isfile(self.output) and store.exists()):
            return [k for k in range(len(self.ranges)) if not self.is_done(k)]
        differs = differing(comparable(store.meta()), comparable(self.recipe))
        if differs:
            raise SimRegError(f'{self.output} already holds a teacher cache with another {", ".join(differs)}: '
                              f'pass another --output, or delete {self.output} and {store.sidecar}')
        shutil.rmtree(self.folder, ignore_errors=True)  # a build stopped just before removing them
        return None

    def is_done(self, k):
        store, rows, views = self.store(k), self.ranges[k], self.recipe.get('views')
        n = rows[1] - rows[0]
        shapes = {'features': ((n, views, None) if views else (n, None), np.float16)}
        if views:
            shapes['views'] = ((n, views, len(VIEW_COLUMNS)), np.int32)
        try:
            recorded = store.meta()
            store.open(shapes)
        except (OSError, ValueError):
            return False
        return comparable(recorded) == comparable({**self.recipe, 'rows': list(rows)})

    def save(self, k, features, views=None):
        """The shard's features (and views), then its sidecar: the shard is done."""
        rows = self.ranges[k]
        if not np.isfinite(features).all():
            raise SimRegError(f'the teacher gave non-finite features for images {rows[0]}-{rows[1] - 1} (fp16 '
                              f'overflow or broken weights): check --teacher_weights, or use --precision fp32')
        arrays = {'features': features} if views is None else {'features': features, 'views': views}
        self.store(k).write(arrays, {**self.recipe, 'rows': list(rows)})

    def assemble(self):
        """Write the cache from the finished shards and remove them; returns the features' shape per image."""
        stores = [self.store(k) for k in range(len(self.ranges))]
        blocks = [np.load(store.arrays['features'], mmap_mode='r') for store in stores]
        view_blocks = ([np.load(store.arrays['views'], mmap_mode='r') for store in stores]
                       if self.recipe.get('views') else None)
        write_cache(self.output, blocks, self.recipe, view_blocks)
        shutil.rmtree(self.folder)
        return blocks[0].shape[1:]


def extract_shard(args, teacher, dataset, rows, device, desc):
    """The shard's features [n, D], or with --cache_views [n, K, D] and the views [n, K, 5]; rank > 0: (None, None)."""
    amp_dtype = AUTOCAST_DTYPES[args.precision]
    extract = dict(amp=amp_dtype is not None, amp_dtype=amp_dtype, l2_normalize=False, desc=desc)
    if not args.cache_views:
        features = extract_features(teacher, ShardImages(dataset, rows), args.batch_size, args.num_workers,
                                    device, **extract)
        return (None, None) if features is None else (features.numpy(), None)
    views = ShardWeakViews(dataset, rows, args.cache_views, crop_size(args), args.seed)
    features, boxes = extract_features(teacher, views, args.batch_size, args.num_workers, device,
                                       with_extras=True, **extract)
    if features is None:
        return None, None
    per_image = (rows[1] - rows[0], args.cache_views)
    return (features.numpy().reshape(*per_image, -1),
            boxes.numpy().reshape(*per_image, len(VIEW_COLUMNS)).astype(np.int32))


def main(args):
    """Build the cache, or finish an interrupted build; returns its path."""
    device = init_distributed(args.dist_timeout)
    args.precision = args.precision or default_precision(device)
    torch.backends.cudnn.benchmark = True  # every full batch has the same shape
    log = setup_logger()
    check_args(args)
    # with --cache_views the images stay decoded uint8, and ShardWeakViews cuts each view from them
    dataset = build_dataset(args.data, 'train', None if args.cache_views else eval_transform(crop_size(args)),
                            args.dataset)
    args.teacher_weights = weights_file(args.arch_teacher, args.teacher_weights)  # an open_clip tag: its file
    run_on_main(lambda: resolve_weights(args.teacher_weights))  # a preset is downloaded once, by rank 0
    weights = resolve_weights(args.teacher_weights)
    teacher = load_backbone(args.arch_teacher, weights, keep_fc=args.teacher_fc)
    net = teacher_input(teacher, args.teacher_image_size or args.image_size, args.teacher_norm)
    if net != NetInput(crop_size(args)):  # not the view as it is, normalised ImageNet's way
        teacher = OwnInput(teacher, net)
    recipe = run_on_main(lambda: describe(args, dataset, weights, net))
    output = args.output or default_output(args, recipe['teacher']['sha256'])
    for path in (output, sidecar_path(output), views_path(output)):  # what a build writes
        check_output(path, '--output', {'--teacher_weights': weights})
    shards = ShardStore(output, recipe, shard_ranges(len(dataset), args.shard_size))
    todo = run_on_main(shards.todo)
    if todo is None:
        log.info(f'{output} is already built for this teacher and dataset: nothing to do')
        cleanup()
        return output
    log.info(f'{args.arch_teacher} teacher {weights} over {len(dataset)} images of {dataset.root} '
             f'({args.dataset}, {recipe["transform"]}, teacher input {net.describe()}, {args.precision}) on '
             f'{get_world_size()} process(es): {len(todo)} of {len(shards.ranges)} shards to compute, into {output}')
    for k in todo:
        desc = f'shard {k + 1}/{len(shards.ranges)}'
        features, views = extract_shard(args, teacher, dataset, shards.ranges[k], device, desc)
        run_on_main(lambda: shards.save(k, features, views))
    main_process = is_main_process()
    cleanup()  # rank 0 assembles alone; the others are done
    if not main_process:
        return output
    shape = ' x '.join(str(n) for n in shards.assemble())
    written = sidecar_path(output) + (f', {views_path(output)}' if args.cache_views else '')
    log.info(f'wrote {output} ({len(dataset)} x {shape} fp16) and {written}; '
             f'train with --use_cache --teacher_feats {output}')
    return output


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
