"""The demo's closing table, read from the result files the evaluation scripts wrote.

    python -m evaluation.report exp/demo [--wall_time SECONDS]
"""
import argparse
import json
import os

from utils.errors import exit_on_user_error


def read_json(path):
    with open(path) as f:
        return json.load(f)


def demo_table(exp_dir, wall_time=None):
    """Rows of (what, value) for the demo: k-NN of teacher and student before/after, linear probe,
    imitation of the teacher on held-out images, wall time."""
    knn = lambda name: read_json(os.path.join(exp_dir, name, 'knn_results.json'))['majority_top1']
    teacher, before, after = knn('features_teacher'), knn('features_init'), knn('features')
    linear = read_json(os.path.join(exp_dir, 'linear', 'linear_results.json'))
    imitation = {}
    for name in os.listdir(os.path.join(exp_dir, 'imitation')):
        result = read_json(os.path.join(exp_dir, 'imitation', name))
        imitation[result['epoch']] = result['mean_cosine']
    first, last = min(imitation), max(imitation)
    rows = [
        ('teacher k-NN top-1 (1-NN / 20-NN)', f"{teacher['1']:.1f} / {teacher['20']:.1f}"),
        ('student k-NN before distillation', f"{before['1']:.1f} / {before['20']:.1f}"),
        ('student k-NN after distillation', f"{after['1']:.1f} / {after['20']:.1f}"),
        ('student linear probe top-1', f"{linear['best']['top1']:.1f}"),
        (f'cos(head, teacher) on val, epoch {first} -> {last}', f'{imitation[first]:.3f} -> {imitation[last]:.3f}'),
    ]
    if wall_time is not None:
        rows.append(('wall time', f'{wall_time / 60:.1f} min'))
    return rows


def get_args_parser():
    p = argparse.ArgumentParser('Print the demo summary table', add_help=True)
    p.add_argument('exp_dir', help='exp/<exp> of the demo run')
    p.add_argument('--wall_time', type=float, help='seconds the whole demo took')
    return p


def main(args):
    """Print the table; returns its rows."""
    rows = demo_table(args.exp_dir, args.wall_time)
    width = max(len(what) for what, _ in rows)
    print('\n' + '=' * (width + 20))
    for what, value in rows:
        print(f'{what:<{width}}  {value}')
    print('=' * (width + 20))
    return rows


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
