"""Training that a cluster cannot break: the same weights on any number of processes and loader workers,
bit-identical after kill -9 anywhere and --resume auto, and a clean stop on SIGTERM / SIGUSR1."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, build_cache, free_port, make_image_folder, torchrun, train, train_log
from models.backbones import build_backbone
from utils.errors import RESUME_EXIT_CODE

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """36 images of 3 classes at 40 px (2 steps of 16 an epoch), a seeded resnet18 teacher and its cache."""
    root = tmp_path_factory.mktemp('cluster')
    make_image_folder(root / 'data', n_classes=3, per_class=12, size=40, splits=('train',))
    torch.manual_seed(1)
    torch.save({'state_dict': build_backbone('resnet18').state_dict()}, root / 'teacher.pth')
    build_cache(root, 'teacher.npy', '--arch_teacher', 'resnet18', '--image_size', '32', '--batch_size', '8',
                '--num_workers', '0')
    return root


def train_args(ws, exp, *extra, teacher='live'):
    source = (['--teacher_weights', str(ws / 'teacher.pth')] if teacher == 'live' else
              ['--use_cache', '--teacher_feats', str(ws / 'teacher.npy')])
    return [str(ws / 'data'), '--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18',
            '--arch_student', 'resnet18', *source, '--batch_size', '16', '--bn_batch', '4', '--image_size', '32',
            '--num_workers', '1', '--print_freq', '1', '--epochs', '2', '--single_aug', '--weak_weak', *extra]


def final_state(ws, exp):
    return torch.load(ws / 'runs' / 'exp' / exp / 'checkpoints' / 'last.pth', weights_only=True)['state_dict']


def run(cmd, timeout=300):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def largest_relative_difference(a, b):
    """max over the float tensors of |a - b| / |b| (norms); the others (step counts) must be equal."""
    assert a.keys() == b.keys()
    assert all(torch.equal(value, b[key]) for key, value in a.items() if not value.is_floating_point())
    return max(((value - b[key]).norm() / b[key].norm().clamp_min(1e-12)).item()
               for key, value in a.items() if value.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize('teacher', ['live', 'cached'])
def test_same_weights_on_1_2_and_4_processes(ws, teacher):
    """--batch_size 16 --bn_batch 4: 4 ghost groups on 1 process, 2 groups each on 2, plain BatchNorm over 4
    on 4 processes; the same images per step and per sample the same crop, so only summation order differs.
    In float64: in fp32, BatchNorm over 4 samples amplifies the 1e-7 rounding of a batch-size-dependent
    matrix product (the head's first Linear) to 1e-2 within 2 steps, which would hide any real difference."""
    states = {}
    for nproc in (1, 2, 4):
        exp = f'{teacher}_{nproc}'
        argv = train_args(ws, exp, '--precision', 'fp64', teacher=teacher)
        run([sys.executable, 'train_student.py', *argv] if nproc == 1 else torchrun('train_student.py', *argv,
                                                                                    nproc=nproc))
        states[nproc] = final_state(ws, exp)
    for nproc in (2, 4):
        assert largest_relative_difference(states[nproc], states[1]) <= 1e-5, nproc
    # and the runs did learn something different from their start: the comparison is not vacuous
    start = torch.load(ws / 'runs' / 'exp' / f'{teacher}_1' / 'checkpoints' / 'ckpt_epoch_0.pth',
                       weights_only=True)['state_dict']
    assert max(((value - start[key]).norm() / start[key].norm().clamp_min(1e-12)).item()
               for key, value in states[1].items() if value.is_floating_point()) > 1e-3


@pytest.mark.slow
def test_loader_workers_do_not_change_the_weights(ws):
    states = []
    for workers in (0, 1, 3):
        train(train_args(ws, f'workers_{workers}', '--num_workers', str(workers)))
        states.append(final_state(ws, f'workers_{workers}'))
    for state in states[1:]:
        assert all(torch.equal(value, state[key]) for key, value in states[0].items())


# ------------------------------------------------------------------ kill -9 anywhere, signals

def kill_args(ws, exp, *extra):
    """40 images, 5 steps of 8 an epoch, 4 epochs; last.pth after every step."""
    return [str(ws / 'data40'), '--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18',
            '--arch_student', 'resnet18', '--teacher_weights', str(ws / 'teacher.pth'), '--batch_size', '8',
            '--image_size', '32', '--num_workers', '1', '--print_freq', '1', '--epochs', '4', '--single_aug',
            '--weak_weak', '--ckpt_every_steps', '1', *extra]


def global_steps(exp_dir):
    """The (epoch, step) of every window the run's JSON log holds, as one step count (5 steps an epoch)."""
    return [5 * (w['epoch'] - 1) + w['step'] for w in train_log(exp_dir, 'window')]


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope='module')
def kill_ws(ws):
    """The uninterrupted runs, on 1 process ('straight') and 2 ('straight_2')."""
    make_image_folder(ws / 'data40', n_classes=2, per_class=20, size=40, splits=('train',))
    run([sys.executable, 'train_student.py', *kill_args(ws, 'straight')])
    run(torchrun('train_student.py', *kill_args(ws, 'straight_2')))
    return ws


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_same_weights(kill_ws):
    """10 kills at random moments (inside a step, between steps, while last.pth is being written), each
    followed by --resume auto: the finished run equals the uninterrupted one bit for bit, no step but the
    one in flight is lost, and no temp file is left."""
    ws, rng = kill_ws, random.Random(0)
    exp_dir, ckpt_dir = ws / 'runs' / 'exp' / 'killed', ws / 'runs' / 'exp' / 'killed' / 'checkpoints'
    kills = 0
    while True:
        done_before = len(global_steps(exp_dir)) if (exp_dir / 'logs' / 'log.jsonl').exists() else 0
        proc = subprocess.Popen([sys.executable, 'train_student.py', *kill_args(ws, 'killed', '--resume', 'auto')],
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills == 10:
            assert proc.wait(timeout=300) == 0
            break
        started = lambda: len(global_steps(exp_dir)) > done_before if (exp_dir / 'logs' / 'log.jsonl').exists() \
            else False
        if kills % 3 == 2:  # while a checkpoint is being written (not the temp file a kill left: it goes at start)
            stale = set(ckpt_dir.glob('.*.tmp'))
            wait_for(lambda: bool(set(ckpt_dir.glob('.*.tmp')) - stale) or proc.poll() is not None)
        else:  # a random moment once this run has trained a step: inside a step, between steps, in a write
            wait_for(lambda: started() or proc.poll() is not None)
            time.sleep(rng.uniform(0, 0.4))
        assert proc.poll() is None, 'the run finished before its kill: give it more steps'
        proc.kill()
        proc.wait()
        kills += 1
        reached = max(global_steps(exp_dir), default=0)
        resumed = torch.load(ckpt_dir / 'last.pth', weights_only=True) if (ckpt_dir / 'last.pth').exists() else None
        if resumed is not None:  # at most the step in flight (one checkpoint interval) is lost
            position = resumed.get('position', {'epoch': resumed['epoch'] + 1, 'step': 0})
            assert reached - (5 * (position['epoch'] - 1) + position['step']) <= 1
    straight, killed = final_state(ws, 'straight'), final_state(ws, 'killed')
    assert all(torch.equal(value, killed[key]) for key, value in straight.items())
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.endswith('.tmp')]
    starts = train_log(exp_dir, 'start')
    assert len(starts) >= 8 and sum(1 for s in starts if s['start_step'] > 0) >= 3  # resumed inside epochs


def process_tree(pid):
    """``pid`` and all its descendants (from /proc), as a scheduler sees the processes of a job."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_every_process_under_torchrun_checkpoints_and_resumes_exactly(kill_ws, signum):
    """2 processes under torchrun, mid-epoch, the signal sent to every process of the job (torchrun, its
    workers and their loader workers) as a scheduler does: every rank stops after the same step, within
    one step of the signal's agreement, rank 0 writes last.pth once, the ranks exit 75 and no process is left;
    the resumed run ends with the uninterrupted 2-process run's weights, bit for bit."""
    ws = kill_ws
    name = f'signal_{signum.name}'
    exp_dir = ws / 'runs' / 'exp' / name
    env = {**ENV, 'PET_SIGNALS_TO_HANDLE': 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1'}  # as run.sh sets it
    proc = subprocess.Popen(torchrun('train_student.py', *kill_args(ws, name)), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert wait_for(lambda: (exp_dir / 'logs' / 'log.jsonl').exists() and
                    any(w['epoch'] == 2 for w in train_log(exp_dir, 'window')), timeout=120)
    tree = process_tree(proc.pid)
    at_signal = max(global_steps(exp_dir))
    for pid in tree:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    out, _ = proc.communicate(timeout=120)
    stopped = [line for line in out.splitlines() if '==> stopped by' in line]
    assert len(stopped) == 2 and f'exit {RESUME_EXIT_CODE}' in stopped[0], out[-3000:]
    assert len({line.split(' in epoch ')[1] for line in stopped}) == 1  # the same step on both ranks
    state = torch.load(exp_dir / 'checkpoints' / 'last.pth', weights_only=True)
    position = 5 * (state['position']['epoch'] - 1) + state['position']['step']
    assert 0 <= position - at_signal <= 3 and position < 20
    assert not [pid for pid in tree if os.path.exists(f'/proc/{pid}')]
    assert 'Traceback' not in out.split('==> stopped by')[0]  # none from our processes before they stopped
    run(torchrun('train_student.py', *kill_args(ws, name, '--resume', 'auto')))
    assert train_log(exp_dir, 'start')[-1]['start_step'] == state['position']['step']
    expected, resumed = final_state(ws, 'straight_2'), final_state(ws, name)
    assert all(torch.equal(value, resumed[key]) for key, value in expected.items())


@pytest.mark.slow
def test_srun_tasks_without_torchrun_train_as_torchrun_does_and_requeue_on_sigusr1(kill_ws, tmp_path):
    """Two plain python processes with the environment srun gives 2 tasks on one node: SIGUSR1 (what
    `--signal=USR1@120` sends before the time limit) stops both after the same step, rank 0 asks scontrol
    to requeue the job, and the requeued job's run ends with the torchrun run's weights, bit for bit."""
    ws = kill_ws
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    (bin_dir / 'scontrol').chmod(0o755)
    base = {k: v for k, v in ENV.items() if not k.startswith(('SLURM_', 'MASTER_', 'RANK', 'WORLD_SIZE', 'LOCAL_'))}
    job = {'PATH': f'{bin_dir}:{ENV["PATH"]}', 'SLURM_JOB_ID': '777', 'SLURM_STEP_ID': '0', 'SLURM_NTASKS': '2',
           'SLURM_JOB_NODELIST': 'localhost', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port())}

    def start(*extra):
        return [subprocess.Popen([sys.executable, 'train_student.py', *kill_args(ws, 'srun', *extra)], cwd=ROOT,
                                 env={**base, **job, 'SLURM_PROCID': str(r), 'SLURM_LOCALID': str(r)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]

    exp_dir = ws / 'runs' / 'exp' / 'srun'
    tasks = start()
    assert wait_for(lambda: (exp_dir / 'logs' / 'log.jsonl').exists() and len(global_steps(exp_dir)) >= 3, 120)
    for task in tasks:
        task.send_signal(signal.SIGUSR1)
    outs = [task.communicate(timeout=120)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [RESUME_EXIT_CODE] * 2, outs[0][-2000:] + outs[1][-2000:]
    assert train_log(exp_dir, 'start')[0]['world_size'] == 2
    assert (tmp_path / 'scontrol.calls').read_text() == 'requeue 777\n'  # once, by rank 0
    job['MASTER_PORT'] = str(free_port())
    tasks = start('--resume', 'auto')
    assert [task.wait(timeout=300) for task in tasks] == [0, 0]
    assert train_log(exp_dir, 'start')[-1]['start_step'] > 0
    expected, resumed = final_state(ws, 'straight_2'), final_state(ws, 'srun')
    assert all(torch.equal(value, resumed[key]) for key, value in expected.items())
