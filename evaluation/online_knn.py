"""Online k-NN while training (``train_student.py --knn_every N``): 1-NN and 20-NN top-1 on ``<data>/val`` against
a fixed class-balanced train subset, the value ``eval_knn.py --train_per_class N --subset_seed SEED`` gives on the
checkpoint of the same epoch (same view, extraction and vote)."""
import functools
import os

import torch
import torch.distributed as dist

from data.folders import build_dataset, is_labelled, restrict_folder
from data.transforms import NetInput, eval_transform
from evaluation import knn
from evaluation.features import OwnInput, check_same_classes, extract_features, input_norm
from utils.distributed import is_distributed, is_main_process
from utils.errors import SimRegError

KS = (1, 20)


def knn_measured(args, held_out):
    """Whether a run measures the online k-NN: with --knn_every, on class folders; without their val/ only when no
    images are held out (``OnlineKnn`` then names the fix)."""
    has_val = os.path.isdir(os.path.join(args.data, 'val'))
    return args.knn_every > 0 and is_labelled(args.data) and (has_val or not held_out)


class OnlineKnn:
    """A training run's fixed train subset and val set, and ``measure(network)`` on them: collective, {"1": top1,
    "20": top1} on rank 0 and None elsewhere, the network left in the train/eval mode it was found in."""

    def __init__(self, args, device, amp_dtype):
        if not os.path.isdir(os.path.join(args.data, 'val')):
            raise SimRegError(f'--knn_every {args.knn_every} measures k-NN on {args.data}/val, which does not '
                              f'exist: add a val/ split with the train classes, or pass --knn_every 0')
        transform, self.size = eval_transform(args.image_size), args.image_size
        self.train = restrict_folder(build_dataset(args.data, 'train', transform, args.dataset),
                                     per_class=args.knn_train_per_class, seed=args.seed)
        self.val = build_dataset(args.data, 'val', transform, args.dataset)
        check_same_classes({'train': self.train, 'val': self.val})
        self.train_labels = torch.tensor(self.train.targets)
        self.val_labels = torch.tensor(self.val.targets)
        self.extract = functools.partial(extract_features, batch_size=args.batch_size, workers=args.num_workers,
                                         device=device, amp=amp_dtype is not None, amp_dtype=amp_dtype)

    def measure(self, network, memory_format=torch.contiguous_format, size=None):
        """``size``: the center crops' (default: the student's)."""
        self.train.transform = self.val.transform = eval_transform(size or self.size)
        if is_distributed():
            # every shard is extracted with rank 0's BatchNorm running statistics, those the checkpoint holds
            for buffer in network.buffers():
                dist.broadcast(buffer, src=0)
        was_training = network.training
        network.eval()
        try:
            train_feats = self.extract(network, self.train, desc='k-NN train subset', memory_format=memory_format)
            val_feats = self.extract(network, self.val, desc='k-NN val', memory_format=memory_format)
        finally:
            network.train(was_training)
        if not is_main_process():
            return None
        results = knn.evaluate(train_feats, self.train_labels, val_feats, self.val_labels, len(self.val.classes),
                               majority_ks=KS, weighted_ks=())
        return {str(k): results['majority'][k] for k in KS}

    def at_start(self, teachers, student_backbone, memory_format):
        """Collective: the start record's ``knn_init`` (the untrained student's) and ``knn_teacher`` (one live teacher's
        {"1", "20"}, or {head: {"1", "20"}} of several; cached ones have no network), {} on ranks other than 0."""
        live = {name: t for name, t in teachers.items() if getattr(t, 'network', None) is not None}
        measured = {}
        for name, teacher in live.items():
            network, size = self.at_input(teacher)
            measured[name] = self.measure(network, memory_format, size)
        init = self.measure(student_backbone, memory_format)
        if not is_main_process():
            return {}
        values = {'knn_init': init}
        if measured:
            values['knn_teacher'] = next(iter(measured.values())) if len(teachers) == 1 else measured
        return values

    def at_input(self, teacher):
        """(network, crop size) measuring a live teacher on its own input: the center crops cut at its size, resized
        and normalised its way (None: the student's crops as they are)."""
        net = teacher.input or NetInput(self.size)
        if net == NetInput(self.size, *input_norm(teacher.network)):  # what extract_features gives it anyway
            return teacher.network, None
        return OwnInput(teacher.network, net).eval(), net.size  # eval: ``measure`` restores the mode it finds
