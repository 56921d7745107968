"""Online k-NN while training (``train_student.py --knn_every N``): the 1-NN and 20-NN top-1 of the student
backbone on ``<data>/val``, against a fixed, class-balanced subset of ``<data>/train``.

The full k-NN evaluation (``eval_knn.py``) extracts the whole training set, an ImageNet pass; during training
a subset of ``--knn_train_per_class`` images per class (chosen once from ``--seed``, the same images every
epoch) costs seconds and still tracks whether the student's feature space is taking the teacher's shape.
It is the project's own evaluation, not a copy: the eval view (``data.transforms.eval_transform`` at
``--image_size``), ``evaluation.features.extract_features`` (each rank extracts its contiguous shard, rank 0
gathers them in order) and ``evaluation.knn.evaluate`` (majority votes, seed 0), so the logged value equals
``eval_knn.py --train_per_class N --subset_seed SEED`` on the checkpoint of the same epoch.
"""
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from data.folders import build_dataset, restrict_folder
from data.transforms import eval_transform
from evaluation import knn
from evaluation.features import check_same_classes, extract_features
from utils.distributed import is_distributed, is_main_process
from utils.errors import SimRegError

KS = (1, 20)


class _EvalInput(nn.Module):
    """The network on the extraction's float32 images, cast to its own dtype and memory format (a student in
    fp64 or channels_last), in eval mode."""

    def __init__(self, network, dtype, memory_format):
        super().__init__()
        self.network, self.dtype, self.memory_format = network, dtype, memory_format

    def forward(self, images):
        return self.network(images.to(self.dtype, memory_format=self.memory_format))


class OnlineKnn:
    """The fixed train subset and val set of one training run, and ``measure(network)`` on them.

    ``measure`` is collective (every rank extracts its shard); it returns {"1": top1, "20": top1} on rank 0,
    None elsewhere, and leaves the network in the train/eval mode it found it in.
    """

    def __init__(self, data, image_size, per_class, seed, batch_size, workers, device, dataset='imagenet',
                 amp_dtype=None):
        transform = eval_transform(image_size)
        self.train = restrict_folder(build_dataset(data, 'train', transform, dataset), per_class=per_class, seed=seed)
        self.val = build_dataset(data, 'val', transform, dataset)
        check_same_classes({'train': self.train, 'val': self.val})
        self.train_labels = torch.tensor(self.train.targets)
        self.val_labels = torch.tensor(self.val.targets)
        self.batch_size, self.workers, self.device, self.amp_dtype = batch_size, workers, device, amp_dtype

    def describe(self):
        return (f'{len(self.train)} train images ({len(self.train) // len(self.train.classes)} per class) '
                f'against {len(self.val)} val images')

    def measure(self, network, dtype=torch.float32, memory_format=torch.contiguous_format):
        if is_distributed():
            # a DDP student's BatchNorm running statistics are each process's own since DDP's last broadcast
            # from rank 0: every shard is extracted with rank 0's, those the checkpoint holds (DDP broadcasts
            # them again at the next step anyway)
            for buffer in network.buffers():
                dist.broadcast(buffer, src=0)
        was_training = network.training
        model = _EvalInput(network, dtype, memory_format).eval()
        amp = self.amp_dtype is not None
        try:
            extract = lambda data, desc: extract_features(model, data, self.batch_size, self.workers, self.device,
                                                          amp=amp, amp_dtype=self.amp_dtype, desc=desc)
            train_feats = extract(self.train, 'k-NN train subset')
            val_feats = extract(self.val, 'k-NN val')
        finally:
            network.train(was_training)
        if not is_main_process():
            return None
        results = knn.evaluate(train_feats, self.train_labels, val_feats, self.val_labels, len(self.val.classes),
                               majority_ks=KS, weighted_ks=())
        return {str(k): results['majority'][k] for k in KS}

    @classmethod
    def from_args(cls, args, device, amp_dtype):
        """The online k-NN of a train_student.py run: its data, --image_size, --knn_train_per_class, --seed,
        --batch_size, --num_workers, --dataset and autocast dtype."""
        if not os.path.isdir(os.path.join(args.data, 'val')):
            raise SimRegError(f'--knn_every {args.knn_every} measures k-NN on {args.data}/val, which does not '
                              f'exist: add a val/ split with the train classes, or pass --knn_every 0')
        return cls(args.data, args.image_size, args.knn_train_per_class, args.seed, args.batch_size,
                   args.num_workers, device, args.dataset, amp_dtype)

    def at_start(self, teachers, student_backbone, dtype, memory_format):
        """The start record's values: ``knn_teacher`` (one live teacher: {"1", "20"}; several: {head name:
        {"1", "20"}} for each live one; cached teachers have no network to measure and are left out) and
        ``knn_init``, the untrained student's. Collective; {} on ranks other than 0."""
        live = {name: t for name, t in teachers.items() if getattr(t, 'network', None) is not None}
        measured = {name: self.measure(t.network, dtype, memory_format) for name, t in live.items()}
        init = self.measure(student_backbone, dtype, memory_format)
        if not is_main_process():
            return {}
        values = {'knn_init': init}
        if measured:
            values['knn_teacher'] = next(iter(measured.values())) if len(teachers) == 1 else measured
        return values


def knn_scalars(name, values):
    """TensorBoard tags of k-NN values: {"1", "20"} -> ``knn/<name>_1nn``, ``knn/<name>_20nn``; several teachers'
    {head: {"1", "20"}} -> ``knn/<name>_<head>_<k>nn``."""
    if set(map(str, KS)) <= set(values):
        return {f'knn/{name}_{k}nn': values[str(k)] for k in KS}
    return {tag: v for head, inner in values.items() for tag, v in knn_scalars(f'{name}_{head}', inner).items()}
