"""SimReg distillation: train a student backbone + regression head to regress a frozen teacher.

    torchrun --nproc_per_node=4 train_student.py /path/to/imagenet \
        --arch_teacher resnet50 --teacher_weights moco_v2.pth --arch_student resnet18 \
        --single_aug --weak_weak --exp r50_to_r18

A plain ``python train_student.py ...`` runs as a single process (CPU or one GPU).
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data.folders import build_dataset, encoded_collate
from data.teacher_cache import ReplayedViews, open_teacher_cache
from data.transforms import TwoViews, decode_views_on, normalize
from models.backbones import STUDENT_ARCHS, TEACHER_ARCHS, build_backbone
from models.head import build_head
from models.loading import load_backbone, load_strict, read_checkpoint, resolve_weights, student_checkpoint
from models.simreg import AUTOCAST_DTYPES, CachedTeacher, LiveTeacher, SimReg, regression_loss
from utils import distributed as dist_utils
from utils.checkpoint import epoch_checkpoint_path, file_sha256, latest_checkpoint, save_atomic
from utils.errors import SimRegError, exit_on_user_error
from utils.logging import TensorBoard, setup_logger


def get_args_parser():
    p = argparse.ArgumentParser('SimReg distillation', add_help=True)
    p.add_argument('data', help='dataset root holding train/<class>/<image>')
    p.add_argument('--dataset', default='imagenet', choices=['imagenet', 'imagenet100'],
                   help="full dataset, or the original's 100-class subset")
    p.add_argument('--base_dir', default='./', help='outputs go to <base_dir>/exp/<exp>/')
    p.add_argument('--exp', default='outputs', help='experiment name')
    p.add_argument('--print_freq', type=int, default=100, help='log every N steps')
    p.add_argument('--save_freq', type=int, default=10, help='keep ckpt_epoch_<n>.pth every N epochs')
    p.add_argument('--batch_size', type=int, default=256, help='total batch size over all processes')
    p.add_argument('--num_workers', type=int, default=8, help='data loading workers per process')
    p.add_argument('--epochs', type=int, default=130)
    # optimisation
    p.add_argument('--learning_rate', type=float, default=0.05, help='base lr, cosine-decayed per epoch')
    p.add_argument('--weight_decay', type=float, default=1e-4)
    p.add_argument('--sgd_momentum', type=float, default=0.9)
    # models
    p.add_argument('--arch_teacher', default='resnet50',
                   help=f'teacher architecture, or a comma-separated list for several teachers '
                        f'(one head each): {", ".join(TEACHER_ARCHS)}')
    p.add_argument('--arch_student', default='resnet50', choices=STUDENT_ARCHS)
    p.add_argument('--n_mlp_layers', type=int, default=4, choices=[2, 4],
                   help='layers of the regression head')
    p.add_argument('--linear_pred', action='store_true', help='head = BN + Linear instead of the MLP')
    p.add_argument('--use_cache', action='store_true',
                   help='regress cached teacher features (--teacher_feats) instead of running the teacher')
    p.add_argument('--teacher_feats', help='teacher feature cache (.npy from cache_teacher_feats.py, or the '
                                           "original's .pth dict, converted once); with several "
                                           'teachers a comma-separated list, empty for live ones')
    p.add_argument('--teacher_fc', action='store_true',
                   help="regress the teacher's pretrained projection (a plain Linear fc) output")
    # augmentation (original meanings)
    p.add_argument('--single_aug', action='store_true', help='one view fed to both nets')
    p.add_argument('--weak_strong', action='store_true', help='teacher weak view, student strong view')
    p.add_argument('--weak_weak', action='store_true', help='weak views for both nets')
    p.add_argument('--image_size', type=int, default=224, help='crop size')
    p.add_argument('--mse_nonorm', action='store_true', help='squared error of un-normalised vectors')
    # weights
    p.add_argument('--teacher_weights', help='teacher checkpoint (any layout models.loading accepts, or a '
                                             'preset name); with several teachers a comma-separated list')
    p.add_argument('--weights', help='initialise student backbone + head from a student checkpoint')
    p.add_argument('--resume', default='', help="checkpoint to resume from, or 'auto' for the latest "
                                                 'in the experiment (fresh start when there is none)')
    p.add_argument('--restart', action='store_true',
                   help='with --resume: take the weights only, restart optimizer and epochs')
    # execution
    p.add_argument('--precision', choices=list(AUTOCAST_DTYPES), default=None,
                   help='autocast dtype (default: bf16 on GPUs that support it, fp32 on CPU)')
    p.add_argument('--channels_last', action='store_true', help='NHWC memory format (faster on GPUs)')
    p.add_argument('--gpu_decode', action='store_true',
                   help='loader workers only read files; JPEGs are decoded (nvjpeg) and augmented on the GPU')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the student (falls back to eager where compilation fails)')
    p.add_argument('--seed', type=int, default=0)
    return p


def cosine_lr(epoch, args):
    """The original's schedule: cosine over epochs, set once per epoch, epochs counted from 1."""
    return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / args.epochs))


def resolve_precision(args, device):
    if args.precision is None:
        bf16_ok = device.type == 'cuda' and torch.cuda.is_bf16_supported()
        args.precision = 'bf16' if bf16_ok else 'fp32'
    return AUTOCAST_DTYPES[args.precision]


def split_per_teacher(value, count, flag):
    """A comma-separated flag with one entry per teacher ('' where a teacher has none)."""
    if not value:
        return [''] * count
    entries = value.split(',')
    if len(entries) != count:
        raise SimRegError(f'{flag} lists {len(entries)} entries for {count} teachers (--arch_teacher): '
                          f'give one per teacher, empty ones included (e.g. "a.pth,")')
    return entries


def head_names(archs):
    """What each teacher's head is called in checkpoints: its arch, numbered when archs repeat."""
    return [arch if archs.count(arch) == 1 else f'{arch}_{i}' for i, arch in enumerate(archs)]


def build_teachers(args, dataset, device, memory_format, log):
    """{head name: LiveTeacher | CachedTeacher}, in --arch_teacher order."""
    archs = args.arch_teacher.split(',')
    unknown = [a for a in archs if a not in TEACHER_ARCHS]
    if unknown:
        raise SimRegError(f'unknown --arch_teacher {",".join(unknown)}: choose from {", ".join(TEACHER_ARCHS)}')
    weights = split_per_teacher(args.teacher_weights, len(archs), '--teacher_weights')
    feats = split_per_teacher(args.teacher_feats, len(archs), '--teacher_feats')
    if any(feats) and not args.use_cache:
        raise SimRegError('--teacher_feats is read only with --use_cache: add --use_cache')
    teachers = {}
    for name, arch, weight, feat, cached in zip(head_names(archs), archs, weights, feats, cached_teachers(args)):
        if cached:
            cache = open_teacher_cache(feat, dataset, log.info)
            if cache.num_views and cache.meta['image_size'] != args.image_size:
                raise SimRegError(f"{cache.path} holds teacher features of views cropped to "
                                  f"{cache.meta['image_size']}px, the student would replay them at "
                                  f"{args.image_size}px: pass --image_size {cache.meta['image_size']} (or build "
                                  f"the cache at this size)")
            if cache.meta.get('image_size') not in (None, args.image_size):
                log.warning('note: %s holds teacher features of %spx center crops, the student trains on '
                            '%dpx crops', cache.path, cache.meta['image_size'], args.image_size)
            info = {**cache.meta['teacher'], 'cache': os.path.abspath(cache.path), 'feat_dim': cache.feat_dim}
            teachers[name] = CachedTeacher(cache, info).to(device)
            continue
        if not weight:
            raise SimRegError(f'no weights for teacher {name}: pass --teacher_weights PATH (a checkpoint of '
                              f'{arch}{", one per teacher" if len(archs) > 1 else ""})')
        dist_utils.run_on_main(lambda: resolve_weights(weight))  # a preset is downloaded once, by rank 0
        path = resolve_weights(weight)
        network = load_backbone(arch, path, keep_fc=args.teacher_fc)
        sha256 = dist_utils.run_on_main(lambda: file_sha256(path))  # only rank 0 records it
        info = {'arch': arch, 'weights': os.path.abspath(path), 'sha256': sha256,
                'feat_dim': network.feat_dim, 'teacher_fc': args.teacher_fc}
        teachers[name] = LiveTeacher(network, info).to(device, memory_format)
    return teachers


def build_student(args, teachers):
    """Fresh student with one head per teacher, or the one in --weights."""
    backbone = build_backbone(args.arch_student)
    heads = {name: build_head(backbone.feat_dim, t.feat_dim, args.n_mlp_layers, args.linear_pred)
             for name, t in teachers.items()}
    model = SimReg(backbone, next(iter(heads.values())) if len(heads) == 1 else nn.ModuleDict(heads))
    if args.weights:
        _, state = student_checkpoint(read_checkpoint(args.weights), args.weights)
        load_strict(model, state, f'--weights {args.weights} for a {args.arch_student} student with heads '
                                  f'for {", ".join(f"{n} ({t.feat_dim}-d)" for n, t in teachers.items())}',
                    'SimReg student')
    return model.train()


def cached_teachers(args):
    """Per teacher, whether its targets come from a cache: with --use_cache, the one teacher, or each
    teacher that has a --teacher_feats entry."""
    feats = split_per_teacher(args.teacher_feats, len(args.arch_teacher.split(',')), '--teacher_feats')
    return [args.use_cache and (bool(feat) or len(feats) == 1) for feat in feats]


def cached_only(args):
    """Every teacher comes from a cache, so only the student's view is needed."""
    return all(cached_teachers(args))


def make_views(args):
    # with cached targets only the student's view is needed
    return TwoViews(args.image_size, args.weak_strong, args.weak_weak, args.single_aug or cached_only(args))


def replayed_views(teachers, args):
    """The views stored with a multi-view cache, which the student replays (None without one). The
    student has one view per step, so either one multi-view cache is the only teacher, or every
    teacher is a cache of the same views."""
    with_views = {name: t.cache for name, t in teachers.items() if t.views is not None}
    if not with_views:
        return None
    cache = next(iter(with_views.values()))
    if len(with_views) < len(teachers):
        others = ', '.join(name for name in teachers if name not in with_views)
        raise SimRegError(f'{cache.path} holds {cache.num_views} views per image that the student replays, but '
                          f'teacher(s) {others} cannot target them: give every teacher a cache built with the same '
                          f'--cache_views, --seed and --image_size, or use single-view caches')
    if len({c.meta['views_sha256'] for c in with_views.values()}) > 1:
        raise SimRegError(f'the multi-view caches {", ".join(c.path for c in with_views.values())} hold different '
                          f'views: build them with the same --cache_views, --seed and --image_size')
    if args.gpu_decode or not args.weak_weak:
        raise SimRegError(f'{cache.path} holds weak views that the student replays as they are: train with '
                          f'--weak_weak{" and without --gpu_decode" if args.gpu_decode else ""}')
    return cache.views


def make_loader(args, world_size, rank, dataset=None):
    """Training loader: (index, views, label) batches, or (index, encoded files, label) with --gpu_decode;
    over ``dataset`` when given (``ReplayedViews`` for a multi-view cache: ((index, view), view, label))."""
    if args.batch_size % world_size:
        raise SimRegError(f'--batch_size {args.batch_size} must divide by the {world_size} processes')
    if dataset is None:
        dataset = build_dataset(args.data, 'train', None if args.gpu_decode else make_views(args), args.dataset,
                                encoded=args.gpu_decode)
    per_rank = args.batch_size // world_size
    if len(dataset) // world_size < per_rank:
        raise SimRegError(f'{len(dataset)} training images give no full batch of {per_rank} per '
                          f'process: lower --batch_size')
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    # Workers are re-created each epoch (no persistent_workers) so that their seeds come from the
    # per-epoch seed and a resumed run replays the same augmentations.
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      collate_fn=encoded_collate if args.gpu_decode else None)


def compile_or_eager(model, log):
    """torch.compile; where dynamo cannot compile (at once or at the first step), train eagerly."""
    torch._dynamo.config.suppress_errors = True
    try:
        return torch.compile(model)
    except Exception as exc:  # any backend failure: eager training is still correct
        log.warning('note: torch.compile failed (%s), training without it', str(exc).splitlines()[0])
        return model


def checkpoint_state(model, optimizer, scaler, epoch, args, teachers):
    """One teacher: ``teacher`` = its info. Several: ``teachers`` = head name -> info, and their
    heads are stored as ``predict_q.<name>.*``."""
    infos = {name: t.info for name, t in teachers.items()}
    return {
        'epoch': epoch,
        'state_dict': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'args': vars(args),
        **({'teacher': next(iter(infos.values()))} if len(infos) == 1 else {'teachers': infos}),
    }


def resume(args, model, optimizer, scaler, ckpt_dir, log):
    """Load --resume (or the latest checkpoint for 'auto'); return the first epoch to run."""
    path = latest_checkpoint(ckpt_dir) if args.resume == 'auto' else args.resume
    if not path:
        log.info('==> no checkpoint in %s, starting fresh', ckpt_dir)
        return 1
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or 'epoch' not in ckpt:
        raise SimRegError(f'--resume {path} is not a training checkpoint (no epoch): use --weights to '
                          f'start from its weights')
    _, state = student_checkpoint(ckpt, path)
    load_strict(model, state, f'--resume {path}', 'SimReg student')
    if args.restart:
        log.info('==> restart from the weights of %s (epoch %d)', path, ckpt['epoch'])
        return 1
    if 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    log.info('==> resumed from %s (epoch %d)', path, ckpt['epoch'])
    return ckpt['epoch'] + 1


def main(args):
    """Train; returns the trained SimReg module (student backbone + head)."""
    device = dist_utils.init_distributed()
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    exp_dir = os.path.join(args.base_dir, 'exp', args.exp)
    ckpt_dir, logs_dir = os.path.join(exp_dir, 'checkpoints'), os.path.join(exp_dir, 'logs')
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(logs_dir, exist_ok=True)
    dist_utils.barrier()
    log = setup_logger(os.path.join(logs_dir, 'train.log'))
    amp_dtype = resolve_precision(args, device)
    dist_utils.seed_everything(args.seed, 0, rank)

    loader = make_loader(args, world_size, rank)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    teachers = build_teachers(args, loader.dataset, device, memory_format, log)
    views = replayed_views(teachers, args)
    if views is not None:
        loader = make_loader(args, world_size, rank, ReplayedViews(loader.dataset, views, args.image_size))
        log.info('==> the student replays the teacher\'s views: one of the %d cached per image, each step',
                 views.shape[1])
    model = build_student(args, teachers).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate,
                                momentum=args.sgd_momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch = resume(args, model, optimizer, scaler, ckpt_dir, log) if args.resume else 1

    if rank == 0:
        with open(os.path.join(logs_dir, 'train_args.json'), 'w') as f:
            json.dump({**vars(args), 'world_size': world_size,
                       'teachers': {name: t.info for name, t in teachers.items()}}, f, indent=2)
    log.info('%s', json.dumps(vars(args)))
    described = ', '.join(f'{name} ({t.feat_dim}-d{", cached" if not t.needs_view else ""})'
                          for name, t in teachers.items())
    log.info('==> %d training images, %d processes, %d images per process and step, teachers: %s; '
             'student %s', len(loader.dataset), world_size, loader.batch_size, described, args.arch_student)
    log.info('==> device %s, backend %s, autocast %s, %s', device, dist_utils.backend_name(),
             str(amp_dtype).replace('torch.', '') if amp_dtype else 'off',
             'channels_last' if args.channels_last else 'contiguous')
    if start_epoch == 1 and rank == 0:
        # the initial student: the "before distillation" baseline for evaluation
        save_atomic(checkpoint_state(model, optimizer, scaler, 0, args, teachers),
                    epoch_checkpoint_path(ckpt_dir, 0))
    if start_epoch > args.epochs:
        log.info('==> all %d epochs are done already', args.epochs)
    ddp_model = DistributedDataParallel(model) if world_size > 1 else model
    if args.compile:
        ddp_model = compile_or_eager(ddp_model, log)
    tensorboard = TensorBoard(logs_dir)
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            lr = cosine_lr(epoch, args)
            for group in optimizer.param_groups:
                group['lr'] = lr
            dist_utils.seed_everything(args.seed, epoch, rank)
            loader.sampler.set_epoch(epoch)
            stats = train_one_epoch(ddp_model, teachers, loader, optimizer, scaler, epoch, args,
                                    device, amp_dtype, memory_format, tensorboard, log)
            log.info('epoch %d  lr %.5f  loss %.4f%s  %.1f img/s  data wait %.0f%%', epoch, lr, stats['loss'],
                     per_teacher(teachers, stats['teacher_losses'].values()), stats['images_per_s'],
                     100 * stats['data_wait'])
            tensorboard.scalars({'epoch/loss': stats['loss'], 'epoch/lr': lr,
                                 **({f'epoch/loss_{n}': v for n, v in stats['teacher_losses'].items()}
                                    if len(teachers) > 1 else {})}, epoch)
            if rank == 0:
                state = checkpoint_state(model, optimizer, scaler, epoch, args, teachers)
                if epoch % args.save_freq == 0 or epoch == args.epochs:
                    save_atomic(state, epoch_checkpoint_path(ckpt_dir, epoch))
                save_atomic(state, os.path.join(ckpt_dir, 'last.pth'))
            dist_utils.barrier()
    finally:
        tensorboard.close()
        dist_utils.cleanup()
    return model


def to_model_input(uint8_images, device, memory_format):
    """uint8 batch from the loader -> normalised float batch on the device."""
    images = normalize(uint8_images.to(device, non_blocking=True))
    return images.contiguous(memory_format=memory_format)


def train_step(model, student_in, targets, optimizer, scaler, amp_dtype, mse_nonorm):
    """One distillation step; ``targets`` maps head name -> teacher features. The loss is the mean of
    the per-teacher losses (the paper's multi-teacher loss; the plain loss for one teacher).
    Returns the detached per-teacher losses, stacked (no host sync)."""
    with torch.autocast(student_in.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        predictions = model(student_in)
    if not isinstance(predictions, dict):
        predictions = {next(iter(targets)): predictions}
    losses = torch.stack([regression_loss(predictions[name], target, mse_nonorm)
                          for name, target in targets.items()])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses.mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses.detach()


def batch_targets(teachers, indices, views, device, memory_format, amp_dtype, single_view):
    """Student input and {head name: target}. Live teachers see the teacher view (the student's own
    with --single_aug or when every teacher is cached), cached ones are read by sample index."""
    if single_view:
        student_in = teacher_in = to_model_input(views, device, memory_format)
    else:
        student_in = to_model_input(views[0], device, memory_format)
        teacher_in = to_model_input(views[1], device, memory_format)
    return student_in, {name: t.targets(indices, teacher_in, amp_dtype) for name, t in teachers.items()}


def train_one_epoch(model, teachers, loader, optimizer, scaler, epoch, args, device, amp_dtype,
                    memory_format, tensorboard, log):
    """One pass over the data. Losses stay on the device; they are read (one sync) every
    ``print_freq`` steps and at the end, where a non-finite value stops the run."""
    model.train()
    steps, world_size = len(loader), dist_utils.get_world_size()
    single_view = args.single_aug or cached_only(args)
    device_views = make_views(args) if args.gpu_decode else None
    loss_sum = torch.zeros(len(teachers), device=device)
    window_sum, window_start = torch.zeros(len(teachers), device=device), 0
    data_time = 0.0
    start = end = time.perf_counter()
    with tqdm(total=steps, desc=f'epoch {epoch}', disable=not dist_utils.is_main_process(),
              dynamic_ncols=True, leave=False) as bar:
        for step, (indices, views, _) in enumerate(loader):
            if device_views is not None:
                views = decode_views_on(device, views, device_views,
                                        lambda j: loader.dataset.samples[indices[j]][0])
            data_time += time.perf_counter() - end
            student_in, targets = batch_targets(teachers, indices, views, device, memory_format, amp_dtype,
                                                single_view)
            losses = train_step(model, student_in, targets, optimizer, scaler, amp_dtype, args.mse_nonorm)
            loss_sum += losses
            window_sum += losses
            bar.update(1)
            if (step + 1) % args.print_freq == 0 or step + 1 == steps:
                # averaged over ranks so that every rank takes the same decision on a non-finite loss
                window = dist_utils.all_reduce_mean(window_sum / (step + 1 - window_start)).tolist()
                window_loss = sum(window) / len(window)
                check_finite(window_loss, epoch, step)
                elapsed = time.perf_counter() - start
                images_per_s = (step + 1) * loader.batch_size * world_size / elapsed
                scalars = {'train/loss': window_loss, 'train/lr': optimizer.param_groups[0]['lr'],
                           'train/images_per_s': images_per_s, 'train/data_wait_share': data_time / elapsed}
                if len(teachers) > 1:
                    scalars.update({f'train/loss_{name}': v for name, v in zip(teachers, window)})
                tensorboard.scalars(scalars, (epoch - 1) * steps + step + 1)
                bar.set_postfix(loss=f'{window_loss:.4f}')
                if (step + 1) % args.print_freq == 0:
                    log.info('Train: [%d][%d/%d]  loss %.4f%s  %.1f img/s', epoch, step + 1, steps,
                             window_loss, per_teacher(teachers, window), images_per_s)
                window_sum.zero_()
                window_start = step + 1
            end = time.perf_counter()
    elapsed = time.perf_counter() - start
    epoch_losses = dist_utils.all_reduce_mean(loss_sum / steps).tolist()
    epoch_loss = sum(epoch_losses) / len(epoch_losses)
    check_finite(epoch_loss, epoch, steps - 1)
    return {'loss': epoch_loss, 'teacher_losses': dict(zip(teachers, epoch_losses)),
            'images_per_s': steps * loader.batch_size * world_size / elapsed, 'data_wait': data_time / elapsed}


def per_teacher(teachers, values):
    """' (name 0.1234, name 0.2345)' with several teachers, '' with one."""
    if len(teachers) == 1:
        return ''
    return ' (' + ', '.join(f'{name} {v:.4f}' for name, v in zip(teachers, values)) + ')'


def check_finite(loss, epoch, step):
    if not math.isfinite(loss):
        raise SimRegError(f'loss is {loss} at epoch {epoch} step {step + 1}: training diverged; the '
                          f'last good checkpoint is kept: lower --learning_rate or use '
                          f'--precision fp32, then --resume auto')


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
