"""utils/distributed.py and utils/errors.py under SLURM and when a peer dies: host lists, srun's variables,
2 gloo processes of tests/dist_worker.py started as plain python (no torchrun), requeue, the one-line exits."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port
from utils import distributed as dist_utils
from utils.errors import DIST_ERROR_EXIT_CODE, RESUME_EXIT_CODE, USER_ERROR_EXIT_CODE, SimRegError, \
    exit_on_user_error

WORKER = os.path.join(ROOT, 'tests', 'dist_worker.py')
TIMEOUT_MIN = 0.05  # --dist_timeout of the workers: 3 s
LOST_PEER = re.compile(r'error: the process group (lost a peer|timed out waiting for a peer) \(rank \d of 2\): '
                       r'.+; the last checkpoint is kept; rerun with --resume auto')


@pytest.mark.parametrize('hostlist, hosts', [
    ('login5', ['login5']),
    ('node[01-03,07],gpu-a[1-2],login5', ['node01', 'node02', 'node03', 'node07', 'gpu-a1', 'gpu-a2', 'login5']),
    ('n[8-11]', ['n8', 'n9', 'n10', 'n11']),         # no padding: the width of the first bound
    ('n[098-101]', ['n098', 'n099', 'n100', 'n101']),
    ('rack[1-2]-node[3-4]', ['rack1-node3', 'rack1-node4', 'rack2-node3', 'rack2-node4']),
    ('a[1,3]b,c', ['a1b', 'a3b', 'c']),
])
def test_expand_hostlist_as_scontrol_show_hostnames(hostlist, hosts):
    assert dist_utils.expand_hostlist(hostlist) == hosts


def test_expand_hostlist_refuses_a_range_it_cannot_read():
    with pytest.raises(SimRegError, match='MASTER_ADDR'):
        dist_utils.expand_hostlist('node[3-1]')


SRUN_TASK = {'SLURM_JOB_ID': '123456', 'SLURM_STEP_ID': '0', 'SLURM_PROCID': '5', 'SLURM_LOCALID': '1',
             'SLURM_NTASKS': '8', 'SLURM_JOB_NODELIST': 'gpu[07-10]'}


def test_slurm_environment_of_a_srun_task():
    assert dist_utils.slurm_environment(SRUN_TASK) == {
        'RANK': '5', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'gpu07', 'MASTER_PORT': str(10000 + 3456)}
    # the step's own tasks and nodes come first; MASTER_ADDR and MASTER_PORT given in the environment win
    step = {**SRUN_TASK, 'SLURM_STEP_NUM_TASKS': '4', 'SLURM_STEP_NODELIST': 'gpu[09-10]'}
    assert dist_utils.slurm_environment(step)['WORLD_SIZE'] == '4'
    assert dist_utils.slurm_environment(step)['MASTER_ADDR'] == 'gpu09'
    given = dist_utils.slurm_environment({**SRUN_TASK, 'MASTER_ADDR': 'head', 'MASTER_PORT': '29400'})
    assert (given['MASTER_ADDR'], given['MASTER_PORT']) == ('head', '29400')
    assert dist_utils.slurm_environment({**SRUN_TASK, 'SLURM_NODELIST': 'x1', 'SLURM_JOB_NODELIST': ''})[
        'MASTER_ADDR'] == 'x1'


@pytest.mark.parametrize('change', [
    {'SLURM_STEP_ID': None},                                      # the batch script itself, not a task of srun
    {'SLURM_NTASKS': '1'},                                        # srun -n 1: the plain single-process run
    {'SLURM_PROCID': None, 'SLURM_STEP_ID': None, 'SLURM_JOB_ID': None},  # no SLURM at all
])
def test_slurm_environment_is_none_for_a_single_process(change):
    env = {k: v for k, v in {**SRUN_TASK, **change}.items() if v is not None}
    assert dist_utils.slurm_environment(env) is None


def test_dist_timeout_flag():
    import argparse
    parser = dist_utils.add_distributed_args(argparse.ArgumentParser())
    assert parser.parse_args([]).dist_timeout == dist_utils.DEFAULT_DIST_TIMEOUT_MIN == 5
    assert parser.parse_args(['--dist_timeout', '0.5']).dist_timeout == 0.5


def start_workers(mode, envs, *args):
    """One tests/dist_worker.py per environment, as plain python processes (no torchrun)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'MASTER_', 'RANK', 'WORLD_SIZE',
                                                                    'LOCAL_RANK'))}
    return [subprocess.Popen([sys.executable, WORKER, mode, *args, '--dist_timeout', str(TIMEOUT_MIN)],
                             env={**base, 'OMP_NUM_THREADS': '1', **env}, cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env in envs]


def finish(procs, timeout=60):
    """(returncode, stdout, stderr) of each process; each is killed if still running after ``timeout``."""
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results


def free_port_for_job():
    """A (7-digit, like real ones) SLURM job id whose derived port, 10000 + id % 20000, is free on the loopback."""
    import socket
    for port in range(10000 + os.getpid() % 20000, 30000):
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
        return 20000 * 50 + port - 10000


def test_srun_tasks_without_torchrun_form_a_process_group():
    job = free_port_for_job()
    slurm = {'SLURM_JOB_ID': str(job), 'SLURM_STEP_ID': '0', 'SLURM_NTASKS': '2',
             'SLURM_JOB_NODELIST': 'localhost,gpu[02-03]'}
    results = finish(start_workers('info', [{**slurm, 'SLURM_PROCID': str(r), 'SLURM_LOCALID': str(r)}
                                            for r in range(2)]))
    assert [code for code, _, _ in results] == [0, 0], results
    infos = [json.loads(out) for _, out, _ in results]
    assert [(i['rank'], i['world_size'], i['local_rank'], i['backend']) for i in infos] == \
        [(0, 2, '0', 'gloo'), (1, 2, '1', 'gloo')]
    assert all(i['sum'] == 1.0 and i['master'] == f'localhost:{10000 + job % 20000}' for i in infos)


def torchrun_envs(n=2):
    port = str(free_port())
    return [{'RANK': str(r), 'WORLD_SIZE': str(n), 'LOCAL_RANK': str(r), 'MASTER_ADDR': '127.0.0.1',
             'MASTER_PORT': port} for r in range(n)]


def wait_ready(procs):
    for proc in procs:
        assert proc.stdout.readline().strip() == 'ready', finish(procs, timeout=1)


@pytest.mark.parametrize('victim', [1, 0])  # rank 0 also holds the rendezvous store
def test_a_killed_peer_ends_the_others_with_one_line(victim):
    procs = start_workers('loop', torchrun_envs())
    wait_ready(procs)
    procs[victim].kill()
    started = time.monotonic()
    (code, _, err), = finish([procs[1 - victim]], timeout=30)
    elapsed = time.monotonic() - started
    finish(procs)
    assert code == DIST_ERROR_EXIT_CODE and err.count('\n') == 1 and LOST_PEER.fullmatch(err.strip()), err
    assert 'Traceback' not in err and elapsed < TIMEOUT_MIN * 60 + 10


def test_a_stuck_peer_ends_the_others_after_the_timeout():
    """Rank 1 lives on but never enters the next all_reduce: rank 0 waits --dist_timeout, not 30 minutes."""
    procs = start_workers('stall', torchrun_envs(), '1')
    wait_ready(procs)
    started = time.monotonic()
    (code, _, err), = finish(procs[:1], timeout=30)
    elapsed = time.monotonic() - started
    finish(procs, timeout=0.1)
    assert code == DIST_ERROR_EXIT_CODE and LOST_PEER.fullmatch(err.strip()) and 'timed out' in err, err
    assert TIMEOUT_MIN * 60 - 1 < elapsed < TIMEOUT_MIN * 60 + 10


def test_a_group_that_never_forms_ends_with_one_line():
    started = time.monotonic()
    (code, _, err), = finish(start_workers('info', torchrun_envs()[:1]))  # rank 1 never comes
    assert code == DIST_ERROR_EXIT_CODE and 'Traceback' not in err, err
    assert re.fullmatch(r'error: the 2 processes did not form a process group at 127.0.0.1:\d+ \(rank 0\): .+; '
                        r'check that every process started .+--dist_timeout', err.strip()), err
    assert time.monotonic() - started < TIMEOUT_MIN * 60 + 30


def raising(exc):
    def main():
        raise exc
    return main


def test_exit_on_user_error_codes_and_lines(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv('SIMREG_EXIT_CODES', str(tmp_path))
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '4')
    recorded = lambda: (tmp_path / 'rank0').read_text().strip()
    assert exit_on_user_error(lambda: 'done') == 'done' and recorded() == '0'
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(raising(SimRegError('bad --flag')))
    assert stop.value.code == USER_ERROR_EXIT_CODE and capsys.readouterr().err == 'error: bad --flag\n'
    assert recorded() == str(USER_ERROR_EXIT_CODE)
    gloo = RuntimeError('[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer '
                        '[10.0.0.2]:1975. This is typically caused by a remote worker crashing. GLHF!')
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(raising(gloo))
    assert stop.value.code == DIST_ERROR_EXIT_CODE == 3 and recorded() == '3'
    assert capsys.readouterr().err == ('error: the process group lost a peer (rank 0 of 4): Connection closed by peer '
                                       '[10.0.0.2]:1975; the last checkpoint is kept; rerun with --resume auto\n')
    import torch.distributed as dist
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(raising(dist.DistBackendError('NCCL communicator was aborted on rank 2.\nmore')))
    assert stop.value.code == 3 and capsys.readouterr().err.startswith(
        'error: the process group lost a peer (rank 0 of 4): NCCL communicator was aborted on rank 2; the last')
    with pytest.raises(SystemExit) as stop:  # what the training processes do after a signal's checkpoint
        exit_on_user_error(raising(SystemExit(RESUME_EXIT_CODE)))
    assert stop.value.code == 75 and recorded() == '75'
    with pytest.raises(RuntimeError, match='a bug'):  # any other error keeps its traceback
        exit_on_user_error(raising(RuntimeError('a bug')))
    assert recorded() == '1'


class Log:
    def __init__(self):
        self.lines = []

    def info(self, msg, *args):
        self.lines.append(('info', msg % args))

    def warning(self, msg, *args):
        self.lines.append(('warning', msg % args))


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """A stub scontrol first on PATH: it records its arguments, and exits with $SCONTROL_EXIT."""
    stub = tmp_path / 'bin' / 'scontrol'
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n'
                    '[ "${SCONTROL_EXIT:-0}" = 0 ] || echo "Requeue of job failed: Job is not requeueable" >&2\n'
                    'exit "${SCONTROL_EXIT:-0}"\n')
    stub.chmod(0o755)
    monkeypatch.setenv('PATH', f"{stub.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv('SLURM_JOB_ID', '4242')
    monkeypatch.delenv('RANK', raising=False)
    return stub.parent / 'args'


def test_requeue_slurm_job_calls_scontrol(scontrol):
    log = Log()
    assert dist_utils.requeue_slurm_job(log) is True
    assert scontrol.read_text().split() == ['requeue', '4242']
    assert log.lines == [('info', '==> requeued SLURM job 4242: it starts again and resumes from the last checkpoint')]


def test_requeue_slurm_job_logs_a_failure(scontrol, monkeypatch):
    monkeypatch.setenv('SCONTROL_EXIT', '1')
    log = Log()
    assert dist_utils.requeue_slurm_job(log) is False
    assert log.lines[0][0] == 'warning' and 'exited with 1: Requeue of job failed' in log.lines[0][1]
    monkeypatch.setenv('PATH', os.path.dirname(sys.executable))  # no scontrol at all
    log = Log()
    assert dist_utils.requeue_slurm_job(log) is False
    assert len(log.lines) == 1 and 'could not requeue SLURM job 4242' in log.lines[0][1]


def test_requeue_slurm_job_only_under_slurm_and_on_rank_0(scontrol, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    assert dist_utils.requeue_slurm_job(Log()) is False
    monkeypatch.setenv('RANK', '0')
    monkeypatch.delenv('SLURM_JOB_ID')
    assert dist_utils.requeue_slurm_job(Log()) is False
    assert not scontrol.exists()


def test_a_broken_group_ends_with_os_exit_not_the_interpreters_teardown(tmp_path, monkeypatch, capsys):
    """With a group still initialised, exit_on_user_error ends the process with os._exit(3) after recording the
    code: letting the interpreter tear down a broken gloo group can abort it with exit -6 instead (seen in CI
    as 'terminate called without an active exception' after the one line, when rank 0 was killed)."""
    import torch.distributed as dist
    monkeypatch.setenv('SIMREG_EXIT_CODES', str(tmp_path))
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(f'os._exit({code})')
    monkeypatch.setattr(os, '_exit', fake_exit)
    gloo = RuntimeError('[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:8900: '
                        'Connection reset by peer')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit, match=r'os\._exit\(3\)'):
            exit_on_user_error(raising(gloo))
        assert exits == [DIST_ERROR_EXIT_CODE] and (tmp_path / 'rank0').read_text().strip() == '3'
        assert capsys.readouterr().err.startswith('error: the process group lost a peer (rank 0 of 1): Read error')
    finally:
        dist.destroy_process_group()
    with pytest.raises(SystemExit) as stop:  # no group: the plain sys.exit, as before
        exit_on_user_error(raising(gloo))
    assert stop.value.code == 3 and exits == [3]
