"""Segmentation probe of a student or any backbone (``evaluation.dense_probe``): a linear 1x1 classifier on the
frozen feature map, mean IoU on the validation masks, in ``dense_results.json``.

    torchrun --nproc_per_node=<gpus> eval_dense.py --weights ckpt.pth --save out/ /path/to/VOCdevkit
"""
import argparse
import json
import os

import torch

from evaluation import common, dense_probe, features
from utils.checkpoint import file_digest, write_file_atomic
from utils.distributed import cleanup, run_on_main
from utils.errors import SimRegError, exit_on_user_error


def get_args_parser():
    p = argparse.ArgumentParser('Segmentation probe of SimReg students and teachers', add_help=True)
    common.add_data_args(p, f'dataset root: {dense_probe.LAYOUTS_HELP}', dataset=False)
    p.add_argument('--weights', required=True, help='checkpoint to evaluate (any layout the project loads)')
    p.add_argument('-a', '--arch', default=None,
                   help='architecture of a plain backbone/teacher file; student checkpoints carry their own')
    p.add_argument('--num_classes', type=int, help='classes of a plain folder (labels 0..n-1); VOC and ADE20k '
                   'know theirs (21, 150)')
    p.add_argument('--load_cache', action='store_true',
                   help='reuse the feature maps an earlier run cached in --save (refused unless the same '
                        'checkpoint, images, image size and --amp made them)')
    p.add_argument('--amp', action='store_true', help='run the frozen network under autocast')
    p.add_argument('--epochs', default=10, type=int, help='training epochs of the classifier')
    p.add_argument('--lr', default=1e-3, type=float, help='AdamW learning rate (cosine schedule to 0)')
    p.add_argument('--wd', default=1e-4, type=float, dest='weight_decay', help='AdamW weight decay')
    p.add_argument('--probe_batch_size', default=16, type=int, help='images per classifier step')
    p.add_argument('--seed', default=0, type=int, help='seed of the classifier init and batch order')
    p.set_defaults(stage=None, use_pred=False, head=None)  # common.start's: the backbone's output folder
    return p


def main(args):
    """The dense_results.json report on rank 0, None elsewhere. Every mask is checked before anything is written."""
    if args.epochs < 1:
        raise SimRegError(f'--epochs {args.epochs}: the classifier needs at least 1 epoch')
    epoch = common.checkpoint_epoch(args.weights)
    splits = dense_probe.open_splits(args.data, args.image_size, args.num_classes)
    masks = {name: dense_probe.read_masks(split, args.workers) for name, split in splits.items()}
    run = common.start(args, 'dense_logs')
    backbone = features.load_feature_model(args.weights, args.arch).backbone
    cache = dense_probe.DenseCache(run.save, file_digest(args.weights), args.image_size, args.amp)
    maps = {}
    for name, split in splits.items():
        if args.load_cache and run_on_main(lambda: maps.setdefault(name, cache.load(name, split)) is not None):
            run.logger.info(f'{name} feature maps: reusing the cache in {run.save}')
            continue
        maps[name] = features.extract_features(dense_probe.DenseModel(backbone), split, args.batch_size,
                                               args.workers, run.device, args.amp, desc=f'{name} feature maps')
        if run.main:
            cache.save(name, split, maps[name])
    cleanup()
    if not run.main:
        return None
    torch.manual_seed(args.seed)
    num_classes = splits['train'].num_classes
    classifier = dense_probe.build_classifier(maps['train'], num_classes)
    losses = dense_probe.train(classifier, maps['train'], masks['train'], args.epochs, args.lr, args.weight_decay,
                               args.probe_batch_size, run.device, torch.Generator().manual_seed(args.seed))
    result = dense_probe.evaluate(classifier, maps['val'], masks['val'], num_classes, args.probe_batch_size,
                                  run.device)
    run.logger.info(f'{splits["val"].layout} val: * mIoU {result["miou"]:.2f} ({num_classes} classes), train loss '
                    f'{losses[-1]:.4f}')
    report = {**result, 'train_loss': losses, 'settings': {
        'weights': os.path.abspath(args.weights), 'weights_sha256': cache.recipe['weights_sha256'],
        'epoch': epoch, 'arch': args.arch, 'data': os.path.abspath(args.data), 'layout': splits['val'].layout,
        'num_classes': num_classes, 'num_train': len(splits['train']), 'num_val': len(splits['val']),
        'image_size': args.image_size, 'map_shape': list(maps['val'].shape[1:]), 'epochs': args.epochs,
        'lr': args.lr, 'weight_decay': args.weight_decay, 'probe_batch_size': args.probe_batch_size,
        'seed': args.seed, 'amp': args.amp, 'processes': run.world_size, 'minutes': round(run.minutes(), 3)}}
    write_file_atomic(json.dumps(report, indent=2) + '\n', os.path.join(run.save, 'dense_results.json'))
    run.logger.info(f'=> time: {run.minutes():.2f}m, results in {run.save}')
    return report


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
