"""The ViT recipe: --optimizer adamw (no weight decay on norms and biases), --warmup_epochs, --clip_grad, and
--accum_steps, whose micro-batches give the weights of the whole batch (fp64: to summation order)."""
import math
import os

import pytest
import torch

import train_student
from conftest import ROOT, make_image_folder, run_command, torchrun, train, train_log
from test_reliability_args import refused

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """48 images of 40 px in 3 classes (3 steps of 16) and a seeded resnet18 teacher."""
    ws = tmp_path_factory.mktemp('recipe')
    make_image_folder(ws / 'data', n_classes=3, per_class=16, size=40, splits=('train',))
    torch.manual_seed(1)
    from models.backbones import build_backbone
    torch.save({'state_dict': build_backbone('resnet18').state_dict()}, ws / 'teacher.pth')
    return ws


def argv(ws, exp, *extra):
    return [str(ws / 'data'), '--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18',
            '--teacher_weights', str(ws / 'teacher.pth'), '--image_size', '32', '--batch_size', '16',
            '--num_workers', '0', '--single_aug', '--weak_weak', '--print_freq', '1', *extra]


def weights(ws, exp, name='last.pth'):
    return torch.load(ws / 'runs' / 'exp' / exp / 'checkpoints' / name, weights_only=True)['state_dict']


def largest_relative_difference(a, b):
    """max over the float tensors of max|a - b| / max|a|. Integer tensors (BatchNorm's counts) must be equal, and
    tensors within 1e-9 of 0 within 1e-9 of each other: biases before a normalisation, whose gradient is 0 but for
    rounding (the ViT's final LayerNorm's, from 0)."""
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    floats = [k for k in a if a[k].is_floating_point()]
    assert all((a[k] - b[k]).abs().max() < 1e-9 for k in floats if a[k].abs().max() < 1e-9)
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in floats if a[k].abs().max() >= 1e-9)


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_adamw_warmup_and_clipping_train_a_vit_student(ws, monkeypatch, precision):
    """fp16: the grad scaler's gradients are unscaled before they are clipped (else they would be clipped to 1e-3
    and then divided by the scale)."""
    seen = []  # at each optimizer step: the groups' (lr, weight decay, parameters) and the total gradient norm
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g['params'] if p.grad is not None]
        seen.append(([(g['lr'], g['weight_decay'], g['params']) for g in self.param_groups],
                     torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()))
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, 'step', recording_step)
    exp = f'vit_{precision}'
    model = train(argv(ws, exp, '--arch_student', 'vit_tiny_patch16', '--optimizer', 'adamw', '--epochs', '2',
                       '--learning_rate', '1e-3', '--weight_decay', '0.05', '--warmup_epochs', '1', '--clip_grad',
                       '1e-3', '--precision', precision))
    # the lr of each step: linear from 0 over epoch 1's 3 steps, then a cosine over epoch 2's
    expected = [1e-3 * f for f in (0, 1 / 3, 2 / 3, 1, 0.75, 0.25)]
    assert [groups[0][0] for groups, _ in seen] == pytest.approx(expected, abs=1e-12)
    assert all(groups[1][0] == groups[0][0] for groups, _ in seen)
    windows = train_log(ws / 'runs' / 'exp' / exp, 'window')
    assert [w['lr'] for w in windows] == pytest.approx(expected, abs=1e-12)
    # weight decay on the matrices, the patch embedding and the position embedding; none on norms and biases
    (_, decay, decayed), (_, no_decay, not_decayed) = seen[0][0]
    names = {id(p): name for name, p in model.named_parameters()}
    assert (decay, no_decay) == (0.05, 0.0) and len(decayed) + len(not_decayed) == len(names)
    assert {names[id(p)] for p in not_decayed} == {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert {'encoder_q.norm.weight', 'encoder_q.blocks.0.attn.qkv.bias', 'predict_q.1.weight'} <= \
        {names[id(p)] for p in not_decayed}
    assert {'encoder_q.blocks.0.attn.qkv.weight', 'encoder_q.pos_embed', 'predict_q.0.weight'} <= \
        {names[id(p)] for p in decayed}
    # the gradients the optimizer steps with are clipped to a total norm of 1e-3 (unclipped they are far larger)
    assert all(0.99e-3 < norm <= 1e-3 * (1 + 1e-6) for _, norm in seen)
    losses = [r['loss'] for r in train_log(ws / 'runs' / 'exp' / exp, 'epoch')]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert not torch.equal(weights(ws, exp)['encoder_q.blocks.0.attn.qkv.weight'],
                           weights(ws, exp, 'ckpt_epoch_0.pth')['encoder_q.blocks.0.attn.qkv.weight'])


def test_warmup_then_cosine_is_a_function_of_the_step_and_none_is_the_papers_schedule():
    parse = train_student.get_args_parser().parse_args
    paper, warm = parse(['x', '--epochs', '10']), parse(['x', '--epochs', '10', '--warmup_epochs', '2'])
    assert all(train_student.learning_rate(e, s, 5, paper) == train_student.cosine_lr(e, paper)
               for e in range(1, 11) for s in range(5))
    lrs = [train_student.learning_rate(e, s, 5, warm) for e in range(1, 11) for s in range(5)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.025) and lrs[10] == pytest.approx(0.05)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (7 + 4 / 5) / 8)))


@pytest.mark.parametrize('student', ['vit', 'resnet18'])
def test_two_micro_batches_give_the_weights_of_the_whole_batch(ws, student):
    """Batch 16 in one step or in two micro-batches of 8 (fp64): the same weights and BatchNorm statistics; the
    ViT with the recipe (AdamW, clipping), the ResNet with the paper's SGD and BatchNorm groups of 8."""
    flags = {'vit': ['--arch_student', 'vit_tiny_patch16', '--optimizer', 'adamw', '--learning_rate', '1e-3',
                     '--weight_decay', '0.05', '--clip_grad', '1.0'],
             'resnet18': ['--arch_student', 'resnet18']}[student]
    for accum in ('1', '2'):
        train(argv(ws, f'{student}_accum{accum}', *flags, '--bn_batch', '8', '--precision', 'fp64', '--epochs', '1',
                   '--accum_steps', accum))
    whole, micro = weights(ws, f'{student}_accum1'), weights(ws, f'{student}_accum2')
    assert largest_relative_difference(whole, micro) <= 1e-5
    initial = weights(ws, f'{student}_accum1', 'ckpt_epoch_0.pth')
    assert max(((whole[k] - initial[k]).abs().max() / whole[k].abs().max()).item() for k in whole
               if whole[k].is_floating_point() and whole[k].abs().max() > 0) > 1e-3  # they trained


@pytest.mark.slow
def test_two_processes_of_two_micro_batches_give_the_weights_of_one_process(ws, tmp_path):
    """ResNet-18, batch 16, BatchNorm groups of 4: 2 gloo processes in micro-batches of 4 = 1 process in one step."""
    flags = ['--arch_student', 'resnet18', '--bn_batch', '4', '--precision', 'fp64', '--epochs', '1']
    train(argv(ws, 'one_process', *flags))
    run_command(torchrun(os.path.join(ROOT, 'tests', 'ddp_worker.py'), str(tmp_path / 'ddp'),
                         *argv(ws, 'two_processes', *flags, '--accum_steps', '2')))
    assert largest_relative_difference(weights(ws, 'one_process'), weights(ws, 'two_processes')) <= 1e-5


BAD_RECIPES = [
    (['--accum_steps', '0'], '--accum_steps 0: give the micro-batches of a step, 1 or more'),
    (['--accum_steps', '3', '--bn_batch', '2'], "--accum_steps 3 does not split each process's 16 images into "
                                                 'micro-batches of whole BatchNorm groups of 2 (--bn_batch 2): give an '
                                                 '--accum_steps that divides 8'),
    (['--accum_steps', '2'], 'groups of 16 (--bn_batch 64): give --accum_steps 1, or a --bn_batch that divides 8'),
    (['--accum_steps', '2', '--bn_batch', '0'], 'groups of 16 (--bn_batch 0): give --accum_steps 1, or a --bn_batch '
                                                'that divides 8'),
    (['--accum_steps', '4', '--bn_batch', '8'], 'give an --accum_steps that divides 2, or a --bn_batch that '
                                                'divides 4'),
    (['--warmup_epochs', '-1'], '--warmup_epochs -1: give the epochs of lr warm-up, 0 or more'),
    (['--warmup_epochs', '2'], '--warmup_epochs 2 is longer than the 1 --epochs: give 1 or fewer'),
    (['--clip_grad', '-1'], '--clip_grad -1.0: give a finite maximal total gradient norm, 0 or more (0: no '
                            'clipping)'),
    (['--clip_grad', 'inf'], '--clip_grad inf: give a finite maximal total gradient norm'),
]


@pytest.mark.parametrize('flags, line', BAD_RECIPES, ids=[' '.join(f) for f, _ in BAD_RECIPES])
def test_a_bad_recipe_flag_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch, flags, line):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    args = train_student.get_args_parser().parse_args(argv(tmp_path, 'refused', '--epochs', '1', *flags))
    refused(capsys, lambda: train_student.main(args), line)
    assert not os.listdir(tmp_path)


def test_micro_batches_must_hold_whole_groups_of_processes_too(tmp_path, capsys, monkeypatch):
    """2 processes of 8 images, BatchNorm over 16 (both processes): no micro-batch of a process holds a group."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    args = train_student.get_args_parser().parse_args(argv(tmp_path, 'refused', '--bn_batch', '16', '--accum_steps',
                                                           '2'))
    refused(capsys, lambda: train_student.main(args), "each process's 8 images into micro-batches of whole "
                                                      'BatchNorm groups of 8 (--bn_batch 16): give --accum_steps 1, '
                                                      'or a --bn_batch that divides 4')
    assert not os.listdir(tmp_path)


def test_the_recipes_settings_pass():
    parse = train_student.get_args_parser().parse_args
    for flags in (['--accum_steps', '4'],  # 256 in micro-batches of 64: the paper's 4-GPU BatchNorm on one GPU
                  ['--accum_steps', '2'], ['--epochs', '10', '--warmup_epochs', '10'],
                  ['--optimizer', 'adamw', '--clip_grad', '3.0', '--warmup_epochs', '10', '--weight_decay', '0.05']):
        train_student.check_args(parse(['DIR', *flags]))


def test_resuming_with_another_optimizer_is_refused(ws, capsys):
    if not (ws / 'runs' / 'exp' / 'resnet18_accum1').exists():
        train(argv(ws, 'resnet18_accum1', '--arch_student', 'resnet18', '--bn_batch', '8', '--precision', 'fp64',
                   '--epochs', '1'))
        capsys.readouterr()
    last = ws / 'runs' / 'exp' / 'resnet18_accum1' / 'checkpoints' / 'last.pth'
    args = train_student.get_args_parser().parse_args(argv(ws, 'switch', '--arch_student', 'resnet18', '--epochs',
                                                           '2', '--optimizer', 'adamw', '--resume', str(last)))
    refused(capsys, lambda: train_student.main(args), f'--resume {last} was trained with --optimizer sgd: pass '
                                                      '--optimizer sgd to continue it, or --restart')
