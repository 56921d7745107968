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

from data.folders import build_dataset
from data.teacher_cache import open_teacher_cache
from data.transforms import TwoViews, normalize
from models.backbones import STUDENT_ARCHS, TEACHER_ARCHS, build_backbone
from models.head import build_head
from models.loading import load_backbone, load_student, read_checkpoint, student_from_state
from models.simreg import SimReg, freeze, regression_loss
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
    p.add_argument('--arch_teacher', default='resnet50', choices=TEACHER_ARCHS)
    p.add_argument('--arch_student', default='resnet50', choices=STUDENT_ARCHS)
    p.add_argument('--n_mlp_layers', type=int, default=4, choices=[2, 4],
                   help='layers of the regression head')
    p.add_argument('--linear_pred', action='store_true', help='head = BN + Linear instead of the MLP')
    p.add_argument('--use_cache', action='store_true',
                   help='regress cached teacher features (--teacher_feats) instead of running the teacher')
    p.add_argument('--teacher_feats', help='teacher feature cache (.npy from cache_teacher_feats.py, or the '
                                           "original's .pth dict, converted once)")
    p.add_argument('--teacher_fc', action='store_true',
                   help="regress the teacher's pretrained projection (a plain Linear fc) output")
    # augmentation (original meanings)
    p.add_argument('--single_aug', action='store_true', help='one view fed to both nets')
    p.add_argument('--weak_strong', action='store_true', help='teacher weak view, student strong view')
    p.add_argument('--weak_weak', action='store_true', help='weak views for both nets')
    p.add_argument('--image_size', type=int, default=224, help='crop size')
    p.add_argument('--mse_nonorm', action='store_true', help='squared error of un-normalised vectors')
    # weights
    p.add_argument('--teacher_weights', help='teacher checkpoint (any layout models.loading accepts)')
    p.add_argument('--weights', help='initialise student backbone + head from a student checkpoint')
    p.add_argument('--resume', default='', help="checkpoint to resume from, or 'auto' for the latest "
                                                 'in the experiment (fresh start when there is none)')
    p.add_argument('--restart', action='store_true',
                   help='with --resume: take the weights only, restart optimizer and epochs')
    # execution
    p.add_argument('--precision', choices=['fp32', 'bf16', 'fp16'], default=None,
                   help='autocast dtype (default: bf16 on GPUs that support it, fp32 on CPU)')
    p.add_argument('--channels_last', action='store_true', help='NHWC memory format (faster on GPUs)')
    p.add_argument('--seed', type=int, default=0)
    return p


def cosine_lr(epoch, args):
    """The original's schedule: cosine over epochs, set once per epoch, epochs counted from 1."""
    return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / args.epochs))


def resolve_precision(args, device):
    if args.precision is None:
        bf16_ok = device.type == 'cuda' and torch.cuda.is_bf16_supported()
        args.precision = 'bf16' if bf16_ok else 'fp32'
    return {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.precision]


def build_teacher(args):
    if not args.teacher_weights:
        raise SimRegError('no teacher: pass --teacher_weights PATH (a checkpoint of --arch_teacher)')
    teacher = load_backbone(args.arch_teacher, args.teacher_weights, keep_fc=args.teacher_fc)
    return freeze(teacher)


def build_student(args, teacher_dim):
    """Fresh student, or the one in --weights (which must match --arch_student and the teacher dim)."""
    if not args.weights:
        backbone = build_backbone(args.arch_student)
        head = build_head(backbone.feat_dim, teacher_dim, args.n_mlp_layers, args.linear_pred)
        return SimReg(backbone, head)
    backbone, head = load_student(args.weights)
    shapes = lambda module: {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if shapes(backbone) != shapes(build_backbone(args.arch_student)):
        raise SimRegError(f'--weights {args.weights} holds a different student than '
                          f'--arch_student {args.arch_student}')
    if head[-1].out_features != teacher_dim:
        raise SimRegError(f'--weights {args.weights} has a head for {head[-1].out_features}-d '
                          f'targets, the teacher gives {teacher_dim}-d')
    return SimReg(backbone.train(), head.train())


def make_loader(args, world_size, rank):
    if args.batch_size % world_size:
        raise SimRegError(f'--batch_size {args.batch_size} must divide by the {world_size} processes')
    # with cached targets only the student's view is needed
    views = TwoViews(args.image_size, args.weak_strong, args.weak_weak, args.single_aug or args.use_cache)
    dataset = build_dataset(args.data, 'train', views, args.dataset)
    per_rank = args.batch_size // world_size
    if len(dataset) // world_size < per_rank:
        raise SimRegError(f'{len(dataset)} training images give no full batch of {per_rank} per '
                          f'process: lower --batch_size')
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    # Workers are re-created each epoch (no persistent_workers) so that their seeds come from the
    # per-epoch seed and a resumed run replays the same augmentations.
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True)


def checkpoint_state(model, optimizer, scaler, epoch, args, teacher_info):
    return {
        'epoch': epoch,
        'state_dict': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'args': vars(args),
        'teacher': teacher_info,
    }


def resume(args, model, optimizer, scaler, ckpt_dir, log):
    """Load --resume (or the latest checkpoint for 'auto'); return the first epoch to run."""
    path = latest_checkpoint(ckpt_dir) if args.resume == 'auto' else args.resume
    if not path:
        log.info('==> no checkpoint in %s, starting fresh', ckpt_dir)
        return 1
    ckpt = read_checkpoint(path)
    if 'state_dict' not in ckpt or 'epoch' not in ckpt:
        raise SimRegError(f'--resume {path} is not a training checkpoint (no state_dict/epoch)')
    backbone, head = student_from_state(ckpt['state_dict'], args.arch_student, args.n_mlp_layers,
                                        args.linear_pred)
    model.encoder_q.load_state_dict(backbone.state_dict())
    model.predict_q.load_state_dict(head.state_dict())
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
    if args.use_cache:
        teacher = open_teacher_cache(args.teacher_feats, loader.dataset, log.info)
        teacher_info = {**teacher.meta['teacher'], 'cache': os.path.abspath(teacher.path),
                        'feat_dim': teacher.feat_dim}
    else:
        teacher = build_teacher(args).to(device, memory_format=memory_format)
        teacher_info = {'arch': args.arch_teacher, 'weights': os.path.abspath(args.teacher_weights),
                        'sha256': file_sha256(args.teacher_weights), 'feat_dim': teacher.feat_dim,
                        'teacher_fc': args.teacher_fc}
    model = build_student(args, teacher.feat_dim).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate,
                                momentum=args.sgd_momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch = resume(args, model, optimizer, scaler, ckpt_dir, log) if args.resume else 1

    if rank == 0:
        with open(os.path.join(logs_dir, 'train_args.json'), 'w') as f:
            json.dump({**vars(args), 'world_size': world_size, 'teacher': teacher_info}, f, indent=2)
    log.info('%s', json.dumps(vars(args)))
    teacher_name = f'cache {args.teacher_feats}' if args.use_cache else args.arch_teacher
    log.info('==> %d training images, %d processes, %d images per process and step, teacher %s '
             '(%d-d), student %s', len(loader.dataset), world_size, loader.batch_size, teacher_name,
             teacher.feat_dim, args.arch_student)
    if start_epoch > args.epochs:
        log.info('==> all %d epochs are done already', args.epochs)
    ddp_model = DistributedDataParallel(model) if world_size > 1 else model
    tensorboard = TensorBoard(logs_dir)
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            lr = cosine_lr(epoch, args)
            for group in optimizer.param_groups:
                group['lr'] = lr
            dist_utils.seed_everything(args.seed, epoch, rank)
            loader.sampler.set_epoch(epoch)
            stats = train_one_epoch(ddp_model, teacher, loader, optimizer, scaler, epoch, args,
                                    device, amp_dtype, memory_format, tensorboard, log)
            log.info('epoch %d  lr %.5f  loss %.4f  %.1f img/s  data wait %.0f%%', epoch, lr,
                     stats['loss'], stats['images_per_s'], 100 * stats['data_wait'])
            tensorboard.scalars({'epoch/loss': stats['loss'], 'epoch/lr': lr}, epoch)
            if rank == 0:
                state = checkpoint_state(model, optimizer, scaler, epoch, args, teacher_info)
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


def teacher_features(teacher, teacher_in, amp_dtype):
    """The frozen teacher's features, without autograd bookkeeping."""
    with torch.inference_mode(), torch.autocast(teacher_in.device.type, dtype=amp_dtype,
                                                enabled=amp_dtype is not None):
        target = teacher(teacher_in)
    # cloned outside inference mode: an inference tensor cannot be saved for the loss's backward
    return target.clone()


def train_step(model, student_in, target, optimizer, scaler, amp_dtype, mse_nonorm):
    """One distillation step; returns the detached loss (no host sync)."""
    with torch.autocast(student_in.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        prediction = model(student_in)
    loss = regression_loss(prediction, target, mse_nonorm)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(model, teacher, loader, optimizer, scaler, epoch, args, device, amp_dtype,
                    memory_format, tensorboard, log):
    """One pass over the data. The loss stays on the device; it is read (one sync) every
    ``print_freq`` steps and at the end, where a non-finite value stops the run."""
    model.train()
    steps, world_size = len(loader), dist_utils.get_world_size()
    loss_sum = torch.zeros((), device=device)
    window_sum, window_start = torch.zeros((), device=device), 0
    data_time = 0.0
    start = end = time.perf_counter()
    with tqdm(total=steps, desc=f'epoch {epoch}', disable=not dist_utils.is_main_process(),
              dynamic_ncols=True, leave=False) as bar:
        for step, (indices, views, _) in enumerate(loader):
            data_time += time.perf_counter() - end
            if args.use_cache:
                student_in = to_model_input(views, device, memory_format)
                target = teacher.rows(indices).to(device, non_blocking=True)
            elif args.single_aug:
                student_in = to_model_input(views, device, memory_format)
                target = teacher_features(teacher, student_in, amp_dtype)
            else:
                student_in = to_model_input(views[0], device, memory_format)
                target = teacher_features(teacher, to_model_input(views[1], device, memory_format),
                                          amp_dtype)
            loss = train_step(model, student_in, target, optimizer, scaler, amp_dtype, args.mse_nonorm)
            loss_sum += loss
            window_sum += loss
            bar.update(1)
            if (step + 1) % args.print_freq == 0 or step + 1 == steps:
                # averaged over ranks so that every rank takes the same decision on a non-finite loss
                window_loss = dist_utils.all_reduce_mean(window_sum / (step + 1 - window_start)).item()
                check_finite(window_loss, epoch, step)
                elapsed = time.perf_counter() - start
                images_per_s = (step + 1) * loader.batch_size * world_size / elapsed
                tensorboard.scalars({'train/loss': window_loss, 'train/lr': optimizer.param_groups[0]['lr'],
                                     'train/images_per_s': images_per_s,
                                     'train/data_wait_share': data_time / elapsed},
                                    (epoch - 1) * steps + step + 1)
                bar.set_postfix(loss=f'{window_loss:.4f}')
                if (step + 1) % args.print_freq == 0:
                    log.info('Train: [%d][%d/%d]  loss %.4f  %.1f img/s', epoch, step + 1, steps,
                             window_loss, images_per_s)
                window_sum.zero_()
                window_start = step + 1
            end = time.perf_counter()
    elapsed = time.perf_counter() - start
    epoch_loss = dist_utils.all_reduce_mean(loss_sum / steps).item()
    check_finite(epoch_loss, epoch, steps - 1)
    return {'loss': epoch_loss, 'images_per_s': steps * loader.batch_size * world_size / elapsed,
            'data_wait': data_time / elapsed}


def check_finite(loss, epoch, step):
    if not math.isfinite(loss):
        raise SimRegError(f'loss is {loss} at epoch {epoch} step {step + 1}: training diverged; the '
                          f'last good checkpoint is kept: lower --learning_rate or use '
                          f'--precision fp32, then --resume auto')


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
