"""Distillation training: head, loss, schedule, data subset, end-to-end runs, DDP, resume."""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, make_image_folder, resumed_from, run_command, torchrun, train as run, train_log
from data.folders import imagenet100_classes, restrict_folder
from models.backbones import build_backbone
from models.head import build_head
import train_student
from train_student import regression_loss


@pytest.mark.parametrize('student,teacher_dim', [('resnet18', 2048), ('mobilenet', 2048),
                                                 ('resnet50', 8192), ('resnet34', 512)])
def test_head_structure_and_dims(student, teacher_dim):
    d = build_backbone(student).feat_dim
    head = build_head(d, teacher_dim).eval()
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.Linear, nn.BatchNorm1d, nn.ReLU,
                     nn.Linear]
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == \
        [(d, 2 * d), (2 * d, d), (d, 2 * d), (2 * d, teacher_dim)]
    assert head(torch.randn(3, d)).shape == (3, teacher_dim)


def test_two_layer_and_linear_heads():
    two = build_head(512, 2048, n_mlp_layers=2)
    assert [type(m) for m in two] == [nn.Linear, nn.Linear]
    assert (two[0].out_features, two[1].out_features) == (1024, 2048)
    linear = build_head(512, 2048, linear_pred=True)
    assert [type(m) for m in linear] == [nn.BatchNorm1d, nn.Linear]
    assert linear.eval()(torch.randn(2, 512)).shape == (2, 2048)


def test_backbone_dims():
    x = torch.randn(2, 3, 64, 64)
    for arch, dim in [('resnet18', 512), ('resnet50', 2048), ('mobilenet', 1280)]:
        model = build_backbone(arch).eval()
        assert model.feat_dim == dim and model(x).shape == (2, dim)


def test_loss_is_two_minus_two_cos():
    torch.manual_seed(0)
    p, t = torch.randn(8, 16), torch.randn(8, 16)
    cos = torch.nn.functional.cosine_similarity(p, t, dim=1)
    assert torch.allclose(regression_loss(p, t), (2 - 2 * cos).mean(), atol=1e-6)
    # the MSE of unit vectors, as the paper writes it
    unit = lambda v: v / v.norm(dim=1, keepdim=True)
    assert torch.allclose(regression_loss(p, t), ((unit(p) - unit(t)) ** 2).sum(1).mean(), atol=1e-5)
    assert regression_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    assert torch.allclose(regression_loss(p, t, mse_nonorm=True), ((p - t) ** 2).sum(1).mean())


def test_lr_schedule_matches_original_formula():
    args = train_student.get_args_parser().parse_args(['data'])
    assert (args.learning_rate, args.epochs, args.sgd_momentum, args.weight_decay, args.batch_size) == \
        (0.05, 130, 0.9, 1e-4, 256)
    # tools.adjust_learning_rate: lr * 0.5 * (1 + cos(pi * (epoch - 1) / epochs)), epochs from 1
    assert train_student.cosine_lr(1, args) == pytest.approx(0.05)
    assert train_student.cosine_lr(66, args) == pytest.approx(0.025)
    assert train_student.cosine_lr(130, args) == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 129 / 130)))
    values = [train_student.cosine_lr(e, args) for e in range(1, 131)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_default_precision_is_native_bf16_else_fp16_on_gpus(monkeypatch):
    from models.simreg import default_precision
    assert default_precision(torch.device('cpu')) == 'fp32'
    native = {}
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True:
                        native['bf16'] or including_emulation)
    native['bf16'] = True  # compute capability 8.0+ (A100, H100)
    assert default_precision(torch.device('cuda', 0)) == 'bf16'
    native['bf16'] = False  # V100, RTX 2080 Ti: bf16 only emulated
    assert default_precision(torch.device('cuda', 0)) == 'fp16'


def test_channels_last_defaults_to_the_device():
    parse = train_student.get_args_parser().parse_args
    # None: main turns it on for GPUs only; either way can be forced
    assert [parse(['data', *flag]).channels_last for flag in ([], ['--channels_last'], ['--no-channels_last'])] == \
        [None, True, False]


def test_live_teacher_held_in_the_autocast_dtype_gives_the_same_features():
    """On GPUs the frozen teacher is kept in the autocast dtype (autocast would cast its weights every step):
    the same features to bf16 rounding (here with CPU autocast)."""
    from models.simreg import LiveTeacher
    torch.manual_seed(0)
    network = build_backbone('resnet18').eval()
    views = torch.randn(4, 3, 32, 32)
    fp32 = LiveTeacher(copy.deepcopy(network), {}).to('cpu')(None, views, torch.bfloat16)
    held = LiveTeacher(copy.deepcopy(network), {}).to('cpu', dtype=torch.bfloat16)
    assert next(held.network.parameters()).dtype == torch.bfloat16
    features = held(None, views, torch.bfloat16)
    assert features.dtype == fp32.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(features.float(), fp32.float()).min() > 0.99
    torch.testing.assert_close(features.float(), fp32.float(), rtol=2e-2, atol=2e-2)


def test_weak_strong_wins_over_weak_weak_as_in_the_original():
    from data.transforms import TwoViews
    both = TwoViews(32, weak_strong=True, weak_weak=True)
    assert 'ColorJitter' in repr(both.student_transform) and 'ColorJitter' not in repr(both.teacher_transform)
    assert 'ColorJitter' not in repr(TwoViews(32, weak_weak=True).student_transform)


def test_imagenet100_picks_the_original_classes():
    classes = [f'n{i:08d}' for i in range(1000)]
    np.random.seed(1234)  # the original: np.random.seed(1234); permutation(len(classes))[:100]
    expected = sorted(np.random.permutation(1000)[:100])
    assert imagenet100_classes(classes) == [classes[i] for i in expected]

    class Folder:  # what restrict_folder needs of an ImageFolder
        pass
    folder = Folder()
    folder.classes = classes
    folder.class_to_idx = {c: i for i, c in enumerate(classes)}
    folder.samples = [(f'{c}/img.JPEG', i) for i, c in enumerate(classes)]
    restrict_folder(folder, imagenet100_classes(classes))
    assert len(folder.samples) == 100 and folder.targets == list(range(100))
    assert [p.split('/')[0] for p, _ in folder.samples] == [classes[i] for i in expected]


# ---------------------------------------------------------------- end-to-end runs

@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('train')
    make_image_folder(root / 'data', n_classes=3, per_class=16, size=72, splits=('train',))
    torch.manual_seed(0)
    teacher = build_backbone('resnet18')
    torch.save({'state_dict': {f'module.encoder_q.{k}': v for k, v in teacher.state_dict().items()}},
               root / 'teacher.pth')
    return root


def train_args(ws, exp, *extra):
    return ['--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18',
            '--arch_student', 'resnet18', '--teacher_weights', str(ws / 'teacher.pth'),
            '--batch_size', '16', '--image_size', '64', '--num_workers', '1', '--print_freq', '1',
            '--single_aug', '--weak_weak', *extra, str(ws / 'data')]


def ckpt(ws, exp, name):
    return torch.load(ws / 'runs' / 'exp' / exp / 'checkpoints' / name, weights_only=True)


def epoch_losses(ws, exp):
    return [record['loss'] for record in train_log(ws / 'runs' / 'exp' / exp, 'epoch')]


@pytest.mark.slow
def test_two_epoch_run_loss_falls_and_outputs(workspace):
    run(train_args(workspace, 'straight', '--epochs', '2', '--save_freq', '1'))
    losses = epoch_losses(workspace, 'straight')
    assert len(losses) == 2 and losses[1] < losses[0]
    # the JSON log: a window per --print_freq (1) step, 48 images / 16 = 3 steps an epoch; the epoch's loss
    # is the mean of its steps'
    windows = train_log(workspace / 'runs' / 'exp' / 'straight', 'window')
    assert [(w['epoch'], w['step'], w['steps']) for w in windows] == [(e, s, 3) for e in (1, 2) for s in (1, 2, 3)]
    for epoch, loss in zip((1, 2), losses):
        assert loss == pytest.approx(np.mean([w['loss'] for w in windows if w['epoch'] == epoch]), rel=1e-6)
    assert all(w['lr'] == train_student.cosine_lr(w['epoch'], train_student.get_args_parser().parse_args(
        ['x', '--epochs', '2'])) and w['images_per_s'] > 0 and 0 <= w['data_wait_share'] < 1 for w in windows)
    assert train_log(workspace / 'runs' / 'exp' / 'straight', 'start')[-1]['resumed_from'] is None
    exp = workspace / 'runs' / 'exp' / 'straight'
    assert {p.name for p in (exp / 'checkpoints').iterdir()} == {'ckpt_epoch_0.pth', 'ckpt_epoch_1.pth',
                                                                 'ckpt_epoch_2.pth', 'last.pth'}
    assert (exp / 'logs' / 'train_args.json').exists()
    assert any(p.name.startswith('events.out.tfevents') for p in (exp / 'logs').iterdir())
    state = ckpt(workspace, 'straight', 'ckpt_epoch_2.pth')
    assert state['epoch'] == 2 and state['args']['arch_student'] == 'resnet18'
    assert {k.split('.')[0] for k in state['state_dict']} == {'encoder_q', 'predict_q'}
    assert len(state['teacher']['sha256']) == 64 and state['teacher']['feat_dim'] == 512


@pytest.mark.slow
def test_resume_reaches_the_same_weights(workspace):
    if not (workspace / 'runs' / 'exp' / 'straight').exists():
        run(train_args(workspace, 'straight', '--epochs', '2', '--save_freq', '1'))
    interrupted = workspace / 'runs' / 'exp' / 'resumed' / 'checkpoints'
    interrupted.mkdir(parents=True)
    # what a job preempted after epoch 1 leaves behind
    (interrupted / 'last.pth').write_bytes(
        (workspace / 'runs' / 'exp' / 'straight' / 'checkpoints' / 'ckpt_epoch_1.pth').read_bytes())
    run(train_args(workspace, 'resumed', '--epochs', '2', '--save_freq', '1', '--resume', 'auto'))
    assert resumed_from(workspace / 'runs' / 'exp' / 'resumed') == 1
    straight, resumed = ckpt(workspace, 'straight', 'last.pth'), ckpt(workspace, 'resumed', 'last.pth')
    assert resumed['epoch'] == 2
    for key, value in straight['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key


@pytest.mark.slow
def test_resume_auto_without_checkpoint_starts_fresh(workspace):
    run(train_args(workspace, 'fresh', '--epochs', '1', '--resume', 'auto'))
    assert resumed_from(workspace / 'runs' / 'exp' / 'fresh') is None
    assert ckpt(workspace, 'fresh', 'last.pth')['epoch'] == 1


@pytest.mark.slow
def test_two_process_gloo_run(workspace, tmp_path):
    out = tmp_path / 'ddp'
    run_command(torchrun(os.path.join(ROOT, 'tests', 'ddp_worker.py'), str(out),
                         *train_args(workspace, 'ddp', '--epochs', '2')))
    rank0, rank1 = torch.load(out / 'rank0.pt'), torch.load(out / 'rank1.pt')
    # DDP keeps parameters in lockstep; BN running stats are per process between DDP's
    # broadcasts from rank 0 (whose state is what the checkpoint holds), as the original's were per GPU
    for key, value in rank0['params'].items():
        assert torch.equal(value, rank1['params'][key]), key
    saved = ckpt(workspace, 'ddp', 'last.pth')['state_dict']
    assert all(torch.equal(saved[k], v) for k, v in rank0['params'].items())
    seen0, seen1 = set(rank0['indices']), set(rank1['indices'])
    assert not seen0 & seen1 and len(seen0) == len(seen1) == 24  # 48 images, 8 per rank and step
    assert ckpt(workspace, 'ddp', 'last.pth')['args']['batch_size'] == 16


def test_gpu_decode_draws_the_same_views_as_the_loader(image_folder):
    """--gpu_decode decodes and augments on the device: the same pixels as the loader's workers, each image
    from its sample's seed (checked on the CPU device; a PNG named .jpg takes the fallback decoder)."""
    from data.folders import build_dataset, read_bytes
    from data.sampler import SeededSamples, sample_seed
    from benchmarks.reference import decode_views_on
    from data.transforms import TwoViews
    from PIL import Image
    views = TwoViews(32, weak_weak=True)
    dataset = build_dataset(image_folder, 'train', views)
    Image.open(dataset.samples[0][0]).save(dataset.samples[0][0], format='PNG')
    indices, epoch, seed = [3, 0, 7, 1, 4], 2, 5
    expected = [SeededSamples(dataset, seed)[(epoch, i)][1] for i in indices]
    paths = [dataset.samples[i][0] for i in indices]
    student, teacher = decode_views_on(torch.device('cpu'), [read_bytes(p) for p in paths], views,
                                       lambda j: paths[j], lambda j: sample_seed(seed, epoch, indices[j]))
    assert torch.equal(student, torch.stack([s for s, _ in expected]))
    assert torch.equal(teacher, torch.stack([t for _, t in expected]))
    assert not torch.equal(student, teacher)  # two weak views: each its own crop


@pytest.mark.slow
def test_gpu_decode_and_compile_fallback_train(workspace, monkeypatch):
    def broken_compile(model, **kwargs):
        raise RuntimeError('no compiler here')
    monkeypatch.setattr(torch, 'compile', broken_compile)
    run(train_args(workspace, 'gpu_decode', '--epochs', '1', '--gpu_decode', '--compile'))
    log = (workspace / 'runs' / 'exp' / 'gpu_decode' / 'logs' / 'train.log').read_text()
    assert 'torch.compile failed (no compiler here), training without it' in log
    assert len(epoch_losses(workspace, 'gpu_decode')) == 1
