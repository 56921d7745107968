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

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data import replay
from data.folders import add_dataset_arg, build_dataset, encoded_collate
from data.gpu_views import ViewParams
from data.sampler import GlobalBatchSampler, SeededSamples
from data.transforms import DeviceInput, TwoViews
from evaluation.online_knn import OnlineKnn, knn_scalars
from models.backbones import STUDENT_ARCHS, TEACHER_ARCHS, build_backbone
from models.batchnorm import bn_groups, convert_batchnorm
from models.head import build_head
from models.loading import load_strict, read_checkpoint, student_checkpoint
from models.simreg import AUTOCAST_DTYPES, SimReg, default_precision, regression_loss
from models.teachers import build_teachers
from models.vit import channels_last_helps
from utils import distributed as dist_utils
from utils.checkpoint import (Checkpointer, epoch_checkpoint_path, make_folder, remove_stale_temp_files,
                              resume_candidates, save_atomic, writable_folder)
from utils.errors import RESUME_EXIT_CODE, SimRegError, exit_on_user_error
from utils.logging import JsonLog, MetricLogger, TensorBoard, json_log_path, setup_logger
from utils.preemption import StopRequest, ignore_in_loader_worker


def get_args_parser():
    p = argparse.ArgumentParser('SimReg distillation', add_help=True)
    p.add_argument('data', help='dataset root holding train/<class>/<image>')
    add_dataset_arg(p)
    p.add_argument('--base_dir', default='./', help='outputs go to <base_dir>/exp/<exp>/')
    p.add_argument('--exp', default='outputs', help='experiment name')
    p.add_argument('--print_freq', type=int, default=100, help='log every N steps')
    p.add_argument('--save_freq', type=int, default=10, help='keep ckpt_epoch_<n>.pth every N epochs')
    p.add_argument('--batch_size', type=int, default=256, help='total batch size over all processes')
    p.add_argument('--bn_batch', type=int, default=64,
                   help="images per BatchNorm group of the global batch, whatever the number of processes (64: "
                        "the original's, 256 over 4 GPUs); 0: BatchNorm over each process's share")
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
    p.add_argument('--arch_student', default='resnet50', choices=STUDENT_ARCHS, metavar='ARCH',
                   help='student: any torchvision classification model by name (resnet18, mobilenet_v3_large, '
                        'efficientnet_b0, convnext_tiny, ...; see the README\'s student table), or mobilenet '
                        '(MobileNet-v2)')
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
    p.add_argument('--channels_last', action='store_true', help='NHWC memory format (faster on GPUs)')
    p.add_argument('--gpu_decode', action='store_true',
                   help='loader workers only read files; JPEGs are decoded (nvjpeg) and augmented on the GPU')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the student (falls back to eager where compilation fails)')
    p.add_argument('--seed', type=int, default=0)
    # online k-NN (evaluation/online_knn.py)
    p.add_argument('--knn_every', type=int, default=0,
                   help='every N epochs and at the last, 1-NN and 20-NN top-1 of the student backbone on <data>/val against '
                        '--knn_train_per_class train images per class, logged (and the teacher\'s and the '
                        'untrained student\'s at the start); 0: off. On ImageNet 10 (run.sh\'s) costs about 0.2%% of the '
                        'run (50k val + 20k train images through the student, against 12.8M images trained on '
                        'in 10 epochs)')
    p.add_argument('--knn_train_per_class', type=int, default=20,
                   help='train images per class for the online k-NN, chosen once from --seed')
    dist_utils.add_distributed_args(p)
    return p


def main(args):
    """Train; returns the trained SimReg module (student backbone + head)."""
    device = dist_utils.init_distributed(args.dist_timeout)
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    exp_dir = os.path.join(args.base_dir, 'exp', args.exp)
    ckpt_dir, logs_dir = os.path.join(exp_dir, 'checkpoints'), os.path.join(exp_dir, 'logs')
    dist_utils.run_on_main(lambda: prepare_experiment(args, exp_dir, ckpt_dir, logs_dir))
    log = setup_logger(os.path.join(logs_dir, 'train.log'))
    json_log = JsonLog(json_log_path(logs_dir))
    # what derives from the flags is decided here, once
    args.precision = args.precision or default_precision(device)
    amp_dtype = AUTOCAST_DTYPES.get(args.precision)
    dtype = torch.float64 if args.precision == 'fp64' else torch.float32  # fp64: only summation order differs
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.weak_strong and args.weak_weak:
        log.warning('note: --weak_strong and --weak_weak: --weak_strong wins, as in the original')
    dist_utils.seed_everything(args.seed, 0, rank)

    dataset = build_dataset(args.data, 'train', None, args.dataset, encoded=args.gpu_decode)
    teachers = build_teachers(args, dataset, device, memory_format, log, dtype)
    # one view for both nets with --single_aug, or when no teacher looks at its own view
    single_view = args.single_aug or not any(t.needs_view for t in teachers.values())
    view_transform = TwoViews(args.image_size, args.weak_strong, args.weak_weak, single_view)
    replayed = replay.student_dataset(dataset, teachers, args, log)  # logs that the student replays the views
    if replayed is not None:
        dataset = replayed
    elif not args.gpu_decode:
        dataset.transform = view_transform
    else:  # the workers read the files and draw the views' parameters; the device decodes and makes the views
        dataset.transform = ViewParams(view_transform)
    loader = make_loader(dataset, args, world_size, rank)
    to_device = DeviceInput(device, memory_format, single_view, view_transform if args.gpu_decode else None,
                            lambda index: dataset.samples[index][0], args.seed, dtype)

    model = build_student(args, teachers)
    convert_batchnorm(model, bn_groups(args.bn_batch, args.batch_size, world_size, rank))
    model.to(device, dtype=dtype, memory_format=memory_format if channels_last_helps(model.encoder_q) else
             torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate,
                                momentum=args.sgd_momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = resume(args, model, optimizer, scaler, ckpt_dir, log) if args.resume else {'epoch': 1, 'step': 0}

    if rank == 0:
        with open(os.path.join(logs_dir, 'train_args.json'), 'w') as f:
            json.dump({**vars(args), 'world_size': world_size,
                       'teachers': {name: t.info for name, t in teachers.items()}}, f, indent=2)
    log.info('%s', json.dumps(vars(args)))
    described = ', '.join(f'{name} ({t.feat_dim}-d{", cached" if not t.needs_view else ""})'
                          for name, t in teachers.items())
    log.info('==> %d training images, %d processes, %d steps of %d images per epoch (%d per process), '
             'teachers: %s; student %s', len(dataset), world_size, loader.batch_sampler.steps, args.batch_size,
             loader.batch_sampler.per_rank, described, args.arch_student)
    log.info('==> device %s, backend %s, autocast %s, %s', device, dist_utils.backend_name(),
             str(amp_dtype).replace('torch.', '') if amp_dtype else 'off',
             'channels_last' if args.channels_last else 'contiguous')
    online_knn = OnlineKnn.from_args(args, device, amp_dtype) if args.knn_every > 0 else None
    knn_start = {}  # measured on a fresh start only: on resume the student is no longer the untrained one
    if online_knn and start['epoch'] == 1 and start['step'] == 0:
        log.info('==> online k-NN every %d epochs: %s', args.knn_every, online_knn.describe())
        knn_start = online_knn.at_start(teachers, model.encoder_q, dtype, memory_format)
        log.info('==> online k-NN at the start: %s', json.dumps(knn_start))
    json_log.write('start', start_epoch=start['epoch'], start_step=start['step'],
                   resumed_from=start.get('resumed_from'), epochs=args.epochs, world_size=world_size,
                   device=str(device), backend=dist_utils.backend_name(), precision=args.precision,
                   channels_last=args.channels_last, **knn_start)
    if start['epoch'] == 1 and start['step'] == 0 and rank == 0:
        # the initial student: the "before distillation" baseline for evaluation
        save_atomic(checkpoint_state(model, optimizer, scaler, 0, args, teachers),
                    epoch_checkpoint_path(ckpt_dir, 0))
    if start['epoch'] > args.epochs:
        log.info('==> all %d epochs are done already', args.epochs)
    ddp_model = DistributedDataParallel(model) if world_size > 1 else model
    if args.compile:
        ddp_model = compile_or_eager(ddp_model, log)
    tensorboard = TensorBoard(logs_dir)
    for key, values in knn_start.items():
        tensorboard.scalars(knn_scalars(key.replace('knn_', ''), values), 0)

    def knn_at_epoch_end(epoch):
        if online_knn is None or (epoch % args.knn_every and epoch != args.epochs):  # and at the last epoch
            return None
        values = online_knn.measure(model.encoder_q, dtype, memory_format)
        if values is None:  # not rank 0
            return None
        log.info('epoch %d  online k-NN: 1-NN %.2f  20-NN %.2f', epoch, values['1'], values['20'])
        tensorboard.scalars(knn_scalars('student', values), epoch)
        return {'knn': values}
    stop = StopRequest(log, args.stop_deadline)
    try:
        for epoch in range(start['epoch'], args.epochs + 1):
            for group in optimizer.param_groups:
                group['lr'] = cosine_lr(epoch, args)
            loader.batch_sampler.set_epoch(epoch, start['step'] if epoch == start['epoch'] else 0)
            to_device.epoch = epoch
            metric_logger = MetricLogger(teachers, epoch, loader.batch_sampler.steps, args.batch_size,
                                         args.print_freq, optimizer, log, tensorboard, json_log, device,
                                         knn_at_epoch_end)
            if epoch == start['epoch'] and 'meter' in start:
                metric_logger.load_state_dict(start['meter'])
            checkpointer = Checkpointer(ckpt_dir, lambda: checkpoint_state(
                model, optimizer, scaler, epoch - 1, args, teachers, metric_logger), args.ckpt_every_steps,
                args.ckpt_every_min, stop, writer=rank == 0)
            if train_one_epoch(ddp_model, teachers, loader, to_device, optimizer, scaler, amp_dtype, args,
                               metric_logger, checkpointer) is None:
                log.warning('==> stopped by %s in epoch %d after step %d/%d, checkpoint %s written: exit %d; '
                            'continue with --resume auto', stop.signal or 'a signal on another process', epoch,
                            metric_logger.step, metric_logger.steps, checkpointer.path, RESUME_EXIT_CODE)
                dist_utils.barrier()  # every rank leaves once rank 0's checkpoint is written
                if rank == 0:
                    dist_utils.requeue_slurm_job(log)
                raise SystemExit(RESUME_EXIT_CODE)
            if rank == 0:
                state = checkpoint_state(model, optimizer, scaler, epoch, args, teachers)
                if epoch % args.save_freq == 0 or epoch == args.epochs:
                    save_atomic(state, epoch_checkpoint_path(ckpt_dir, epoch))
                save_atomic(state, os.path.join(ckpt_dir, 'last.pth'))
            dist_utils.barrier()
    finally:
        stop.close()
        tensorboard.close()
        dist_utils.cleanup()
    return model


def train_one_epoch(model, teachers, loader, to_device, optimizer, scaler, amp_dtype, args, metric_logger,
                    checkpointer):
    """One pass over the data: batch -> student input and teacher targets -> step -> log (and a checkpoint
    when due). Returns the epoch's statistics, or None when a signal stopped it."""
    model.train()
    for index, images, _ in metric_logger.log_every(loader):
        student_in, teacher_in = to_device(index, images)
        targets = {name: teacher(index, teacher_in, amp_dtype) for name, teacher in teachers.items()}
        losses = train_step(model, student_in, targets, optimizer, scaler, amp_dtype, args.mse_nonorm)
        metric_logger.update(losses)
        if checkpointer.after_step(epoch_done=metric_logger.step == metric_logger.steps):
            return None
    return metric_logger.summary()


def prepare_experiment(args, exp_dir, ckpt_dir, logs_dir):
    """Rank 0, before anything is written: the folders, no temp file left by a killed write, and no
    finished or running experiment started over by mistake."""
    writable_folder(ckpt_dir)
    make_folder(logs_dir)
    for name in remove_stale_temp_files(ckpt_dir):
        print(f'note: removed {name}, left in {ckpt_dir} by a write that was killed', flush=True)
    existing = resume_candidates(ckpt_dir)
    if existing and not args.resume and not args.overwrite:
        raise SimRegError(f'{exp_dir} already holds checkpoints ({", ".join(map(os.path.basename, existing[:3]))}'
                          f'{", ..." if len(existing) > 3 else ""}): pass --resume auto to continue it, '
                          f'--overwrite to start it again, or another --exp')


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


def cosine_lr(epoch, args):
    """The original's schedule: cosine over epochs, set once per epoch, epochs counted from 1."""
    return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / args.epochs))


def make_loader(dataset, args, world_size, rank):
    """Training loader of this process's share of each global batch (``data.sampler``): (index, view(s),
    label) batches; (index, encoded files, label) with --gpu_decode; ((index, view), view, label) over
    ``ReplayedViews``. Every sample is made from its own seed, so workers and ranks do not matter."""
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, world_size, rank, args.seed)
    return DataLoader(SeededSamples(dataset, args.seed), batch_sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_in_loader_worker,
                      collate_fn=encoded_collate if args.gpu_decode else None)


def build_student(args, teachers):
    """Fresh student with one head per teacher, or the one in --weights."""
    backbone = build_backbone(args.arch_student, args.image_size)
    heads = {name: build_head(backbone.feat_dim, t.feat_dim, args.n_mlp_layers, args.linear_pred)
             for name, t in teachers.items()}
    model = SimReg(backbone, next(iter(heads.values())) if len(heads) == 1 else nn.ModuleDict(heads))
    if args.weights:
        _, state = student_checkpoint(read_checkpoint(args.weights), args.weights)
        load_strict(model, state, f'--weights {args.weights} for a {args.arch_student} student with heads '
                                  f'for {", ".join(f"{n} ({t.feat_dim}-d)" for n, t in teachers.items())}',
                    'SimReg student')
    return model.train()


def compile_or_eager(model, log):
    """torch.compile; where dynamo cannot compile (at once or at the first step), train eagerly."""
    torch._dynamo.config.suppress_errors = True
    try:
        return torch.compile(model)
    except Exception as exc:  # any backend failure: eager training is still correct
        log.warning('note: torch.compile failed (%s), training without it', str(exc).splitlines()[0])
        return model


def checkpoint_state(model, optimizer, scaler, epoch, args, teachers, metric_logger=None):
    """``epoch``: the last completed epoch. Inside an epoch (``metric_logger`` given) also ``position``,
    the epoch in progress and the steps done in it, and ``meter``, its running sums. One teacher:
    ``teacher`` = its info. Several: ``teachers`` = head name -> info, and their heads are stored as
    ``predict_q.<name>.*``."""
    infos = {name: t.info for name, t in teachers.items()}
    state = {
        'epoch': epoch,
        'state_dict': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'args': vars(args),
        **({'teacher': next(iter(infos.values()))} if len(infos) == 1 else {'teachers': infos}),
    }
    if metric_logger is not None:
        state['position'] = {'epoch': metric_logger.epoch, 'step': metric_logger.step}
        state['meter'] = metric_logger.state_dict()
    return state


def resume(args, model, optimizer, scaler, ckpt_dir, log):
    """Load --resume, or with 'auto' the newest checkpoint of the experiment that loads; return where to
    start: {'epoch', 'step'} (plus 'resumed_from', the epoch completed, and 'meter' inside an epoch)."""
    ckpt, path = None, args.resume
    if args.resume != 'auto':
        ckpt = read_checkpoint(path)
    for candidate in (resume_candidates(ckpt_dir) if args.resume == 'auto' else []):
        try:
            ckpt, path = read_checkpoint(candidate), candidate
            break
        except SimRegError as exc:
            log.warning('note: %s; trying the previous checkpoint', exc)
    if ckpt is None:
        log.info('==> no checkpoint in %s, starting fresh', ckpt_dir)
        return {'epoch': 1, 'step': 0}
    if not isinstance(ckpt, dict) or 'epoch' not in ckpt:
        raise SimRegError(f'--resume {path} is not a training checkpoint (no epoch): use --weights to '
                          f'start from its weights')
    _, state = student_checkpoint(ckpt, path)
    load_strict(model, state, f'--resume {path}', 'SimReg student')
    if args.restart:
        log.info('==> restart from the weights of %s (epoch %d)', path, ckpt['epoch'])
        return {'epoch': 1, 'step': 0}
    if 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    position = ckpt.get('position', {'epoch': ckpt['epoch'] + 1, 'step': 0})
    log.info('==> resumed from %s (epoch %d%s)', path, ckpt['epoch'],
             f', then step {position["step"]} of epoch {position["epoch"]}' if 'position' in ckpt else '')
    start = {**position, 'resumed_from': ckpt['epoch']}
    return {**start, 'meter': ckpt['meter']} if 'meter' in ckpt else start


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
