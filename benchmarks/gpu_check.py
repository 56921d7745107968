"""The GPU figures in one command (about 7 minutes on one H100 with 16 cores, no network; it makes its own JPEGs):
one line per figure, each figure in its own process under its own timeout.

    python benchmarks/gpu_check.py [--work DIR]   # on a CUDA machine
    python benchmarks/gpu_check.py --smoke        # every figure's code on the CPU at tiny sizes (CI runs it)
"""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_student  # noqa: E402
from benchmarks.common import median_of  # noqa: E402
from benchmarks.reference import fixed_step  # noqa: E402
from benchmarks.run import encoded_loader_speeds, jpeg_folder, teacher_and_cache, train_epochs  # noqa: E402
from data.sampler import GlobalBatchSampler  # noqa: E402
from data.transforms import DeviceInput  # noqa: E402

FULL = dict(count=20_000, shape=(375, 500), batch=256, size=224, workers=16, teacher='resnet50', smoke=False)
SMOKE = dict(count=16, shape=(30, 40), batch=4, size=32, workers=1, teacher='resnet18', smoke=True)
TIMEOUT, COMPILE_TIMEOUT, TOTAL = 75, 150, 400  # seconds: a figure, the --compile one, the whole check


class MemoryLoader:
    """The loader's place in ``train_student.main`` for the step figures: one pinned uint8 batch every step, with
    the sampler's indices (a cached teacher's rows)."""

    def __init__(self, sampler, images):
        self.batch_sampler, self.dataset, self.images = sampler, range(sampler.num_samples), images

    def __iter__(self):
        for keys in self.batch_sampler:
            yield torch.tensor([i for _, i in keys]), self.images, torch.zeros(len(keys), dtype=torch.int64)


def memory_input(args, dataset, teachers, ctx, held_out=()):
    """``train_student.build_input`` for the step figures (no loader work)."""
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, 1, 0, args.seed)
    loader = MemoryLoader(sampler, images.pin_memory() if ctx.device.type == 'cuda' else images)
    return loader, DeviceInput(ctx.device, ctx.memory_format, True, ctx.amp_dtype)


def train(cfg, work, exp, *extra, teacher='live'):
    """One epoch of ``train_student.main`` over the generated JPEGs: (img/s, data-wait share) past its first window
    (over the whole epoch where it has one window)."""
    argv = ['--arch_teacher', cfg['teacher'], '--teacher_weights', cfg['weights'], '--arch_student', 'resnet18',
            '--epochs', '1', '--batch_size', str(cfg['batch']), '--image_size', str(cfg['size']),
            '--num_workers', str(cfg['workers']), '--print_freq', str(max(1, cfg['count'] // cfg['batch'] // 6)),
            '--save_freq', '100', '--ckpt_every_min', '0', '--overwrite', '--single_aug', '--weak_weak', *extra]
    argv += ['--channels_last'] if torch.cuda.is_available() else []
    argv += ['--use_cache', '--teacher_feats', cfg['feats']] if teacher == 'cached' else []
    speed, wait, steady, steady_wait = train_epochs(cfg['root'], work, exp, argv, cfg['batch'])
    return (speed, wait) if steady != steady else (steady, steady_wait)


def step(cfg, work, name, *extra, teacher='live'):
    with mock.patch.object(train_student, 'build_input', memory_input):
        speed, _ = train(cfg, work, name, *extra, teacher=teacher)
    return speed, f'{speed:.4g} img/s'


def epoch(cfg, work, name, *extra, teacher='live'):
    speed, wait = train(cfg, work, name, *extra, teacher=teacher)
    return speed, f'{speed:.4g} img/s, data wait {100 * wait:.1f}%'


def nvjpeg_decode(cfg, work):
    """Batched nvjpeg decode of a batch of the generated JPEGs, median of repeats."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from data.folders import build_dataset, read_bytes
    files = [read_bytes(path) for path, _ in build_dataset(cfg['root'], 'train', None).samples[:cfg['batch']]]
    decode = lambda: decode_jpeg(files, mode=ImageReadMode.RGB, device='cuda')  # noqa: E731
    decode()
    speed = len(files) / median_of(decode, 11, 'cuda')
    return speed, f'{speed:.4g} img/s'


def bn_across_processes(cfg, work):
    """A one-process proxy of BatchNorm across processes: the student's step with every BatchNorm on the
    cross-process path (a group of 2 processes) over a real one-process group, against plain BatchNorm. The
    statistics are not a real run's; the kernels and collectives are."""
    import torch.distributed as dist
    from models.backbones import build_backbone
    from models.batchnorm import BNGroups, convert_batchnorm
    from models.head import build_head
    from models.simreg import SimReg
    gpu = torch.cuda.is_available()
    device = torch.device('cuda' if gpu else 'cpu')
    dist.init_process_group('nccl' if gpu else 'gloo', init_method=f'file://{work}/rendezvous_{os.getpid()}',
                            rank=0, world_size=1)
    batch, size, steps = cfg['batch'], cfg['size'], 20 if gpu else 1
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    ctx = train_student.Context(device, torch.bfloat16 if gpu else None, memory_format)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    targets = {'t': torch.randn(batch, 2048, device=device)}
    speeds = []
    for groups in (BNGroups(batch, 2, dist.group.WORLD), None):
        torch.manual_seed(0)
        model = convert_batchnorm(SimReg(build_backbone('resnet18'), build_head(512, 2048)), groups)
        model.to(device, memory_format=memory_format).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run = lambda: [fixed_step(model, images, targets, optimizer, ctx) for _ in range(steps)]  # noqa
        run()
        speeds.append(steps * batch / median_of(run, 3, device))
    dist.destroy_process_group()
    return speeds[0], f'{speeds[0]:.4g} img/s | plain BatchNorm {speeds[1]:.4g} img/s | {speeds[0] / speeds[1]:.2f}x'


def loader_alone(cfg, work):
    packed, listed = encoded_loader_speeds(cfg['root'], cfg['batch'], cfg['workers'], 2 if cfg['smoke'] else 12)
    return packed, f'packed_collate {packed:.4g} img/s | list_collate {listed:.4g} img/s | {packed / listed:.2f}x'


# name -> (needs CUDA, function(cfg, work) -> (value, line), the figure whose value it is compared with)
FIGURES = {
    'step_live': (False, lambda c, w: step(c, w, 'step_live'), None),
    'step_cached': (False, lambda c, w: step(c, w, 'step_cached', teacher='cached'), None),
    'step_plain_bn': (False, lambda c, w: step(c, w, 'step_plain_bn', '--bn_batch', '0'), 'step_live'),
    'step_compile': (True, lambda c, w: step(c, w, 'step_compile', '--compile'), 'step_live'),
    'epoch_cpu_loader': (False, lambda c, w: epoch(c, w, 'epoch_cpu_loader'), None),
    'epoch_gpu_decode_live': (False, lambda c, w: epoch(c, w, 'epoch_gpu_decode_live', '--gpu_decode'), None),
    'epoch_gpu_decode_cached': (False, lambda c, w: epoch(c, w, 'epoch_gpu_decode_cached', '--gpu_decode',
                                                          teacher='cached'), None),
    'loader_alone': (False, loader_alone, None),
    'nvjpeg_decode': (True, nvjpeg_decode, None),
    'bn_across_processes': (False, bn_across_processes, None),
}


def figure(name, cfg, work):
    """Run one figure here; its value goes to ``work``/figures.json; returns its line."""
    needs_cuda, fn, baseline = FIGURES[name]
    if needs_cuda and not torch.cuda.is_available():
        return f'{name}: skipped (no CUDA)'
    value, line = fn(cfg, work)
    results_path = os.path.join(work, 'figures.json')
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    results[name] = value
    with open(results_path, 'w') as f:
        json.dump(results, f)
    compared = f'; {baseline} / this {results[baseline] / value:.2f}x' if baseline in results else ''
    return f'{name}: {line}{compared}'


def in_process(name, cfg, work, timeout):
    """``figure`` in a process of its own, ended after ``timeout`` seconds; its output goes to ``<name>.log``."""
    log = os.path.join(work, f'{name}.log')
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--figure', name, '--work', work]
                                + (['--smoke'] if cfg['smoke'] else []), stdout=out, stderr=out,
                                start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its loader workers too
            proc.wait()
            return f'{name}: timed out after {timeout} s (log: {log})'
    lines = [line for line in open(log).read().splitlines() if line.startswith(f'{name}: ')]
    return lines[-1] if proc.returncode == 0 and lines else f'{name}: failed, exit {proc.returncode} (log: {log})'


def prepare(cfg, work):
    """The JPEGs, a random teacher and its feature cache, made once; the figures' processes read them."""
    os.environ.setdefault('SIMREG_BENCH_CACHE', os.path.join(work, 'jpegs'))
    root = jpeg_folder(cfg['count'], cfg['shape'], unique=min(cfg['count'], 2000))
    paths = os.path.join(work, 'teacher.pth'), os.path.join(work, 'feats.npy')
    if not all(map(os.path.exists, paths)):
        with contextlib.redirect_stdout(open(os.path.join(work, 'prepare.log'), 'w')):
            paths = teacher_and_cache(root, work, cfg['teacher'], cfg['size'], cfg['batch'], cfg['workers'])
    return {**cfg, 'root': root, 'weights': paths[0], 'feats': paths[1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--smoke', action='store_true', help='tiny sizes on the CPU; CUDA-only figures skipped')
    parser.add_argument('--work', help='folder of the data, logs and results (default: a new temporary one)')
    parser.add_argument('--figure', choices=sorted(FIGURES), help='run this figure in this process')
    parser.add_argument('--only', nargs='*', choices=sorted(FIGURES), help='run only these figures')
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix='gpu_check_')
    os.makedirs(work, exist_ok=True)
    base = SMOKE if args.smoke else FULL
    base = {**base, 'workers': min(base['workers'], os.cpu_count())}
    cfg = prepare(base, work)
    if args.figure:
        print(figure(args.figure, cfg, work), flush=True)
        return
    if not args.smoke:
        print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs', flush=True)
    start = time.perf_counter()
    for name in args.only or FIGURES:
        left, began = TOTAL - (time.perf_counter() - start), time.perf_counter()
        if left < 20:
            print(f'{name}: not run (the check\'s {TOTAL} s are spent)', flush=True)
            continue
        if args.smoke and name != 'nvjpeg_decode':  # in this process, for speed; one figure tries the other way
            with open(os.path.join(work, f'{name}.log'), 'w') as log, contextlib.redirect_stdout(log):
                line = figure(name, cfg, work)
        else:
            line = in_process(name, cfg, work, int(min(left, COMPILE_TIMEOUT if name == 'step_compile' else TIMEOUT)))
        print(f'{line}  [{time.perf_counter() - began:.0f} s]', flush=True)


if __name__ == '__main__':
    main()
