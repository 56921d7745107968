"""run.sh and demo.sh, cheaply: stub `torchrun`, `srun`, `nvidia-smi` and `demo.sh`/`run.sh` record how they
were called, and a `sitecustomize` makes torch see the GPUs of an emulated node; the real torchrun, with a
tiny stand-in for train_student.py, checks that signals reach every process and leave none behind."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port

NODE_GPUS = 8

# torch on a node with FAKE_NODE_GPUS GPUs: CUDA_VISIBLE_DEVICES hides all but the devices it lists
SITECUSTOMIZE = '''
import os
if 'FAKE_NODE_GPUS' in os.environ:
    import torch

    def device_count(node=int(os.environ['FAKE_NODE_GPUS'])):
        visible = os.environ.get('CUDA_VISIBLE_DEVICES')
        return node if visible is None else min(node, len([d for d in visible.split(',') if d.strip()]))

    torch.cuda.device_count = device_count
'''
# nvidia-smi lists every GPU of the node whatever CUDA_VISIBLE_DEVICES says, and fails without a driver
NVIDIA_SMI = '''#!/bin/sh
if [ "$FAKE_NODE_GPUS" -eq 0 ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."; exit 9
fi
for i in $(seq 0 $((FAKE_NODE_GPUS - 1))); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-0000000$i)"; done
'''
RECORDER = '''#!/bin/sh
{ echo "$0"; [ $# -eq 0 ] || printf '%s\\n' "$@"; } > "$CALLS/$(basename "$0").args"
env > "$CALLS/$(basename "$0").env"
pwd > "$CALLS/$(basename "$0").cwd"
'''


def write_script(path, text):
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def node(tmp_path):
    """run(script, gpus, **env) runs ``bash script`` on an emulated node with ``gpus`` GPUs, stub
    torchrun and nvidia-smi first on PATH; it returns the finished process and the calls folder, where
    each stub called leaves <name>.args (its path, then one argument a line) and <name>.env."""
    stubs, calls = tmp_path / 'stubs', tmp_path / 'calls'
    stubs.mkdir()
    calls.mkdir()
    (stubs / 'sitecustomize.py').write_text(SITECUSTOMIZE)
    write_script(stubs / 'nvidia-smi', NVIDIA_SMI)
    write_script(stubs / 'torchrun', RECORDER)
    write_script(stubs / 'srun', RECORDER)

    def environ(gpus, **env):
        base = {k: v for k, v in os.environ.items() if k not in ('CUDA_VISIBLE_DEVICES', 'DATA', 'NGPUS')
                and not k.startswith('SLURM_')}
        python_path = os.pathsep.join(filter(None, [str(stubs), base.get('PYTHONPATH')]))
        return {**base, 'PATH': f'{stubs}{os.pathsep}{base["PATH"]}', 'PYTHONPATH': python_path,
                'FAKE_NODE_GPUS': str(gpus), 'CALLS': str(calls), **env}

    def run(script, gpus, **env):
        proc = subprocess.run(['bash', str(script)], capture_output=True, text=True, timeout=120,
                              env=environ(gpus, **env))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc, calls

    run.stubs, run.environ = stubs, environ
    return run


def called(calls, name):
    """The arguments stub ``name`` was called with (after its path), or None if it was not called."""
    path = calls / f'{name}.args'
    return path.read_text().splitlines()[1:] if path.exists() else None


def environment(calls, name):
    return dict(line.split('=', 1) for line in (calls / f'{name}.env').read_text().splitlines() if '=' in line)


@pytest.mark.parametrize('gpus, env, nproc', [
    (NODE_GPUS, {'CUDA_VISIBLE_DEVICES': '0,1'}, 2),  # nvidia-smi -L would say 8: ranks 2-7 would fail
    (NODE_GPUS, {}, NODE_GPUS),
    (NODE_GPUS, {'CUDA_VISIBLE_DEVICES': ''}, 1),     # every GPU hidden: one CPU process
    (0, {}, 1),                                       # no GPU, no driver
    (NODE_GPUS, {'CUDA_VISIBLE_DEVICES': '0,1', 'NGPUS': '3'}, 3),  # NGPUS still decides
])
def test_run_sh_starts_a_process_per_gpu_torch_sees(node, tmp_path, gpus, env, nproc):
    proc, calls = node(os.path.join(ROOT, 'run.sh'), gpus, DATA=str(tmp_path / 'imagenet'), **env)
    args = called(calls, 'torchrun')
    assert args is not None, proc.stderr[-2000:]
    assert f'--nproc_per_node={nproc}' in args and args.count(f'--nproc_per_node={nproc}') == 1, args
    # the real recipe, not the demo: train_student.py on DATA with the paper's settings
    assert args[args.index('train_student.py') + 1] == str(tmp_path / 'imagenet')
    assert args[args.index('--exp') + 1] == 'moco_r50_to_r18' and args[args.index('--epochs') + 1] == '130'
    assert '--resume' in args and 'DATA is unset' not in proc.stdout


@pytest.mark.parametrize('script, program', [('knn_eval.sh', 'eval_knn.py'), ('lin_eval.sh', 'eval_linear.py'),
                                             ('transfer_eval.sh', 'eval_transfer.py'),
                                             ('zeroshot_eval.sh', 'eval_zeroshot.py')])
def test_eval_launchers_start_a_process_per_visible_gpu(node, script, program):
    """scripts/launch.sh, which the evaluation launchers source: torchrun with one process per GPU torch sees."""
    _, calls = node(os.path.join(ROOT, script), NODE_GPUS, CUDA_VISIBLE_DEVICES='0,1')
    assert called(calls, 'torchrun')[:3] == ['--standalone', '--nproc_per_node=2', os.path.join(ROOT, program)]


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(script, stub): a folder holding the project's launchers (run.sh, scripts/ and demo/), with a
    recording stub in place of ``stub``; returns the copied ``script``'s path."""
    def copy(script, stub):
        folder = tmp_path / 'project'
        folder.mkdir()
        shutil.copy(os.path.join(ROOT, 'run.sh'), folder / 'run.sh')
        for name in ('scripts', 'demo'):
            shutil.copytree(os.path.join(ROOT, name), folder / name, ignore=shutil.ignore_patterns('__pycache__'))
        write_script(folder / stub, RECORDER)
        return folder / script
    return copy


def test_run_sh_without_data_runs_demo_sh_with_its_settings(node, copy_of):
    proc, calls = node(copy_of('run.sh', 'demo/demo.sh'), NODE_GPUS, CUDA_VISIBLE_DEVICES='0,1', N_MLP_LAYERS='2')
    assert 'DATA is unset, running the embedded demo' in proc.stdout
    assert called(calls, 'torchrun') is None  # run.sh handed over to demo.sh (exec) and did not train
    assert called(calls, 'demo.sh') == []
    demo_env = environment(calls, 'demo.sh')
    settings = [demo_env[name] for name in ('NGPUS', 'N_MLP_LAYERS', 'BASE_DIR')]
    assert settings == ['2', '2', './']  # two GPUs visible, and run.sh's settings (the demo's lr is DEMO_LR)
    assert 'DATA' not in demo_env


def test_demo_sh_on_its_own_goes_through_run_sh(node, copy_of):
    """Without run.sh's settings demo.sh starts run.sh, DATA unset so that it comes back to the demo."""
    proc, calls = node(copy_of('demo/demo.sh', 'run.sh'), NODE_GPUS, DATA='/data/imagenet', NGPUS='2')
    assert called(calls, 'run.sh') == [] and 'DATA' not in environment(calls, 'run.sh')
    assert called(calls, 'torchrun') is None


SLURM_JOB = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_NNODES': '2', 'SLURM_GPUS_ON_NODE': '4',
             'SLURM_CPUS_PER_TASK': '10', 'SLURM_NTASKS': '8', 'SLURM_PROCID': '0', 'SLURM_JOB_NODELIST': 'gpu[1-2]'}


def training_args(args):
    """What train_student.py gets, from its path on."""
    return args[args.index('train_student.py'):]


def test_run_sh_under_sbatch_starts_a_task_per_gpu_on_every_node_with_srun(node, tmp_path):
    data = str(tmp_path / 'imagenet')
    _, calls = node(os.path.join(ROOT, 'run.sh'), 4, DATA=data)
    torchrun_args = training_args(called(calls, 'torchrun'))
    (calls / 'torchrun.args').unlink()
    proc, calls = node(os.path.join(ROOT, 'run.sh'), 4, DATA=data, **SLURM_JOB)
    args = called(calls, 'srun')
    assert args is not None and called(calls, 'torchrun') is None, proc.stderr[-2000:]
    # 2 nodes x 4 GPUs; srun does not pass sbatch's --cpus-per-task on by itself
    assert args[:args.index('python')] == ['--kill-on-bad-exit=1', '--nodes=2', '--ntasks=8', '--ntasks-per-node=4',
                                           '--cpus-per-task=10']
    assert training_args(args) == torchrun_args and args[args.index('python') + 1] == 'train_student.py'
    assert (calls / 'srun.cwd').read_text().strip() == ROOT


def test_run_sh_in_a_task_of_srun_uses_torchrun_on_its_node(node, tmp_path):
    """`srun --pty bash` then `bash run.sh`: already a task of a step, so no nested srun."""
    _, calls = node(os.path.join(ROOT, 'run.sh'), 4, DATA=str(tmp_path / 'imagenet'), SLURM_STEP_ID='0', **SLURM_JOB)
    assert called(calls, 'srun') is None and '--nproc_per_node=4' in called(calls, 'torchrun')


def test_run_sh_copied_to_the_spool_folder_by_sbatch_finds_the_project(node, tmp_path):
    """sbatch runs a copy of the script, elsewhere: run.sh goes to the submitted one's folder (scontrol)."""
    spool = tmp_path / 'spool' / 'job4242'
    spool.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, 'run.sh'), spool / 'slurm_script')
    write_script(node.stubs / 'scontrol', f'#!/bin/sh\necho "JobId=4242 JobName=simreg"\n'
                                          f'echo "   Command={ROOT}/run.sh"\necho "   WorkDir=/home/user"\n')
    _, calls = node(spool / 'slurm_script', 4, DATA=str(tmp_path / 'imagenet'), SLURM_SUBMIT_DIR='/home/user',
                    **SLURM_JOB)
    assert (calls / 'srun.cwd').read_text().strip() == ROOT and 'train_student.py' in called(calls, 'srun')


# stands in for train_student.py: on SIGTERM or SIGUSR1 it "checkpoints" and exits 75 (RESUME_EXIT_CODE)
FAKE_TRAINING = '''
import os, signal, sys, time
from utils.errors import RESUME_EXIT_CODE, exit_on_user_error

def main():
    def stop(signum, frame):
        raise SystemExit(RESUME_EXIT_CODE)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, stop)
    with open(os.path.join(os.environ['CALLS'], 'worker%s.pids' % os.environ['RANK']), 'w') as f:
        f.write('%d %d' % (os.getpid(), os.getppid()))  # itself and torchrun
    while True:
        time.sleep(0.05)

exit_on_user_error(main)
'''


def running(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(') ', 1)[1][0] != 'Z'
    except FileNotFoundError:
        return False


def in_group(pgid):
    """The processes of process group ``pgid`` that have not exited."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    fields = f.read().rsplit(') ', 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != 'Z':
                found.append(int(entry))
    return found


@pytest.mark.parametrize('sig, whole_group', [(signal.SIGTERM, True), (signal.SIGUSR1, True),
                                              (signal.SIGTERM, False)])
def test_a_signal_to_run_sh_reaches_every_process_and_leaves_none(node, tmp_path, sig, whole_group):
    """The real torchrun with 2 stand-in workers. Before: SIGUSR1 killed torchrun and left its workers (in
    sessions of their own) running; SIGTERM to bash alone left torchrun and the workers."""
    project = tmp_path / 'project'
    project.mkdir()
    shutil.copy(os.path.join(ROOT, 'run.sh'), project / 'run.sh')
    shutil.copytree(os.path.join(ROOT, 'scripts'), project / 'scripts')
    (project / 'train_student.py').write_text(FAKE_TRAINING)
    write_script(node.stubs / 'torchrun', f'#!/bin/sh\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    env = node.environ(0, DATA=str(tmp_path / 'imagenet'), NGPUS='2', MASTER_PORT=str(free_port()),
                       CUDA_VISIBLE_DEVICES='', PYTHONPATH=ROOT)
    del env['FAKE_NODE_GPUS']  # no torch in the stand-ins
    calls, pids = tmp_path / 'calls', set()
    proc = subprocess.Popen(['bash', str(project / 'run.sh')], env=env, start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(calls.glob('worker*.pids'))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        pids.update(int(p) for f in calls.glob('worker*.pids') for p in f.read_text().split())
        assert len(pids) == 3, proc.stderr.read() if proc.poll() is not None else pids  # 2 workers, 1 torchrun
        (os.killpg if whole_group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        time.sleep(0.5)
        assert [pid for pid in pids if running(pid)] == [] and in_group(proc.pid) == []
        assert proc.returncode == 75, err[-3000:]  # the workers checkpointed: run it again to resume
        assert f'run.sh: got {sig.name}, passing it on to the training processes' in err
    finally:  # whatever a failing run.sh left behind
        for pid in [pid for pid in pids if running(pid)] + in_group(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()


SRUN_WAITING = '''#!/bin/bash
# srun's stand-in: its "tasks" checkpoint on the signal that scancel sends them, rank 0 leaves its exit code,
# and srun exits 137 like the real one does after --kill-on-bad-exit killed the slower tasks
echo $$ > "$CALLS/srun.pid"
trap 'echo 75 > "$SIMREG_EXIT_CODES/rank0"; exit 137' TERM USR1
while :; do sleep 0.05; done
'''
SCANCEL = '''#!/bin/sh
printf '%s\\n' "$@" > "$CALLS/scancel.args"
kill -s "${1#--signal=}" "$(cat "$CALLS/srun.pid")"
'''


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1])
def test_under_slurm_run_sh_signals_the_tasks_with_scancel_not_srun(node, tmp_path, sig):
    """srun answers SIGTERM by killing its tasks outright: run.sh has SLURM signal the tasks themselves."""
    write_script(node.stubs / 'srun', SRUN_WAITING)
    write_script(node.stubs / 'scancel', SCANCEL)
    calls = tmp_path / 'calls'
    proc = subprocess.Popen(['bash', os.path.join(ROOT, 'run.sh')], text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env=node.environ(4, DATA=str(tmp_path / 'imagenet'), **SLURM_JOB))
    try:
        deadline = time.monotonic() + 30
        while not (calls / 'srun.pid').exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert (calls / 'scancel.args').read_text().split() == [f'--signal={sig.name[3:]}', '4242'], err
        assert proc.returncode == 75, err[-2000:]
    finally:
        proc.kill()
