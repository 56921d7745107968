"""A label-free progress signal (``train_student.py --holdout N``): N training images, drawn from the seed alone and
left out of training, on which the student's imitation of its teachers is measured, the mean cosine between the
head's output and the teacher's feature on the evaluation view (what the loss, 2 - 2 cos, optimises)."""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.folders import ImageList, is_labelled
from data.sampler import derive_seed
from data.transforms import NetInput, eval_transform, to_net_input
from utils.distributed import is_main_process
from utils.errors import SimRegError
from utils.logging import read_json_log

DEFAULT_SIZE = 256
HOLDOUT_STREAM = 24  # derive_seed(seed, HOLDOUT_STREAM): a stream of its own, apart from the epochs' orders


def holdout_size(args, labelled, num_samples):
    """--holdout: as given (at most a tenth of the images); by default DEFAULT_SIZE (at most a tenth) for unlabelled
    images measured every --knn_every epochs, none for class folders (their online k-NN measures them)."""
    if args.holdout is None:
        return min(DEFAULT_SIZE, num_samples // 10) if not labelled and args.knn_every > 0 else 0
    if args.holdout > num_samples // 10:
        raise SimRegError(f'--holdout {args.holdout}: at most a tenth of the {num_samples} training images '
                          f'({num_samples // 10}) can be held out: lower it')
    return args.holdout


def held_out_images(args, dataset, teachers, world_size):
    """A run's held-out sample indices and their ``HeldOutImitation`` (None when none are held out)."""
    indices = holdout_indices(len(dataset), holdout_size(args, is_labelled(args.data), len(dataset)), args.seed)
    batch = args.batch_size // world_size  # the per-process batch: what training fits in memory
    return indices, HeldOutImitation(dataset, indices, args.image_size, teachers, batch) if indices else None


def holdout_indices(num_samples, count, seed):
    """The ``count`` held-out sample indices, sorted: the start of a permutation drawn from ``seed`` alone (and the
    number of images), the same on any hardware, number of processes and resume."""
    order = np.random.RandomState(derive_seed(seed, HOLDOUT_STREAM)).permutation(num_samples)
    return sorted(order[:count].tolist())


class WithoutHoldout(Dataset):
    """``SeededSamples`` without the held-out images: ``[(epoch, position)]`` is the sample ``(epoch, index)`` of the
    position-th kept index, so samples keep their own index (their seed, their teacher cache row)."""

    def __init__(self, samples, held_out):
        self.samples = samples
        left_out = set(held_out)
        self.kept = [i for i in range(len(samples)) if i not in left_out]

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, key):
        epoch, position = key
        return self.samples[(epoch, self.kept[position])]


class HeldOutImitation:
    """The held-out images' evaluation views, decoded once on rank 0 (cut at the largest net's size, as the cache
    builder cuts them), and ``measure(model, teachers)`` on them, each net given its own input."""

    def __init__(self, dataset, indices, image_size, teachers, batch_size):
        multi_view = [name for name, t in teachers.items() if getattr(t, 'boxes', None) is not None]
        if multi_view:
            raise SimRegError(f'--holdout compares the student with the teacher on center crops, and the cache of '
                              f'{multi_view[0]} holds weak views only: pass --holdout 0 (or a center-crop cache)')
        self.index, self.batch_size, self.init = torch.tensor(indices), batch_size, None
        self.student = NetInput(image_size)
        size = max([image_size] + [t.input.size for t in teachers.values() if getattr(t, 'input', None)])
        if is_main_process():
            images = ImageList(dataset.root, [dataset.samples[i][0] for i in indices], eval_transform(size))
            self.images = torch.stack([images[i][1] for i in range(len(images))])

    @torch.no_grad()
    def measure(self, model, teachers, ctx):
        """Rank 0: the mean over images (and over teachers, as the loss) of cos(head output, teacher's feature);
        a live teacher runs on the view, a cached one gives its row (its center crop); None on other ranks."""
        if not is_main_process():
            return None
        was_training, total = model.training, 0.0
        model.eval()
        try:
            for start in range(0, len(self.index), self.batch_size):
                index = self.index[start:start + self.batch_size]
                uint8 = self.images[start:start + len(index)].to(ctx.device)
                with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
                    predictions = model(to_net_input(uint8, self.student, memory_format=ctx.memory_format))
                if not isinstance(predictions, dict):
                    predictions = {next(iter(teachers)): predictions}
                for name, teacher in teachers.items():
                    view = to_net_input(uint8, teacher.input, memory_format=ctx.memory_format) if teacher.needs_view \
                        else None  # a cached teacher gives its row
                    total += cosines(predictions[name], teacher(index, view, ctx.amp_dtype)).sum().item()
        finally:
            model.train(was_training)
        return total / (len(self.index) * len(teachers))

    def at_start(self, model, teachers, ctx, fresh, json_log):
        """The start record's values: the untrained student's cosine (``holdout_cosine_init``) when ``fresh``;
        a resumed run takes it from the log's last start record that has it, for the trend."""
        value = self.measure(model, teachers, ctx) if fresh else None
        if not is_main_process():
            return {}
        if fresh:
            self.init = value
            self.log(ctx, 0, 'untrained student', value)
            return {'holdout_images': len(self.index), 'holdout_cosine_init': value}
        starts = read_json_log(json_log, 'start') if os.path.isfile(json_log) else []
        self.init = next((r['holdout_cosine_init'] for r in reversed(starts) if 'holdout_cosine_init' in r), None)
        return {'holdout_images': len(self.index)}

    def at_epoch(self, model, teachers, ctx, epoch):
        """The epoch record's ``holdout_cosine`` and ``holdout_cosine_change`` (since the untrained student)."""
        value = self.measure(model, teachers, ctx)
        if value is None:
            return {}
        self.log(ctx, epoch, f'epoch {epoch}', value)
        return {'holdout_cosine': value,
                **({'holdout_cosine_change': value - self.init} if self.init is not None else {})}

    def log(self, ctx, step, what, value):
        change = f', {value - self.init:+.4f} since the start' if self.init is not None and step else ''
        ctx.logs.text.info('%s  held-out imitation: cos(head, teacher) %.4f on %d images%s', what, value,
                           len(self.index), change)
        ctx.logs.tensorboard.scalars({'holdout/cosine': value}, step)


def cosines(prediction, target):
    """Row-wise cosine, in float32 (float64 for fp64 runs): the held-out measure and the loss (train_student)."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    return (F.normalize(prediction.to(dtype), dim=1) * F.normalize(target.to(dtype), dim=1)).sum(dim=1)
