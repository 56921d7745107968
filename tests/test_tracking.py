"""--log_to wandb,mlflow: W&B in offline mode and MLflow's local file store record the loss series of log.jsonl,
the arguments and the report; a resumed run continues the same tracked runs; a missing library is one line."""
import glob
import json
import os
import signal
import struct
import sys

import pytest
import torch

from conftest import make_image_folder, read_json, resumed_from, train, train_log
from models.backbones import build_backbone
from utils.errors import exit_on_user_error


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    make_image_folder(tmp_path / 'data', n_classes=2, per_class=8, size=40, splits=('train',))
    torch.manual_seed(0)
    torch.save({'state_dict': build_backbone('resnet18').state_dict()}, tmp_path / 'teacher.pth')
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb'))
    monkeypatch.setenv('MLFLOW_TRACKING_URI', f'file://{tmp_path}/mlruns')
    for name in ('WANDB_PROJECT', 'MLFLOW_EXPERIMENT_NAME'):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / 'wandb').mkdir()
    return tmp_path


def train_args(ws, *extra):
    return ['--base_dir', str(ws / 'runs'), '--exp', 'tracked', '--arch_teacher', 'resnet18', '--arch_student',
            'resnet18', '--teacher_weights', str(ws / 'teacher.pth'), '--batch_size', '8', '--image_size', '32',
            '--num_workers', '0', '--print_freq', '1', '--single_aug', '--log_to', 'wandb,mlflow', *extra,
            str(ws / 'data')]


# W&B keeps an offline run in a .wandb file: a LevelDB log (github.com/google/leveldb doc/log_format.md: 32 KiB
# blocks of records with a 7-byte header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after a 7-byte
# ':W&B' header, each record a wandb.proto.wandb_internal_pb2.Record. wandb has no public reader for it.
def wandb_records(path):
    from wandb.proto.wandb_internal_pb2 import Record
    data, block = open(path, 'rb').read(), 32768
    assert data[:4] == b':W&B'
    position, pieces = 7, b''
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is zero padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack('<IHB', data[position:position + 7])
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pieces)
            pieces = b''
            yield record


def wandb_runs(ws):
    """[(run id, config, [history rows], [saved files])] of each offline run (a resume adds one), oldest first."""
    runs = []
    for folder in sorted(glob.glob(str(ws / 'wandb' / 'wandb' / 'offline-run-*'))):
        run_id, config, rows = None, {}, []
        for record in wandb_records(glob.glob(os.path.join(folder, '*.wandb'))[0]):
            kind = record.WhichOneof('record_type')
            if kind == 'run':
                run_id, started = record.run.run_id, record.run.start_time.ToNanoseconds()
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == 'history':
                rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        runs.append((started, run_id, config, rows, sorted(os.listdir(os.path.join(folder, 'files')))))
    return [run[1:] for run in sorted(runs)]


def jsonl_series(exp_dir):
    """log.jsonl's window losses by TensorBoard's step, and its epoch losses by epoch."""
    windows = {(w['epoch'] - 1) * w['steps'] + w['step']: w['loss'] for w in train_log(exp_dir, 'window')}
    return windows, {e['epoch']: e['loss'] for e in train_log(exp_dir, 'epoch')}


@pytest.mark.slow
def test_wandb_and_mlflow_record_the_loss_series_and_a_resume_continues_them(workspace, one_thread, monkeypatch):
    import mlflow
    import train_student
    from evaluation import report
    steps, train_step = [], train_student.train_step

    def stop_in_the_third_step(*args):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args)
    monkeypatch.setattr(train_student, 'train_step', stop_in_the_third_step)
    exp_dir = workspace / 'runs' / 'exp' / 'tracked'
    with pytest.raises(SystemExit) as stopped:  # SIGTERM in the third step: a checkpoint after it, exit 75
        train(train_args(workspace, '--epochs', '2'))
    assert stopped.value.code == 75
    ids = read_json(exp_dir / 'logs' / 'tracking.json')
    assert ids['mlflow']['tracking_uri'] == f'file://{workspace}/mlruns'
    # the report, with a k-NN result: report.py gives its files and numbers to the tracked runs
    os.makedirs(exp_dir / 'features')
    (exp_dir / 'features' / 'knn_results.json').write_text(json.dumps({'majority_top1': {'1': 50.0, '20': 62.5}}))
    report.main(report.get_args_parser().parse_args([str(exp_dir)]))
    monkeypatch.setattr(train_student, 'train_step', train_step)
    train(train_args(workspace, '--epochs', '2', '--resume', 'auto'))
    assert train_log(exp_dir, 'start')[-1]['start_step'] == 1 and resumed_from(exp_dir) == 1
    assert read_json(exp_dir / 'logs' / 'tracking.json') == ids
    windows, epochs = jsonl_series(exp_dir)
    assert sorted(windows) == list(range(1, 5)) and sorted(epochs) == [1, 2]  # 16 images / 8 = 2 steps an epoch

    runs = wandb_runs(workspace)  # training, the report, the resumed training
    assert [run[0] for run in runs] == [ids['wandb']['run_id']] * 3
    assert runs[0][1]['exp'] == 'tracked' and runs[0][1]['log_to'] == 'wandb,mlflow'
    rows = [row for run in runs for row in run[2]]
    assert [(r['train/step'], r['train/loss']) for r in rows if 'train/loss' in r] == sorted(windows.items())
    assert [(r['epoch'], r['epoch/loss']) for r in rows if 'epoch/loss' in r] == sorted(epochs.items())
    assert {'report.png', 'report.json'} <= set(runs[1][3]) and {'report.png', 'report.json'} <= set(runs[2][3])

    client = mlflow.tracking.MlflowClient(ids['mlflow']['tracking_uri'])
    run_id = ids['mlflow']['run_id']
    history = lambda key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    assert history('train/loss') == sorted(windows.items())
    assert history('epoch/loss') == sorted(epochs.items())
    assert history('results/student_knn_after_1') == [(0, 50.0)] * 2  # at the report, at the resumed run's end
    run = client.get_run(run_id)
    assert run.info.status == 'FINISHED' and run.info.run_name == 'tracked'
    assert run.data.params['arch_student'] == 'resnet18' and run.data.params['resume'] == ''  # the first start's
    assert {a.path for a in client.list_artifacts(run_id)} == {'report.png', 'report.json'}
    experiment = client.get_experiment_by_name('simreg').experiment_id
    assert len(client.search_runs([experiment])) == 1
    # starting the experiment again starts new tracked runs
    train(train_args(workspace, '--epochs', '1', '--overwrite'))
    again = read_json(exp_dir / 'logs' / 'tracking.json')
    assert all(again[name]['run_id'] != ids[name]['run_id'] for name in ('wandb', 'mlflow'))
    assert wandb_runs(workspace)[-1][0] == again['wandb']['run_id'] and len(client.search_runs([experiment])) == 2


@pytest.mark.parametrize('library, package', [('wandb', 'wandb'), ('mlflow', 'mlflow-skinny')])
def test_a_missing_library_is_one_line_naming_its_package_before_anything_is_written(
        workspace, monkeypatch, capsys, library, package):
    monkeypatch.setitem(sys.modules, library, None)  # import raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: train(train_args(workspace, '--log_to', library)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f'error: --log_to {library} needs the {library} library: pip install {package}\n'
    assert not (workspace / 'runs').exists()


def test_an_unknown_tracker_is_one_line(workspace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: train(train_args(workspace, '--log_to', 'wandb,comet')))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --log_to wandb,comet: 'comet' is not a tracker; give a comma list of " \
                                      "wandb, mlflow\n"


def test_only_rank_0_tracks(tmp_path, monkeypatch):
    import utils.logging
    monkeypatch.setattr(utils.logging, 'is_main_process', lambda: False)
    logs = utils.logging.Logs(str(tmp_path), 1, 'wandb,mlflow')
    assert logs.trackers == [] and logs.tensorboard.trackers == []
    monkeypatch.setattr(utils.logging, 'is_main_process', lambda: True)
    assert [type(t).__name__ for t in utils.logging.Logs(str(tmp_path), 1, 'wandb,mlflow').trackers] == \
        ['WandbRun', 'MlflowRun']
