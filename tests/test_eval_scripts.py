"""End to end: knn_eval.sh / lin_eval.sh / eval_knn.py / eval_linear.py as a user runs them, on a tiny
generated image folder at --image_size 32 with a tiny student checkpoint in the training layout."""
import os
import sys

import numpy as np
import pytest
import torch

import eval_knn
from conftest import (HEAD_DIM, make_image_folder, read_json, run_command as run, torchrun, write_student_checkpoint,
                      write_teacher_checkpoint)

pytestmark = pytest.mark.slow
SMALL = ['--image_size', '32', '--workers', '0']


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """<base>/data (21 images a split: 2 ranks get unequal slices), <base>/exp/demo/checkpoints/ckpt_epoch_1.pth
    (as train_student.py writes it), a teacher."""
    base = tmp_path_factory.mktemp('eval')
    make_image_folder(base / 'data', n_classes=3, per_class=7, size=40)
    os.makedirs(base / 'exp' / 'demo' / 'checkpoints')
    write_student_checkpoint(base / 'exp' / 'demo' / 'checkpoints' / 'ckpt_epoch_1.pth')
    write_teacher_checkpoint(base / 'teacher.pth')
    return base


def knn_single(base, save, *extra, expect=0):
    return run([sys.executable, 'eval_knn.py', '--weights', str(base / 'exp/demo/checkpoints/ckpt_epoch_1.pth'),
                '--save', str(base / save), '--epoch', '1', *SMALL, *extra, str(base / 'data')], expect=expect)


@pytest.fixture(scope='module')
def single(base):
    """One single-process k-NN run in <base>/single, shared by the tests below."""
    knn_single(base, 'single')
    return base / 'single'


def test_knn_eval_sh_under_torchrun_matches_a_single_process(base, single):
    """2 gloo processes extract their slices; rank 0 gathers them into the same rows, in the same order."""
    run(['bash', 'knn_eval.sh', *SMALL], EXP='demo', EPOCH='1', BASE_DIR=str(base), DATA=str(base / 'data'),
        NGPUS='2')
    features = base / 'exp/demo/features'
    two, one = read_json(features / 'knn_results.json'), read_json(single / 'knn_results.json')
    assert two['settings']['processes'] == 2 and one['settings']['processes'] == 1
    assert two['majority_top1'] == one['majority_top1'] and two['weighted'] == one['weighted']
    assert set(two['majority_top1']) == {'1', '20'} and set(two['weighted']) == {'20', '200'}
    for k in (1, 20):
        with open(features / f'nn_{k}_acc_epoch_001.txt') as f:
            assert float(f.read()) == two['majority_top1'][str(k)]
    gathered, alone = np.load(features / 'train_feats.npy'), np.load(single / 'train_feats.npy')
    assert gathered.dtype == np.float16 and gathered.shape == alone.shape == (21, 512)
    np.testing.assert_allclose(gathered.astype(np.float32), alone.astype(np.float32), atol=2e-3)
    assert np.array_equal(np.load(features / 'train_labels.npy'), np.repeat(np.arange(3), 7))


def test_knn_cache_is_reused_and_a_foreign_one_refused(base, single):
    first = read_json(single / 'knn_results.json')
    again = knn_single(base, 'single', '--load_cache')
    assert 'train features: reusing the cache' in again.stdout and 'val features: reusing the cache' in again.stdout
    reused = read_json(single / 'knn_results.json')
    assert reused['majority_top1'] == first['majority_top1'] and reused['majority_top1']['1'] >= 90.0
    refused = run([sys.executable, 'eval_knn.py', '--weights', str(base / 'teacher.pth'), '--arch', 'resnet18',
                   '--save', str(single), '--load_cache', *SMALL, str(base / 'data')], expect=2)
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith('error: cached train features') and 'weights_sha256' in error and '--save' in error


def test_eval_knn_main_returns_the_report_it_writes(base, single):
    """In this process, as a notebook or another script calls it: main(parsed flags) -> the results."""
    args = eval_knn.get_args_parser().parse_args(
        ['--weights', str(base / 'exp/demo/checkpoints/ckpt_epoch_1.pth'), '--save', str(single), '--epoch', '1',
         '--load_cache', *SMALL, str(base / 'data')])
    report = eval_knn.main(args)
    assert report == read_json(single / 'knn_results.json')
    assert report['majority_top1']['1'] >= 90.0 and report['settings']['num_train'] == 21


def test_knn_use_pred_evaluates_the_head(base):
    knn_single(base, 'pred', '--use_pred')
    assert read_json(base / 'pred/pred_head/knn_results.json')['settings']['feat_dim'] == HEAD_DIM


def test_lin_eval_sh_with_cached_features(base):
    run(['bash', 'lin_eval.sh', *SMALL, '--epochs', '4', '--lr_schedule', '2,3', '-b', '8', '--lr', '0.05'],
        EXP='demo', EPOCH='1', BASE_DIR=str(base), DATA=str(base / 'data'), NGPUS='1', USE_CACHE='1',
        EVAL_FREQ='1')
    linear = base / 'exp/demo/linear'
    results = read_json(linear / 'linear_results.json')
    assert [r['epoch'] for r in results['history']] == [1, 2, 3, 4]
    assert [r['lr'] for r in results['history']] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    assert results['best']['top1'] >= 75.0                                    # chance: 33%
    assert results['settings']['use_cache'] and results['settings']['stage'] == 'backbone'
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar', 'linear_results.txt', 'train_feats.json'):
        assert (linear / name).is_file(), name
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(linear / 'tb'))


def probe_run(base, save, *extra):
    return run([sys.executable, 'eval_linear.py', '--weights', str(base / 'exp/demo/checkpoints/ckpt_epoch_1.pth'),
                '--save', str(base / save), *SMALL, '-b', '8', '--lr', '0.05', '--eval-freq', '1', *extra,
                str(base / 'data')])


def test_eval_linear_on_images_resumes_exactly_and_evaluates(base):
    probe_run(base, 'whole', '--epochs', '3')
    probe_run(base, 'split', '--epochs', '2')
    resumed = probe_run(base, 'split', '--epochs', '3', '--resume', str(base / 'split/checkpoint.pth.tar'))
    assert '=> resumed from' in resumed.stdout + resumed.stderr  # not a fresh run that happens to match
    whole = torch.load(base / 'whole/checkpoint.pth.tar', weights_only=True)
    split = torch.load(base / 'split/checkpoint.pth.tar', weights_only=True)
    assert [r['epoch'] for r in split['history']] == [1, 2, 3]
    for key, value in whole['state_dict'].items():
        torch.testing.assert_close(split['state_dict'][key], value)
    for name in ('train_feats.npy', 'train_labels.npy', 'train_feats.json'):
        os.remove(base / 'split' / name)
    probe_run(base, 'split', '--evaluate')
    evaluated = read_json(base / 'split/linear_evaluate.json')
    assert evaluated['acc1'] == read_json(base / 'split/linear_results.json')['best']['top1']
    assert not (base / 'split/train_feats.npy').exists()  # the probe carries the train statistics


def test_eval_imitation_under_torchrun_matches_a_single_process(base):
    """Every rank but 0 stops after its share of the extraction (they used to go on and fail on rank 0's
    work: the rank was read after the process group had ended)."""
    student = write_student_checkpoint(base / 'student_512.pth', head_dim=512)    # the teacher's dim
    flags = ['--weights', student, '--arch_teacher', 'resnet18', '--teacher_weights', str(base / 'teacher.pth'),
             *SMALL, str(base / 'data')]
    run(torchrun('eval_imitation.py', *flags, '--save', str(base / 'imitation_2')))
    run([sys.executable, 'eval_imitation.py', *flags, '--save', str(base / 'imitation_1')])
    two = read_json(base / 'imitation_2/imitation_epoch_1.json')
    one = read_json(base / 'imitation_1/imitation_epoch_1.json')
    assert two['images'] == one['images'] == 21 and -1 < one['mean_cosine'] < 1
    assert two['mean_cosine'] == pytest.approx(one['mean_cosine'], abs=1e-3)
