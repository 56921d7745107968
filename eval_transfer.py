"""Transfer evaluation on ``<data>/train/<class>/<image>`` and ``val/`` and/or ``test/``: the L-BFGS logistic
regression of ``evaluation.transfer`` and k-NN on the cached features, in ``transfer_results.{json,txt}``.

    torchrun --nproc_per_node=<gpus> eval_transfer.py --weights ckpt.pth --save out/ /path/to/dataset
"""
import argparse
import json
import os

from evaluation import common, knn, transfer
from utils.checkpoint import write_file_atomic
from utils.errors import SimRegError, exit_on_user_error

SPLITS = ('train', 'val', 'test')


def get_args_parser():
    p = argparse.ArgumentParser('Transfer evaluation (L-BFGS logistic regression and k-NN on frozen features) '
                                'of SimReg students and teachers', add_help=True)
    common.add_data_args(p, 'dataset root holding train/ and val/ and/or test/', dataset=False, save=None,
                         save_help='output folder for results, logs and feature caches '
                                   f'(default: {common.OUTPUTS}/transfer/<name>)')
    common.add_feature_args(p, linear_pred=False)
    p.add_argument('--name', default=None, help='dataset name in the results (default: the folder name of DIR)')
    p.add_argument('--max_iter', default=transfer.MAX_ITER, type=int,
                   help='L-BFGS iterations per L2 strength at most')
    p.add_argument('--seed', default=0, type=int,
                   help='seed of the train holdout (when there is no val/) and of k-NN tie-breaking')
    return p


def present_splits(root):
    """The splits under ``root``: train and at least one of val/test."""
    present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if 'train' not in present or len(present) < 2:
        raise SimRegError(f'{root} needs train/ and val/ and/or test/ (one sub-folder per class in each); '
                          f'it has {", ".join(s + "/" for s in present) or "none of them"}')
    return present


def main(args):
    """The transfer_results.json report on rank 0, None elsewhere."""
    if args.max_iter < 1:
        raise SimRegError(f'--max_iter {args.max_iter}: L-BFGS needs at least one iteration per L2 strength')
    splits = present_splits(args.data)
    name = args.name or os.path.basename(os.path.normpath(os.path.abspath(args.data)))
    run = common.start(args, 'transfer_logs', save=args.save or os.path.join(common.OUTPUTS, 'transfer', name))
    extracted = common.extract_splits(run, splits, name)
    if extracted is None:
        return None
    logger, save, stage, device = run.logger, run.save, run.stage, run.device
    by_split, num_classes = extracted.splits, extracted.num_classes
    train, val, test = (by_split.get(split) for split in SPLITS)
    logger.info(f'{name}: {num_classes} classes, ' + ', '.join(f'{len(f)} {s}' for s, (f, _) in by_split.items())
                + f', {train[0].shape[1]}-d {stage} features; L-BFGS probe on {device}')
    probe = transfer.evaluate_transfer(train, val, test, num_classes, seed=args.seed, device=device,
                                       max_iter=args.max_iter)
    reference, query, knn_on = transfer.knn_splits(train, val, test)
    neighbours = knn.evaluate(reference[0], reference[1], query[0], query[1], num_classes, seed=args.seed)
    report = {
        'dataset': name, 'data': os.path.abspath(args.data),
        'weights': os.path.abspath(args.weights), 'weights_sha256': extracted.weights_sha256,
        'arch': args.arch, 'stage': stage, 'image_size': args.image_size,
        'num_classes': num_classes, 'feat_dim': int(train[0].shape[1]),
        'num_samples': {split: len(labels) for split, (_, labels) in by_split.items()},
        'linear': probe,
        'knn': {'on': knn_on, 'majority_top1': {str(k): v for k, v in neighbours['majority'].items()},
                'weighted': {str(k): v for k, v in neighbours['weighted'].items()},
                'temperature': knn.TEMPERATURE, 'faiss': knn.faiss_device()},
        'processes': run.world_size, 'amp': args.amp, 'minutes': round(run.minutes(), 3),
    }
    write_file_atomic(json.dumps(report, indent=2) + '\n', os.path.join(save, 'transfer_results.json'))
    text = summary(report)
    write_file_atomic(text, os.path.join(save, 'transfer_results.txt'))
    logger.info('\n' + text + f'=> results in {save}')
    return report


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
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
