"""Checkpoints a cluster cannot spoil: only finite states are written and resumed, one run per experiment (its
lock), a stop signal from main's first line ends with exit 75, and files get the umask's permissions."""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, make_image_folder, read_json, train_log, write_teacher_checkpoint
from utils.checkpoint import lock_experiment, non_finite, release_experiment_locks, save_atomic, write_file_atomic
from utils.errors import RESUME_EXIT_CODE, SimRegError
from utils.training import Checkpointer

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


def sha256(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def folder_digests(folder):
    return {name: sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def temp_files(folder):
    return [p.name for p in folder.rglob('*') if p.name.endswith('.tmp')]


# ---------------------------------------------------------------- item 1: nothing non-finite is written

def test_non_finite_names_every_tensor_that_is_not_finite():
    state = {'state_dict': {'a': torch.ones(3), 'b': torch.tensor([1.0, float('nan')]), 'n': torch.tensor(5)},
             'optimizer': {'state': {0: {'momentum_buffer': torch.tensor([float('inf')])}}}, 'epoch': 3}
    assert non_finite(state) == ['optimizer.state.0.momentum_buffer', 'state_dict.b']
    assert non_finite({'state_dict': {'a': torch.ones(2)}, 'args': {'lr': 0.1}}) == []


class Meter(SimpleNamespace):
    def state_dict(self):
        return {'step': self.step, 'epoch_sum': self.epoch_sum}


def checkpointer(ckpt_dir, weights, resumed=None):
    args = SimpleNamespace(ckpt_every_steps=1, ckpt_every_min=0, save_freq=10, epochs=2)
    stop = SimpleNamespace(agreed=lambda: False, signal=None)
    start = {'epoch': 1, 'step': 0, **({'path': resumed} if resumed else {})}
    state_fn = lambda epoch, meter=None: {'epoch': epoch, 'state_dict': {'w': weights},
                                          **({'meter': meter.state_dict()} if meter else {})}
    return Checkpointer(str(ckpt_dir), state_fn, args, stop, start)


def test_a_state_that_is_not_finite_is_not_written_and_the_last_good_one_is_kept(tmp_path):
    """Weights gone non-finite with a finite loss (at an epoch end or inside one): one line, no write, no temp file."""
    weights = torch.ones(4)
    ckpt = checkpointer(tmp_path, weights)
    ckpt.save(1)
    before = folder_digests(tmp_path)
    weights[2] = float('inf')
    with pytest.raises(SimRegError, match=r'the state \(1 tensor \(state_dict.w\)\) is not finite after epoch 2: '
                                          r'training diverged; nothing was written'):
        ckpt.save(2)
    with pytest.raises(SimRegError, match='lower --learning_rate .* then --resume auto'):
        ckpt.after_step(Meter(epoch=2, step=1, steps=3, epoch_sum=torch.zeros(1)))
    assert folder_digests(tmp_path) == before and not temp_files(tmp_path)


def test_weights_whose_first_step_has_a_non_finite_loss_are_set_aside(tmp_path):
    """A checkpoint written inside an epoch, and the very next step's loss is NaN: its weights diverge at once
    (a huge but finite step), so it is renamed last.pth.diverged and --resume auto takes the one before."""
    weights = torch.ones(4)
    ckpt = checkpointer(tmp_path, weights)
    ckpt.after_step(Meter(epoch=1, step=1, steps=3, epoch_sum=torch.tensor([0.5])))
    written = sha256(tmp_path / 'last.pth')
    with pytest.raises(SimRegError, match='the loss is not finite at epoch 1 step 2: .* the first step from the '
                                          'weights of last.pth already had a non-finite loss: renamed'):
        ckpt.after_step(Meter(epoch=1, step=2, steps=3, epoch_sum=torch.tensor([float('nan')])))
    assert sorted(os.listdir(tmp_path)) == ['last.pth.diverged'] and sha256(tmp_path / 'last.pth.diverged') == written
    # a NaN loss later than the first step after the write does not blame the written weights
    ckpt = checkpointer(tmp_path, weights)
    ckpt.after_step(Meter(epoch=1, step=1, steps=3, epoch_sum=torch.tensor([0.5])))
    ckpt.every_steps = 5
    ckpt.after_step(Meter(epoch=1, step=2, steps=3, epoch_sum=torch.tensor([0.7])))
    ckpt.every_steps = 1
    with pytest.raises(SimRegError, match='the last good checkpoint is kept'):
        ckpt.after_step(Meter(epoch=1, step=3, steps=4, epoch_sum=torch.tensor([float('nan')])))
    assert (tmp_path / 'last.pth').exists()


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp('relckpt')
    make_image_folder(root / 'data', n_classes=3, per_class=8, size=40, splits=('train',))
    write_teacher_checkpoint(root / 'T.pth')
    return root


def train_cmd(ws, exp, *extra):
    """The issue's $T: 3 steps of 8 images an epoch."""
    return [sys.executable, 'train_student.py', str(ws / 'data'), '--arch_teacher', 'resnet18', '--teacher_weights',
            str(ws / 'T.pth'), '--arch_student', 'resnet18', '--image_size', '32', '--batch_size', '8',
            '--num_workers', '0', '--single_aug', '--weak_weak', '--epochs', '1', '--base_dir', str(ws / 'runs'),
            '--exp', exp, *extra]


def run(cmd, expect, **env):
    result = subprocess.run(cmd, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def one_line(result, *fragments):
    """The last stderr line is the one error line, with ``fragments``, and there is no traceback."""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and 'Traceback' not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def assert_all_finite(ckpt_dir):
    for path in ckpt_dir.glob('*.pth'):
        assert non_finite(torch.load(path, weights_only=True)) == [], path


@pytest.mark.slow
def test_divergence_leaves_no_non_finite_checkpoint_and_resume_auto_continues(ws):
    """The issue's repro (lr 1e30, last.pth every step, the loss checked every 100 steps): exit 2 with one line,
    no checkpoint that is not finite (step 1's, whose weights (~1e29) gave the NaN, set aside); --resume auto
    with a sane lr continues from the last good checkpoint and finishes."""
    ckpt_dir = ws / 'runs' / 'exp' / 'div' / 'checkpoints'
    diverged = run(train_cmd(ws, 'div', '--learning_rate', '1e30', '--ckpt_every_steps', '1', '--print_freq', '100',
                             '--epochs', '2'), expect=2)
    one_line(diverged, 'the loss is not finite at epoch 1 step 2', 'training diverged', 'nothing was written',
             'last.pth', 'renamed', '--resume auto')
    assert_all_finite(ckpt_dir)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ['ckpt_epoch_0.pth', 'last.pth.diverged']
    untrained = sha256(ckpt_dir / 'ckpt_epoch_0.pth')
    again = run(train_cmd(ws, 'div', '--learning_rate', '0.05', '--ckpt_every_steps', '1', '--print_freq', '100',
                          '--epochs', '2', '--resume', 'auto'), expect=0)
    assert f'resumed from {ckpt_dir / "ckpt_epoch_0.pth"} (epoch 0)' in again.stdout
    start = train_log(ws / 'runs' / 'exp' / 'div', 'start')[-1]
    assert (start['resumed_from'], start['start_epoch'], start['start_step']) == (0, 1, 0)
    assert torch.load(ckpt_dir / 'last.pth', weights_only=True)['epoch'] == 2
    assert_all_finite(ckpt_dir)
    assert sha256(ckpt_dir / 'ckpt_epoch_0.pth') == untrained and not temp_files(ckpt_dir)


@pytest.mark.slow
def test_resume_skips_a_checkpoint_that_is_not_finite(ws):
    """A last.pth holding NaN (written by an older version, or damaged): --resume <it> is one line, exit 2, nothing
    changed; --resume auto says so, skips it and resumes from the newest finite one."""
    exp_dir = ws / 'runs' / 'exp' / 'nan_last'
    run(train_cmd(ws, 'nan_last', '--save_freq', '1'), expect=0)
    last = exp_dir / 'checkpoints' / 'last.pth'
    state = torch.load(last, weights_only=True)
    next(v for v in state['state_dict'].values() if v.is_floating_point()).view(-1)[0] = float('nan')
    torch.save(state, last)
    before = folder_digests(exp_dir / 'checkpoints')
    refused = run(train_cmd(ws, 'nan_last', '--epochs', '2', '--resume', str(last)), expect=2)
    one_line(refused, f'--resume {last} is not finite (1 tensor (state_dict.', '--resume auto takes the newest')
    assert folder_digests(exp_dir / 'checkpoints') == before
    resumed = run(train_cmd(ws, 'nan_last', '--epochs', '2', '--resume', 'auto'), expect=0)
    assert f'note: skipping {last}: it is not finite (1 tensor' in resumed.stdout + resumed.stderr
    assert f'resumed from {exp_dir / "checkpoints" / "ckpt_epoch_1.pth"}' in resumed.stdout
    assert_all_finite(exp_dir / 'checkpoints')


# ---------------------------------------------------------------- items 2 and 7: the lock, signals at start-up

GATED = '''
import os, sys, time
import torch
import train_student
from utils.errors import exit_on_user_error
gate, where = os.environ['GATE'], os.environ.get('GATE_AT', 'build_dataset')
def gated(real):
    def wait(*args, **kwargs):
        if not os.path.exists(gate + '.waiting'):
            open(gate + '.waiting', 'w').close()
            while not os.path.exists(gate):
                time.sleep(0.02)
        return real(*args, **kwargs)
    return wait
if where == 'build_dataset':
    train_student.build_dataset = gated(train_student.build_dataset)
else:  # inside the first checkpoint write, its temp file open
    torch.save = gated(torch.save)
exit_on_user_error(lambda: train_student.main(train_student.get_args_parser().parse_args(sys.argv[1:])))
'''


def start_gated(ws, tmp_path, exp, *extra, at='build_dataset', **env):
    """train_student.py that stops at ``at`` (the data listing: rank 0 holds the lock by then) until the test
    creates the gate file; returns (process, gate path)."""
    gate = tmp_path / f'gate_{exp}'
    cmd = [sys.executable, '-c', GATED, *train_cmd(ws, exp, *extra)[2:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, 'GATE': str(gate), 'GATE_AT': at, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(f'{gate}.waiting'):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, gate


def test_the_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    lock_experiment(str(tmp_path))
    try:
        held = (tmp_path / 'run.lock').read_text()
        assert held.startswith(f'pid {os.getpid()} on host {socket.gethostname()}, since ')
        with pytest.raises(SimRegError, match=f'{tmp_path} is in use by another run \\(pid {os.getpid()} on host '
                                              f'{socket.gethostname()}, since .*\\): wait for it to end'):
            lock_experiment(str(tmp_path))  # another open file: flock refuses it as it would another process
    finally:
        release_experiment_locks()
    lock_experiment(str(tmp_path))
    release_experiment_locks()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A loader worker forked by the holder lingers after a kill -9 of its parent: it must not hold the lock."""
    lock_experiment(str(tmp_path))
    read, write = os.pipe()
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # the child (its fork hooks have run) says so, waits until the parent has let go, then exits
        os.write(ready_write, b'r')
        os.read(read, 1)
        os._exit(0)
    os.read(ready_read, 1)
    try:
        release_experiment_locks()  # the parent's run ends (as a kill would end it); the child still runs
        lock_experiment(str(tmp_path))  # refused if the child's copy of the descriptor still held the lock
        release_experiment_locks()
    finally:
        os.write(write, b'x')
        os.waitpid(child, 0)
        for fd in (read, write, ready_read, ready_write):
            os.close(fd)


@pytest.mark.slow
def test_two_runs_on_one_experiment_one_is_refused_and_the_other_is_whole(ws, tmp_path):
    """Run A (lr 0.05) holds the experiment; B (a fresh start, lr 0.01) and C (a resubmitted --resume auto) are
    refused in one line naming A's host and pid, exit 2; C does not touch the temp file of A's write in flight;
    A finishes with its own checkpoints, train_args.json, log and one TensorBoard file."""
    exp_dir = ws / 'runs' / 'exp' / 'same'
    a, gate = start_gated(ws, tmp_path, 'same', '--learning_rate', '0.05', '--epochs', '2')
    holder = f'pid {a.pid} on host {socket.gethostname()}'
    b = run(train_cmd(ws, 'same', '--learning_rate', '0.01', '--epochs', '2'), expect=2)
    one_line(b, f'{exp_dir} is in use by another run ({holder}, since', 'wait for it to end', 'another --exp')
    in_flight = exp_dir / 'checkpoints' / '.last.pth8k2j.tmp'
    in_flight.write_bytes(b'a write in flight')
    c = run(train_cmd(ws, 'same', '--learning_rate', '0.05', '--epochs', '2', '--resume', 'auto'), expect=2)
    one_line(c, f'in use by another run ({holder}')
    assert in_flight.read_bytes() == b'a write in flight' and 'removed' not in c.stdout
    gate.touch()
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, out[-2000:] + err[-2000:]
    in_flight.unlink()
    assert read_json(exp_dir / 'logs' / 'train_args.json')['learning_rate'] == 0.05
    assert len(train_log(exp_dir, 'start')) == 1 and len(train_log(exp_dir, 'epoch')) == 2
    assert len(list((exp_dir / 'logs').glob('events.out.tfevents.*'))) == 1
    for path in (exp_dir / 'checkpoints').iterdir():
        assert torch.load(path, weights_only=True)['args']['learning_rate'] == 0.05, path
    assert sorted(p.name for p in (exp_dir / 'checkpoints').iterdir()) == ['ckpt_epoch_0.pth', 'ckpt_epoch_2.pth',
                                                                         'last.pth']


@pytest.mark.slow
def test_a_killed_holder_does_not_block_the_next_start(ws, tmp_path):
    exp_dir = ws / 'runs' / 'exp' / 'killed_holder'
    a, _ = start_gated(ws, tmp_path, 'killed_holder')
    a.kill()
    a.communicate()
    assert f'pid {a.pid} ' in (exp_dir / 'run.lock').read_text()
    b = subprocess.Popen(train_cmd(ws, 'killed_holder', '--resume', 'auto'), cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = b.communicate(timeout=300)
    assert b.returncode == 0, out[-2000:] + err[-2000:]
    assert (exp_dir / 'run.lock').read_text().startswith(f'pid {b.pid} on host ')


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1], ids=['SIGTERM', 'SIGUSR1'])
def test_a_signal_during_start_up_exits_75_and_requeues(ws, tmp_path, signum):
    """A stop signal while the run lists its data (before any step): exit 75 at once, one line, the SLURM job
    requeued, no temp file; the lock is free again."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    (bin_dir / 'scontrol').chmod(0o755)
    exp = f'startup_{signum.name}'
    a, _ = start_gated(ws, tmp_path, exp, SLURM_JOB_ID='4242', PATH=f'{bin_dir}:{ENV["PATH"]}')
    a.send_signal(signum)
    out, err = a.communicate(timeout=60)
    assert a.returncode == RESUME_EXIT_CODE, out[-2000:] + err[-2000:]
    assert f'==> {signum.name} received before training started: exit 75; run again with --resume auto' in out + err
    assert 'Traceback' not in err
    assert (tmp_path / 'scontrol.calls').read_text() == 'requeue 4242\n'
    assert not temp_files(ws / 'runs' / 'exp' / exp)
    lock_experiment(str(ws / 'runs' / 'exp' / exp))
    release_experiment_locks()


@pytest.mark.slow
def test_a_signal_during_the_first_checkpoint_write_exits_75_without_a_temp_file(ws, tmp_path):
    """SIGTERM while ckpt_epoch_0.pth is being written (its temp file open): the write completes, the run stops
    after its first step with last.pth written, exit 75, and no temp file is left."""
    ckpt_dir = ws / 'runs' / 'exp' / 'first_write' / 'checkpoints'
    a, gate = start_gated(ws, tmp_path, 'first_write', at='torch.save')
    assert [p.name for p in ckpt_dir.iterdir()][0].startswith('.ckpt_epoch_0.pth')
    a.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    gate.touch()
    out, err = a.communicate(timeout=120)
    assert a.returncode == RESUME_EXIT_CODE, out[-2000:] + err[-2000:]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ['ckpt_epoch_0.pth', 'last.pth']
    assert torch.load(ckpt_dir / 'last.pth', weights_only=True)['position'] == {'epoch': 1, 'step': 1}


# ---------------------------------------------------------------- item 10: the umask's permissions

@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_are_written_with_the_umask_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_atomic({'w': torch.ones(2)}, tmp_path / 'ckpt.pth')
        write_file_atomic('{}', tmp_path / 'results.json')
        write_file_atomic(b'\x89PNG', tmp_path / 'report.png')
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == \
        {'ckpt.pth': mode, 'results.json': mode, 'report.png': mode}


@pytest.mark.slow
def test_training_outputs_are_0644_under_umask_022(ws):
    run(['sh', '-c', 'umask 022 && exec "$@"', 'sh', *train_cmd(ws, 'modes')], expect=0)
    exp_dir = ws / 'runs' / 'exp' / 'modes'
    modes = {p.name: p.stat().st_mode & 0o777 for p in exp_dir.rglob('*') if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize('finished', [False, True])
def test_the_watchdog_exits_75_only_when_the_stop_does_not_finish(finished):
    """A run stuck after a stop signal ends with RESUME_EXIT_CODE once the deadline passes; one that finishes in
    time is left alone."""
    code = ('import threading, time\n'
            'from utils.training import start_watchdog\n'
            'done = threading.Event()\n'
            'start_watchdog(done, 0.2, lambda: print("stuck", flush=True))\n'
            f'done.set() if {finished} else None\n'
            'time.sleep(3)\n')  # a stuck run that the watchdog does not end exits 0 here
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == ((0, '') if finished else (RESUME_EXIT_CODE, 'stuck\n'))
