"""The teacher's own input: --teacher_image_size and --teacher_norm. One crop for both nets, cut at the larger
size; each net's input resized from it on the device and normalised its way; for a live teacher, the cache
builder and --gpu_decode alike. A cache records its teacher's input and a run that asks for another is refused.
The teacher is a parameter (``TEACHERS``: arch -> a function writing seeded weights to a path)."""
import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from conftest import build_cache, make_image_folder, read_json, run_command, train, write_teacher_checkpoint
from data.folders import build_dataset, decode_rgb
from data.gpu_views import GpuDecodedInput, ViewParams
from data.sampler import SeededSamples
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, NORMS, DeviceInput, NetInput, TwoViews, eval_transform
from benchmarks.reference import list_collate
from models.loading import load_backbone
from models.simreg import LiveTeacher, teacher_input
from utils.errors import SimRegError

def write_clip(path, seed=1):
    """Seeded random weights of open_clip's ViT-S-32, saved as open_clip saves them (the whole model)."""
    import open_clip
    torch.manual_seed(seed)
    torch.save(open_clip.create_model('ViT-S-32').state_dict(), path)


TEACHERS = {'resnet18': write_teacher_checkpoint, 'open_clip/ViT-S-32': write_clip}
STUDENT, TEACHER = 32, 64  # the student's and the teacher's input sizes
# the end-to-end run's (student, teacher) sizes and a second cache's smaller teacher input, per teacher
SIZES = {'resnet18': (STUDENT, TEACHER, (24, 'clip')), 'open_clip/ViT-S-32': (64, 96, (32, 'imagenet'))}


def by_hand(uint8, size, mean, std):
    """torchvision's own Resize (antialiased bilinear) + ToDtype(scale) + Normalize, on a uint8 batch."""
    x = v2.functional.resize(uint8, [size, size], antialias=True) if uint8.shape[-1] != size else uint8
    return v2.functional.normalize(v2.functional.to_dtype(x, torch.float32, scale=True), list(mean), list(std))


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """<ws>/data: 2 classes x 3 images of 48 px; <ws>/<arch>.pth per teacher."""
    ws = tmp_path_factory.mktemp('teacher_input')
    make_image_folder(ws / 'data', n_classes=2, per_class=3, size=48, splits=('train',))
    for arch, write in TEACHERS.items():
        write(ws / f'{arch.replace("/", "_")}.pth')
    return ws


def test_device_input_resizes_and_normalises_each_net_its_way():
    torch.manual_seed(0)
    crop = torch.randint(0, 256, (3, 3, TEACHER, TEACHER), dtype=torch.uint8)
    clip, student = NetInput(TEACHER, *NORMS['clip']), NetInput(STUDENT)
    nets = DeviceInput(torch.device('cpu'), torch.contiguous_format, True).with_nets(
        student, [clip, NetInput(STUDENT), clip])
    student_in, teacher_in = nets(None, crop, 0)
    torch.testing.assert_close(student_in, by_hand(crop, STUDENT, IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=1e-5)
    assert list(teacher_in) == [clip, student] and teacher_in[student] is student_in  # one tensor per input
    torch.testing.assert_close(teacher_in[clip], by_hand(crop, TEACHER, *NORMS['clip']), rtol=0, atol=1e-5)
    small = NetInput(16, *NORMS['siglip'])  # two views: each made at its net's size, resized where it is not
    two_views = DeviceInput(torch.device('cpu'), torch.contiguous_format, False).with_nets(student, [small])
    student_in, teacher_in = two_views(None, (crop[:, :, :STUDENT, :STUDENT], crop), 0)
    torch.testing.assert_close(teacher_in, by_hand(crop, 16, (0.5,) * 3, (0.5,) * 3), rtol=0, atol=1e-5)
    assert student_in.shape[-1] == STUDENT
    # the defaults: ImageNet's, no resize, one tensor for both nets (as before these flags)
    plain_student, plain_teacher = DeviceInput(torch.device('cpu'), torch.contiguous_format, True)(None, crop, 0)
    assert plain_student is plain_teacher
    torch.testing.assert_close(plain_student, by_hand(crop, TEACHER, IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=1e-5)


def test_one_view_for_both_nets_is_cut_at_the_larger_size():
    image = torch.zeros(3, 48, 48, dtype=torch.uint8)
    assert TwoViews(STUDENT, weak_weak=True, single_aug=True, teacher_size=TEACHER)(image).shape[-1] == TEACHER
    student, teacher = TwoViews(STUDENT, weak_weak=True, teacher_size=TEACHER)(image)
    assert (student.shape[-1], teacher.shape[-1]) == (STUDENT, TEACHER)


def test_the_family_normalisation_is_the_networks_unless_overridden():
    network = torch.nn.Identity()
    assert teacher_input(network, 48) == NetInput(48, IMAGENET_MEAN, IMAGENET_STD)  # no attributes: ImageNet's
    network.input_mean, network.input_std = NORMS['clip']
    assert teacher_input(network, 48) == NetInput(48, *NORMS['clip'])
    assert teacher_input(network, 48, 'siglip') == NetInput(48, (0.5,) * 3, (0.5,) * 3)


def spy(monkeypatch):
    """Record the first batch's uint8 view and the live teachers' targets (the first batch's first)."""
    seen = {}
    to_input, call = DeviceInput.__call__, LiveTeacher.__call__

    def device_input(self, index, images, epoch):
        seen.setdefault('crop', images)
        return to_input(self, index, images, epoch)

    def teacher(self, index, view, amp_dtype=None):
        out = call(self, index, view, amp_dtype)
        seen.setdefault('targets', []).append(out)
        return out
    monkeypatch.setattr(DeviceInput, '__call__', device_input)
    monkeypatch.setattr(LiveTeacher, '__call__', teacher)
    return seen


def common(ws, exp, *extra, student=STUDENT):
    return [str(ws / 'data'), '--arch_student', 'resnet18', '--image_size', str(student), '--batch_size', '6',
            '--epochs', '2', '--save_freq', '1', '--num_workers', '0', '--single_aug', '--weak_weak',
            '--print_freq', '1', '--base_dir', str(ws / 'runs'), '--exp', exp, *extra]


def checkpoint(ws, exp, name='last.pth'):
    return torch.load(ws / 'runs' / 'exp' / exp / 'checkpoints' / name, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize('arch', list(TEACHERS))
def test_teacher_at_its_own_size_trains_caches_and_resumes(ws, arch, one_thread, monkeypatch):
    STUDENT, TEACHER, second = SIZES[arch]  # noqa: N806
    name, runner = arch.replace('/', '_'), functools.partial(common, student=STUDENT)
    weights, teacher_size = str(ws / f'{name}.pth'), ['--teacher_image_size', str(TEACHER)]
    teacher = [*teacher_size, '--arch_teacher', arch, '--teacher_weights', weights]
    network = load_backbone(arch, weights).eval()
    net = teacher_input(network, TEACHER)
    # live: the targets are the teacher's on the crop resized and normalised its way, by hand
    seen = spy(monkeypatch)
    train(runner(ws, f'live_{name}', *teacher))
    assert seen['crop'].shape[-1] == TEACHER
    with torch.no_grad():
        expected = network(by_hand(seen['crop'], TEACHER, net.mean, net.std))
    torch.testing.assert_close(seen['targets'][0], expected, rtol=0, atol=1e-5)
    info = read_json(ws / 'runs' / 'exp' / f'live_{name}' / 'logs' / 'train_args.json')['teachers'][arch]
    assert info['input'] == json.loads(json.dumps(net._asdict()))
    # resume: a run stopped after epoch 1 continues to the same weights
    resumed = ws / 'runs' / 'exp' / f'resumed_{name}' / 'checkpoints'
    resumed.mkdir(parents=True)
    shutil.copy(ws / 'runs' / 'exp' / f'live_{name}' / 'checkpoints' / 'ckpt_epoch_1.pth', resumed / 'last.pth')
    train(runner(ws, f'resumed_{name}', *teacher, '--resume', 'auto'))
    straight, again = checkpoint(ws, f'live_{name}')['state_dict'], checkpoint(ws, f'resumed_{name}')['state_dict']
    assert all(torch.equal(value, again[key]) for key, value in straight.items())
    # the cache: the rows are the teacher's on the center crop cut at the larger size, resized and normalised its
    # way (a teacher smaller than the student: the crop at the student's size, resized), its input recorded
    paths = [path for path, _ in build_dataset(str(ws / 'data'), 'train', None).samples]
    for size, norm in ((TEACHER, ''), second):
        own = teacher_input(network, size, norm)
        cache = f'{name}_{size}{norm}.npy'
        build_cache(ws, cache, '--arch_teacher', arch, '--image_size', str(STUDENT), '--teacher_image_size',
                    str(size), *(['--teacher_norm', norm] if norm else []), '--teacher_weights', weights,
                    '--num_workers', '0', '--precision', 'fp32')
        meta = read_json(ws / cache.replace('.npy', '.json'))
        assert meta['teacher_input'] == {'size': size, 'mean': list(own.mean), 'std': list(own.std)}
        crops = torch.stack([eval_transform(max(size, STUDENT))(decode_rgb(path)) for path in paths])
        with torch.no_grad():
            expected = network(by_hand(crops, size, own.mean, own.std))
        torch.testing.assert_close(torch.from_numpy(np.load(ws / cache)).float(), expected, rtol=1e-3, atol=1e-3)
    cache = f'{name}_{TEACHER}.npy'
    feats = ['--use_cache', '--teacher_feats', str(ws / cache), '--arch_teacher', arch]
    train(runner(ws, f'cached_{name}', *feats, *teacher_size, '--epochs', '1'))
    assert checkpoint(ws, f'cached_{name}')['teacher']['input']['size'] == TEACHER
    # another size or normalisation than the cache's teacher took: one line, exit 2, no checkpoint
    wrong = f'{ws / cache} was built with teacher input {net.describe()}, the run asks for '
    result = run_command([os.sys.executable, 'train_student.py', *runner(ws, f'refused_{name}', *feats),
                          '--teacher_image_size', '48'], expect=2)
    assert result.stderr.strip().splitlines()[-1] == (
        f'error: {wrong}{net._replace(size=48).describe()}: rebuild the cache with cache_teacher_feats.py '
        f'--teacher_image_size 48, or drop --teacher_image_size and --teacher_norm to train on the cache\'s')
    assert not os.listdir(ws / 'runs' / 'exp' / f'refused_{name}' / 'checkpoints')
    # a multi-view cache: the student replays the stored views cut at the teacher's (larger) size, then resized
    build_cache(ws, f'{name}_views.npy', '--arch_teacher', arch, '--image_size', str(STUDENT), *teacher_size,
                '--teacher_weights', weights, '--num_workers', '0', '--cache_views', '2')
    seen = spy(monkeypatch)
    train(runner(ws, f'views_{name}', '--use_cache', '--teacher_feats', str(ws / f'{name}_views.npy'),
                 '--arch_teacher', arch, '--epochs', '1'))
    assert seen['crop'].shape[-1] == TEACHER and 'targets' not in seen
    other = 'siglip' if arch.startswith('open_clip/') else 'clip'  # not the family's
    with pytest.raises(SimRegError, match=f'the run asks for {TEACHER}px, {other} normalisation: rebuild the cache '
                                          f'with cache_teacher_feats.py --teacher_image_size {TEACHER} '
                                          f'--teacher_norm {other}, or drop'):
        train(runner(ws, f'refused_norm_{name}', *feats, *teacher_size, '--teacher_norm', other))


@pytest.mark.slow
def test_a_teacher_carrying_its_mean_and_std_is_normalised_its_way(ws, one_thread, monkeypatch):
    import models.simreg

    def with_clip_attributes(*args, **kwargs):
        network = load_backbone(*args, **kwargs)
        network.input_mean, network.input_std = NORMS['clip']
        return network
    monkeypatch.setattr(models.simreg, 'load_backbone', with_clip_attributes)
    live = ['--arch_teacher', 'resnet18', '--teacher_weights', str(ws / 'resnet18.pth'), '--epochs', '1']
    for exp, extra, norm in (('family', [], 'clip'), ('override', ['--teacher_norm', 'imagenet'], 'imagenet')):
        seen = spy(monkeypatch)
        train(common(ws, exp, *live, *extra))
        info = read_json(ws / 'runs' / 'exp' / exp / 'logs' / 'train_args.json')['teachers']['resnet18']
        assert (tuple(info['input']['mean']), tuple(info['input']['std'])) == NORMS[norm]
        network = load_backbone('resnet18', str(ws / 'resnet18.pth')).eval()
        with torch.no_grad():
            expected = network(by_hand(seen['crop'], STUDENT, *NORMS[norm]))
        torch.testing.assert_close(seen['targets'][0], expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_teachers_each_take_their_own_input(ws, one_thread, monkeypatch):
    seen, weights = spy(monkeypatch), str(ws / 'resnet18.pth')
    train(common(ws, 'two', '--arch_teacher', 'resnet18,resnet18', '--teacher_weights', f'{weights},{weights}',
                 '--teacher_image_size', f'{TEACHER},48', '--teacher_norm', 'clip,siglip', '--epochs', '1'))
    network = load_backbone('resnet18', weights).eval()
    assert seen['crop'].shape[-1] == TEACHER
    for targets, (size, norm) in zip(seen['targets'], [(TEACHER, 'clip'), (48, 'siglip')]):
        with torch.no_grad():
            expected = network(by_hand(seen['crop'], size, *NORMS[norm]))
        torch.testing.assert_close(targets, expected, rtol=0, atol=1e-5)


def test_gpu_decode_gives_the_cpu_paths_teacher_input(ws, one_thread):
    """--gpu_decode with a teacher at another size: the batched views (checked on the CPU device) give the
    CPU loader's student and teacher inputs within a grey level or two, and the teacher's targets within 1%."""
    views, seed, epoch, indices = TwoViews(STUDENT, weak_weak=True, single_aug=True, teacher_size=TEACHER), 3, 1, \
        [4, 0, 2, 5, 1]
    clip = NetInput(TEACHER, *NORMS['clip'])
    cpu_input = DeviceInput(torch.device('cpu'), torch.contiguous_format, True).with_nets(NetInput(STUDENT), [clip])
    cpu = build_dataset(str(ws / 'data'), 'train', views)
    student_in, teacher_in = cpu_input(None, torch.stack([SeededSamples(cpu, seed)[(epoch, i)][1] for i in indices]),
                                       epoch)
    encoded = build_dataset(str(ws / 'data'), 'train', None, encoded=True)
    encoded.transform = ViewParams(views)
    index, samples, _ = list_collate([SeededSamples(encoded, seed)[(epoch, i)] for i in indices])
    gpu_input = GpuDecodedInput(torch.device('cpu'), torch.contiguous_format, views, encoded.samples,
                                seed).with_nets(NetInput(STUDENT), [clip])
    gpu_student, gpu_teacher = gpu_input(index, samples, epoch)
    assert gpu_student.shape[-1] == STUDENT and gpu_teacher.shape[-1] == TEACHER
    level = 2 / 255 / min(NORMS['clip'][1])  # two grey levels, normalised
    torch.testing.assert_close(gpu_teacher, teacher_in, rtol=0, atol=level)
    torch.testing.assert_close(gpu_student, student_in, rtol=0, atol=2 / 255 / min(IMAGENET_STD))
    network = load_backbone('resnet18', str(ws / 'resnet18.pth')).eval()
    with torch.no_grad():
        ours, theirs = network(gpu_teacher), network(teacher_in)
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU and SIMREG_TEST_GPU=1')
def test_on_cuda_each_net_gets_its_input_one_batch_ahead(ws):
    """On CUDA (bf16, channels_last, made one batch ahead on a side stream): the CPU path's inputs within bf16's
    rounding; then a --gpu_decode run with two teachers at two sizes and normalisations trains."""
    torch.manual_seed(0)
    crops = [torch.randint(0, 256, (4, 3, TEACHER, TEACHER), dtype=torch.uint8) for _ in range(2)]
    nets = NetInput(STUDENT), [NetInput(TEACHER, *NORMS['clip']), NetInput(48, *NORMS['siglip'])]
    on_cuda = DeviceInput(torch.device('cuda'), torch.channels_last, True, torch.bfloat16).with_nets(*nets)
    on_cpu = DeviceInput(torch.device('cpu'), torch.contiguous_format, True).with_nets(*nets)
    for (_, (student_in, teacher_in), _), crop in zip(on_cuda.batches([(None, c, None) for c in crops], 0), crops):
        cpu_student, cpu_teacher = on_cpu(None, crop, 0)
        assert student_in.dtype == torch.bfloat16 and student_in.is_contiguous(memory_format=torch.channels_last)
        for ours, theirs in [(student_in, cpu_student), *((teacher_in[n], cpu_teacher[n]) for n in nets[1])]:
            torch.testing.assert_close(ours.float().cpu(), theirs, rtol=1e-2, atol=3 / 255 / 0.26)
    weights = str(ws / 'resnet18.pth')
    run_command([os.sys.executable, 'train_student.py', *common(ws, 'cuda_two_teachers', '--gpu_decode'),
                 '--arch_teacher', 'resnet18,resnet18', '--teacher_weights', f'{weights},{weights}',
                 '--teacher_image_size', f'{TEACHER},48', '--teacher_norm', 'clip,siglip'])
    assert checkpoint(ws, 'cuda_two_teachers')['teachers']['resnet18_1']['input']['size'] == 48
