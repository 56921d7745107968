"""Transfer evaluation: the L-BFGS probe finds a known linear separator with a sensible L2 strength,
the search and the holdout are deterministic, the split rules, and eval_transfer.py /
transfer_eval.sh end to end on tiny generated folders."""
import os
import sys

import pytest
import torch

import models
from conftest import make_image_folder, read_json, run_command as run, write_student_checkpoint
from eval_transfer import present_splits
from evaluation import transfer
from utils.errors import SimRegError


pytestmark = pytest.mark.usefixtures('one_thread')


def separable(n, generator, dim=16, n_classes=4, margin=2.0):
    """Gaussian features labelled by argmax(W x) for a fixed W, keeping points whose best class
    wins by ``margin``: linearly separable with a gap, so a good probe makes no mistakes."""
    weight = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123))
    x = 3 * torch.randn(8 * n, dim, generator=generator) + 5     # standardisation has work to do
    logits = (x - 5) @ weight.T
    top2 = logits.topk(2, dim=1).values
    x = x[(top2[:, 0] - top2[:, 1] > margin).nonzero().flatten()[:n]]
    return x.half(), ((x - 5) @ weight.T).argmax(1)           # float16, as the cache holds them


@pytest.fixture(scope='module')
def splits():
    g = torch.Generator().manual_seed(0)
    return separable(600, g), separable(200, g), separable(400, g)


def test_a_known_linear_separator_is_found_with_a_sensible_l2(splits):
    train, val, test = splits
    result = transfer.evaluate_transfer(train, val, test, num_classes=4)
    selection, final = result['selection'], result['final']
    assert [row['l2'] for row in selection['grid']] == list(transfer.L2_GRID)
    assert final['evaluated_on'] == 'test' and final['fit_on'] == 'train+val' and final['num_fit'] == 800
    assert final['top1'] >= 99.0 and final['mean_per_class_top1'] >= 99.0 and final['converged']
    by_l2 = {row['l2']: row for row in selection['grid']}
    assert selection['chosen_l2'] < 10.0 < max(transfer.L2_GRID)       # not the strongest penalties
    assert by_l2[max(transfer.L2_GRID)]['top1'] < 50.0                # which do hurt: the search matters
    assert selection['chosen_top1'] == max(row['top1'] for row in selection['grid'])


def test_with_noisy_labels_and_useless_dimensions_a_middle_l2_wins():
    """4 informative of 64 dimensions, 20% of labels random, 160 train images: the weakest penalty
    overfits, the strongest underfits, the chosen one sits between and beats both."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g)

    def noisy(n):
        x = torch.randn(n, 64, generator=g)
        y = (x[:, :4] @ weight.T).argmax(1)
        flipped = torch.rand(n, generator=g) < 0.2
        y[flipped] = torch.randint(0, 4, (int(flipped.sum()),), generator=g)
        return x, y

    result = transfer.evaluate_transfer(noisy(160), noisy(400), None, num_classes=4)
    selection = result['selection']
    weakest, strongest = selection['grid'][0], selection['grid'][-1]
    assert 1.0 <= selection['chosen_l2'] <= 1e3
    assert selection['chosen_top1'] >= weakest['top1'] + 3 and selection['chosen_top1'] >= strongest['top1'] + 10


def test_without_val_a_train_holdout_chooses_and_train_is_refit(splits):
    train, _, test = splits
    result = transfer.evaluate_transfer(train, None, test, num_classes=4, seed=3)
    selection, final = result['selection'], result['final']
    assert 'holdout' in selection['scored_on'] and 'seed 3' in selection['scored_on']
    assert selection['num_fit'] + selection['num_scored'] == 600
    assert selection['num_scored'] == pytest.approx(120, abs=4)
    assert final['fit_on'] == 'train' and final['num_fit'] == 600 and final['top1'] >= 98.0


def test_without_test_val_is_reported_from_the_train_only_fit(splits):
    train, val, _ = splits
    result = transfer.evaluate_transfer(train, val, None, num_classes=4, grid=transfer.L2_GRID[::4])
    final = result['final']
    assert final['evaluated_on'] == 'val' and final['fit_on'] == 'train' and 'optimistic' in final['note']
    assert final['top1'] == result['selection']['chosen_top1']
    with pytest.raises(SimRegError, match='add a val/ or test/'):
        transfer.evaluate_transfer(train, None, None, num_classes=4)


def test_the_search_is_deterministic(splits):
    train, val, test = splits
    grid = transfer.L2_GRID[::3]
    first = transfer.evaluate_transfer(train, val, test, num_classes=4, grid=grid)
    again = transfer.evaluate_transfer(train, val, test, num_classes=4, grid=grid)
    assert first == again                                  # every per-l2 loss and accuracy, bit for bit
    held_first = transfer.evaluate_transfer(train, None, test, num_classes=4, grid=grid, seed=1)
    held_again = transfer.evaluate_transfer(train, None, test, num_classes=4, grid=grid, seed=1)
    assert held_first == held_again


def test_stratified_holdout_is_deterministic_and_stratified():
    counts = [10, 5, 2, 1, 20]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])[torch.randperm(38)]
    fit, held = transfer.stratified_holdout(labels, 0.2, seed=0)
    assert torch.bincount(labels[held], minlength=5).tolist() == [2, 1, 1, 0, 4]
    assert torch.equal(torch.cat([fit, held]).sort().values, torch.arange(38))
    assert torch.equal(fit, fit.sort().values) and torch.equal(held, held.sort().values)
    same = transfer.stratified_holdout(labels, 0.2, seed=0)
    assert torch.equal(same[0], fit) and torch.equal(same[1], held)
    assert not torch.equal(transfer.stratified_holdout(labels, 0.2, seed=1)[1], held)


def test_constant_feature_dimensions_are_centred_not_divided_by_zero():
    features = torch.cat([torch.randn(50, 3), torch.full((50, 1), 0.25)], dim=1)
    standardize = transfer.Standardizer(features, torch.float64)
    out = standardize(torch.cat([features, torch.ones(1, 4)]))
    assert torch.isfinite(out).all() and out[:50, 3].abs().max() == 0
    torch.testing.assert_close(out[:50, :3].std(0, correction=0), torch.ones(3, dtype=torch.float64))


def test_knn_uses_the_same_reference_as_the_final_probe(splits):
    train, val, test = splits
    reference, query, on = transfer.knn_splits(train, val, test)
    assert on == 'train+val -> test' and len(reference[0]) == 800 and query is test
    assert transfer.knn_splits(train, val, None)[2] == 'train -> val'
    assert transfer.knn_splits(train, None, test)[2] == 'train -> test'


@pytest.mark.slow
def test_eval_transfer_on_a_teacher_file_with_a_test_split(tmp_path):
    data = make_image_folder(tmp_path / 'pets', n_classes=3, per_class=6, size=40, splits=('train', 'val', 'test'))
    torch.save(models.build_backbone('resnet18').state_dict(), tmp_path / 'teacher.pth')
    save = tmp_path / 'out'
    run([sys.executable, 'eval_transfer.py', '--weights', str(tmp_path / 'teacher.pth'), '--arch', 'resnet18',
         '--image_size', '32', '--workers', '0', '--save', str(save), data])
    report = read_json(save / 'transfer_results.json')
    assert report['dataset'] == 'pets' and report['stage'] == 'backbone' and report['feat_dim'] == 512
    assert report['num_samples'] == {'train': 18, 'val': 18, 'test': 18}
    linear = report['linear']
    assert linear['selection']['scored_on'] == 'val' and len(linear['selection']['grid']) == len(transfer.L2_GRID)
    assert linear['final']['evaluated_on'] == 'test' and linear['final']['num_fit'] == 36
    assert linear['final']['top1'] >= 70.0                                   # chance: 33%
    assert report['knn']['on'] == 'train+val -> test' and set(report['knn']['majority_top1']) == {'1', '20'}
    with open(save / 'transfer_results.txt') as f:
        text = f.read()
    assert 'chosen l2' in text and 'linear top-1 on test' in text and 'k-NN train+val -> test' in text
    for split in ('train', 'val', 'test'):
        assert (save / f'{split}_feats.json').is_file()


@pytest.mark.slow
def test_transfer_eval_sh_on_a_student_without_a_test_split(tmp_path):
    data = make_image_folder(tmp_path / 'flowers', n_classes=3, per_class=6, size=40, splits=('train', 'val'))
    os.makedirs(tmp_path / 'exp/demo/checkpoints')
    write_student_checkpoint(tmp_path / 'exp/demo/checkpoints/ckpt_epoch_1.pth')
    run(['bash', 'transfer_eval.sh', '--workers', '0', '--use_pred', '--max_iter', '100'], EXP='demo', EPOCH='1',
        BASE_DIR=str(tmp_path), DATASET=data, NGPUS='1', IMAGE_SIZE='32')
    report = read_json(tmp_path / 'exp/demo/transfer/flowers/pred_head/transfer_results.json')
    assert report['stage'] == 'head' and report['num_samples'] == {'train': 18, 'val': 18}
    final = report['linear']['final']
    assert final['evaluated_on'] == 'val' and final['fit_on'] == 'train' and 'optimistic' in final['note']
    assert report['knn']['on'] == 'train -> val'
    assert 'max 100 iterations' in report['linear']['protocol']['solver']


def test_a_dataset_without_val_or_test_is_refused_naming_what_it_has(tmp_path):
    data = make_image_folder(tmp_path / 'only_train', n_classes=2, per_class=2, size=16, splits=('train',))
    with pytest.raises(SimRegError, match='needs train/ and val/ and/or test/.*it has train/$'):
        present_splits(data)
    make_image_folder(tmp_path / 'only_train', n_classes=2, per_class=2, size=16, splits=('test',))
    assert present_splits(data) == ['train', 'test']
