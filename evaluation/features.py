"""Features extracted once for k-NN and the linear probe: a checkpoint becomes a ``FeatureModel``, every rank
extracts a contiguous slice and rank 0 gathers them in dataset order; L2-normalised float16, cached with a sidecar.
"""
import functools
import logging
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.teacher_cache import dataset_fingerprint
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, to_net_input
from models.backbones import build_backbone
from models.loading import load_backbone
from models.student import load_student
from utils.checkpoint import file_digest, read_checkpoint
from utils.distributed import get_rank, get_world_size, is_distributed, is_main_process, run_on_main
from utils.errors import SimRegError
from utils.store import Store, StoreMismatch, differing

GATHER_ROWS = 32768
BACKBONE_LAYERS = ('layer3', 'layer4')


class _StageReached(Exception):
    """Carries a block's output (``args[0]``) out of the backbone, so later blocks are not computed."""


class FeatureModel(nn.Module):
    """The network up to the evaluated stage, in eval mode: ``backbone`` (the pooled feature), ``layer3`` or
    ``layer4`` (that ResNet block's output, average-pooled), ``head`` (the regression head's output) or
    ``head.<i>`` (the output of the head's Linear at index ``i``)."""

    def __init__(self, backbone, head, stage='backbone'):
        super().__init__()
        valid = available_stages(backbone, head)
        if stage not in valid:
            raise SimRegError(f"--stage {stage} is not available for this checkpoint: choose one of "
                              f"{', '.join(valid)}")
        self.stage = stage
        self.backbone = backbone
        # the input the backbone expects (an open_clip model's own); students train on ImageNet-normalised input
        self.input_mean = getattr(backbone, 'input_mean', IMAGENET_MEAN)
        self.input_std = getattr(backbone, 'input_std', IMAGENET_STD)
        self.head = head if stage == 'head' else head[:int(stage[5:]) + 1] if stage.startswith('head.') else None
        self.eval()

    @staticmethod
    def _stop_at_stage(module, inputs, output):
        raise _StageReached(output)

    def forward(self, images):
        if self.stage in BACKBONE_LAYERS:
            hook = getattr(self.backbone, self.stage).register_forward_hook(self._stop_at_stage)
            try:
                self.backbone(images)
            except _StageReached as reached:
                return F.adaptive_avg_pool2d(reached.args[0], 1).flatten(1)
            finally:
                hook.remove()
            raise RuntimeError(f'{self.stage} was never reached in the backbone forward')
        features = self.backbone(images)
        return features if self.head is None else self.head(features)


def available_stages(backbone, head):
    stages = ['backbone'] + [name for name in BACKBONE_LAYERS
                             if isinstance(getattr(backbone, name, None), nn.Module)]
    if head is not None:
        stages.append('head')
        stages += [f'head.{i}' for i, m in enumerate(head) if isinstance(m, nn.Linear)]
    return stages


def resolve_stage(stage, use_pred):
    """``--stage``, where ``--use_pred`` means ``head``."""
    if use_pred and stage not in (None, 'head'):
        raise SimRegError(f'--use_pred evaluates the head output but --stage is {stage}: pass only one')
    return 'head' if use_pred else (stage or 'backbone')


def stage_output_dir(save, stage, head_name=None):
    """``<save>`` for the backbone, ``<save>/pred_head`` for the head output, ``<save>/stage_<name>`` for others, so
    stages never mix; a several-teacher student's head stages add the head's name."""
    if stage == 'backbone':
        return save
    folder = 'pred_head' if stage == 'head' else f'stage_{stage}'
    return os.path.join(save, f'{folder}_{head_name}' if head_name and stage.startswith('head') else folder)


def _holds_student(checkpoint):
    """A student file carries regression-head weights (``predict_q.*``) somewhere in it."""
    if not isinstance(checkpoint, dict):
        return False
    dicts = [checkpoint] + [v for v in checkpoint.values() if isinstance(v, dict)]
    return any(isinstance(k, str) and 'predict_q.' in k for d in dicts for k in d)


def _is_arch(backbone, arch):
    """Whether ``backbone`` has the parameter shapes of ``arch`` (built on the meta device: no weights)."""
    with torch.device('meta'):
        reference = build_backbone(arch, getattr(backbone, 'image_size', None))  # a ViT student's size
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    return shapes(backbone) == shapes(reference)


def load_feature_model(weights, arch=None, stage='backbone', linear_pred=False, head_name=None):
    """Any checkpoint the project can load, as a FeatureModel. Students carry their architecture and head (``arch``
    is only checked, ``head_name`` picks a several-teacher student's head); any other file is a plain backbone."""
    checkpoint = None if weights.endswith('.safetensors') else read_checkpoint(weights)  # open_clip's: no student
    if _holds_student(checkpoint):
        backbone, head = load_student(weights, head=head_name, backbone_only=not stage.startswith('head'))
        if arch is not None and not _is_arch(backbone, arch):
            raise SimRegError(f'--arch {arch} does not match the student stored in {weights}: '
                              f'drop --arch (students carry their architecture) or fix it')
        if linear_pred and not isinstance(head[0], nn.BatchNorm1d):
            raise SimRegError(f'--linear_pred: the head in {weights} is an MLP, not the linear one; '
                              f'drop --linear_pred (the checkpoint says how its head is built)')
    elif arch is None:
        raise SimRegError(f'{weights} holds no SimReg student (no predict_q.* weights): pass --arch to '
                          f'evaluate it as a plain backbone, e.g. a teacher')
    else:
        backbone, head = load_backbone(arch, weights), None
        if stage.startswith('head'):
            raise SimRegError(f'{weights} is a plain backbone without a regression head: '
                              f'--use_pred/--stage {stage} need a student checkpoint')
    return FeatureModel(backbone, head, stage)


@torch.no_grad()
def extract_features(model, dataset, batch_size, workers, device, amp=False, desc='features',
                     amp_dtype=None, l2_normalize=True, with_extras=False, memory_format=torch.contiguous_format):
    """L2-normalised (or raw) float16 features of ``dataset`` in dataset order on rank 0, None elsewhere; each
    rank extracts a contiguous slice of ``batch_size`` / ranks batches, its images normalised ``input_norm(model)``'s
    way, in ``memory_format`` (a channels_last network's). ``with_extras=True``: (features, the third item of every
    sample), a label or e.g. a view's crop box. Samples are indexed by their position."""
    world, rank = get_world_size(), get_rank()
    if len(dataset) < world:
        raise SimRegError(f'{len(dataset)} images cannot be split over {world} processes: '
                          f'use fewer processes (--nproc_per_node)')
    bounds = [len(dataset) * r // world for r in range(world + 1)]  # rank r extracts [bounds[r], bounds[r + 1])
    start, stop = bounds[rank], bounds[rank + 1]
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=max(1, batch_size // world),
                        shuffle=False, num_workers=workers, pin_memory=device.type == 'cuda')
    model.eval().to(device)
    local = {}  # 'features' (and 'extras') of this rank's slice
    for indices, images, extras in tqdm(loader, desc=desc, disable=not is_main_process(), dynamic_ncols=True):
        images = normalize(images.to(device, non_blocking=True), *input_norm(model)).contiguous(
            memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            output = model(images).float()
        output = (F.normalize(output, dim=1) if l2_normalize else output).half().cpu()
        for name, values in [('features', output), ('extras', extras)][:1 + with_extras]:
            if name not in local:
                local[name] = torch.empty(stop - start, *values.shape[1:], dtype=values.dtype)
            local[name][indices - start] = values
    features = gather_in_order(local['features'], bounds, device)
    return (features, gather_in_order(local['extras'], bounds, device)) if with_extras else features


class OwnInput(nn.Module):
    """A teacher on its own input ``net`` (``NetInput``): ``extract_features`` hands it the view normalised ImageNet's
    way; its grey levels come back exactly (whole numbers), then are resized and normalised as training does."""

    def __init__(self, network, net):
        super().__init__()
        self.network, self.net = network, net
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x):
        images = (x.float() * self.std + self.mean).round_().clamp_(0, 255).to(torch.uint8)
        return self.network(to_net_input(images, self.net))


def input_norm(model):
    """(mean, std) the network normalises its input with: its own ``input_mean``/``input_std``, else ImageNet's."""
    return getattr(model, 'input_mean', IMAGENET_MEAN), getattr(model, 'input_std', IMAGENET_STD)


def gather_in_order(local, bounds, device):
    """Every rank's slice concatenated on rank 0, in rank order (= dataset order), ``GATHER_ROWS`` rows per
    rank at a time."""
    if not is_distributed():
        return local
    world, rank = get_world_size(), get_rank()
    counts = [bounds[r + 1] - bounds[r] for r in range(world)]
    comm_device = device if dist.get_backend() == 'nccl' else torch.device('cpu')
    pieces = []  # rank 0: the pieces received from every rank, per step
    for row in range(0, max(counts), GATHER_ROWS):
        piece = torch.zeros(min(GATHER_ROWS, max(counts) - row), *local.shape[1:], dtype=local.dtype)
        mine = local[row:row + len(piece)]
        piece[:len(mine)] = mine
        piece = piece.to(comm_device)
        received = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
        dist.gather(piece, received, dst=0)
        if rank == 0:
            pieces.append([t.cpu() for t in received])
    dist.barrier()
    if rank != 0:
        return None
    return torch.cat([torch.cat([step[r] for step in pieces])[:counts[r]] for r in range(world)])


class FeatureCache:
    """The features of each split, a ``utils.store.Store`` each: ``<folder>/<split>_feats.npy`` (float16,
    L2-normalised), ``<split>_labels.npy`` and ``<split>_feats.json``, whose ``CHECKED`` keys must match for
    reuse: the weights, ``recipe`` ({stage, dataset, image_size, amp}) and the images, by relative path."""

    CHECKED = ('weights_sha256', 'stage', 'dataset', 'image_size', 'amp', 'split', 'num_samples', 'num_classes',
               'file_list_sha256')

    def __init__(self, folder, weights, recipe, refuse_hint):
        self.folder = folder
        self.weights = weights
        self.recipe = {key: recipe[key] for key in ('stage', 'dataset', 'image_size', 'amp')}
        self.refuse_hint = refuse_hint

    @functools.cached_property
    def weights_sha256(self):
        return file_digest(self.weights)

    def store(self, split):
        path = lambda suffix: os.path.join(self.folder, f'{split}_{suffix}')
        return Store(path('feats.json'), {'features': path('feats.npy'), 'labels': path('labels.npy')})

    def expected(self, split, dataset):
        return {'weights_sha256': self.weights_sha256, **self.recipe, 'split': split,
                'num_samples': len(dataset), 'num_classes': len(dataset.classes),
                'file_list_sha256': dataset_fingerprint(dataset)['file_list_sha256']}

    def load(self, split, dataset):
        """(features, labels) of a cache that matches, None without one; a cache of something else is refused."""
        store = self.store(split)
        if not store.exists():
            return None
        recorded, expected = store.meta(), self.expected(split, dataset)
        wrong = differing(recorded, expected, self.CHECKED)
        if wrong:
            key, hint = wrong[0], self.refuse_hint
            if key == 'amp':
                hint = f'{"pass" if recorded.get(key) else "drop"} --amp to reuse them, or {hint}'
            if key == 'file_list_sha256':
                raise SimRegError(f'cached {split} features {store.sidecar} were made for other files than the '
                                  f'{expected["num_samples"]} images of {dataset.root} (the same count, not '
                                  f'the same paths or class folders): {hint}')
            raise SimRegError(f'cached {split} features {store.sidecar} were made with {key}={recorded.get(key)}, '
                              f'this run has {key}={expected[key]}: {hint}')
        n = expected['num_samples']
        try:
            arrays = store.open({'features': ((n, recorded.get('feat_dim')), np.float16),
                                 'labels': ((n,), np.int64)}, mmap=False)
        except (StoreMismatch, FileNotFoundError):
            raise SimRegError(f'cached {split} features in {self.folder} are incomplete: {self.refuse_hint}') from None
        return torch.from_numpy(arrays['features']), torch.from_numpy(arrays['labels'])

    def save(self, split, dataset, features, labels):
        meta = {**self.expected(split, dataset), 'weights': os.path.abspath(self.weights),
                'feat_dim': int(features.shape[1]), 'dtype': 'float16', 'l2_normalized': True,
                'created': time.strftime('%Y-%m-%d %H:%M:%S')}
        self.store(split).write({'features': features.numpy(), 'labels': labels.numpy()}, meta)


def split_features(cache, split, dataset, model, reuse, batch_size, workers, device):
    """(features, labels) of one split on rank 0, (None, None) elsewhere: from the cache when ``reuse`` and it
    matches, else extracted by all ranks and cached."""
    loaded = {}

    def load_on_main():
        loaded['cache'] = cache.load(split, dataset)
        return loaded['cache'] is not None

    if reuse and run_on_main(load_on_main):
        logging.getLogger('simreg').info(f'{split} features: reusing the cache in {cache.folder}')
        return loaded['cache'] if is_main_process() else (None, None)
    features = extract_features(model, dataset, batch_size, workers, device, cache.recipe['amp'],
                                desc=f'{split} features')
    if not is_main_process():
        return None, None
    labels = torch.tensor(dataset.targets, dtype=torch.int64)
    cache.save(split, dataset, features, labels)
    return features, labels


def check_same_classes(datasets):
    """Every split of ``{split: dataset}`` holds the classes of the first one."""
    (first, reference), *others = datasets.items()
    for split, dataset in others:
        if dataset.classes != reference.classes:
            raise SimRegError(f'{first}/ and {split}/ hold different classes ({len(reference.classes)} vs '
                              f'{len(dataset.classes)}): every split needs the same class folders')
