"""The scripts' flags: the evaluation scripts share one definition of their common flags, one default
per meaning, and command lines written for earlier versions parse to the same values."""
import pytest

import cache_teacher_feats
import eval_imitation
import eval_knn
import eval_linear
import eval_transfer
import export_student
import train_student
from evaluation import common

FEATURE_SCRIPTS = (eval_knn, eval_linear, eval_transfer)


def parsed(module, *argv):
    return vars(module.get_args_parser().parse_args(list(argv)))


def definition(module, dest):
    action = next(a for a in module.get_args_parser()._actions if a.dest == dest)
    return action.option_strings, action.default, action.type, action.help


@pytest.mark.parametrize('dest', ['weights', 'arch', 'use_pred', 'head', 'stage', 'workers', 'batch_size',
                                  'image_size', 'amp'])
def test_feature_scripts_share_their_common_flags(dest):
    assert definition(eval_knn, dest) == definition(eval_linear, dest) == definition(eval_transfer, dest)


@pytest.mark.parametrize('dest', ['dataset', 'workers', 'batch_size', 'image_size', 'save'])
def test_imitation_shares_the_data_flags(dest):
    assert definition(eval_imitation, dest)[:3] == definition(eval_knn, dest)[:3]


def test_one_default_per_meaning():
    # --image_size None: the model's own input size (open_clip's), else 224
    for module in (*FEATURE_SCRIPTS, eval_imitation):
        args = parsed(module, 'DIR', '--weights', 'w.pth')
        assert (args['workers'], args['batch_size'], args['image_size']) == (8, 256, None), module.__name__
    assert parsed(cache_teacher_feats, 'DIR', '--teacher_weights', 't')['num_workers'] == 8
    assert train_student.get_args_parser().parse_args(['DIR']).num_workers == 8
    for module in (eval_knn, eval_linear, eval_imitation):
        assert parsed(module, 'DIR', '--weights', 'w.pth')['save'] == common.OUTPUTS == './outputs'
    # transfer results go to ./outputs/transfer/<name>, resolved once the dataset's name is known
    assert parsed(eval_transfer, 'DIR', '--weights', 'w.pth')['save'] is None
    assert './outputs/transfer/<name>' in definition(eval_transfer, 'save')[3]


def test_earlier_command_lines_parse_to_the_same_values():
    checkpoint = dict(weights='w.pth', arch='resnet50', use_pred=True, head='h', stage='head')
    assert parsed(eval_knn, '--weights', 'w.pth', '-a', 'resnet50', '--use_pred', '--head', 'h', '--stage', 'head',
                  '--linear_pred', '--dataset', 'imagenet100', '-j', '2', '-b', '64', '--save', 's', '--load_cache',
                  '--epoch', '3', '-k', '5', '--image_size', '96', '--amp', '--seed', '4', 'DIR') == dict(
        data='DIR', **checkpoint, linear_pred=True, dataset='imagenet100', workers=2, batch_size=64, save='s',
        load_cache=True, epoch=3, k=5, image_size=96, amp=True, seed=4, dist_timeout=5.0,
        train_per_class=0, subset_seed=0)  # the online k-NN's subset flags, off by default
    assert parsed(eval_linear, 'DIR', '--weights', 'w.pth', '--arch', 'resnet50', '--use_pred', '--head', 'h',
                  '--stage', 'head', '--linear_pred', '--dataset', 'imagenet100', '--workers', '2',
                  '--batch-size', '64', '--epochs', '3', '--learning-rate', '0.5', '--lr_schedule', '1,2',
                  '--momentum', '0.8', '--weight-decay', '0', '--eval-freq', '2', '--resume', 'r', '--seed', '4',
                  '--save', 's', '-e', '--use_cache', '--image_size', '96', '--amp') == dict(
        data='DIR', **checkpoint, linear_pred=True, dataset='imagenet100', workers=2, batch_size=64, epochs=3,
        lr=0.5, lr_schedule='1,2', momentum=0.8, weight_decay=0.0, eval_freq=2, resume='r', seed=4, save='s',
        evaluate=True, use_cache=True, image_size=96, amp=True, dist_timeout=5.0)
    aliases = parsed(eval_linear, 'DIR', '--weights', 'w.pth', '--lr', '0.2', '--wd', '0.1', '--evaluate')
    assert (aliases['lr'], aliases['weight_decay'], aliases['evaluate']) == (0.2, 0.1, True)
    assert parsed(eval_transfer, '--weights', 'w.pth', '-a', 'resnet50', '--use_pred', '--head', 'h',
                  '--stage', 'head', '--name', 'pets', '-j', '2', '-b', '64', '--save', 's', '--load_cache',
                  '--image_size', '96', '--amp', '--max_iter', '7', '--seed', '4', 'DIR') == dict(
        data='DIR', **checkpoint, name='pets', workers=2, batch_size=64, save='s', load_cache=True,
        image_size=96, amp=True, max_iter=7, seed=4, dist_timeout=5.0)
    assert parsed(eval_imitation, '--weights', 'w.pth', '--arch_teacher', 'resnet50', '--teacher_weights', 't',
                  '--head', 'h', '--dataset', 'imagenet100', '--split', 'test', '--image_size', '96',
                  '-b', '64', '-j', '2', '--save', 's', 'DIR') == dict(
        data='DIR', weights='w.pth', arch_teacher='resnet50', teacher_weights='t', head='h', dataset='imagenet100',
        split='test', image_size=96, batch_size=64, workers=2, save='s', dist_timeout=5.0)
    assert parsed(export_student, 'ckpt.pth', 'out.pth', '--arch', 'resnet18') == dict(
        checkpoint='ckpt.pth', output='out.pth', arch='resnet18', onnx=None, image_size=224, opset=17, format='pth',
        with_head=False, license='other', push_to_hub=None)
