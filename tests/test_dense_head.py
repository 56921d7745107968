"""Dense distillation (--dense_weight, --dense_head): the dense head, the dense loss against a hand computation, a tiny
dense run (trains, resumes, exports without its dense head) and the refusals; DINOv3's feature maps."""
import copy
import os

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import torchvision

import export_student
import train_student
from conftest import cache_workspace, read_json, resumed_from, train, train_log, write_student_checkpoint
from data.transforms import NetInput
from models import load_student
from models.backbones import build_backbone
from models.dense import feature_and_map
from models.head import build_head
from models.simreg import LiveTeacher
from utils.errors import SimRegError, exit_on_user_error

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('arch, prefix', [('dinov3_vits16', 5), ('dinov3_convnext_tiny', None)])
def test_dinov3_map_pooled_as_it_pools_is_its_feature(arch, prefix):
    """The ViT's map is its normed patch tokens (class and 4 storage tokens excluded), the ConvNeXt's its last
    stage's map; pooled as each pools (class token; average, norm), the backbone's feature."""
    torch.manual_seed(0)
    model = build_backbone(arch).eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        (feature, fmap), expected = feature_and_map(model, images), model(images)
        if prefix:
            tokens = model.forward_features(images)
            assert model.num_prefix_tokens == prefix and fmap.shape == (2, 384, 4, 3)
            assert torch.equal(fmap.flatten(2).transpose(1, 2), tokens[:, prefix:])
            assert torch.equal(feature, tokens[:, 0])
        else:
            pooled = model.head.norm(fmap.mean((2, 3), keepdim=True)).flatten(1)
            assert fmap.shape == (2, 768, 2, 1) and torch.allclose(pooled, expected, atol=1e-5)
    assert torch.allclose(feature, expected, atol=1e-5, rtol=1e-5)


def test_dense_head_is_the_regression_head_per_location():
    """The same layers as the global head (1x1 convolutions, BatchNorm2d): with its weights, the global head applied
    at every location (BatchNorm statistics over the batch and the locations)."""
    torch.manual_seed(0)
    for layers in (2, 4):
        dense, flat = build_head(8, 6, layers, dense=True), build_head(8, 6, layers)
        assert [type(m).__name__ for m in dense] == [type(m).__name__.replace('Linear', 'Conv2d').replace('1d', '2d')
                                                     for m in flat]
        flat.load_state_dict({k: v.flatten(1) if v.ndim == 4 else v for k, v in dense.state_dict().items()})
        x = torch.randn(3, 8, 2, 5)
        expected = flat(x.permute(0, 2, 3, 1).reshape(-1, 8)).reshape(3, 2, 5, 6).permute(0, 3, 1, 2)
        assert torch.allclose(dense(x), expected, atol=1e-6)


def _args(*extra):
    return train_student.get_args_parser().parse_args(['data', '--arch_student', 'resnet18', '--image_size', '64',
                                                       '--arch_teacher', 'vit_small_patch16', *extra])


def test_dense_loss_is_the_hand_computation():
    """One fp64 step: the returned dense loss and the gradients are those of the dense head on the student's map
    (resnet18 at 64 px: 2x2), resized to the ViT teacher's 4x4 grid (bilinear), and ``2 - 2 cos`` with the teacher's
    patch tokens at its own input, averaged over locations and images, added to the global loss times
    --dense_weight."""
    torch.manual_seed(0)
    vit = build_backbone('vit_small_patch16').double()
    teachers = {'vit_small_patch16': LiveTeacher(vit, {}, NetInput(64))}
    args = _args('--dense_weight', '0.5', '--dense_head', '2')
    dense = train_student.dense_teachers(args, teachers)
    assert dense == {'vit_small_patch16': 384}
    model = train_student.build_student(args, teachers).double()
    assert model.dense_q[0].in_channels == 512 and model.dense_q[-1].out_channels == 384
    reference = copy.deepcopy(model)
    student_in, teacher_in = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.randn(4, 3, 64, 64).double()

    fmap = {}
    reference.encoder_q.layer4.register_forward_hook(lambda module, inputs, output: fmap.update(map=output))
    prediction = reference(student_in)  # the global forward; its hook keeps the map
    with torch.no_grad():
        tokens = vit.forward_features(teacher_in)
    grid = tokens[:, 1:].transpose(1, 2).reshape(4, 384, 4, 4)  # the class token excluded
    dense_prediction = F.interpolate(reference.dense_q(fmap['map']), size=(4, 4), mode='bilinear', align_corners=False)
    cos = (dense_prediction * grid).sum(1) / (dense_prediction.norm(dim=1) * grid.norm(dim=1))
    dense_loss = (2 - 2 * cos).mean()
    global_loss = (2 - 2 * F.cosine_similarity(prediction, tokens[:, 0])).mean()
    (global_loss + 0.5 * dense_loss).backward()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no change: the gradients stay to compare
    ctx = train_student.Context(torch.device('cpu'), dense_weight=0.5)
    losses = train_student.train_step(model, teachers, (torch.arange(4), student_in, teacher_in), optimizer, ctx)
    assert losses.shape == (2,) and 0.1 < dense_loss.item() < 4
    assert torch.allclose(losses, torch.stack([global_loss, dense_loss]).detach(), rtol=1e-10, atol=0)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12), name


def _vit_teacher(path):
    torch.manual_seed(2)
    torch.save(build_backbone('vit_small_patch16').state_dict(), path)  # a DINO ViT-S/16 hub file's layout
    return str(path)


@pytest.fixture(scope='module')
def dense_ws(tmp_path_factory):
    ws = cache_workspace(tmp_path_factory.mktemp('dense'))
    return ws, _vit_teacher(ws / 'vit.pth')


def _argv(ws, teacher, exp, *extra):
    return [str(ws / 'data'), '--arch_student', 'resnet18', '--image_size', '64', '--batch_size', '6',
            '--epochs', '3', '--num_workers', '0', '--single_aug', '--print_freq', '1', '--save_freq', '1',
            '--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'vit_small_patch16',
            '--teacher_weights', teacher, '--dense_weight', '1', '--precision', 'fp64', *extra]


def _export(*argv):
    return export_student.main(export_student.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.mark.slow
def test_dense_run_trains_resumes_and_exports_without_its_head(dense_ws, tmp_path, capsys):
    ws, teacher = dense_ws
    train(_argv(ws, teacher, 'straight'))
    exp = ws / 'runs' / 'exp' / 'straight'
    epochs = train_log(exp, 'epoch')
    assert [r['loss_dense'] for r in epochs] == sorted((r['loss_dense'] for r in epochs), reverse=True)
    assert epochs[-1]['loss_dense'] < 0.8 * epochs[0]['loss_dense']
    assert all('loss_dense' in r for r in train_log(exp, 'window'))
    text = (exp / 'logs' / 'train.log').read_text()
    assert f"loss {epochs[-1]['loss']:.4f}  dense {epochs[-1]['loss_dense']:.4f}" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(exp / 'logs')).Reload()
    assert len(events.Scalars('train/loss_dense')) == 9

    # a run stopped after epoch 1 and resumed ends with the same weights, its dense head included
    resumed = ws / 'runs' / 'exp' / 'resumed' / 'checkpoints'
    resumed.mkdir(parents=True)
    (resumed / 'last.pth').write_bytes((exp / 'checkpoints' / 'ckpt_epoch_1.pth').read_bytes())
    train(_argv(ws, teacher, 'resumed', '--resume', 'auto'))
    assert resumed_from(ws / 'runs' / 'exp' / 'resumed') == 1
    straight = torch.load(exp / 'checkpoints' / 'last.pth', weights_only=True)['state_dict']
    again = torch.load(resumed / 'last.pth', weights_only=True)['state_dict']
    assert any(k.startswith('dense_q.') for k in straight) and straight.keys() == again.keys()
    for key, value in straight.items():
        assert torch.equal(value, again[key]), key

    # every export holds the backbone alone, which loads into torchvision as today
    last = exp / 'checkpoints' / 'last.pth'
    backbone = {k[len('encoder_q.'):]: v for k, v in straight.items() if k.startswith('encoder_q.')}
    _export(last, tmp_path / 'r18.pth', '--onnx', tmp_path / 'r18.onnx', '--image_size', 64)
    _export(last, tmp_path / 'r18.safetensors', '--format', 'safetensors')
    _export(last, tmp_path / 'hf', '--format', 'hf', '--with_head')
    exported = [torch.load(tmp_path / 'r18.pth', weights_only=True),
                safetensors.torch.load_file(tmp_path / 'r18.safetensors'),
                safetensors.torch.load_file(tmp_path / 'hf' / 'model.safetensors')]
    for state in exported:
        assert state.keys() == backbone.keys() and all(torch.equal(state[k], v.float()) for k, v in backbone.items())
        result = torchvision.models.resnet18().load_state_dict(state, strict=False)
        assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight'] and not result.unexpected_keys
    assert sorted(os.listdir(tmp_path / 'hf')) == ['README.md', 'config.json', 'head.safetensors', 'model.safetensors']
    assert not any('dense' in k for k in safetensors.torch.load_file(tmp_path / 'hf' / 'head.safetensors'))
    assert read_json(tmp_path / 'hf' / 'config.json')['heads']['head.safetensors']['out_dim'] == 384
    import onnx
    assert not any('dense' in init.name for init in onnx.load(str(tmp_path / 'r18.onnx')).graph.initializer)
    _, head = load_student(str(last))  # the evaluation scripts' loader: backbone and regression head only
    assert isinstance(head[-1], torch.nn.Linear) and head[-1].out_features == 384


def refused(capsys, run):
    """The error line of a command that exits 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        exit_on_user_error(run)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1
    return err.strip()


@pytest.mark.parametrize('extra, line', [
    (['--use_cache', '--teacher_feats', 'c.npy'], 'error: --use_cache with --dense_weight 1.0: a cached teacher has '
     'no dense targets (too large to cache): run the teacher live (drop --use_cache) or pass --dense_weight 0'),
    (['--arch_teacher', 'resnet18,resnet50', '--use_cache', '--teacher_feats', 'a.npy,b.npy'],
     'error: --use_cache with --dense_weight 1.0: a cached teacher has no dense targets'),
    (['--dense_weight', '-1'], "error: --dense_weight -1.0: give a finite dense loss weight, 0 or more (0: the "
                               "paper's method)"),
    (['--dense_weight', 'nan'], 'error: --dense_weight nan: give a finite dense loss weight'),
])
def test_bad_dense_flags_are_one_line_and_write_nothing(tmp_path, capsys, extra, line):
    argv = ['data', '--arch_teacher', 'resnet18', '--teacher_weights', 't.pth', '--dense_weight', '1',
            '--base_dir', str(tmp_path), *extra]
    assert refused(capsys, lambda: train_student.main(train_student.get_args_parser().parse_args(argv))).startswith(
        line)
    assert os.listdir(tmp_path) == []


def test_a_cached_teacher_beside_a_live_one_has_no_dense_head():
    """Several teachers: a live teacher's dense head is ``dense_q.<head name>``; a cached teacher has none (refused
    only when every teacher is cached); a live teacher of a family without a feature map is refused."""
    args = _args('--arch_teacher', 'resnet18,resnet50', '--use_cache', '--teacher_feats', ',b.npy',
                 '--dense_weight', '1')
    train_student.check_args(args)
    torch.manual_seed(0)
    cached = type('Cached', (), {'needs_view': False, 'feat_dim': 8})()
    teachers = {'resnet18': LiveTeacher(build_backbone('resnet18'), {}, NetInput(32)), 'resnet50': cached}
    dense = train_student.dense_teachers(args, teachers)
    assert dense == {'resnet18': 512}
    keys = train_student.build_student(args, teachers).state_dict()
    assert {k.split('.')[1] for k in keys if k.startswith('dense_q.')} == {'resnet18'}
    plain = _args('--arch_teacher', 'resnet18,resnet50')  # --dense_weight 0: no dense head, no map computed
    assert train_student.dense_teachers(plain, teachers) == {}
    assert not hasattr(train_student.build_student(plain, teachers), 'dense_q')
    odd = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    odd.feat_dim = 4
    with pytest.raises(SimRegError, match=r'^--dense_weight: teacher resnet18 has no dense targets here \(the ResNet, '
                                          r'DINO, DINOv2, DINOv3, MoCo v3 and DeiT teachers have them; open_clip '
                                          r'towers do not\): pass --dense_weight 0 or another teacher$'):
        train_student.dense_teachers(args, {'resnet18': LiveTeacher(odd, {}, NetInput(32)), 'resnet50': cached})


def test_dense_heads_must_be_in_the_checkpoint_and_the_run(tmp_path, capsys):
    """--weights of a student without a dense head for a dense run, and the other way round: one line each."""
    ws = cache_workspace(tmp_path)
    plain = write_student_checkpoint(tmp_path / 'plain.pth', head_dim=512)
    argv = [str(ws / 'data'), '--arch_student', 'resnet18', '--image_size', '32', '--batch_size', '6', '--epochs',
            '1', '--num_workers', '0', '--single_aug', '--base_dir', str(tmp_path / 'runs'), '--arch_teacher',
            'resnet18', '--teacher_weights', str(ws / 'teacher.pth')]
    run = lambda *extra: lambda: train(argv + list(extra))
    assert refused(capsys, run('--exp', 'a', '--weights', plain, '--dense_weight', '1')) == (
        f'error: --weights {plain} for a resnet18 student with heads for resnet18 (512-d): the checkpoint holds no '
        f'dense head (dense_q.*), trained without --dense_weight: pass --dense_weight 0, or a checkpoint of a run '
        f'with one')
    train(argv + ['--exp', 'dense', '--dense_weight', '1', '--dense_head', '2'])
    dense = tmp_path / 'runs' / 'exp' / 'dense' / 'checkpoints' / 'last.pth'
    assert refused(capsys, run('--exp', 'b', '--weights', str(dense))).endswith(
        'the checkpoint holds a dense head (dense_q.*), trained with --dense_weight: pass the --dense_weight it was '
        'trained with, or a checkpoint without one')
    train(argv + ['--exp', 'c', '--weights', str(dense), '--dense_weight', '2', '--dense_head', '2'])
    # a dense student's backbone loads wherever a student's does (as a teacher, or by the evaluation scripts)
    from models import load_backbone
    state = torch.load(dense, weights_only=True)['state_dict']
    loaded = load_backbone('resnet18', str(dense)).state_dict()
    assert all(torch.equal(v, state['encoder_q.' + k]) for k, v in loaded.items())
