"""SimReg distillation: train a student backbone + regression head to regress a frozen teacher.

    torchrun --nproc_per_node=4 train_student.py /path/to/imagenet \
        --arch_teacher resnet50 --teacher_weights moco_v2.pth --arch_student resnet18 \
        --single_aug --weak_weak --exp r50_to_r18

A plain ``python train_student.py ...`` runs as a single process (CPU or one GPU).
"""
import argparse
import contextlib
import functools
import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data import replay
from data.folders import add_dataset_arg, build_dataset
from data.gpu_views import GpuDecodedInput, ViewParams, packed_collate
from data.sampler import GlobalBatchSampler, SeededSamples
from data.transforms import NORMS, DeviceInput, NetInput, TwoViews
from evaluation.holdout import WithoutHoldout, cosines, held_out_images
from evaluation.online_knn import OnlineKnn, knn_measured
from models.backbones import STUDENT_ARCHS, TEACHER_ARCHS, build_backbone
from models.batchnorm import bad_grouping, bn_groups, convert_batchnorm, frozen_running_stats
from models.dense import feature_map
from models.head import build_head
from models.loading import load_strict
from models.simreg import AUTOCAST_DTYPES, SimReg, build_teachers, default_precision, in_float64
from models.student import student_checkpoint
from models.vit import channels_last_helps
from utils import distributed as dist_utils
from utils.checkpoint import (describe_non_finite, lock_experiment, make_folder, non_finite, read_checkpoint,
                              release_experiment_locks, remove_stale_temp_files, resume_candidates, writable_folder)
from utils.errors import RESUME_EXIT_CODE, SimRegError, end_broken_group, exit_on_user_error
from utils.logging import Logs, setup_logger
from utils.tracking import check_log_to
from utils.training import (Checkpointer, MetricLogger, Preempted, StopSignals, StoppedBeforeTraining,
                            ignore_in_loader_worker)


def get_args_parser():
    p = argparse.ArgumentParser('SimReg distillation', add_help=True)
    p.add_argument('data', help='dataset root holding train/<class>/<image>; or a folder of images at any depth, or '
                                'a text file listing image paths (one per line), unlabelled')
    add_dataset_arg(p)
    p.add_argument('--base_dir', default='./', help='outputs go to <base_dir>/exp/<exp>/')
    p.add_argument('--exp', default='outputs', help='experiment name')
    p.add_argument('--print_freq', type=int, default=100, help='log every N steps')
    p.add_argument('--save_freq', type=int, default=10, help='keep ckpt_epoch_<n>.pth every N epochs')
    p.add_argument('--batch_size', type=int, default=256, help='total batch size over all processes')
    p.add_argument('--bn_batch', type=int, default=64,
                   help="images per BatchNorm group of the global batch, whatever the number of processes (the "
                        "paper: 64, 256 over 4 GPUs); 0: BatchNorm over each process's share")
    p.add_argument('--num_workers', type=int, default=8, help='data loading workers per process')
    p.add_argument('--epochs', type=int, default=130)
    # optimisation
    p.add_argument('--optimizer', choices=['sgd', 'adamw'], default='sgd',
                   help="sgd: the paper's (with --sgd_momentum); adamw: torch's AdamW with its default betas (0.9, "
                        '0.999), no weight decay on norms and biases (the ViT recipe)')
    p.add_argument('--learning_rate', type=float, default=0.05,
                   help='base lr, cosine-decayed per epoch (per step with --warmup_epochs)')
    p.add_argument('--warmup_epochs', type=int, default=0,
                   help='linear lr warm-up from 0 over the first N epochs, then the cosine, both set every step')
    p.add_argument('--weight_decay', type=float, default=1e-4)
    p.add_argument('--sgd_momentum', type=float, default=0.9)
    p.add_argument('--clip_grad', type=float, default=0, help='clip the total gradient norm to this (0: off)')
    p.add_argument('--accum_steps', type=int, default=1,
                   help="process each process's share of --batch_size in this many micro-batches, their gradients "
                        'summed into one step (the same step, less memory)')
    # models
    p.add_argument('--arch_teacher', default='resnet50',
                   help=f'teacher architecture, or a comma-separated list for several teachers '
                        f'(one head each): {", ".join(TEACHER_ARCHS)}')
    p.add_argument('--arch_student', default='resnet50', choices=STUDENT_ARCHS, metavar='ARCH',
                   help='student: any torchvision classification model by name (resnet18, mobilenet_v3_large, '
                        'efficientnet_b0, convnext_tiny, ...; see docs/checkpoints.md), or mobilenet '
                        '(MobileNet-v2)')
    p.add_argument('--n_mlp_layers', type=int, default=4, choices=[2, 4],
                   help='layers of the regression head')
    p.add_argument('--linear_pred', action='store_true', help='head = BN + Linear instead of the MLP')
    p.add_argument('--dense_weight', type=float, default=0,
                   help="add W x the dense loss: a dense head on the student's feature map, resized to each live "
                        "teacher's grid, regresses the teacher's patch tokens or last feature map per location "
                        "(docs/training.md); 0: the paper's method")
    p.add_argument('--dense_head', type=int, default=4, choices=[2, 4],
                   help='layers of the dense head (1x1 convolutions), as --n_mlp_layers for the regression head')
    p.add_argument('--use_cache', action='store_true',
                   help='regress cached teacher features (--teacher_feats) instead of running the teacher')
    p.add_argument('--teacher_feats', help='teacher feature cache (.npy from cache_teacher_feats.py, or a SimReg '
                                           '.pth dict, converted once); with several teachers a comma-separated '
                                           'list, empty for live ones')
    p.add_argument('--teacher_fc', action='store_true',
                   help="regress the teacher's pretrained projection (a plain Linear fc) output")
    # augmentation
    p.add_argument('--single_aug', action='store_true', help='one view fed to both nets')
    p.add_argument('--weak_strong', action='store_true', help='teacher weak view, student strong view')
    p.add_argument('--weak_weak', action='store_true', help='weak views for both nets')
    p.add_argument('--image_size', type=int, default=224, help='crop size')
    p.add_argument('--teacher_image_size', default='',
                   help="the teacher's input size (default: --image_size); with several teachers one for all or a "
                        "comma-separated list")
    p.add_argument('--teacher_norm', default='',
                   help=f"the teacher's normalisation, {'|'.join(NORMS)} (default: its family's); with several "
                        f"teachers one for all or a comma-separated list, empty for the family's")
    p.add_argument('--mse_nonorm', action='store_true', help='squared error of un-normalised vectors')
    # weights
    p.add_argument('--teacher_weights', help='teacher checkpoint (any layout models.loading accepts, or a '
                                             'preset name); with several teachers a comma-separated list')
    p.add_argument('--weights', help='initialise student backbone + head from a student checkpoint')
    p.add_argument('--resume', default='', help="checkpoint to resume from, or 'auto' for the latest "
                                                 'in the experiment (fresh start when there is none)')
    p.add_argument('--restart', action='store_true',
                   help='with --resume: take the weights only, restart optimizer and epochs')
    p.add_argument('--overwrite', action='store_true',
                   help='start the experiment again although it holds checkpoints (without --resume)')
    p.add_argument('--ckpt_every_min', type=float, default=20,
                   help='also write last.pth inside epochs every M minutes (0: at epoch ends only)')
    p.add_argument('--ckpt_every_steps', type=int, default=0,
                   help='also write last.pth inside epochs every N steps (0: off)')
    p.add_argument('--stop_deadline', type=float, default=60,
                   help='after SIGTERM/SIGUSR1, exit after this many seconds even if the step and the '
                        'checkpoint have not finished')
    # execution
    p.add_argument('--precision', choices=[*AUTOCAST_DTYPES, 'fp64'], default=None,
                   help='autocast dtype (default: bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU); '
                        'fp64: the student and a live teacher in float64 (slow: to check that runs of different '
                        'shapes differ only by summation order)')
    p.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='NHWC memory format for the convolutional nets (default: on GPUs, where it is faster)')
    p.add_argument('--gpu_decode', action='store_true',
                   help='loader workers only read files; JPEGs are decoded (nvjpeg) and augmented on the GPU')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the student (falls back to eager where compilation fails)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--log_to', default='', help='also log to these trackers, a comma list: wandb, mlflow '
                                                '(docs/training.md); TensorBoard and log.jsonl are always written')
    # online k-NN (evaluation/online_knn.py)
    p.add_argument('--knn_every', type=int, default=0,
                   help='every N epochs and at the last, log the 1-NN and 20-NN top-1 of the student backbone on '
                        '<data>/val against --knn_train_per_class train images per class (and the teacher\'s and the '
                        'untrained student\'s at the start); 0: off')
    p.add_argument('--knn_train_per_class', type=int, default=20,
                   help='train images per class for the online k-NN, chosen once from --seed')
    p.add_argument('--holdout', type=int, metavar='N',
                   help='leave N training images (drawn from --seed) out of training and log the imitation cosine '
                        'on them with the online k-NN (default: 256, at most a tenth of the images, for unlabelled '
                        'images with --knn_every; 0 for class folders)')
    dist_utils.add_distributed_args(p)
    return p


MIN_IMAGE_SIZE = 16  # the smallest size the tests train at (the strong views' 13-pixel blur needs 7 or more)


def check_args(args):
    """Every flag that can be wrong on its own or with the number of processes, checked before anything is written
    (a bad value would fail later, after a folder or checkpoint exists, or run silently wrong): one line each."""
    world = int(os.environ.get('WORLD_SIZE') or (dist_utils.slurm_environment() or {}).get('WORLD_SIZE', 1))
    count = lambda name, least, what: (getattr(args, name) >= least,
                                       f'--{name} {getattr(args, name)}: give {what}, {least} or more')
    number = lambda name, ok, want: (math.isfinite(getattr(args, name)) and ok(getattr(args, name)),
                                     f'--{name} {getattr(args, name)}: give {want}')
    exp = os.path.normpath(args.exp or '.')
    checks = [
        (exp not in ('.', '..') and not exp.startswith('..' + os.sep) and not os.path.isabs(exp),
         f'--exp {args.exp!r}: give a name for the experiment\'s folder in {os.path.join(args.base_dir, "exp")}'),
        count('batch_size', 2, 'the images per step over all processes'), count('epochs', 1, 'the epochs to train'),
        count('num_workers', 0, 'the loader processes per process'), count('print_freq', 1, 'the steps per log line'),
        count('save_freq', 1, 'the epochs between kept checkpoints'),
        count('knn_every', 0, 'the epochs between online k-NN measures (0: off)'),
        (not args.holdout or args.knn_every > 0, f'--holdout {args.holdout} is measured every --knn_every epochs: '
                                                 f'pass --knn_every N too, or drop --holdout'),
        (args.holdout is None or args.holdout >= 0,
         f'--holdout {args.holdout}: give the images to hold out, 0 or more'),
        count('ckpt_every_steps', 0, 'the steps between checkpoints inside epochs (0: off)'),
        count('seed', 0, 'the seed'), count('accum_steps', 1, 'the micro-batches of a step'),
        count('warmup_epochs', 0, 'the epochs of lr warm-up'),
        (args.warmup_epochs <= args.epochs, f'--warmup_epochs {args.warmup_epochs} is longer than the '
                                            f'{args.epochs} --epochs: give {args.epochs} or fewer'),
        (not args.knn_every or args.knn_train_per_class >= 1,
         f'--knn_train_per_class {args.knn_train_per_class}: give the train images per class the online k-NN '
         f'uses, 1 or more (or --knn_every 0 for no online k-NN)'),
        (args.image_size >= MIN_IMAGE_SIZE, f'--image_size {args.image_size} is below the {MIN_IMAGE_SIZE} pixels '
                                            f'training needs: pass {MIN_IMAGE_SIZE} or more (224: the paper)'),
        number('learning_rate', lambda v: v >= 0, 'a finite base learning rate, 0 or more (0.05: the paper)'),
        number('weight_decay', lambda v: v >= 0, 'a finite weight decay, 0 or more (1e-4: the paper)'),
        number('sgd_momentum', lambda v: 0 <= v < 1, 'a momentum from 0 up to, not including, 1 (0.9: the paper)'),
        number('dense_weight', lambda v: v >= 0, "a finite dense loss weight, 0 or more (0: the paper's method)"),
        (not (args.dense_weight and args.use_cache and (',' not in args.arch_teacher or all(
            (args.teacher_feats or '').split(',')))),
         f'--use_cache with --dense_weight {args.dense_weight}: a cached teacher has no dense targets (too large to '
         f'cache): run the teacher live (drop --use_cache) or pass --dense_weight 0'),
        number('clip_grad', lambda v: v >= 0, 'a finite maximal total gradient norm, 0 or more (0: no clipping)'),
        number('ckpt_every_min', lambda v: v >= 0, 'the minutes between checkpoints inside epochs, 0 or more (0: off)'),
        number('stop_deadline', lambda v: v > 0, 'the seconds a stop signal waits for the checkpoint, more than 0'),
        number('dist_timeout', lambda v: v > 0, 'the minutes a process waits for the others, more than 0'),
        (args.batch_size % world == 0, f'--batch_size {args.batch_size} must divide by the {world} processes'),
        (not args.restart or args.resume, '--restart takes the weights of --resume: add --resume PATH or drop '
                                          '--restart'),
        (args.use_cache or not any((args.teacher_feats or '').split(',')),
         '--teacher_feats is read only with --use_cache: add --use_cache'),
        (not args.use_cache or args.teacher_feats or ',' in args.arch_teacher,
         '--use_cache needs --teacher_feats PATH (built by cache_teacher_feats.py)'),
    ]
    for ok, message in checks:
        if not ok:
            raise SimRegError(message)
    check_log_to(args.log_to)
    check_teacher_input(args.teacher_image_size, args.teacher_norm)
    per_rank = args.batch_size // world
    if args.bn_batch < 0 or args.bn_batch == 1:
        raise SimRegError(f'--bn_batch {args.bn_batch}: give the images per BatchNorm group, 2 or more (64, the '
                          f'paper\'s), or 0 for BatchNorm over each process\'s share')
    if args.bn_batch == 0 and per_rank < 2:
        raise SimRegError(f'--bn_batch 0 normalises over each process\'s {per_rank} image, and BatchNorm needs 2 or '
                          f'more: give --bn_batch 2 or more, or a larger --batch_size')
    group = min(args.bn_batch, args.batch_size)  # as models.batchnorm.bn_groups groups the batch
    if args.bn_batch and group != per_rank and (
            per_rank % group if group < per_rank else (group % per_rank or args.batch_size % group)):
        raise bad_grouping(args.bn_batch, args.batch_size, world)
    bn_images = group if args.bn_batch and group < per_rank else per_rank  # a process's images per BatchNorm group
    if per_rank % (args.accum_steps * bn_images):  # micro-batches of whole groups: the statistics without them
        fits = f'an --accum_steps that divides {per_rank // bn_images}' if per_rank > bn_images else '--accum_steps 1'
        smaller = f', or a --bn_batch that divides {per_rank // args.accum_steps}' * (per_rank % args.accum_steps == 0)
        raise SimRegError(f'--accum_steps {args.accum_steps} does not split each process\'s {per_rank} images into '
                          f'micro-batches of whole BatchNorm groups of {bn_images} (--bn_batch {args.bn_batch}): '
                          f'give {fits}{smaller}')


def check_teacher_input(sizes, norms):
    """--teacher_image_size and --teacher_norm (also cache_teacher_feats.py's): each entry empty or valid."""
    for size in filter(None, sizes.split(',')):
        if not size.isdigit() or int(size) < MIN_IMAGE_SIZE:
            raise SimRegError(f'--teacher_image_size {sizes}: give sizes of {MIN_IMAGE_SIZE} pixels or more, one '
                              f'for all teachers or one per teacher')
    if unknown := [n for n in norms.split(',') if n and n not in NORMS]:
        raise SimRegError(f'--teacher_norm {",".join(unknown)}: choose from {", ".join(NORMS)} (empty: the '
                          f'teacher family\'s)')


@dataclass
class Context:
    """What a training step needs besides the model, the teachers, the data and the optimizer; made once."""
    device: torch.device
    amp_dtype: torch.dtype = None  # autocast dtype; None: fp32
    memory_format: torch.memory_format = torch.contiguous_format
    mse_nonorm: bool = False  # the loss regresses the raw vectors (regression_loss)
    logs: Logs = None  # text log, JSON log, TensorBoard
    to_device: DeviceInput = None  # a loader batch -> (student input, teacher input)
    checkpointer: Checkpointer = None
    scaler: torch.amp.GradScaler = None  # made from amp_dtype: enabled for fp16 only
    lr: object = None  # (epoch, step, steps) -> the step's learning rate (learning_rate)
    accum_steps: int = 1  # micro-batches per step, their gradients summed
    clip_grad: float = 0.0  # the total gradient norm is clipped to this (0: not clipped)
    dense_weight: float = 0.0  # the weight of the dense loss (--dense_weight): each live teacher has a dense head

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def main(args):
    """Train; returns the trained SimReg module (student backbone + head). From this first line a SIGTERM/SIGUSR1
    ends the run with exit 75: at once before training, after a step and its checkpoint during it."""
    check_args(args)
    signals = StopSignals(args.stop_deadline)
    try:
        return train(args, signals)
    except StoppedBeforeTraining as stopped:
        exit_stopped_before_training(stopped)
    finally:
        signals.close()
        release_experiment_locks()


def train(args, signals):
    """``main``'s run; ``signals`` (``StopSignals``) stop it after a step once training begins."""
    # ---------------------------------------------------------------- processes, experiment folder, logs
    device = dist_utils.init_distributed(args.dist_timeout)
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    exp_dir = os.path.join(args.base_dir, 'exp', args.exp)
    ckpt_dir, logs_dir = os.path.join(exp_dir, 'checkpoints'), os.path.join(exp_dir, 'logs')
    dist_utils.run_on_main(functools.partial(prepare_experiment, args, exp_dir, ckpt_dir, logs_dir))
    args.precision = args.precision or default_precision(device)
    args.channels_last = device.type == 'cuda' if args.channels_last is None else args.channels_last
    torch.backends.cudnn.benchmark = device.type == 'cuda'  # every step has the same shapes: autotune once
    ctx = Context(device, AUTOCAST_DTYPES.get(args.precision), mse_nonorm=args.mse_nonorm,
                  memory_format=torch.channels_last if args.channels_last else torch.contiguous_format,
                  logs=Logs(logs_dir, args.print_freq, args.log_to), lr=functools.partial(learning_rate, args=args),
                  accum_steps=args.accum_steps, clip_grad=args.clip_grad, dense_weight=args.dense_weight)
    log = ctx.logs.text
    if args.weak_strong and args.weak_weak:
        log.warning('note: --weak_strong and --weak_weak: --weak_strong wins')
    dist_utils.seed_everything(args.seed, 0, rank)

    # ---------------------------------------------------------------- data and teachers
    dataset = build_dataset(args.data, 'train', None, args.dataset, encoded=args.gpu_decode)
    teachers = build_teachers(args, dataset, ctx, log)
    held_out, holdout = held_out_images(args, dataset, teachers, world_size)
    loader, ctx.to_device = build_input(args, dataset, teachers, ctx, held_out)

    # ---------------------------------------------------------------- student, optimizer, resume
    model = build_student(args, teachers)
    # groups of the micro-batches: check_args made each of them whole groups of the global batch
    convert_batchnorm(model, bn_groups(args.bn_batch, args.batch_size // args.accum_steps, world_size, rank))
    model.to(device, memory_format=ctx.memory_format if channels_last_helps(model.encoder_q) else
             torch.contiguous_format)
    if args.precision == 'fp64':  # runs of different shapes then differ only by summation order
        in_float64(model, teachers)
    optimizer = build_optimizer(model, args, device)
    start = resume(args, model, optimizer, ctx.scaler, ckpt_dir, log) if args.resume else {'epoch': 1, 'step': 0}

    # ---------------------------------------------------------------- before the first step
    describe_run(args, teachers, loader, ctx, logs_dir)
    online_knn = OnlineKnn(args, device, ctx.amp_dtype) if knn_measured(args, held_out) else None
    fresh = start['epoch'] == 1 and start['step'] == 0 and 'path' not in start  # not resumed from epoch 0
    knn_start = online_knn.at_start(teachers, model.encoder_q, ctx.memory_format) if online_knn and fresh else {}
    knn_start.update(holdout.at_start(model, teachers, ctx, fresh, ctx.logs.json.path or '') if holdout else {})
    ctx.logs.start(start_epoch=start['epoch'], start_step=start['step'], resumed_from=start.get('resumed_from'),
                   epochs=args.epochs, world_size=world_size, device=str(device),
                   backend=dist_utils.backend_name(), precision=args.precision, channels_last=args.channels_last,
                   **knn_start)
    signals.training(log)
    ctx.checkpointer = Checkpointer(ckpt_dir, functools.partial(checkpoint_state, model, optimizer, ctx.scaler,
                                                                args, teachers), args, signals, start)
    if fresh:
        ctx.checkpointer.save(0)  # the untrained student: the "before distillation" baseline
    if start['epoch'] > args.epochs:
        log.info('==> all %d epochs are done already', args.epochs)
    # no buffer broadcast: rank 0's BatchNorm statistics are the saved ones either way (the k-NN broadcasts them)
    ddp_model = (DistributedDataParallel(model, broadcast_buffers=False, gradient_as_bucket_view=True)
                 if world_size > 1 else model)
    if args.compile:
        ddp_model = compile_or_eager(ddp_model, log)

    # ---------------------------------------------------------------- training
    try:
        for epoch in range(start['epoch'], args.epochs + 1):
            loader.batch_sampler.set_epoch(epoch, start['step'] if epoch == start['epoch'] else 0)
            stats = train_one_epoch(ddp_model, teachers, loader, optimizer, ctx, epoch)
            due = args.knn_every > 0 and (epoch % args.knn_every == 0 or epoch == args.epochs)
            knn = online_knn.measure(model.encoder_q, ctx.memory_format) if online_knn and due else None
            stats.update(holdout.at_epoch(model, teachers, ctx, epoch) if holdout and due else {})
            ctx.logs.epoch(epoch, stats, knn)
            ctx.checkpointer.save(epoch)
            dist_utils.barrier()
    except Preempted as stopped:
        exit_preempted(stopped, log)
    finally:
        signals.finish()
        ctx.logs.close()
        dist_utils.cleanup()
    return model


def train_one_epoch(model, teachers, loader, optimizer, ctx, epoch):
    """One pass over the data: batch -> the step's lr -> step (teacher targets, student) -> log (and a checkpoint
    when due; ``Preempted`` after a stop signal's). Returns the epoch's statistics."""
    metric_logger = MetricLogger(teachers, epoch, loader.batch_sampler.steps, loader.batch_sampler.batch_size,
                                 optimizer, ctx)
    metric_logger.load_state_dict(ctx.checkpointer.resumed_meter(epoch))
    model.train()
    for index, (student_in, teacher_in), _ in metric_logger.log_every(ctx.to_device.batches(loader, epoch)):
        for group in optimizer.param_groups:
            group['lr'] = ctx.lr(epoch, metric_logger.step, metric_logger.steps)
        losses = train_step(model, teachers, (index, student_in, teacher_in), optimizer, ctx)
        metric_logger.update(losses)
        ctx.checkpointer.after_step(metric_logger)
    return metric_logger.summary()


def train_step(model, teachers, batch, optimizer, ctx):
    """One optimizer step on ``batch``, (sample indices, student input, teacher input), in ``ctx.accum_steps``
    micro-batches: each one's teacher targets, student forward and loss / accum_steps backward (the gradients sum
    to the whole batch's; DDP syncs them at the last, BatchNorm's running statistics are updated at the first);
    then clipping and the step. The loss is the mean of the per-teacher losses (the paper's multi-teacher loss), plus
    ``ctx.dense_weight`` x the mean of the dense losses. Returns the per-teacher losses, stacked (no host sync), and
    the dense loss last when there is one."""
    optimizer.zero_grad(set_to_none=True)
    total, parts = 0, (micro_batches(part, ctx.accum_steps) for part in batch)
    for i, (index, student_in, teacher_in) in enumerate(zip(*parts)):
        targets, maps = {}, {}
        for name, teacher in teachers.items():
            if ctx.dense_weight and teacher.needs_view:  # its feature and its map from one forward
                targets[name], maps[name] = teacher(index, teacher_in, ctx.amp_dtype, dense=True)
            else:
                targets[name] = teacher(index, teacher_in, ctx.amp_dtype)
        last = i == ctx.accum_steps - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync()
        with sync, contextlib.nullcontext() if i == 0 else frozen_running_stats(model):
            with torch.autocast(student_in.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype is not None):
                if maps:
                    predictions, dense = model(student_in, {name: m.shape[-2:] for name, m in maps.items()})
                else:
                    predictions = model(student_in)
            if not isinstance(predictions, dict):
                predictions = {next(iter(targets)): predictions}
            losses = torch.stack([regression_loss(predictions[name], target, ctx.mse_nonorm)
                                  for name, target in targets.items()])
            loss = losses.mean()
            if maps:  # 2 - 2 cos per location (regression_loss over the channels), averaged over locations
                dense_loss = torch.stack([regression_loss(dense[name], m) for name, m in maps.items()]).mean()
                loss, losses = loss + ctx.dense_weight * dense_loss, torch.cat([losses, dense_loss[None]])
            ctx.scaler.scale(loss / ctx.accum_steps).backward()
        total = total + losses.detach()
    if ctx.clip_grad:
        ctx.scaler.unscale_(optimizer)  # clip the true gradients, not the fp16 scaler's
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']], ctx.clip_grad)
    ctx.scaler.step(optimizer)
    ctx.scaler.update()
    return total / ctx.accum_steps


def micro_batches(part, count):
    """A batch's part (a tensor; a dict of them: the teachers' inputs by size and normalisation) in ``count``
    micro-batches."""
    if isinstance(part, dict):
        return [dict(zip(part, values)) for values in zip(*(micro_batches(v, count) for v in part.values()))]
    return part.chunk(count)


def regression_loss(prediction, target, mse_nonorm=False):
    """Mean over the batch of ``2 - 2 cos(prediction, target)``, the MSE of unit vectors; ``mse_nonorm``: the summed
    squared error of the raw vectors, as the flag's help says (docs/differences.md)."""
    if mse_nonorm:
        dtype = torch.promote_types(prediction.dtype, torch.float32)  # fp32, or fp64 for --precision fp64
        return ((prediction.to(dtype) - target.to(dtype)) ** 2).sum(dim=1).mean()
    return (2 - 2 * cosines(prediction, target)).mean()  # cosines computes in the same dtype


def prepare_experiment(args, exp_dir, ckpt_dir, logs_dir):
    """Rank 0, before anything is written: the folders, the experiment's lock (one run at a time), then no temp
    file left by a killed write, and no finished experiment started over by mistake."""
    writable_folder(ckpt_dir)
    make_folder(logs_dir)
    lock_experiment(exp_dir)
    for name in remove_stale_temp_files(ckpt_dir):
        print(f'note: removed {name}, left in {ckpt_dir} by a write that was killed', flush=True)
    existing = resume_candidates(ckpt_dir)
    if existing and not args.resume and not args.overwrite:
        raise SimRegError(f'{exp_dir} already holds checkpoints ({", ".join(map(os.path.basename, existing[:3]))}'
                          f'{", ..." if len(existing) > 3 else ""}): pass --resume auto to continue it, '
                          f'--overwrite to start it again, or another --exp')


def build_input(args, dataset, teachers, ctx, held_out=()):
    """(the training loader, the step's input maker): views made by the loader's workers on the CPU, made on the
    device (``--gpu_decode``), or a multi-view teacher cache's views replayed for the student; ``held_out``: the
    sample indices left out of training."""
    live = [t.input for t in teachers.values() if t.needs_view]  # the live teachers' NetInputs
    single_view = args.single_aug or not live  # no teacher view needed
    views = TwoViews(args.image_size, args.weak_strong, args.weak_weak, single_view,
                     max(net.size for net in live) if live else None)
    nets = NetInput(args.image_size), live
    to_device = DeviceInput(ctx.device, ctx.memory_format, single_view, ctx.amp_dtype).with_nets(*nets)
    replayed = replay.student_dataset(dataset, teachers, args, ctx.logs.text)  # logs that the student replays
    if replayed is not None:
        dataset = replayed
    elif args.gpu_decode:  # the workers read the files and draw the views' parameters; the device does the rest
        dataset.transform = ViewParams(views)
        to_device = GpuDecodedInput(ctx.device, ctx.memory_format, views, dataset.samples, args.seed,
                                    ctx.amp_dtype).with_nets(*nets)
    else:
        dataset.transform = views
    return make_loader(dataset, args, dist_utils.get_world_size(), dist_utils.get_rank(), held_out), to_device


def make_loader(dataset, args, world_size, rank, held_out=()):
    """This process's share of each global batch (``data.sampler``): (index, view(s), label) batches; (index,
    encoded files, label) with --gpu_decode; ((index, view), view, label) over ``ReplayedViews``. Every sample is
    made from its own seed, so workers and ranks do not matter; the ``held_out`` indices are never drawn."""
    samples = SeededSamples(dataset, args.seed)
    samples = WithoutHoldout(samples, held_out) if held_out else samples
    sampler = GlobalBatchSampler(len(samples), args.batch_size, world_size, rank, args.seed)
    return DataLoader(samples, batch_sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_in_loader_worker,
                      collate_fn=packed_collate if args.gpu_decode else None)


def dense_teachers(args, teachers):
    """{head name: its dense targets' channels} of the teachers the dense heads regress (--dense_weight): every live
    teacher (a cached one has no dense targets); {} without --dense_weight."""
    if not args.dense_weight:
        return {}
    channels = {name: t.map_channels() for name, t in teachers.items() if t.needs_view}
    if none := [name for name, c in channels.items() if c is None]:
        raise SimRegError(f'--dense_weight: teacher {none[0]} has no dense targets here (the ResNet, DINO, DINOv2, '
                          f'DINOv3, MoCo v3 and DeiT teachers have them; open_clip towers do not): pass --dense_weight '
                          f'0 or another teacher')
    return channels


def build_student(args, teachers):
    """Fresh student with one head per teacher (and with --dense_weight one dense head per live teacher), or the one
    in --weights."""
    dense = dense_teachers(args, teachers)
    backbone = build_backbone(args.arch_student, args.image_size)
    heads = {name: build_head(backbone.feat_dim, t.feat_dim, args.n_mlp_layers, args.linear_pred)
             for name, t in teachers.items()}
    dense_q = None
    if dense:
        with torch.no_grad():  # the map's channels, from a blank image (eval mode: no BatchNorm statistics change)
            in_dim = feature_map(backbone.eval(), torch.zeros(1, 3, args.image_size, args.image_size)).shape[1]
        dense_q = {name: build_head(in_dim, out_dim, args.dense_head, dense=True) for name, out_dim in dense.items()}
        dense_q = dense_q[next(iter(dense_q))] if len(teachers) == 1 else nn.ModuleDict(dense_q)
    model = SimReg(backbone, next(iter(heads.values())) if len(heads) == 1 else nn.ModuleDict(heads), dense_q)
    if args.weights:
        _, state = student_checkpoint(read_checkpoint(args.weights), args.weights)
        load_student_state(model, state, f'--weights {args.weights} for a {args.arch_student} student with heads '
                                         f'for {", ".join(f"{n} ({t.feat_dim}-d)" for n, t in teachers.items())}')
    return model.train()


def load_student_state(model, state, what):
    """Strictly; a checkpoint with dense heads for a run without, or the other way round: one line."""
    saved, wanted = any(k.startswith('dense_q.') for k in state), hasattr(model, 'dense_q')
    if saved and not wanted:
        raise SimRegError(f'{what}: the checkpoint holds a dense head (dense_q.*), trained with --dense_weight: pass '
                          f'the --dense_weight it was trained with, or a checkpoint without one')
    if wanted and not saved:
        raise SimRegError(f'{what}: the checkpoint holds no dense head (dense_q.*), trained without --dense_weight: '
                          f'pass --dense_weight 0, or a checkpoint of a run with one')
    load_strict(model, state, what, 'SimReg student')


def resume(args, model, optimizer, scaler, ckpt_dir, log):
    """Load --resume, or with 'auto' the newest checkpoint of the experiment that loads and is finite; return where
    to start: {'epoch', 'step'} (plus 'resumed_from', the epoch completed, 'path', and 'meter' inside an epoch)."""
    ckpt, path = None, args.resume
    if args.resume != 'auto':
        ckpt = read_checkpoint(path)
        if bad := non_finite(ckpt):
            raise SimRegError(f'--resume {path} is not finite ({describe_non_finite(bad)}): resume from an earlier '
                              f'checkpoint (--resume auto takes the newest finite one)')
    candidates = resume_candidates(ckpt_dir) if args.resume == 'auto' else []
    for candidate in candidates:
        try:
            ckpt, path = read_checkpoint(candidate), candidate
        except SimRegError as exc:
            log.warning('note: %s; trying the previous checkpoint', exc)
            continue
        if not (bad := non_finite(ckpt)):
            break
        log.warning('note: skipping %s: it is not finite (%s); trying the previous checkpoint', candidate,
                    describe_non_finite(bad))
        ckpt = None
    if ckpt is None and candidates and not args.overwrite:
        raise SimRegError(f'none of the {len(candidates)} checkpoints in {ckpt_dir} can be resumed (see the notes '
                          f'above): pass --resume <file>, --overwrite to start the experiment again, or another --exp')
    if ckpt is None:
        log.info('==> no checkpoint in %s, starting fresh', ckpt_dir)
        return {'epoch': 1, 'step': 0}
    if not isinstance(ckpt, dict) or 'epoch' not in ckpt:
        raise SimRegError(f'--resume {path} is not a training checkpoint (no epoch): use --weights to '
                          f'start from its weights')
    _, state = student_checkpoint(ckpt, path)
    load_student_state(model, state, f'--resume {path}')
    if args.restart:
        log.info('==> restart from the weights of %s (epoch %d)', path, ckpt['epoch'])
        return {'epoch': 1, 'step': 0}
    trained_with = (ckpt.get('args') or {}).get('optimizer', 'sgd')
    if trained_with != args.optimizer:
        raise SimRegError(f'--resume {path} was trained with --optimizer {trained_with}: pass --optimizer '
                          f'{trained_with} to continue it, or --restart to take its weights only')
    if 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    position = ckpt.get('position', {'epoch': ckpt['epoch'] + 1, 'step': 0})
    log.info('==> resumed from %s (epoch %d%s)', path, ckpt['epoch'],
             f', then step {position["step"]} of epoch {position["epoch"]}' if 'position' in ckpt else '')
    start = {**position, 'resumed_from': ckpt['epoch'], 'path': path}
    return {**start, 'meter': ckpt['meter']} if 'meter' in ckpt else start


def describe_run(args, teachers, loader, ctx, logs_dir):
    """train_args.json (rank 0) and the log lines that say what this run is."""
    if dist_utils.is_main_process():
        with open(os.path.join(logs_dir, 'train_args.json'), 'w') as f:
            json.dump({**vars(args), 'world_size': dist_utils.get_world_size(),
                       'teachers': {name: t.info for name, t in teachers.items()}}, f, indent=2)
    log, sampler = ctx.logs.text, loader.batch_sampler
    log.info('%s', json.dumps(vars(args)))
    described = ', '.join(f'{name} ({t.feat_dim}-d{", cached" if not t.needs_view else ""})'
                          for name, t in teachers.items())
    log.info('==> %d training images, %d processes, %d steps of %d images per epoch (%d per process), '
             'teachers: %s; student %s', len(loader.dataset), dist_utils.get_world_size(), sampler.steps,
             args.batch_size, sampler.per_rank, described, args.arch_student)
    log.info('==> device %s, backend %s, autocast %s, %s', ctx.device, dist_utils.backend_name(),
             str(ctx.amp_dtype).replace('torch.', '') if ctx.amp_dtype else 'off',
             'channels_last' if args.channels_last else 'contiguous')


def checkpoint_state(model, optimizer, scaler, args, teachers, epoch, meter=None):
    """``epoch``: the last completed epoch. Inside an epoch (``meter`` given) also ``position``, the epoch in
    progress and the steps done in it, and ``meter``, its running sums. One teacher: ``teacher`` = its info.
    Several: ``teachers`` = head name -> info, their heads stored as ``predict_q.<name>.*``."""
    infos = {name: t.info for name, t in teachers.items()}
    state = {
        'epoch': epoch,
        'state_dict': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'args': vars(args),
        **({'teacher': next(iter(infos.values()))} if len(infos) == 1 else {'teachers': infos}),
    }
    if meter is not None:
        state['position'] = {'epoch': meter.epoch, 'step': meter.step}
        state['meter'] = meter.state_dict()
    return state


def compile_or_eager(model, log):
    """torch.compile; where dynamo cannot compile (at once or at the first step), train eagerly."""
    torch._dynamo.config.suppress_errors = True
    try:
        return torch.compile(model)
    except Exception as exc:  # any backend failure: eager training is still correct
        log.warning('note: torch.compile failed (%s), training without it', str(exc).splitlines()[0])
        return model


def build_optimizer(model, args, device):
    """The paper's SGD; or AdamW (torch's default betas) without weight decay on norms and biases (ndim <= 1)."""
    fused = True if device.type == 'cuda' else None
    if args.optimizer == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.sgd_momentum,
                               weight_decay=args.weight_decay, fused=fused)
    params = list(model.parameters())
    return torch.optim.AdamW([{'params': [p for p in params if p.ndim > 1]},
                              {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0}],
                             lr=args.learning_rate, weight_decay=args.weight_decay, fused=fused)


def cosine_lr(epoch, args):
    """The paper's schedule: cosine over epochs, set once per epoch, epochs counted from 1."""
    return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / args.epochs))


def learning_rate(epoch, step, steps, args):
    """The lr of step ``step`` (from 0) of the ``steps`` of ``epoch`` (from 1): ``cosine_lr``; with --warmup_epochs
    N, MoCo v3's per-step schedule: linear from 0 over the first N epochs, then a cosine over the others."""
    if not args.warmup_epochs:
        return cosine_lr(epoch, args)
    done, warmup = epoch - 1 + step / steps, args.warmup_epochs  # epochs done, fractional
    if done < warmup:
        return args.learning_rate * done / warmup
    return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (done - warmup) / (args.epochs - warmup)))


def exit_stopped_before_training(stopped):
    """A stop signal before the first step: nothing to checkpoint; rank 0 requeues a SLURM job; exit
    RESUME_EXIT_CODE (at once where a process group is up: its peers may be anywhere in start-up)."""
    log = logging.getLogger('simreg')
    if not log.handlers:  # before the run's logs exist
        log = setup_logger()
    log.warning('==> %s: exit %d; run again with --resume auto', stopped, RESUME_EXIT_CODE)
    if dist_utils.is_main_process():
        dist_utils.requeue_slurm_job(log)
    end_broken_group(RESUME_EXIT_CODE)


def exit_preempted(stopped, log):
    """After the checkpoint a stop signal asked for: every rank leaves once it is written, rank 0 requeues a
    SLURM job, exit RESUME_EXIT_CODE."""
    log.warning('==> %s, checkpoint %s written: exit %d; continue with --resume auto', stopped, stopped.path,
                RESUME_EXIT_CODE)
    dist_utils.barrier()
    if dist_utils.is_main_process():
        dist_utils.requeue_slurm_job(log)
    raise SystemExit(RESUME_EXIT_CODE)


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
