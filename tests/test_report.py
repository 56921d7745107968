"""evaluation.report: the table, report.json and report.png, on an experiment directory holding what the
demo's scripts wrote (tests/fixtures/report_exp: a real 3-epoch demo's log and evaluation files), on parts of
it, and on a log with the online k-NN in it."""
import json
import os
import shutil
import sys

import pytest

from conftest import ROOT, check_report, check_report_png, read_json, run_command
from evaluation import report as report_module

FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'report_exp')
LOG = os.path.join('logs', 'log.jsonl')


def log_records(exp):
    return [json.loads(line) for line in (exp / LOG).read_text().splitlines()]


def write_log(exp, records):
    (exp / 'logs').mkdir(parents=True, exist_ok=True)
    (exp / LOG).write_text(''.join(json.dumps(r) + '\n' for r in records))


def report_of(exp, *args):
    return report_module.main(report_module.get_args_parser().parse_args([str(exp), *args]))


@pytest.fixture
def exp(tmp_path):
    return shutil.copytree(FIXTURE, tmp_path / 'exp' / 'demo')


def test_command_reports_every_result_of_the_demo(exp):
    result = run_command([sys.executable, '-m', 'evaluation.report', str(exp), '--wall_time', '153'])
    report = check_report(exp, panels=3)
    epochs = [r for r in log_records(exp) if r['event'] == 'epoch']
    assert report['loss_by_epoch'] == {'epoch': [1, 2, 3], 'loss': [r['loss'] for r in epochs],
                                       'lr': [r['lr'] for r in epochs]}
    assert report['teacher_knn'] == {'1': 10.0, '20': 18.333333333333332}  # the fixture's values, by hand
    assert report['linear_top1'] == 10.0 and report['linear_best_epoch'] == 5
    assert report['imitation_cosine'] == {'0': 0.034235674887895584, '3': 0.9227256774902344}
    assert report['student_knn_after_epoch'] == 3 and report['imitation_split'] == 'val'
    assert report['wall_time_s'] == 153.0 and report['exp_dir'] == str(exp)
    assert report['online_knn'] is None and report['online_knn_teacher'] is None
    # the table as the demo always printed it
    table = result.stdout
    for row in ['teacher k-NN top-1 (1-NN / 20-NN)        10.0 / 18.3',
                'student k-NN before distillation         11.7 / 15.0',
                'student k-NN after distillation          13.3 / 5.0',
                'student linear probe top-1               10.0',
                'cos(head, teacher) on val, epoch 0 -> 3  0.034 -> 0.923',
                'wall time                                2.5 min']:
        assert row + '\n' in table, table


def test_training_only_gives_the_loss_curve_and_nulls(exp, capsys):
    for folder in ('features_teacher', 'features_init', 'features', 'linear', 'imitation'):
        shutil.rmtree(exp / folder)
    report = report_of(exp)
    assert report == read_json(exp / 'report.json')
    check_report(exp, panels=1)
    for key in ('teacher_knn', 'student_knn_before', 'student_knn_after', 'student_knn_after_epoch',
                'linear_top1', 'linear_best_epoch', 'imitation_cosine', 'imitation_split', 'wall_time_s',
                'online_knn', 'online_knn_teacher', 'online_knn_init'):
        assert report[key] is None, key
    assert report['loss_by_epoch']['epoch'] == [1, 2, 3]
    assert 'k-NN' not in capsys.readouterr().out


def test_some_results_and_folders_given_as_options(exp, capsys):
    (exp / LOG).unlink()
    shutil.move(exp / 'features_teacher', exp.parent / 'teacher_elsewhere')
    shutil.rmtree(exp / 'linear')
    (exp / 'imitation' / 'imitation_epoch_0.json').unlink()
    report = report_of(exp, '--teacher_knn', str(exp.parent / 'teacher_elsewhere'))
    assert report['teacher_knn'] == read_json(exp.parent / 'teacher_elsewhere' / 'knn_results.json')['majority_top1']
    assert report['loss_by_epoch'] is None and report['linear_top1'] is None
    assert report['imitation_cosine'] == {'3': 0.9227256774902344}
    check_report_png(exp, panels=2)  # k-NN and imitation; no loss curve without a log
    out = capsys.readouterr().out
    assert 'teacher k-NN top-1 (1-NN / 20-NN)' in out and 'linear probe' not in out
    assert 'cos(head, teacher) on val, epoch 3 -> 3  0.923 -> 0.923' in out


def test_online_knn_from_the_log(exp):
    records = log_records(exp)
    online = {1: {'1': 20.0, '20': 22.5}, 3: {'1': 31.25, '20': 30.0}}  # epoch 2 logged none
    for r in records:
        if r['event'] == 'start':
            r.update(knn_teacher={'1': 40.0, '20': 45.0}, knn_init={'1': 12.5, '20': 11.0})
        if r['event'] == 'epoch' and r['epoch'] in online:
            r['knn'] = online[r['epoch']]
    write_log(exp, records)
    linear = read_json(exp / 'linear' / 'linear_results.json')
    linear['best'] = {'top1': 12.5, 'epoch': 4}  # the probe's best, not its last (10.0 at epoch 5)
    (exp / 'linear' / 'linear_results.json').write_text(json.dumps(linear))
    report = report_of(exp)
    assert report['linear_top1'] == 12.5 and report['linear_best_epoch'] == 4
    assert report['online_knn'] == {'epoch': [1, 3], '1': [20.0, 31.25], '20': [22.5, 30.0]}
    assert report['online_knn_teacher'] == {'1': 40.0, '20': 45.0}
    assert report['online_knn_init'] == {'1': 12.5, '20': 11.0}
    check_report(exp, panels=3)
    for folder in ('features_teacher', 'features_init', 'features', 'linear', 'imitation'):
        shutil.rmtree(exp / folder)
    report_of(exp)
    check_report(exp, panels=2)  # the loss and the online k-NN


def test_log_is_read_from_the_last_fresh_run_and_a_redone_epoch_counts_once(exp):
    first = log_records(exp)
    start = next(r for r in first if r['event'] == 'start')
    epoch = lambda e, loss: {'event': 'epoch', 'epoch': e, 'loss': loss, 'lr': 0.1}
    window = lambda e, step, loss: {'event': 'window', 'epoch': e, 'step': step, 'steps': 4, 'loss': loss}
    again = [start, window(1, 2, 9.0), window(1, 4, 8.0), epoch(1, 8.5), epoch(2, 7.0),  # --overwrite
             {**start, 'start_epoch': 2, 'start_step': 0, 'resumed_from': 1}, epoch(2, 6.0), epoch(3, 5.0)]
    write_log(exp, first + again)
    report, windows = report_module.collect(str(exp))
    assert report['loss_by_epoch'] == {'epoch': [1, 2, 3], 'loss': [8.5, 6.0, 5.0], 'lr': [0.1] * 3}
    assert windows == [(0.5, 9.0), (1.0, 8.0)]


def test_bad_experiment_directories_are_one_line_errors(tmp_path, exp):
    result = run_command([sys.executable, '-m', 'evaluation.report', str(tmp_path / 'nowhere')], expect=2)
    assert 'is not a folder' in result.stderr and 'Traceback' not in result.stderr
    (exp / 'linear' / 'linear_results.json').write_text('{"best": ')
    with pytest.raises(report_module.SimRegError, match='cannot read .*linear_results.json'):
        report_of(exp)
    assert not (exp / 'report.json').exists()


def test_dense_probe_results_give_a_row_a_panel_and_dense_miou(exp, capsys):
    assert report_of(exp)['dense_miou'] is None  # the plain demo has no segmentation probe
    capsys.readouterr()
    for folder, miou in [('dense_teacher', 71.25), ('dense_init', 20.5), ('dense', 60.0)]:
        (exp / folder).mkdir()
        (exp / folder / 'dense_results.json').write_text(json.dumps({'miou': miou, 'per_class_iou': [miou]}))
    report = report_of(exp)
    assert report['dense_miou'] == {'teacher': 71.25, 'student_before': 20.5, 'student_after': 60.0}
    assert read_json(exp / 'report.json')['dense_miou'] == report['dense_miou']
    assert 'dense probe mIoU: teacher / student before -> after  71.2 / 20.5 -> 60.0\n' in capsys.readouterr().out
    check_report(exp, panels=4)  # loss, k-NN, imitation and the probe's bars
    shutil.rmtree(exp / 'dense_init')
    assert report_of(exp)['dense_miou'] == {'teacher': 71.25, 'student_before': None, 'student_after': 60.0}
    assert '71.2 / - -> 60.0' in capsys.readouterr().out
