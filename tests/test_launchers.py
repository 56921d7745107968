"""run.sh and demo.sh, cheaply: stub `torchrun`, `nvidia-smi` and `demo.sh`/`run.sh` record how they
were called, and a `sitecustomize` makes torch see the GPUs of an emulated node."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

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

    def run(script, gpus, **env):
        base = {k: v for k, v in os.environ.items() if k not in ('CUDA_VISIBLE_DEVICES', 'DATA', 'NGPUS')}
        python_path = os.pathsep.join(filter(None, [str(stubs), base.get('PYTHONPATH')]))
        proc = subprocess.run(['bash', str(script)], capture_output=True, text=True, timeout=120,
                              env={**base, 'PATH': f'{stubs}{os.pathsep}{base["PATH"]}', 'PYTHONPATH': python_path,
                                   'FAKE_NODE_GPUS': str(gpus), 'CALLS': str(calls), **env})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc, calls

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


@pytest.fixture
def copy_of(tmp_path):
    """copy_of(script, stub): a folder holding the project's ``script`` and, beside it, a recording
    stub named ``stub``; returns the copied script's path."""
    def copy(script, stub):
        folder = tmp_path / 'project'
        folder.mkdir()
        shutil.copy(os.path.join(ROOT, script), folder / script)
        write_script(folder / stub, RECORDER)
        return folder / script
    return copy


def test_run_sh_without_data_runs_demo_sh_with_its_settings(node, copy_of):
    proc, calls = node(copy_of('run.sh', 'demo.sh'), NODE_GPUS, CUDA_VISIBLE_DEVICES='0,1', LR='0.1')
    assert 'DATA is unset, running the embedded demo' in proc.stdout
    assert called(calls, 'torchrun') is None  # run.sh handed over to demo.sh (exec) and did not train
    assert called(calls, 'demo.sh') == []
    demo_env = environment(calls, 'demo.sh')
    settings = [demo_env[name] for name in ('NGPUS', 'LR', 'N_MLP_LAYERS', 'BASE_DIR')]
    assert settings == ['2', '0.1', '4', './']  # two GPUs visible, and run.sh's settings
    assert 'DATA' not in demo_env


def test_demo_sh_on_its_own_goes_through_run_sh(node, copy_of):
    """Without run.sh's settings demo.sh starts run.sh, DATA unset so that it comes back to the demo."""
    proc, calls = node(copy_of('demo.sh', 'run.sh'), NODE_GPUS, DATA='/data/imagenet', NGPUS='2')
    assert called(calls, 'run.sh') == [] and 'DATA' not in environment(calls, 'run.sh')
    assert called(calls, 'torchrun') is None
