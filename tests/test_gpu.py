"""GPU-only paths: nvjpeg decoding, bf16 autocast, torch.compile and an NCCL training run.

Skipped without a CUDA GPU, but for a CPU check of how the compile test tells that nothing was
compiled. The rest of the suite hides GPUs, so run these with
``SIMREG_TEST_GPU=1 python -m pytest -q tests/test_gpu.py``.
"""
import copy

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from conftest import free_port, make_image_folder, resumed_from, run_command, train_log
from data.folders import build_dataset, decode_rgb, read_bytes
from benchmarks.reference import decode_views_on, fixed_step
from data.transforms import normalize
from models.backbones import build_backbone
from models.head import build_head
from models.simreg import SimReg

CUDA = torch.device('cuda')


def gpu_test(test):
    """Marks a GPU-only test: skipped without a CUDA GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(),
                                              reason='needs a CUDA GPU and SIMREG_TEST_GPU=1')(test))


@gpu_test
def test_nvjpeg_decodes_like_the_cpu(tmp_path):
    """The same images, not the same bytes: nvjpeg upsamples chroma more simply than libjpeg-turbo, which
    costs a few grey levels per pixel on these noisy 4:2:0 JPEGs (mean 3.6 seen on an H100)."""
    root = make_image_folder(tmp_path / 'data', n_classes=2, per_class=4, size=96, splits=('train',))
    paths = [p for p, _ in build_dataset(root, 'train', None).samples]
    decoded = decode_jpeg([read_bytes(p) for p in paths], mode=ImageReadMode.RGB, device=CUDA)
    for path, image in zip(paths, decoded):
        assert image.device.type == 'cuda' and image.shape == (3, 96, 96)
        gpu, cpu = image.cpu().double(), decode_rgb(path).double()
        psnr = 10 * torch.log10(255 ** 2 / ((gpu - cpu) ** 2).mean())
        assert psnr > 28 and torch.corrcoef(torch.stack([gpu.flatten(), cpu.flatten()]))[0, 1] > 0.98, path


@gpu_test
def test_gpu_decode_falls_back_for_a_png_in_the_batch(tmp_path):
    root = make_image_folder(tmp_path / 'data', n_classes=1, per_class=3, size=64, splits=('train',))
    paths = [p for p, _ in build_dataset(root, 'train', None).samples]
    Image.open(paths[1]).save(paths[1], format='PNG')  # ImageNet holds a PNG named .JPEG
    batch = decode_views_on(CUDA, [read_bytes(p) for p in paths], lambda image: image, lambda j: paths[j], int)
    assert batch.device.type == 'cuda' and batch.shape == (3, 3, 64, 64)
    assert torch.equal(batch[1].cpu(), decode_rgb(paths[1]))  # PNG is lossless and took the CPU decoder


def student_and_input(seed=0):
    torch.manual_seed(seed)
    model = SimReg(build_backbone('resnet18'), build_head(512, 512)).to(CUDA)
    images = normalize(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, device=CUDA))
    target = torch.nn.functional.normalize(torch.randn(8, 512, device=CUDA), dim=1)
    return model, images, target


def train_losses(model, images, target, amp_dtype, memory_format, steps=15):
    import train_student
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ctx = train_student.Context(CUDA, amp_dtype, memory_format)
    images = images.contiguous(memory_format=memory_format)
    return [fixed_step(model, images, {'t': target}, optimizer, ctx).item()
            for _ in range(steps)]


@gpu_test
def test_bf16_channels_last_training_follows_fp32():
    """bf16 rounds every activation to 8 mantissa bits: single-step updates of this random net agree
    with fp32 only to cos ~0.87 (so on the CPU too), but the loss curve follows fp32's (on the CPU
    within 0.08 at every step)."""
    model, images, target = student_and_input()
    fp32 = train_losses(copy.deepcopy(model), images, target, None, torch.contiguous_format)
    bf16 = train_losses(model, images, target, torch.bfloat16, torch.channels_last)
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.15
    assert bf16[-1] < 0.2 * bf16[0]


def compiled_graphs(run):
    """``run()``'s result, the graphs torch.compile's backend compiled while it ran and the frames it
    failed to compile. Under ``suppress_errors`` (compile_or_eager sets it) a failed compile runs eagerly
    without a word: no graph, a failed frame, and outputs that equal eager ones trivially."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # nothing compiled before is reused
    counters.clear()
    result = run()
    return result, counters['stats']['unique_graphs'], counters['frames']['total'] - counters['frames']['ok']


@gpu_test
def test_compiled_model_computes_the_eager_outputs():
    import train_student
    from utils.logging import setup_logger
    model, images, _ = student_and_input()
    model.eval()
    compiled = train_student.compile_or_eager(model, setup_logger(name='compile-test'))
    with torch.no_grad():
        eager_out = model(images)
        compiled_out, graphs, failed = compiled_graphs(lambda: compiled(images))
    assert graphs >= 1 and failed == 0, f'torch.compile fell back to eager: {graphs} graphs, {failed} failed'
    assert torch.allclose(compiled_out, eager_out, rtol=1e-3, atol=1e-3)


def test_compiled_graphs_tells_a_compile_from_a_silent_fallback():
    """compiled_graphs on the CPU (this test needs no GPU): dynamo's eager backend compiles one graph; a
    backend that fails falls back to eager under suppress_errors, same outputs, and no graph is counted."""
    def failing_backend(graph, example_inputs):
        raise RuntimeError('no compiler here')

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(4, 8)
    with torch._dynamo.config.patch(suppress_errors=True), torch.no_grad():
        eager_out = model(x)
        out, graphs, failed = compiled_graphs(lambda: torch.compile(model, backend='eager')(x))
        assert (graphs, failed) == (1, 0) and torch.equal(out, eager_out)
        out, graphs, failed = compiled_graphs(lambda: torch.compile(model, backend=failing_backend)(x))
        assert graphs == 0 and failed >= 1 and torch.equal(out, eager_out)


@gpu_test
@pytest.mark.slow
def test_nccl_bf16_gpu_decode_run_and_resume(tmp_path):
    """torchrun on the GPU: NCCL, bf16 autocast, channels_last, nvjpeg; the loss falls, and a run
    resumed after epoch 1 ends where the straight run ended (up to cuDNN's non-determinism)."""
    data = make_image_folder(tmp_path / 'data', n_classes=3, per_class=32, size=96, splits=('train',))
    torch.manual_seed(0)
    torch.save(build_backbone('resnet18').state_dict(), tmp_path / 'teacher.pth')

    def train(exp, *extra):
        run_command(['torchrun', '--standalone', '--nproc_per_node=1', f'--master_port={free_port()}',
                     'train_student.py', data, '--base_dir', str(tmp_path), '--exp', exp,
                     '--arch_teacher', 'resnet18', '--teacher_weights', str(tmp_path / 'teacher.pth'),
                     '--batch_size', '32', '--image_size', '64', '--num_workers', '2', '--print_freq', '1',
                     '--single_aug', '--weak_weak', '--channels_last', '--gpu_decode', *extra])
        return tmp_path / 'exp' / exp

    straight = train('straight', '--epochs', '3', '--save_freq', '1')
    start = train_log(straight, 'start')[-1]
    assert (start['backend'], start['precision'], start['channels_last']) == ('nccl', 'bf16', True)
    losses = [record['loss'] for record in train_log(straight, 'epoch')]
    assert len(losses) == 3 and losses[2] < losses[0]

    resumed = tmp_path / 'exp' / 'resumed' / 'checkpoints'
    resumed.mkdir(parents=True)
    (resumed / 'last.pth').write_bytes((straight / 'checkpoints' / 'ckpt_epoch_1.pth').read_bytes())
    train('resumed', '--epochs', '3', '--resume', 'auto')
    assert resumed_from(tmp_path / 'exp' / 'resumed') == 1
    a = torch.load(straight / 'checkpoints' / 'last.pth', weights_only=True)['state_dict']
    b = torch.load(resumed / 'last.pth', weights_only=True)['state_dict']
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=5e-2, atol=5e-3), key


@gpu_test
def test_graphed_probe_epochs_equal_eager_ones():
    """The CUDA-graph probe epoch replays the eager step's kernels, and each epoch captures its own
    learning rate (MultiStepLR drops it after the first)."""
    from evaluation import probe
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(2048, 64), dim=1)
    labels = torch.randint(0, 10, (2048,))
    var, mean = probe.feature_stats(features)
    features, labels = features.half().to(CUDA), labels.to(CUDA)
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(1)  # the same initial probe and the same batch orders
        linear = probe.build_probe(var, mean, 10).to(CUDA)
        optimizer = torch.optim.SGD(linear.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1])
        stats = []
        for _ in range(2):
            stats.append(probe.train_epoch_cached(linear, optimizer, features, labels, 128, cuda_graph=graphed))
            scheduler.step()
        runs[graphed] = stats, [p.detach().clone() for p in linear.parameters()]
    (eager_stats, eager_params), (graph_stats, graph_params) = runs[False], runs[True]
    for eager, graph in zip(eager_params, graph_params):
        assert torch.allclose(eager, graph, rtol=1e-5, atol=1e-6)
    for eager, graph in zip(eager_stats, graph_stats):
        assert graph == pytest.approx(eager, rel=1e-5)


@gpu_test
def test_cached_targets_copied_asynchronously_stay_intact(tmp_path):
    """Cached targets travel through pinned buffers with non-blocking copies: each batch's rows arrive
    whole, and no later gather overwrites a buffer whose copy is still in flight."""
    import numpy as np
    from data.teacher_cache import TeacherFeatureCache, write_sidecar
    from models.simreg import CachedTeacher
    path = str(tmp_path / 'feats.npy')
    rows = np.random.RandomState(0).randn(4096, 256).astype(np.float16)
    np.save(path, rows)
    write_sidecar(path, {'teacher': {}, 'dataset': {'num_samples': len(rows)}})
    teacher = CachedTeacher(TeacherFeatureCache(path), {}).to(CUDA)
    batches = [torch.randint(0, len(rows), (512,)) for _ in range(20)]
    targets = [teacher(b) for b in batches]
    torch.cuda.synchronize()
    for indices, target in zip(batches, targets):
        assert target.device.type == 'cuda'
        assert torch.equal(target.cpu(), torch.from_numpy(rows[indices.numpy()]))


def _views_and_images(tmp_path, config):
    """JPEGs of ImageNet-like shapes (two padding groups), the CPU pipeline's views of them from per-sample
    seeds, and the loader's ViewParams samples of the same files."""
    import numpy as np
    from data.gpu_views import ViewParams
    from data.sampler import SeededSamples
    from data.transforms import TwoViews
    root = tmp_path / 'data' / 'train' / 'c0'
    root.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i, (h, w) in enumerate([(375, 500), (500, 375), (333, 500), (120, 90), (900, 1200), (375, 500)]):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = 127 + 90 * np.sin(xx[..., None] / rng.uniform(20, 60) + yy[..., None] / rng.uniform(20, 60)
                                   + np.arange(3))  # smooth: nvjpeg and libjpeg-turbo decode it alike
        Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(root / f'{i}.jpg', quality=95)
    views = TwoViews(224, **config)
    cpu = build_dataset(tmp_path / 'data', 'train', views)
    indices = list(range(len(cpu)))
    expected = [SeededSamples(cpu, 1)[(0, i)][1] for i in indices]
    encoded = build_dataset(tmp_path / 'data', 'train', None, encoded=True)
    encoded.transform = ViewParams(views)
    samples = [SeededSamples(encoded, 1)[(0, i)][1] for i in indices]
    return views, encoded, torch.tensor(indices), expected, samples


def _psnr(a, b):
    return 10 * torch.log10(255 ** 2 / ((a.double() - b.double()) ** 2).mean(dim=(-3, -2, -1)).clamp(min=1e-10))


@gpu_test
@pytest.mark.parametrize('config', [dict(weak_weak=True), dict(weak_strong=True)], ids=['weak_weak', 'weak_strong'])
def test_batched_views_on_cuda_match_the_cpu_pipeline(tmp_path, config):
    """The batched views on the GPU (fp16 products) from the CPU-decoded pixels: PSNR >= 35 dB against the
    CPU pipeline per image; through nvjpeg (GpuDecodedInput, as --gpu_decode trains) >= 30 dB on these smooth
    JPEGs, the decoders' own difference included."""
    from data.gpu_views import BatchedViews, GpuDecodedInput
    views, encoded, index, expected, samples = _views_and_images(tmp_path, config)
    batched = BatchedViews(views)
    images = [decode_rgb(p).to(CUDA) for p, _ in encoded.samples]
    ours = batched(images, torch.stack([s.params for s in samples]))
    to_device = GpuDecodedInput(CUDA, torch.contiguous_format, views, encoded.samples, seed=1)
    through_nvjpeg = to_device.views(index, samples, 0)
    for v in range(2):
        theirs = torch.stack([e[v] for e in expected])
        assert ours[v].device.type == 'cuda' and ours[v].shape == theirs.shape
        assert _psnr(ours[v].cpu(), theirs).min() >= 35, _psnr(ours[v].cpu(), theirs)
        assert _psnr(through_nvjpeg[v].cpu(), theirs).min() >= 30, _psnr(through_nvjpeg[v].cpu(), theirs)


@gpu_test
def test_batched_views_make_no_host_sync(tmp_path):
    """Making a batch's views (weak and strong) never waits for the GPU: CUDA's sync debug mode raises on
    any synchronising call."""
    from data.gpu_views import BatchedViews
    views, encoded, _, _, samples = _views_and_images(tmp_path, dict(weak_strong=True))
    batched = BatchedViews(views)
    images = [decode_rgb(p).to(CUDA) for p, _ in encoded.samples]
    params = torch.stack([s.params for s in samples])
    batched(images, params)  # warm-up: cuBLAS handles, the pinned-memory pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        student, teacher = batched(images, params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert student.shape == teacher.shape == (len(images), 3, 224, 224)
