"""Benchmarks: ours against a plain reference implementation of the SimReg release's way, side by side
in one process on the same inputs. Each prints one line

    <name>: ours <x> <unit> | reference <y> <unit> | <ratio>x

    python benchmarks/run.py            # full sizes
    python benchmarks/run.py --quick    # under 2 minutes on a 2-core CPU
"""
import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.folders import build_dataset  # noqa: E402
from data.sampler import SeededSamples  # noqa: E402
from data.teacher_cache import TeacherFeatureCache, write_sidecar  # noqa: E402
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, weak_transform  # noqa: E402
from benchmarks import bench_eval  # noqa: E402
from benchmarks.common import best_of, median_of, report  # noqa: E402
from benchmarks.reference import fixed_step  # noqa: E402


# ------------------------------------------------------------------ input pipeline

def write_imagenet_like_jpegs(root, count, seed=0):
    """``count`` ImageNet-sized (500x375) JPEGs in ``root/train/n00000000/`` (``write_jpeg``)."""
    folder = os.path.join(root, 'train', 'n00000000')
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        write_jpeg(os.path.join(folder, f'{i:05d}.JPEG'), (375, 500), seed * count + i)


def images_per_second(dataset, batch_size, epochs, sampler=None):
    """Steady-state throughput of one worker: the worker is started once and warmed up by a first
    pass, as in training, where its start is paid once per epoch of thousands of batches."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=1, sampler=sampler, persistent_workers=True)

    def one_pass():
        for _ in loader:
            pass
    one_pass()
    return len(dataset) / best_of(one_pass, epochs)


def bench_input_pipeline(quick):
    """Training's samples (``SeededSamples``: seeded per sample, uint8 views) against a plain torchvision loop."""
    count = 192 if quick else 512
    with tempfile.TemporaryDirectory() as root:
        write_imagenet_like_jpegs(root, count)
        ours = SeededSamples(build_dataset(root, 'train', weak_transform(224)), 0)
        # the reference's weak view: PIL decode, RandomResizedCrop, flip, ToTensor, Normalize (float32)
        reference = datasets.ImageFolder(os.path.join(root, 'train'), T.Compose([
            T.RandomResizedCrop(224, scale=(0.2, 1.)), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
        ours_speed = images_per_second(ours, 32, 3, sampler=[(0, i) for i in range(count)])
        reference_speed = images_per_second(reference, 32, 3)
    return report('input_pipeline', ours_speed, reference_speed, 'img/s',
                  extra='  (train view at 224 with per-sample seeding, 500x375 JPEGs, one DataLoader worker)')


def bench_seeding(quick):
    """Per-sample seeding alone: ``SeededSamples`` over a dataset that does nothing, against the same seeded by
    ``fork_rng`` + ``torch.manual_seed``."""
    from benchmarks.reference import ManualSeededSamples
    count = 2000 if quick else 20000
    keys = [(0, i) for i in range(count)]
    ours, reference = SeededSamples(range(count), 0), ManualSeededSamples(range(count), 0)
    ours_time = median_of(lambda: [ours[key] for key in keys], 5) / count
    reference_time = median_of(lambda: [reference[key] for key in keys], 5) / count
    return report('seeding', ours_time * 1e6, reference_time * 1e6, 'us/sample', higher_is_better=False,
                  extra='  (SeededSamples over a dataset that does nothing, sample seed derivation included)')


# ------------------------------------------------------------------ teacher cache

def rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def bench_teacher_cache(quick):
    """Target gather for a batch of 256: memmap rows by index vs the reference's dict of per-image
    tensors copied row by row (``current_target[i] = t_feats[name]``)."""
    n, dim, batch = (100_000 if quick else 1_281_167), 2048, 256
    free_bytes = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    while n * dim * 4 * 1.3 > 0.6 * free_bytes:  # the reference dict holds fp32 rows in RAM
        n //= 2
    rng = np.random.RandomState(0)
    names = [f'n{i // 1300:08d}_{i}.JPEG' for i in range(n)]
    batches = [rng.randint(0, n, batch) for _ in range(50)]
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, 'feats.npy')
        chunk_rows = 65536
        features = np.lib.format.open_memmap(path, mode='w+', dtype=np.float16, shape=(n, dim))
        for start in range(0, n, chunk_rows):
            features[start:start + chunk_rows] = rng.randn(min(chunk_rows, n - start), dim)
        features.flush()
        del features
        # the sidecar holds only what TeacherFeatureCache checks (no real dataset)
        write_sidecar(path, {'teacher': {}, 'dataset': {'num_samples': n, 'root': '', 'file_list_sha256': ''}})
        os.sync()  # a real cache is an old file: no write-back competing with the reads
        gc.collect()
        before = rss_bytes()
        cache = TeacherFeatureCache(path)
        cache.rows(torch.from_numpy(np.arange(n)))  # touch every page, as a long run would
        ours_memory = rss_bytes() - before
        ours_time = best_of(lambda: [cache.rows(torch.from_numpy(b)) for b in batches], 3) / len(batches)

        before = rss_bytes()
        t_feats = {name: torch.from_numpy(np.asarray(cache.features[i], dtype=np.float32))
                   for i, name in enumerate(names)}
        reference_memory = rss_bytes() - before

        def reference_gather(indices):
            current_target = torch.zeros(batch, dim)
            for i, index in enumerate(indices):
                current_target[i] = t_feats[names[index]]
            return current_target
        reference_time = best_of(lambda: [reference_gather(b) for b in batches], 3) / len(batches)
        report('teacher_cache', ours_time * 1e3, reference_time * 1e3, 'ms/batch', higher_is_better=False,
               extra=f'  (batch {batch}, N={n} x {dim}; resident memory ours {ours_memory / 2**30:.2f} GiB | '
                     f'reference {reference_memory / 2**30:.2f} GiB = {ours_memory / reference_memory:.2f}x)')

        # what every (re)start of a run pays before its first step: open the memmap vs torch.load the dict
        reference_path = os.path.join(root, 'feats.pth')
        torch.save(t_feats, reference_path)
        del t_feats
        gc.collect()
        ours_open = best_of(lambda: TeacherFeatureCache(path), 3)
        reference_open = best_of(lambda: torch.load(reference_path), 1)
    return report('teacher_cache_open', ours_open, reference_open, 's', higher_is_better=False,
                  extra=f'  (open the cache at start-up, N={n} x {dim})')


# ------------------------------------------------------------------ train step

def bench_train_step(quick):
    """Distillation step img/s: ours (train_student.train_step: uint8 in, on-device normalisation,
    autocast bf16 and channels_last on GPUs, inference-mode teacher) vs a plain fp32 loop."""
    import train_student
    from models.backbones import build_backbone
    from models.head import build_head
    from models.simreg import LiveTeacher, SimReg
    from data.transforms import DeviceInput, normalize

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    gpu = device.type == 'cuda'
    size, batch, steps = (224, 128, 20) if gpu else ((64, 16, 3) if quick else (112, 32, 5))
    images, index = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), torch.arange(batch)

    def build(memory_format):
        torch.manual_seed(0)
        teacher = LiveTeacher(build_backbone('resnet50'), {}).to(device, memory_format)
        student = build_backbone('resnet18')
        model = SimReg(student, build_head(512, 2048)).to(device, memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return teacher, model, optimizer

    memory_format = torch.channels_last if gpu else torch.contiguous_format
    amp_dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else None
    teacher, model, _ = build(memory_format)
    teacher.to(device, memory_format, amp_dtype)  # as train_student: the frozen teacher in the autocast dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, fused=gpu or None)
    torch.backends.cudnn.benchmark = gpu
    ctx = train_student.Context(device, amp_dtype, memory_format)
    to_device = DeviceInput(device, memory_format, True, amp_dtype)

    def ours():  # the body of train_student.train_one_epoch
        for _ in range(steps):
            x, teacher_in = to_device(index, images, 0)
            train_student.train_step(model, {'teacher': teacher}, (index, x, teacher_in), optimizer, ctx)
        if gpu:
            torch.cuda.synchronize()

    ref_teacher, ref_model, ref_optimizer = build(torch.contiguous_format)
    float_images = normalize(images)  # the reference ships float32 batches from the loader

    def reference():
        for _ in range(steps):
            x = float_images.to(device)
            with torch.no_grad():
                target = torch.nn.functional.normalize(ref_teacher.network(x), dim=1)
            query = torch.nn.functional.normalize(ref_model(x), dim=1)
            loss = (2 - 2 * (query * target).sum(1)).mean()
            ref_optimizer.zero_grad()
            loss.backward()
            ref_optimizer.step()
            loss.item()  # the reference reads the loss every step
        if gpu:
            torch.cuda.synchronize()

    ours(), reference()  # warm-up
    ours_speed = steps * batch / best_of(ours, 2)
    reference_speed = steps * batch / best_of(reference, 2)
    return report('train_step', ours_speed, reference_speed, 'img/s',
                  extra=f'  (ResNet-50 -> ResNet-18, {size}px, batch {batch}, {device.type})')


def bench_bn_groups(quick):
    """The student's step with --bn_batch 64 on one process (ghost BatchNorm: one batch_norm per group of 64)
    against plain BatchNorm over the 256 a process holds on one GPU (on a CPU scaled down: groups of a quarter
    of the batch); repeats alternate, medians reported."""
    import train_student
    from models.backbones import build_backbone
    from benchmarks.common import wall_times
    from models.batchnorm import BNGroups, convert_batchnorm
    from models.head import build_head
    from models.simreg import SimReg

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    gpu = device.type == 'cuda'
    size, batch, steps = (224, 256, 20) if gpu else ((64, 32, 3) if quick else (112, 64, 5))
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    amp_dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported(including_emulation=False) else None
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    targets = {'t': torch.randn(batch, 2048, device=device)}
    ctx = train_student.Context(device, amp_dtype, memory_format)

    def build(groups):
        torch.manual_seed(0)
        model = convert_batchnorm(SimReg(build_backbone('resnet18'), build_head(512, 2048)), groups)
        model.to(device, memory_format=memory_format).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return lambda: [fixed_step(model, images, targets, optimizer, ctx)
                        for _ in range(steps)]

    ours, reference = build(BNGroups(batch // 4)), build(None)
    ours(), reference()  # warm-up
    pairs = [(wall_times(ours, 1, device)[0], wall_times(reference, 1, device)[0]) for _ in range(5)]
    ours_speed, reference_speed = (steps * batch / sorted(times)[len(times) // 2] for times in zip(*pairs))
    return report('bn_groups', ours_speed, reference_speed, 'img/s',
                  extra=f'  (ResNet-18 student step, BatchNorm over groups of {batch // 4} vs over the {batch} of '
                        f'one process, {size}px, {device.type})')


def bench_linear_cached(quick):
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    sizes = dict(n=50_000, dim=512, classes=100, repeats=2) if quick else dict(n=400_000, dim=2048, classes=1000,
                                                                                  repeats=3)
    bench_eval.bench_probe_epoch(batch_size=256, device=device, **sizes)


def bench_knn(quick):
    bench_eval.bench_knn(**(dict(n_train=20_000, n_val=5_000, dim=128, classes=100) if quick else
                            dict(n_train=200_000, n_val=20_000, dim=512, classes=1000)), repeats=2)


# ------------------------------------------------------------------ --gpu_decode views: per image vs batched

def write_jpeg(path, shape, seed):
    """One ImageNet-like JPEG (texture, noise, quality 90) of ``shape`` (height, width)."""
    rng = np.random.RandomState(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    waves = np.sin(xx[..., None] / rng.uniform(3, 30) + yy[..., None] / rng.uniform(3, 30) + np.arange(3))
    pixels = 127 + 70 * waves + rng.normal(0, 25, (h, w, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def jpeg_folder(count, shape, unique=2000, classes=10):
    """``<cache>/jpegs_<count>_<w>x<h>/train/<class>/``: ``count`` JPEGs, generated once (in parallel) and
    reused; ``unique`` distinct images, the rest hard links to them (the same bytes decode at the same cost,
    and the folder costs ``unique`` files of disk). Orientations alternate as in ImageNet: ``shape``,
    transposed, and 2/3 of its height. ``SIMREG_BENCH_CACHE`` sets the cache (default ~/.cache/simreg_bench)."""
    import multiprocessing
    h, w = shape
    root = os.path.join(os.environ.get('SIMREG_BENCH_CACHE', os.path.expanduser('~/.cache/simreg_bench')),
                        f'jpegs_{count}_{w}x{h}')
    done = os.path.join(root, 'complete')
    if os.path.exists(done):
        return root
    shapes = [(h, w), (w, h), (h * 2 // 3, w)]
    paths = [os.path.join(root, 'train', f'n{i % classes:08d}', f'{i:06d}.JPEG') for i in range(count)]
    for folder in {os.path.dirname(p) for p in paths}:
        os.makedirs(folder, exist_ok=True)
    jobs = [(paths[i], shapes[i % len(shapes)], i) for i in range(min(unique, count))]
    with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.starmap(write_jpeg, jobs, chunksize=16)
    for i in range(len(jobs), count):
        if os.path.exists(paths[i]):
            os.remove(paths[i])
        try:
            os.link(paths[i % len(jobs)], paths[i])
        except OSError:
            shutil.copyfile(paths[i % len(jobs)], paths[i])
    open(done, 'w').close()
    return root


def bench_gpu_views(quick):
    """--gpu_decode's main-process work per batch, before and after the batched views: decode + views one
    image at a time (``decode_views_on``, parameters drawn here) against decode + ``BatchedViews`` (parameters
    drawn by the workers, as in training). Median of repeats. On a CPU the batched path is the slower:
    its dense matrix products do ~100x the multiply-adds of a direct resize, which only a GPU makes free."""
    from data.folders import read_bytes
    from data.gpu_views import GpuDecodedInput, ViewParams
    from data.sampler import sample_seed, seeded
    from benchmarks.reference import decode_views_on
    from data.transforms import TwoViews
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    gpu = device.type == 'cuda'
    batch, repeats = (256, 11) if gpu else ((8, 3) if quick else (32, 5))
    root = jpeg_folder(max(batch, 64), (375, 500), unique=batch)
    paths = sorted(p for p, _ in build_dataset(root, 'train', None).samples)[:batch]
    encoded = [read_bytes(p) for p in paths]
    index = torch.arange(batch)
    for name, views in (('gpu_views_weak', TwoViews(224, weak_weak=True, single_aug=True)),
                        ('gpu_views_weak_strong', TwoViews(224, weak_strong=True))):
        worker = ViewParams(views)
        samples = []
        for i, data in enumerate(encoded):
            with seeded(sample_seed(0, 0, i)):
                samples.append(worker(data))  # what the loader's workers hand over
        batched = GpuDecodedInput(device, torch.contiguous_format, views, [(p, 0) for p in paths], 0)
        run_batched = lambda: batched.views(index, samples, 0)  # noqa: E731
        run_per_image = lambda: decode_views_on(device, encoded, views, lambda j: paths[j],  # noqa: E731
                                                lambda j: sample_seed(0, 0, j))
        run_batched(), run_per_image()  # warm-up (nvjpeg handles, cuBLAS)
        ours = batch / median_of(run_batched, repeats, device)
        reference = batch / median_of(run_per_image, repeats, device)
        report(name, ours, reference, 'img/s',
               extra=f'  (decode + views at 224, batched vs per image, batch {batch} of 500x375/375x500 JPEGs, '
                     f'{device.type})')


# ------------------------------------------------------------------ a real training epoch

def steady_state(windows, batch_size):
    """Images/s and data-wait share between the first window record and the last of an epoch (the
    records hold figures since the epoch's start): the epoch without its start-up (workers, cuDNN)."""
    first, last = windows[0], windows[-1]
    t0, t1 = (w['step'] * batch_size / w['images_per_s'] for w in (first, last))
    d0, d1 = first['data_wait_share'] * t0, last['data_wait_share'] * t1
    return (last['step'] - first['step']) * batch_size / (t1 - t0), (d1 - d0) / (t1 - t0)


def teacher_and_cache(root, work, arch, size, batch, workers):
    """A random ``arch`` teacher's weights and its feature cache of ``root`` (cache_teacher_feats), under ``work``."""
    import cache_teacher_feats
    from models.backbones import build_backbone
    torch.manual_seed(0)
    weights, feats = os.path.join(work, 'teacher.pth'), os.path.join(work, 'feats.npy')
    torch.save(build_backbone(arch).state_dict(), weights)
    autotune = torch.backends.cudnn.benchmark  # the builder turns it on; train_student leaves it as it is
    cache_teacher_feats.main(cache_teacher_feats.get_args_parser().parse_args(
        [root, '--arch_teacher', arch, '--teacher_weights', weights, '--image_size', str(size),
         '--batch_size', str(batch), '--num_workers', str(workers), '--output', feats]))
    torch.backends.cudnn.benchmark = autotune
    return weights, feats


def train_epochs(root, work, exp, argv, batch):
    """``train_student.main`` on ``root`` with ``argv``; the last epoch's img/s and data-wait share, over the epoch
    and past its first window (``steady_state``), from its JSON log."""
    import train_student
    from utils.logging import json_log_path, read_json_log
    train_student.main(train_student.get_args_parser().parse_args([root, '--base_dir', work, '--exp', exp] + argv))
    records = read_json_log(json_log_path(os.path.join(work, 'exp', exp, 'logs')))
    epoch = [r for r in records if r['event'] == 'epoch'][-1]
    windows = [r for r in records if r['event'] == 'window' and r['epoch'] == epoch['epoch']]
    steady = steady_state(windows, batch) if len(windows) > 1 else (float('nan'), float('nan'))
    return epoch['images_per_s'], epoch['data_wait_share'], *steady


def encoded_loader_speeds(root, batch, workers, batches):
    """Img/s of a --gpu_decode loader alone (workers read files and draw parameters), packed_collate against the
    reference list_collate, pinned as in training on CUDA; the workers are warmed up by a first batch."""
    from benchmarks.reference import list_collate
    from data.gpu_views import ViewParams, packed_collate
    from data.sampler import GlobalBatchSampler
    from data.transforms import TwoViews
    dataset = SeededSamples(build_dataset(root, 'train', ViewParams(TwoViews(224, weak_weak=True, single_aug=True)),
                                          encoded=True), 0)
    speeds = []
    for collate in (packed_collate, list_collate):
        sampler = GlobalBatchSampler(min(len(dataset), (batches + 1) * batch), batch, 1, 0, 0)
        loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                 pin_memory=torch.cuda.is_available()))
        next(loader)
        start = time.perf_counter()
        count = sum(len(b[0]) for b in loader)
        speeds.append(count / (time.perf_counter() - start))
        del loader
    return speeds


def bench_encoded_loader(quick):
    batch, workers, batches = (32, 2, 6) if quick else (64, 2, 12)
    root = jpeg_folder(batch * (batches + 1), (375, 500), unique=min(batch * (batches + 1), 2000))
    packed, listed = encoded_loader_speeds(root, batch, workers, batches)
    return report('encoded_loader', packed, listed, 'img/s',
                  extra=f'  (--gpu_decode loader alone, packed_collate vs list_collate, batch {batch}, {workers} '
                        'workers, 500x375 JPEGs)')


BENCHMARKS = {'seeding': bench_seeding, 'input_pipeline': bench_input_pipeline, 'teacher_cache': bench_teacher_cache,
              'linear_cached': bench_linear_cached, 'knn': bench_knn, 'train_step': bench_train_step,
              'bn_groups': bench_bn_groups, 'gpu_views': bench_gpu_views, 'encoded_loader': bench_encoded_loader}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='small sizes (under 2 minutes on 2 CPU cores)')
    parser.add_argument('--only', nargs='*', choices=sorted(BENCHMARKS), help='run only these')
    args = parser.parse_args()
    for name, bench in BENCHMARKS.items():
        if not args.only or name in args.only:
            bench(args.quick)


if __name__ == '__main__':
    main()
