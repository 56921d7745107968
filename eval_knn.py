"""k-NN evaluation of a student (or any backbone) on ImageNet, with the original SimReg protocol.

Majority-vote 1-NN and 20-NN top-1 (the paper's numbers, written to
``nn_<k>_acc_epoch_<epoch>.txt``) and weighted 20/200-NN (the protocol of later SSL papers),
all from one exact faiss search over L2-normalised features, collected in ``knn_results.json``.

    torchrun --nproc_per_node=<gpus> eval_knn.py --weights ckpt.pth --save out/ /path/to/imagenet
"""
import argparse
import json
import os
import time

import torch

from data.folders import build_dataset
from data.transforms import eval_transform
from evaluation import features, knn
from utils.checkpoint import write_text_atomic
from utils.distributed import cleanup, init_distributed, get_world_size, is_main_process
from utils.errors import exit_on_user_error
from utils.logging import setup_logger

parser = argparse.ArgumentParser(description='k-NN evaluation of SimReg students and teachers')
parser.add_argument('data', metavar='DIR', help='dataset root holding train/ and val/')
features.add_checkpoint_args(parser)
parser.add_argument('--dataset', default='imagenet', choices=['imagenet', 'imagenet100'],
                    help='full dataset or the original 100-class subset')
parser.add_argument('-j', '--workers', default=8, type=int, help='data loading workers per process')
parser.add_argument('-b', '--batch-size', default=256, type=int, help='total batch size over all processes')
parser.add_argument('--save', default='./outputs', help='output folder for features, logs and results')
parser.add_argument('--load_cache', action='store_true',
                    help='reuse features cached in --save by an earlier run of the same checkpoint')
parser.add_argument('--epoch', default=130, type=int, help='epoch of the checkpoint, used in result file names')
parser.add_argument('-k', default=1, type=int, help='extra k for the majority vote (1 and 20 are always reported)')
parser.add_argument('--image_size', default=224, type=int, help='center crop size (resize to size*256/224)')
parser.add_argument('--amp', action='store_true', help='extract features under autocast')
parser.add_argument('--seed', default=0, type=int, help='seed of the random tie-breaking in the majority vote')


def main():
    args = parser.parse_args()
    device = init_distributed()
    torch.backends.cudnn.benchmark = True    # every batch has the same shape
    stage = features.resolve_stage(args.stage, args.use_pred)
    save = features.stage_output_dir(args.save, stage, args.head)
    if is_main_process():
        os.makedirs(save, exist_ok=True)
    logger = setup_logger(os.path.join(save, 'knn_logs') if is_main_process() else None)
    logger.info(f'args: {vars(args)}')
    started = time.time()

    model = features.load_feature_model(args.weights, args.arch, stage, args.linear_pred, head_name=args.head)
    transform = eval_transform(args.image_size)
    train_set = build_dataset(args.data, 'train', transform, args.dataset)
    val_set = build_dataset(args.data, 'val', transform, args.dataset)
    features.check_same_classes({'train': train_set, 'val': val_set})
    cache = features.FeatureCache(save, args.weights, stage, args.dataset, args.image_size,
                                  refuse_hint='delete those files, pass another --save, or run without '
                                              '--load_cache to recompute them', amp=args.amp)
    extract = dict(model=model, reuse=args.load_cache, batch_size=args.batch_size, workers=args.workers, device=device)
    train_feats, train_labels = features.split_features(cache, 'train', train_set, **extract)
    val_feats, val_labels = features.split_features(cache, 'val', val_set, **extract)
    world_size, main_process = get_world_size(), is_main_process()
    cleanup()
    if not main_process:
        return
    del model, extract    # frees the GPU memory faiss is about to use
    if device.type == 'cuda':
        torch.cuda.empty_cache()

    majority_ks = sorted(set(knn.MAJORITY_KS) | {args.k})
    logger.info(f'k-NN on {knn.faiss_device()}: {len(train_feats)} train, {len(val_feats)} val, '
                f'{train_feats.shape[1]}-d {stage} features')
    results = knn.evaluate(train_feats, train_labels, val_feats, val_labels, len(train_set.classes),
                           majority_ks=majority_ks, seed=args.seed)
    for k, acc in results['majority'].items():
        write_text_atomic('%.18e\n' % acc, os.path.join(save, 'nn_%d_acc_epoch_%03d.txt' % (k, args.epoch)))
        logger.info(f'{k}-NN (majority) * Acc {acc:.2f}')
    for k, acc in results['weighted'].items():
        logger.info(f'{k}-NN (weighted, T={knn.TEMPERATURE}) * Acc@1 {acc["top1"]:.2f} Acc@5 {acc["top5"]:.2f}')
    report = {
        'majority_top1': {str(k): v for k, v in results['majority'].items()},
        'weighted': {str(k): v for k, v in results['weighted'].items()},
        'settings': {
            'weights': os.path.abspath(args.weights), 'weights_sha256': cache.weights_sha256,
            'epoch': args.epoch, 'stage': stage, 'arch': args.arch, 'data': os.path.abspath(args.data),
            'dataset': args.dataset, 'image_size': args.image_size, 'num_train': len(train_feats),
            'num_val': len(val_feats), 'num_classes': len(train_set.classes),
            'feat_dim': int(train_feats.shape[1]), 'temperature': knn.TEMPERATURE, 'seed': args.seed,
            'faiss': knn.faiss_device(), 'processes': world_size, 'amp': args.amp,
            'minutes': round((time.time() - started) / 60, 3),
        },
    }
    write_text_atomic(json.dumps(report, indent=2) + '\n', os.path.join(save, 'knn_results.json'))
    logger.info(f'=> time: {(time.time() - started) / 60:.2f}m, results in {save}')


if __name__ == '__main__':
    exit_on_user_error(main)
