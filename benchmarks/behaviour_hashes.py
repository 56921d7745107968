"""sha256 of the final checkpoint tensors of fixed-seed 2-epoch CPU runs, to show that a refactor
changed no behaviour: run it before and after, and compare the printed lines.

    python benchmarks/behaviour_hashes.py [--work /tmp/hashes]

Runs (each 2 epochs on a generated 3-class folder, resnet18 -> resnet18 at 32 px, batch 8):
one process; 2 gloo processes under torchrun; a cached teacher; two teachers (live + cached);
a multi-view cache the student replays.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))
os.environ['CUDA_VISIBLE_DEVICES'] = ''


def state_hash(path):
    """One digest over every tensor of the checkpoint's state_dict, in key order."""
    state = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def run(cmd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f'failed: {" ".join(cmd)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--work', default='/tmp/simreg_behaviour_hashes')
    args = p.parse_args()
    from conftest import free_port, make_image_folder
    from models.backbones import build_backbone

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    data = make_image_folder(os.path.join(work, 'data'), n_classes=3, per_class=8, size=40, splits=('train',))
    torch.manual_seed(1)
    torch.save(build_backbone('resnet18').state_dict(), os.path.join(work, 'teacher.pth'))
    py = sys.executable
    cache = [py, 'cache_teacher_feats.py', data, '--teacher_weights', os.path.join(work, 'teacher.pth'),
             '--arch_teacher', 'resnet18', '--image_size', '32', '--batch_size', '8', '--num_workers', '0']
    run(cache + ['--output', os.path.join(work, 'single.npy')])
    run(cache + ['--output', os.path.join(work, 'views.npy'), '--cache_views', '2'])

    common = ['--base_dir', work, '--arch_teacher', 'resnet18', '--arch_student', 'resnet18',
              '--batch_size', '8', '--image_size', '32', '--num_workers', '1', '--print_freq', '2',
              '--epochs', '2', '--single_aug', '--weak_weak', '--seed', '3']
    teacher = ['--teacher_weights', os.path.join(work, 'teacher.pth')]
    runs = {
        'one_process': [py, 'train_student.py', *common, *teacher],
        'gloo_2_processes': [py, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
                             f'--master_port={free_port()}', 'train_student.py', *common, *teacher],
        'cached_teacher': [py, 'train_student.py', *common, '--use_cache',
                           '--teacher_feats', os.path.join(work, 'single.npy')],
        'two_teachers': [py, 'train_student.py', *common, '--arch_teacher', 'resnet18,resnet18',
                         '--teacher_weights', os.path.join(work, 'teacher.pth') + ',', '--use_cache',
                         '--teacher_feats', ',' + os.path.join(work, 'single.npy')],
        'multi_view_cache': [py, 'train_student.py', *common, '--use_cache',
                             '--teacher_feats', os.path.join(work, 'views.npy')],
    }
    for name, cmd in runs.items():
        run(cmd + ['--exp', name, data])
        print(f'{name:18s} {state_hash(os.path.join(work, "exp", name, "checkpoints", "last.pth"))}', flush=True)


if __name__ == '__main__':
    main()
