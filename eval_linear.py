"""Linear probe of a student or any backbone (``evaluation.probe``, the SimReg paper's protocol): SGD on
RandomResizedCrop + flip views (``--use_cache``: on the cached center-crop features), validated on val features.

    torchrun --nproc_per_node=<gpus> eval_linear.py --weights ckpt.pth --save out/ /path/to/imagenet
"""
import argparse
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from data.folders import build_dataset
from evaluation import common, features, probe
from models.openclip import weights_file
from utils.checkpoint import read_checkpoint, save_atomic, write_file_atomic
from utils.distributed import barrier, cleanup, get_rank, is_main_process, run_on_main, seed_everything
from utils.errors import SimRegError, exit_on_user_error
from utils.logging import TensorBoard


def get_args_parser():
    p = argparse.ArgumentParser('Linear probe of SimReg students and teachers', add_help=True)
    common.add_data_args(p, 'dataset root holding train/ and val/')
    common.add_feature_args(p, load_cache=False)    # the probe always reuses a matching cache
    p.add_argument('--epoch', type=int, default=argparse.SUPPRESS,
                   help='epoch of the checkpoint (--weights), recorded with the results: checked against the '
                        'checkpoint, which knows it; needed only for a file that does not')
    p.add_argument('--epochs', default=40, type=int, help='training epochs of the probe')
    p.add_argument('--lr', '--learning-rate', default=0.01, type=float, dest='lr', help='initial learning rate')
    p.add_argument('--lr_schedule', default='15,30,40', help='epochs at which the learning rate drops 10x')
    p.add_argument('--momentum', default=0.9, type=float, help='SGD momentum')
    p.add_argument('--wd', '--weight-decay', default=1e-4, type=float, dest='weight_decay', help='weight decay')
    p.add_argument('--eval-freq', default=10, type=int, help='validate every this many epochs (and after the last one)')
    p.add_argument('--resume', default='', help='probe checkpoint to continue from (<save>/checkpoint.pth.tar)')
    p.add_argument('-e', '--evaluate', action='store_true',
                   help='only validate the probe of --resume (default: <save>/model_best.pth.tar)')
    p.add_argument('--use_cache', action='store_true',
                   help='train on the cached center-crop features (minutes instead of hours, usually '
                        'slightly lower accuracy)')
    p.add_argument('--seed', default=0, type=int, help='seed of the probe init, batch order and augmentation')
    return p


def parse_milestones(text):
    try:
        return [int(x) for x in text.split(',') if x.strip()]
    except ValueError:
        raise SimRegError(f'--lr_schedule {text!r} must be comma-separated epochs, e.g. 15,30,40') from None


def main(args):
    """Train the probe (or, with --evaluate, validate one); returns on rank 0 the linear_results.json
    report (with --evaluate, linear_evaluate.json's), None elsewhere."""
    args.weights = weights_file(args.arch, args.weights)  # an open_clip pretrained tag: its file in the local cache
    args.epoch = common.checkpoint_epoch(args.weights, getattr(args, 'epoch', None))
    run = common.start(args, 'logs')
    device, logger, save = run.device, run.logger, run.save
    seed_everything(args.seed, 0, get_rank())
    milestones = parse_milestones(args.lr_schedule)
    probe_path = args.resume or (os.path.join(save, 'model_best.pth.tar') if args.evaluate else '')
    if probe_path and not os.path.isfile(probe_path):
        raise SimRegError(f'no probe checkpoint at {probe_path}: train one first (without --evaluate/--resume) '
                          f'or pass --resume <save>/checkpoint.pth.tar')

    model, datasets, cache = common.open_features(run, ('train', 'val'), args.dataset)
    model = model.to(device)
    num_classes = len(datasets['train'].classes)
    extract = dict(model=model, reuse=True, batch_size=args.batch_size, workers=args.workers, device=device)
    if args.evaluate:  # the probe checkpoint holds the train statistics: the train split is not needed
        val_feats, val_labels = features.split_features(cache, 'val', datasets['val'], **extract)
        result = validate_checkpoint(run, probe_path, cache, num_classes, val_feats, val_labels) if run.main else None
        cleanup()
        return result
    train_feats, train_labels = features.split_features(cache, 'train', datasets['train'], **extract)
    val_feats, val_labels = features.split_features(cache, 'val', datasets['val'], **extract)
    var, mean = run_on_main(lambda: probe.feature_stats(train_feats))
    linear = probe.build_probe(var, mean, num_classes).to(device)
    optimizer = torch.optim.SGD(linear.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones)
    state = {'start_epoch': 0, 'best_acc1': 0.0, 'best_epoch': None, 'history': []}
    if args.resume:
        state.update(load_probe_checkpoint(args.resume, cache, linear, optimizer, scheduler))
        logger.info(f'=> resumed from {args.resume} at epoch {state["start_epoch"]}')

    if args.use_cache:  # rank 0 trains alone, on the features in device memory
        cleanup()
        if not run.main:
            return None
        cached = (train_feats.to(device), train_labels.to(device))
        train_epoch = lambda epoch: probe.train_epoch_cached(linear, optimizer, *cached, args.batch_size)
    else:
        train_epoch = image_epochs(args, run.world_size, model, linear, optimizer, device)
    train_feats = train_labels = None  # their statistics are taken: free the memory
    if run.main:
        val_feats, val_labels = val_feats.to(device), val_labels.to(device)
    board = TensorBoard(os.path.join(save, 'tb'))
    started, report = time.time(), None
    for epoch in range(state['start_epoch'], args.epochs):
        seed_everything(args.seed, epoch, get_rank())
        lr = optimizer.param_groups[0]['lr']
        train = train_epoch(epoch)
        scheduler.step()
        if is_main_process():
            record = {'epoch': epoch + 1, 'lr': lr, 'train_loss': train['loss'], 'train_acc1': train['acc1']}
            if epoch % args.eval_freq == 0 or epoch == args.epochs - 1:
                val = probe.evaluate(linear, val_feats, val_labels)
                record.update(val_loss=val['loss'], val_acc1=val['acc1'], val_acc5=val['acc5'])
                if val['acc1'] > state['best_acc1'] or state['best_epoch'] is None:
                    state.update(best_acc1=val['acc1'], best_epoch=epoch + 1)
            state['history'].append(record)
            logger.info(f'epoch {epoch + 1}: '
                        + ' '.join(f'{k} {v:.4g}' for k, v in record.items() if k != 'epoch'))
            board.scalars({f'linear/{k}': v for k, v in record.items() if k != 'epoch'}, epoch + 1)
            checkpoint = {'epoch': epoch + 1, 'state_dict': linear.state_dict(), 'best_acc1': state['best_acc1'],
                          'best_epoch': state['best_epoch'], 'optimizer': optimizer.state_dict(),
                          'lr_scheduler': scheduler.state_dict(), 'history': state['history'],
                          'weights_sha256': cache.weights_sha256, 'stage': run.stage, 'args': vars(args)}
            save_atomic(checkpoint, os.path.join(save, 'checkpoint.pth.tar'))
            if state['best_epoch'] == epoch + 1:
                save_atomic(checkpoint, os.path.join(save, 'model_best.pth.tar'))
            report = write_results(save, state, args, run.stage, cache, run.world_size, time.time() - started)
        barrier()
    board.close()
    cleanup()
    return report


def validate_checkpoint(run, path, cache, num_classes, val_feats, val_labels):
    """--evaluate: the probe of ``path`` on the val features; writes linear_evaluate.json."""
    dim = val_feats.shape[1]
    linear = probe.build_probe(torch.ones(dim), torch.zeros(dim), num_classes).to(run.device)
    load_probe_checkpoint(path, cache, linear)
    result = probe.evaluate(linear, val_feats.to(run.device), val_labels.to(run.device))
    run.logger.info(f'{path}: * Acc@1 {result["acc1"]:.3f} Acc@5 {result["acc5"]:.3f}')
    result = {'checkpoint': os.path.abspath(path), **result}
    write_file_atomic(json.dumps(result, indent=2) + '\n', os.path.join(run.save, 'linear_evaluate.json'))
    return result


def image_epochs(args, world, model, linear, optimizer, device):
    """``train_epoch(epoch)``: one probe epoch on the augmented training images through the frozen network."""
    train_set = build_dataset(args.data, 'train', probe.probe_train_transform(args.image_size), args.dataset)
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(train_set, batch_size=max(1, args.batch_size // world), shuffle=sampler is None,
                        sampler=sampler, num_workers=args.workers, pin_memory=device.type == 'cuda')
    trained = DistributedDataParallel(linear) if world > 1 else linear

    def train_epoch(epoch):
        if sampler is not None:
            sampler.set_epoch(epoch)
        return probe.train_epoch_images(model, trained, loader, optimizer, device, args.amp)
    return train_epoch


def load_probe_checkpoint(path, cache, linear, optimizer=None, scheduler=None):
    """Restore a probe; refuse one trained on the features of another checkpoint or stage."""
    checkpoint = read_checkpoint(path)
    if checkpoint.get('weights_sha256') != cache.weights_sha256 or checkpoint.get('stage') != cache.recipe['stage']:
        raise SimRegError(f'{path} is a probe of other features (weights or --stage differ): '
                          f'pass the probe checkpoint of this run')
    linear.load_state_dict(checkpoint['state_dict'])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['lr_scheduler'])
    return {'start_epoch': checkpoint['epoch'], **{k: checkpoint[k] for k in ('best_acc1', 'best_epoch', 'history')}}


def write_results(save, state, args, stage, cache, world, seconds):
    """linear_results.txt (one line per epoch, then the best) and linear_results.json."""
    last = next((r for r in reversed(state['history']) if 'val_acc1' in r), {})  # the last validated epoch
    lines = [' '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in r.items())
             for r in state['history']]
    lines.append(f'best val top-1 {state["best_acc1"]:.3f} (epoch {state["best_epoch"]}); last validated '
                 f'top-1 {last.get("val_acc1", float("nan")):.3f} top-5 {last.get("val_acc5", float("nan")):.3f}')
    write_file_atomic('\n'.join(lines) + '\n', os.path.join(save, 'linear_results.txt'))
    report = {'best': {'top1': state['best_acc1'], 'epoch': state['best_epoch']},
              'last': {'top1': last.get('val_acc1'), 'top5': last.get('val_acc5'), 'epoch': last.get('epoch')},
              'history': state['history'],
              'settings': {**vars(args), 'stage': stage, 'weights_sha256': cache.weights_sha256,
                           'processes': world, 'minutes_this_run': round(seconds / 60, 3)}}
    write_file_atomic(json.dumps(report, indent=2) + '\n', os.path.join(save, 'linear_results.json'))
    return report


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
