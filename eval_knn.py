"""k-NN evaluation of a student or any backbone (``evaluation.knn``): the SimReg paper's majority-vote 1/20-NN
top-1 (``nn_<k>_acc_epoch_<epoch>.txt``, the checkpoint's epoch) and weighted 20/200-NN, in ``knn_results.json``.

    torchrun --nproc_per_node=<gpus> eval_knn.py --weights ckpt.pth --save out/ /path/to/imagenet
"""
import argparse
import json
import os

from evaluation import common, knn
from models.openclip import weights_file
from utils.checkpoint import write_file_atomic
from utils.errors import exit_on_user_error


def get_args_parser():
    p = argparse.ArgumentParser('k-NN evaluation of SimReg students and teachers', add_help=True)
    common.add_data_args(p, 'dataset root holding train/ and val/')
    common.add_feature_args(p)
    p.add_argument('--epoch', type=int, help='epoch of the checkpoint, for the result file names: checked against '
                   'the checkpoint, which knows it; needed only for a file that does not (nn_<k>_acc.txt without)')
    p.add_argument('-k', default=1, type=int, help='extra k for the majority vote (1 and 20 are always reported)')
    p.add_argument('--seed', default=0, type=int, help='seed of the random tie-breaking in the majority vote')
    p.add_argument('--train_per_class', default=0, type=int,
                   help='use only this many train images per class, the subset train_student.py --knn_every '
                        'measures against (with --subset_seed = its --seed); 0: all')
    p.add_argument('--subset_seed', default=0, type=int, help='seed that chooses the --train_per_class images')
    return p


def main(args):
    """The knn_results.json report on rank 0, None elsewhere."""
    args.weights = weights_file(args.arch, args.weights)  # an open_clip pretrained tag: its file in the local cache
    args.epoch = common.checkpoint_epoch(args.weights, args.epoch)
    run = common.start(args, 'knn_logs')
    extracted = common.extract_splits(run, ('train', 'val'), args.dataset)
    if extracted is None:
        return None
    (train_feats, train_labels), (val_feats, val_labels) = extracted.splits['train'], extracted.splits['val']
    logger, save, stage = run.logger, run.save, run.stage
    logger.info(f'k-NN on {knn.faiss_device()}: {len(train_feats)} train, {len(val_feats)} val, '
                f'{train_feats.shape[1]}-d {stage} features')
    results = knn.evaluate(train_feats, train_labels, val_feats, val_labels, extracted.num_classes,
                           majority_ks=set(knn.MAJORITY_KS) | {args.k}, seed=args.seed)
    for k, acc in results['majority'].items():
        name = f'nn_{k}_acc.txt' if args.epoch is None else f'nn_{k}_acc_epoch_{args.epoch:03d}.txt'
        write_file_atomic('%.18e\n' % acc, os.path.join(save, name))
        logger.info(f'{k}-NN (majority) * Acc {acc:.2f}')
    for k, acc in results['weighted'].items():
        logger.info(f'{k}-NN (weighted, T={knn.TEMPERATURE}) * Acc@1 {acc["top1"]:.2f} Acc@5 {acc["top5"]:.2f}')
    report = {
        'majority_top1': {str(k): v for k, v in results['majority'].items()},
        'weighted': {str(k): v for k, v in results['weighted'].items()},
        'settings': {
            'weights': os.path.abspath(args.weights), 'weights_sha256': extracted.weights_sha256,
            'epoch': args.epoch, 'stage': stage, 'arch': args.arch, 'data': os.path.abspath(args.data),
            'dataset': args.dataset, 'image_size': args.image_size, 'num_train': len(train_feats),
            'num_val': len(val_feats), 'num_classes': extracted.num_classes,
            'feat_dim': int(train_feats.shape[1]), 'temperature': knn.TEMPERATURE, 'seed': args.seed,
            'train_per_class': args.train_per_class or None, 'subset_seed': args.subset_seed,
            'faiss': knn.faiss_device(), 'processes': run.world_size, 'amp': args.amp,
            'minutes': round(run.minutes(), 3),
        },
    }
    write_file_atomic(json.dumps(report, indent=2) + '\n', os.path.join(save, 'knn_results.json'))
    logger.info(f'=> time: {run.minutes():.2f}m, results in {save}')
    return report


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
