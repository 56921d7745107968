"""Transfer evaluation of a student or teacher on a dataset laid out as folders.

``<data>/train/<class>/<image>``, ``<data>/val/...`` and/or ``<data>/test/...`` (train and at
least one of the others). Center-crop features are extracted once (cached in ``--save``), then
rank 0 fits an L-BFGS logistic-regression probe with the L2 strength chosen on a held-out split
(the protocol of ``evaluation/transfer.py``) and runs k-NN on the same features. Results go to
``transfer_results.json`` and ``transfer_results.txt``.

    torchrun --nproc_per_node=<gpus> eval_transfer.py --weights ckpt.pth --save out/ /path/to/dataset
"""
import argparse
import json
import os
import time

import torch

from data.folders import build_dataset
from data.transforms import eval_transform
from evaluation import features, knn, transfer
from utils.checkpoint import write_text_atomic
from utils.distributed import cleanup, get_world_size, init_distributed, is_main_process
from utils.errors import SimRegError, exit_on_user_error
from utils.logging import setup_logger

SPLITS = ('train', 'val', 'test')

parser = argparse.ArgumentParser(description='Transfer evaluation (L-BFGS logistic regression and k-NN on '
                                             'frozen features) of SimReg students and teachers')
parser.add_argument('data', metavar='DIR', help='dataset root holding train/ and val/ and/or test/')
features.add_checkpoint_args(parser, linear_pred=False)
parser.add_argument('--name', default=None, help='dataset name in the results (default: the folder name of DIR)')
parser.add_argument('-j', '--workers', default=8, type=int, help='data loading workers per process')
parser.add_argument('-b', '--batch-size', default=256, type=int, help='total batch size over all processes')
parser.add_argument('--save', default=None,
                    help='output folder for features, logs and results (default: ./outputs/transfer/<name>)')
parser.add_argument('--load_cache', action='store_true',
                    help='reuse features cached in --save by an earlier run of the same checkpoint and dataset')
parser.add_argument('--image_size', default=224, type=int, help='center crop size (resize to size*256/224)')
parser.add_argument('--amp', action='store_true', help='extract features under autocast')
parser.add_argument('--max_iter', default=transfer.MAX_ITER, type=int,
                    help='L-BFGS iterations per L2 strength at most')
parser.add_argument('--seed', default=0, type=int,
                    help='seed of the train holdout (when there is no val/) and of k-NN tie-breaking')


def present_splits(root):
    """The splits under ``root``: train and at least one of val/test are required."""
    present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if 'train' not in present or len(present) < 2:
        raise SimRegError(f'{root} needs train/ and val/ and/or test/ (one sub-folder per class in each); '
                          f'it has {", ".join(s + "/" for s in present) or "none of them"}')
    return present


def main():
    args = parser.parse_args()
    if args.max_iter < 1:
        raise SimRegError(f'--max_iter {args.max_iter}: L-BFGS needs at least one iteration per L2 strength')
    splits = present_splits(args.data)
    device = init_distributed()
    torch.backends.cudnn.benchmark = True    # every batch has the same shape
    stage = features.resolve_stage(args.stage, args.use_pred)
    name = args.name or os.path.basename(os.path.normpath(os.path.abspath(args.data)))
    save = features.stage_output_dir(args.save or os.path.join('outputs', 'transfer', name), stage, args.head)
    if is_main_process():
        os.makedirs(save, exist_ok=True)
    logger = setup_logger(os.path.join(save, 'transfer_logs') if is_main_process() else None)
    logger.info(f'args: {vars(args)}')
    started = time.time()

    model = features.load_feature_model(args.weights, args.arch, stage, head_name=args.head)
    transform = eval_transform(args.image_size)
    datasets = {split: build_dataset(args.data, split, transform) for split in splits}
    features.check_same_classes(datasets)
    cache = features.FeatureCache(save, args.weights, stage, name, args.image_size,
                                  refuse_hint='delete those files, pass another --save, or run without '
                                              '--load_cache to recompute them', amp=args.amp)
    extract = dict(model=model, reuse=args.load_cache, batch_size=args.batch_size, workers=args.workers, device=device)
    extracted = {split: features.split_features(cache, split, dataset, **extract)
                 for split, dataset in datasets.items()}
    world_size, main_process = get_world_size(), is_main_process()
    cleanup()
    if not main_process:
        return
    del model, extract    # frees the GPU memory the probe and faiss are about to use
    if device.type == 'cuda':
        torch.cuda.empty_cache()

    train, val, test = (extracted.get(split) for split in SPLITS)
    num_classes = len(datasets['train'].classes)
    logger.info(f'{name}: {num_classes} classes, ' + ', '.join(f'{len(f)} {s}' for s, (f, _) in extracted.items())
                + f', {train[0].shape[1]}-d {stage} features; L-BFGS probe on {device}')
    probe = transfer.evaluate_transfer(train, val, test, num_classes, seed=args.seed, device=device,
                                       max_iter=args.max_iter)
    reference, query, knn_on = transfer.knn_splits(train, val, test)
    neighbours = knn.evaluate(reference[0], reference[1], query[0], query[1], num_classes, seed=args.seed)
    report = {
        'dataset': name, 'data': os.path.abspath(args.data),
        'weights': os.path.abspath(args.weights), 'weights_sha256': cache.weights_sha256,
        'arch': args.arch, 'stage': stage, 'image_size': args.image_size,
        'num_classes': num_classes, 'feat_dim': int(train[0].shape[1]),
        'num_samples': {split: len(labels) for split, (_, labels) in extracted.items()},
        'linear': probe,
        'knn': {'on': knn_on, 'majority_top1': {str(k): v for k, v in neighbours['majority'].items()},
                'weighted': {str(k): v for k, v in neighbours['weighted'].items()},
                'temperature': knn.TEMPERATURE, 'faiss': knn.faiss_device()},
        'processes': world_size, 'amp': args.amp, 'minutes': round((time.time() - started) / 60, 3),
    }
    write_text_atomic(json.dumps(report, indent=2) + '\n', os.path.join(save, 'transfer_results.json'))
    text = summary(report)
    write_text_atomic(text, os.path.join(save, 'transfer_results.txt'))
    logger.info('\n' + text + f'=> results in {save}')


def summary(report):
    """The human-readable transfer_results.txt."""
    selection, final, neighbours = report['linear']['selection'], report['linear']['final'], report['knn']
    lines = [f'dataset {report["dataset"]} ({report["data"]})',
             (f'weights {report["weights"]} (stage {report["stage"]}, {report["feat_dim"]}-d, '
              f'image size {report["image_size"]})'),
             'samples ' + ', '.join(f'{split} {n}' for split, n in report['num_samples'].items()),
             (f'L2 search: fit on {selection["fit_on"]} ({selection["num_fit"]}), '
              f'scored on {selection["scored_on"]} ({selection["num_scored"]})')]
    lines += [f'  l2 {row["l2"]:.3e}  top-1 {row["top1"]:6.2f}  loss {row["loss"]:.4f}  '
              f'iterations {row["iterations"]}' + ('' if row['converged'] else ' (not converged)')
              for row in selection['grid']]
    lines.append(f'chosen l2 {selection["chosen_l2"]:.3e} (held-out top-1 {selection["chosen_top1"]:.2f})')
    lines.append(f'linear top-1 on {final["evaluated_on"]} {final["top1"]:.2f} (mean per class '
                 f'{final["mean_per_class_top1"]:.2f}), fit on {final["fit_on"]} ({final["num_fit"]})'
                 + (f'; {final["note"]}' if 'note' in final else ''))
    votes = [f'{k}-NN majority {v:.2f}' for k, v in neighbours['majority_top1'].items()]
    votes += [f'{k}-NN weighted {v["top1"]:.2f}' for k, v in neighbours['weighted'].items()]
    lines.append(f'k-NN {neighbours["on"]}: ' + ', '.join(votes))
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    exit_on_user_error(main)
