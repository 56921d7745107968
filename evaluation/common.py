"""What the evaluation scripts share: their flags (``add_data_args``, ``add_feature_args``), their start-up
(``start``), the extraction of each split's features (``open_features``, ``extract_splits``), the epoch of the
checkpoint (``checkpoint_epoch``), and the guard every writer of a named output uses (``check_output``)."""
import logging
import os
import re
import time
from dataclasses import dataclass

import torch

from data.folders import add_dataset_arg, build_dataset, restrict_folder
from data.transforms import eval_transform
from evaluation import features
from utils.checkpoint import read_checkpoint, writable_folder
from utils.distributed import add_distributed_args, cleanup, get_world_size, init_distributed, is_main_process
from utils.errors import SimRegError
from utils.logging import setup_logger

OUTPUTS = './outputs'   # every evaluation script's default output folder (eval_transfer: a sub-folder)


def add_data_args(p, data_help, dataset=True, save=OUTPUTS,
                  save_help='output folder for results, logs and feature caches (default: %(default)s)'):
    """DIR, --dataset (unless ``dataset`` is False), -j, -b, --image_size, --save and --dist_timeout."""
    p.add_argument('data', metavar='DIR', help=data_help)
    if dataset:
        add_dataset_arg(p)
    p.add_argument('-j', '--workers', default=8, type=int, help='data loading workers per process')
    p.add_argument('-b', '--batch-size', default=256, type=int, help='total batch size over all processes')
    p.add_argument('--image_size', default=None, type=int,
                   help='crop size (the evaluation view resizes to size*256/224, then center-crops); default: the '
                        'model\'s own input size for open_clip models, else 224')
    p.add_argument('--save', default=save, help=save_help)
    add_distributed_args(p)


def add_feature_args(p, load_cache=True, linear_pred=True):
    """The checkpoint and its stage, --linear_pred, --load_cache (unless the script always reuses its cache), --amp."""
    p.add_argument('--weights', required=True, help='checkpoint to evaluate (any layout the project loads)')
    p.add_argument('-a', '--arch', default=None,
                   help='architecture of a plain backbone/teacher file; student checkpoints carry their '
                        'own (if given, it is checked against the student)')
    p.add_argument('--use_pred', action='store_true', help='evaluate the regression head output (= --stage head)')
    p.add_argument('--head', help='with --use_pred/--stage head*: which head of a several-teacher student')
    p.add_argument('--stage', default=None,
                   help='where to take features: backbone (default), layer3, layer4, head or head.<i> '
                        '(output of the head Linear at index i)')
    if linear_pred:
        p.add_argument('--linear_pred', action='store_true',
                       help='check that the student has the linear head (the head is built from the checkpoint)')
    if load_cache:
        p.add_argument('--load_cache', action='store_true',
                       help='reuse the features an earlier run cached in --save (refused unless the same '
                            'checkpoint, images, stage, dataset, image size and --amp made them)')
    p.add_argument('--amp', action='store_true', help='run the frozen network under autocast')


@dataclass
class Run:
    """An evaluation script once started (``start``)."""
    args: object                # the parsed flags
    device: torch.device
    stage: str                  # features.resolve_stage of --stage/--use_pred
    save: str                   # the stage's output folder (features.stage_output_dir)
    logger: logging.Logger
    world_size: int
    main: bool                  # rank 0 (read before the process group ends)
    started: float              # time.time() once started

    def minutes(self):
        return (time.time() - self.started) / 60


def start(args, log_name, save=None):
    """Join the processes, resolve the stage and its output folder under ``save`` (default ``args.save``), log
    to ``<folder>/<log_name>`` on rank 0, starting with the flags."""
    device = init_distributed(args.dist_timeout)
    torch.backends.cudnn.benchmark = True    # every batch has the same shape
    stage = features.resolve_stage(args.stage, args.use_pred)
    folder = features.stage_output_dir(save or args.save, stage, args.head)
    if os.path.isfile(args.weights) and os.path.isdir(folder) and same_file(os.path.dirname(args.weights) or '.',
                                                                          folder):
        raise SimRegError(f'--weights {args.weights} lies in the output folder {folder}, where the evaluation writes '
                          f'its results, logs and caches: pass another --save')
    if is_main_process():
        writable_folder(folder)
    logger = setup_logger(os.path.join(folder, log_name) if is_main_process() else None)
    logger.info(f'args: {vars(args)}')
    return Run(args, device, stage, folder, logger, get_world_size(), is_main_process(), time.time())


def open_features(run, splits, name):
    """(FeatureModel, {split: dataset} on the evaluation view, their FeatureCache in ``run.save``); ``name``
    is the dataset's name in the cache. A flag the script lacks means no check, no subset, or a cache always
    reused."""
    args = run.args
    model = features.load_feature_model(args.weights, args.arch, run.stage, getattr(args, 'linear_pred', False),
                                        head_name=args.head)
    resolve_image_size(args, model.backbone)
    datasets = {split: build_dataset(args.data, split, eval_transform(args.image_size),
                                     getattr(args, 'dataset', 'imagenet')) for split in splits}
    features.check_same_classes(datasets)
    if getattr(args, 'train_per_class', 0):  # eval_knn.py: the online k-NN's train subset
        restrict_folder(datasets['train'], per_class=args.train_per_class, seed=args.subset_seed)
    hint = ('delete those files, pass another --save, or run without --load_cache to recompute them'
            if hasattr(args, 'load_cache') else 'delete those files or pass another --save')
    recipe = dict(stage=run.stage, dataset=name, image_size=args.image_size, amp=args.amp)
    cache = features.FeatureCache(run.save, args.weights, recipe, hint)
    return model, datasets, cache


def resolve_image_size(args, network):
    """--image_size when given, else the network's own input size (open_clip's), else the protocol's 224."""
    args.image_size = args.image_size or getattr(network, 'input_size', 224)
    return args.image_size


@dataclass
class Extracted:
    """What rank 0 holds once every split is extracted (``extract_splits``)."""
    splits: dict                # {split: (features [N, D] float16 L2-normalised, labels [N] int64)}
    num_classes: int
    weights_sha256: str


def extract_splits(run, splits, name):
    """The features of each split (extracted by every rank, or read from the cache with --load_cache) as an
    ``Extracted`` on rank 0, None elsewhere; then the process group ends and the model's memory is freed for
    what rank 0 runs alone."""
    args = run.args
    model, datasets, cache = open_features(run, splits, name)
    extracted = {split: features.split_features(cache, split, dataset, model, args.load_cache, args.batch_size,
                                                args.workers, run.device)
                 for split, dataset in datasets.items()}
    cleanup()
    if not run.main:
        return None
    del model    # frees the GPU memory faiss and the probes are about to use
    torch.cuda.empty_cache()  # a no-op where CUDA was never used
    return Extracted(extracted, len(datasets[splits[0]].classes), cache.weights_sha256)


def checkpoint_epoch(weights, given=None):
    """The epoch of the student in ``weights``: its checkpoint's 'epoch', else n of a file named
    ``ckpt_epoch_<n>.pth``; ``given`` (--epoch) must agree, and is taken for a file that knows none (a teacher).
    None when neither says."""
    ckpt = None if weights.endswith('.safetensors') else read_checkpoint(weights, mmap=True)  # only its keys
    student = isinstance(ckpt, dict) and (isinstance(ckpt.get('args'), dict) or 'opt' in ckpt)
    named = re.fullmatch(r'ckpt_epoch_(\d+)\.pth', os.path.basename(weights))
    known, source = ((ckpt['epoch'], 'its checkpoint says') if student and isinstance(ckpt.get('epoch'), int)
                     else (int(named.group(1)), 'its file name says') if named else (None, None))
    if given is not None and known is not None and given != known:
        raise SimRegError(f'--epoch {given} disagrees with {weights}, whose epoch is {known} ({source}): pass '
                          f'--epoch {known} or leave --epoch out')
    return known if known is not None else given


def same_file(path, other):
    """Whether two paths name one file: the same path, or one reached through a symlink or hard link."""
    if os.path.abspath(path) == os.path.abspath(other):
        return True
    try:
        return os.path.samefile(path, other)
    except OSError:  # one of them does not exist (yet)
        return False


def check_output(path, flag, inputs):
    """Refuse to write ``path`` (given as ``flag``) where it would replace an input (``inputs``: {what: path}; also
    through a symlink or hard link) or a training checkpoint; called before anything is written."""
    for name, source in inputs.items():
        if source and same_file(path, source):
            raise SimRegError(f'{flag} {path} is {name} {source}: writing it would replace the input; name another '
                              f'file for {flag}')
    if os.path.isfile(path) and is_training_checkpoint(path):
        raise SimRegError(f'{flag} {path} is a training checkpoint (it holds the optimizer or epoch): writing it '
                          f'would replace it; name another file for {flag}')


def is_training_checkpoint(path):
    """Whether ``path`` is a torch.save file holding 'optimizer' or 'epoch' (a training run's checkpoint, of a
    student or a probe); its tensors are only mapped, not read."""
    try:
        ckpt = read_checkpoint(path, mmap=True)
    except SimRegError:  # damaged, or not a PyTorch file: nothing a run can resume
        return False
    return isinstance(ckpt, dict) and ('optimizer' in ckpt or 'epoch' in ckpt)
