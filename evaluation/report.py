"""The report of an experiment from the files training and the evaluation scripts wrote: a table on stdout,
``EXP_DIR/report.json`` and ``EXP_DIR/report.png``. A result missing from its path (default: ``SOURCES``, demo/demo.sh's
layout) is null in report.json and left out of the table and picture. k-NN values: majority-vote top-1 % by k.
"""
import argparse
import io
import json
import math
import os

from utils.checkpoint import write_file_atomic
from utils.errors import SimRegError, exit_on_user_error
from utils.logging import read_json_log
from utils.tracking import log_report

SOURCES = {  # option -> its default path, relative to EXP_DIR (demo/demo.sh's layout)
    'log': os.path.join('logs', 'log.jsonl'),
    'teacher_knn': os.path.join('features_teacher', 'knn_results.json'),
    'before_knn': os.path.join('features_init', 'knn_results.json'),
    'after_knn': os.path.join('features', 'knn_results.json'),
    'linear': os.path.join('linear', 'linear_results.json'),
    'imitation': 'imitation',
    'teacher_dense': os.path.join('dense_teacher', 'dense_results.json'),  # the dense demo's (DEMO_DENSE=1)
    'before_dense': os.path.join('dense_init', 'dense_results.json'),
    'after_dense': os.path.join('dense', 'dense_results.json'),
}
RESULT_FILES = {name: os.path.basename(path) for name, path in SOURCES.items() if name not in ('log', 'imitation')}
DENSE = {'teacher': 'teacher_dense', 'student_before': 'before_dense', 'student_after': 'after_dense'}
PANEL_INCHES, DPI = (5.0, 4.0), 120  # each panel of report.png: 600 x 480 pixels


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_result(path, read=read_json):
    """``read(path)``; None when the file is not there. A file there that cannot be read is a SimRegError."""
    if not os.path.isfile(path):
        return None
    try:
        return read(path)
    except (OSError, ValueError, KeyError) as exc:
        raise SimRegError(f'cannot read {path} ({exc}): run again the step that writes it, or remove it') from None


def source_paths(exp_dir, **given):
    """The path of each source (``given[name]``, else its default) under ``exp_dir``; a knn/linear option may
    name the script's output folder or the result file."""
    paths = {name: os.path.join(exp_dir, given.get(name) or default) for name, default in SOURCES.items()}
    return {name: os.path.join(path, RESULT_FILES[name]) if name in RESULT_FILES and os.path.isdir(path) else path
            for name, path in paths.items()}


def training_curves(records):
    """(report entries from the log, the loss by window as [(epoch - 1 + step / steps, loss)]), from the records
    of the last run that started from scratch (all of them if no start is logged); a step logged twice counts last."""
    fresh = [i for i, r in enumerate(records) if r['event'] == 'start' and r.get('resumed_from') is None
             and r.get('start_epoch', 1) == 1 and r.get('start_step', 0) == 0]
    records = records[fresh[-1]:] if fresh else records
    epochs = sorted({r['epoch']: r for r in records if r['event'] == 'epoch'}.items())
    windows = sorted({(r['epoch'], r['step']): r for r in records if r['event'] == 'window'}.items())
    starts = [r for r in records if r['event'] == 'start']
    knn_epochs = [(epoch, r['knn']) for epoch, r in epochs if r.get('knn')]
    ks = sorted({k for _, knn in knn_epochs for k in knn}, key=int)
    last_start = lambda key: next((r[key] for r in reversed(starts) if r.get(key)), None)
    holdout = [(0, last_start('holdout_cosine_init'))] if last_start('holdout_cosine_init') is not None else []
    holdout += [(epoch, r['holdout_cosine']) for epoch, r in epochs if r.get('holdout_cosine') is not None]
    entries = {
        'loss_by_epoch': {'epoch': [e for e, _ in epochs], 'loss': [r['loss'] for _, r in epochs],
                          'lr': [r.get('lr') for _, r in epochs]} if epochs else None,
        'online_knn': {'epoch': [e for e, _ in knn_epochs], **{k: [knn.get(k) for _, knn in knn_epochs] for k in ks}}
        if knn_epochs else None,
        'online_knn_teacher': last_start('knn_teacher'),
        'online_knn_init': last_start('knn_init'),
        'holdout_cosine': {'epoch': [e for e, _ in holdout], 'cosine': [c for _, c in holdout]} if holdout else None,
    }
    return entries, [(epoch - 1 + step / r['steps'], r['loss']) for (epoch, step), r in windows]


def read_imitation(folder):
    """{epoch: mean cosine} and the split, from eval_imitation.py's files in ``folder`` (a file without an
    epoch, imitation_epoch_x.json, is left out); (None, None) without any."""
    names = sorted(n for n in os.listdir(folder) if n.endswith('.json')) if os.path.isdir(folder) else []
    results = [read_result(os.path.join(folder, name)) for name in names]
    results = sorted((r for r in results if r.get('epoch') is not None), key=lambda r: r['epoch'])
    if not results:
        return None, None
    return {str(r['epoch']): r['mean_cosine'] for r in results}, results[-1].get('split')


def collect(exp_dir, wall_time=None, **sources):
    """(report.json's dict, the loss by window for the picture) for ``exp_dir``; ``sources`` as source_paths."""
    if not os.path.isdir(exp_dir):
        raise SimRegError(f'{exp_dir} is not a folder: pass an experiment directory (<base_dir>/exp/<exp>)')
    paths = source_paths(exp_dir, **sources)
    knn = {name: read_result(paths[name]) for name in ('teacher_knn', 'before_knn', 'after_knn')}
    linear = read_result(paths['linear'])
    entries, windows = training_curves(read_result(paths['log'], read_json_log) or [])
    cosine, split = read_imitation(paths['imitation'])
    dense = {key: read_result(paths[name]) for key, name in DENSE.items()}
    report = {
        'teacher_knn': knn['teacher_knn'] and knn['teacher_knn']['majority_top1'],
        'student_knn_before': knn['before_knn'] and knn['before_knn']['majority_top1'],
        'student_knn_after': knn['after_knn'] and knn['after_knn']['majority_top1'],
        'student_knn_after_epoch': knn['after_knn'] and knn['after_knn'].get('settings', {}).get('epoch'),
        'linear_top1': linear and linear['best']['top1'],
        'linear_best_epoch': linear and linear['best']['epoch'],
        'imitation_cosine': cosine,
        'imitation_split': split,
        # eval_dense.py's segmentation-probe mIoU (%) of the teacher and of the student before and after
        'dense_miou': {key: r and r['miou'] for key, r in dense.items()} if any(dense.values()) else None,
        'wall_time_s': wall_time,
        **entries,
        'exp_dir': os.path.abspath(exp_dir),
    }
    return report, windows


def plot_loss(ax, report, windows):
    if windows:
        ax.plot(*zip(*windows), color='C0', alpha=0.35, linewidth=1, label='per window')
    curve = report['loss_by_epoch']
    ax.plot(curve['epoch'], curve['loss'], 'o-', color='C0', label='epoch mean')
    ax.set(title='Training loss', xlabel='epoch', ylabel='regression loss')


def plot_knn(ax, report):
    """The student's online 1-NN by epoch against the teacher's and the untrained student's (lines: online when
    logged, else the final evaluation's); the final evaluation's markers: trained student (star), linear probe
    (diamond), teacher (triangle) at the last epoch, untrained student (cross) at epoch 0."""
    online, curve = report['online_knn'], report['loss_by_epoch']
    x = (curve['epoch'][-1] if curve else report['student_knn_after_epoch']) or 0  # the last epoch trained
    if online and online.get('1'):
        start = [(0, report['online_knn_init']['1'])] if report['online_knn_init'] else []
        ax.plot(*zip(*start, *zip(online['epoch'], online['1'])), 'o-', color='C0', label='student, online k-NN')
    lines = [('online_knn_teacher', 'teacher_knn', 'teacher', dict(color='C2', ls='--')),
             ('online_knn_init', 'student_knn_before', 'untrained student', dict(color='C7', ls=':'))]
    for number, (online_key, final_key, what, style) in enumerate(lines):
        use_online = bool(report[online_key]) and bool(online)
        source = 'online' if use_online else 'final eval'
        values = (report[online_key] if use_online else report[final_key]) or {}
        # one teacher's {"1", "20"}, or several teachers' {head: {"1", "20"}} (a line each)
        for suffix, value in [('', values)] if '1' in values else [(f' {name}', v) for name, v in values.items()]:
            ax.axhline(value['1'], linewidth=1.5, label=f"{what}{suffix} ({source}): {value['1']:.1f}", **style)
        if use_online and report[final_key]:
            value = report[final_key]['1']
            ax.plot([x if number == 0 else 0], [value], '^' if number == 0 else 'X', color=style['color'],
                    markersize=9, label=f'{what} (final eval): {value:.1f}')
    if report['student_knn_after']:
        value = report['student_knn_after']['1']
        ax.plot([x], [value], '*', color='C3', markersize=14, label=f'trained student (final eval): {value:.1f}')
    if report['linear_top1'] is not None:
        ax.plot([x], [report['linear_top1']], 'D', color='C1', markersize=7,
                label=f"linear probe top-1: {report['linear_top1']:.1f}")
    ax.set(title='k-NN top-1 (1-NN) on val', xlabel='epoch', ylabel='top-1 (%)')
    ax.set_xlim(left=-0.4, right=max(x, 1) + 0.5)
    ax.set_ylim(bottom=0, top=min(100.0, ax.get_ylim()[1] * 1.4))  # from 0, with room for the legend


def plot_imitation(ax, report):
    """cos(head, teacher) by epoch: eval_imitation.py's on its split, and the one training logs on its held-out
    training images (--holdout)."""
    cosine, holdout = report['imitation_cosine'] or {}, report['holdout_cosine']
    epochs = sorted(cosine, key=int)
    if cosine:
        ax.plot([int(e) for e in epochs], [cosine[e] for e in epochs], 'o-', color='C4',
                label=f"student head on {report['imitation_split']}")
    for e in epochs:
        ax.annotate(f'{cosine[e]:.3f}', (int(e), cosine[e]), textcoords='offset points', xytext=(0, 8),
                    ha='center')
    if holdout:
        ax.plot(holdout['epoch'], holdout['cosine'], 's--', color='C5', label='student head on held-out train images')
    lowest = min([*cosine.values(), *(holdout['cosine'] if holdout else [])])
    ax.set(title='Imitation of the teacher', xlabel='epoch', ylabel='mean cos(head, teacher)',
           ylim=(min(0.0, lowest - 0.05), 1.05))


def plot_dense(ax, report):
    """The segmentation probe's mIoU of the teacher, the untrained student and the trained student, as bars."""
    names = {'teacher': 'teacher', 'student_before': 'untrained\nstudent', 'student_after': 'trained\nstudent'}
    shown = [(names[key], value) for key, value in report['dense_miou'].items() if value is not None]
    bars = ax.bar([name for name, _ in shown], [value for _, value in shown], color=['C2', 'C7', 'C3'][:len(shown)])
    ax.bar_label(bars, fmt='%.1f')
    ax.set(title='Segmentation probe on val (eval_dense.py)', ylabel='mIoU (%)', ylim=(0, 100))


def panels(report):
    """The names of the panels the report has data for, in their order."""
    knn = any(report[key] for key in ('teacher_knn', 'student_knn_before', 'student_knn_after', 'online_knn',
                                      'online_knn_teacher', 'online_knn_init')) or report['linear_top1'] is not None
    return [name for name, present in [('loss', report['loss_by_epoch']), ('knn', knn),
                                       ('imitation', report['imitation_cosine'] or report['holdout_cosine']),
                                       ('dense', report['dense_miou'])]
            if present]


def render_png(report, windows):
    """The PNG (bytes) of the report's panels, drawn with matplotlib's Agg backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise SimRegError('matplotlib is needed for report.png: pip install -r requirements.txt') from None
    names = panels(report)
    fig = Figure(figsize=(PANEL_INCHES[0] * max(len(names), 1), PANEL_INCHES[1]), dpi=DPI, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names):
        {'loss': lambda: plot_loss(ax, report, windows), 'knn': lambda: plot_knn(ax, report),
         'imitation': lambda: plot_imitation(ax, report), 'dense': lambda: plot_dense(ax, report)}[name]()
        ax.grid(alpha=0.3)
        if name != 'dense':  # the others are by epoch, with a legend
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize='small')
    if not names:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, 'no training log or evaluation results found', ha='center', va='center')
    wall = report['wall_time_s']
    fig.suptitle(os.path.basename(report['exp_dir'].rstrip(os.sep)) +
                 (f'  (wall time {wall / 60:.1f} min)' if wall is not None else ''))
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=DPI)
    return buffer.getvalue()


def print_table(report):
    """The table of the results the report has."""
    rows = []
    for key, what in [('teacher_knn', 'teacher k-NN top-1 (1-NN / 20-NN)'),
                      ('student_knn_before', 'student k-NN before distillation'),
                      ('student_knn_after', 'student k-NN after distillation')]:
        if report[key]:
            rows.append((what, f"{report[key]['1']:.1f} / {report[key]['20']:.1f}"))
    if report['linear_top1'] is not None:
        rows.append(('student linear probe top-1', f"{report['linear_top1']:.1f}"))
    if report['imitation_cosine']:
        cosine = report['imitation_cosine']
        first, last = min(cosine, key=int), max(cosine, key=int)
        rows.append((f"cos(head, teacher) on {report['imitation_split']}, epoch {first} -> {last}",
                     f'{cosine[first]:.3f} -> {cosine[last]:.3f}'))
    if report['holdout_cosine']:
        holdout = report['holdout_cosine']
        rows.append((f"cos(head, teacher) on held-out train images, epoch {holdout['epoch'][0]} -> "
                     f"{holdout['epoch'][-1]}", f"{holdout['cosine'][0]:.3f} -> {holdout['cosine'][-1]:.3f}"))
    if report['dense_miou']:
        teacher, before, after = ('-' if v is None else f'{v:.1f}' for v in report['dense_miou'].values())
        rows.append(('dense probe mIoU: teacher / student before -> after', f'{teacher} / {before} -> {after}'))
    if report['wall_time_s'] is not None:
        rows.append(('wall time', f"{report['wall_time_s'] / 60:.1f} min"))
    if not rows:
        print('\n(no evaluation results to tabulate)')
        return
    width = max(len(what) for what, _ in rows)
    print('\n' + '=' * (width + 20))
    for what, value in rows:
        print(f'{what:<{width}}  {value}')
    print('=' * (width + 20))


def get_args_parser():
    p = argparse.ArgumentParser('Report on an experiment: a table, report.json and report.png', add_help=True)
    p.add_argument('exp_dir', help='exp/<exp>: the experiment directory (report.json and report.png go there)')
    p.add_argument('--wall_time', type=float, help='seconds the whole run took (the demo passes it)')
    for name, default in SOURCES.items():
        p.add_argument(f'--{name}', help=f'default: EXP_DIR/{default}; relative paths are taken from EXP_DIR')
    return p


def main(args):
    """Print the table, write report.json and report.png; returns the report's dict."""
    if args.wall_time is not None and not math.isfinite(args.wall_time):
        raise SimRegError(f'--wall_time {args.wall_time}: give the seconds as a finite number')
    report, windows = collect(args.exp_dir, args.wall_time, **{name: getattr(args, name) for name in SOURCES})
    print_table(report)
    json_path, png_path = os.path.join(args.exp_dir, 'report.json'), os.path.join(args.exp_dir, 'report.png')
    write_file_atomic(json.dumps(report, indent=2) + '\n', json_path)
    write_file_atomic(render_png(report, windows), png_path)
    print(f'report: {json_path}, {png_path}')
    log_report(args.exp_dir)  # to the runs of train_student.py --log_to, if any
    return report


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
