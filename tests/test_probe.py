"""Linear probe: the original's standardisation, its state-dict layout, and that it learns."""
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_image_folder, write_student_checkpoint
from data.folders import build_dataset
from data.transforms import eval_transform
from evaluation import features, probe


pytestmark = pytest.mark.usefixtures('one_thread')


def test_standardisation_equals_the_original_formula():
    g = torch.Generator().manual_seed(0)
    raw = 3 * torch.randn(500, 16, generator=g) + torch.linspace(-2, 2, 16)
    # the original: get_feats L2-normalises, torch.var_mean over the train set, then
    # Normalize -> FullBatchNorm: (x - mean) * 1 / sqrt(var + 1e-5)
    unit = raw / raw.norm(2, dim=1, keepdim=True)
    var, mean = torch.var_mean(unit, dim=0)
    expected = (unit - mean) * (1.0 / torch.sqrt(var + 1e-5))

    our_var, our_mean = probe.feature_stats(raw)
    linear = probe.build_probe(our_var, our_mean, num_classes=4)
    torch.testing.assert_close(linear[1](linear[0](raw)), expected, atol=1e-4, rtol=1e-4)
    half_var, half_mean = probe.feature_stats(unit.half())       # what the cache holds
    torch.testing.assert_close(half_mean, mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(half_var, var, atol=1e-3, rtol=1e-2)
    assert set(linear.state_dict()) == {'1.inv_std', '1.mean', '2.weight', '2.bias'}


def test_cached_epoch_steps_even_when_the_set_is_smaller_than_a_batch():
    rows = torch.randn(10, 8)
    var, mean = probe.feature_stats(rows)
    linear = probe.build_probe(var, mean, num_classes=3)
    before = linear[2].weight.detach().clone()
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    stats = probe.train_epoch_cached(linear, optimizer, rows.half(), torch.randint(0, 3, (10,)), 256)
    assert not torch.equal(linear[2].weight, before)
    assert set(stats) == {'loss', 'acc1'}
    # fewer than 5 classes: top-5 covers them all, top-1 is the argmax
    labels = torch.zeros(10, dtype=torch.long)
    result = probe.evaluate(linear, rows, labels)
    with torch.no_grad():
        expected_acc1 = 100.0 * (linear(rows).argmax(1) == labels).double().mean().item()
    assert result['acc5'] == 100.0 and result['acc1'] == pytest.approx(expected_acc1)


@pytest.fixture(scope='module')
def probe_setup(tmp_path_factory):
    """A random-weight student on a 3-class folder: cached train/val features and their stats."""
    root = tmp_path_factory.mktemp('probe')
    folder = make_image_folder(root / 'data', n_classes=3, per_class=12, size=40)
    model = features.load_feature_model(write_student_checkpoint(root / 'student.pth'))
    cpu = torch.device('cpu')
    sets = {split: build_dataset(folder, split, eval_transform(32)) for split in ('train', 'val')}
    feats = {split: features.extract_features(model, ds, 16, 0, cpu) for split, ds in sets.items()}
    labels = {split: torch.tensor(ds.targets) for split, ds in sets.items()}
    return folder, model, feats, labels


def test_probe_on_augmented_images_learns(probe_setup):
    folder, model, feats, labels = probe_setup
    torch.manual_seed(0)
    linear = probe.build_probe(*probe.feature_stats(feats['train']), num_classes=3)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(build_dataset(folder, 'train', probe.probe_train_transform(32)), batch_size=8, shuffle=True)
    for _ in range(6):
        probe.train_epoch_images(model, linear, loader, optimizer, torch.device('cpu'))
    assert probe.evaluate(linear, feats['val'], labels['val'])['acc1'] >= 75.0     # chance: 33%


def test_probe_on_cached_features_learns(probe_setup):
    _, _, feats, labels = probe_setup
    torch.manual_seed(0)
    linear = probe.build_probe(*probe.feature_stats(feats['train']), num_classes=3)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        train = probe.train_epoch_cached(linear, optimizer, feats['train'], labels['train'], batch_size=8)
    assert train['acc1'] > 90.0
    assert probe.evaluate(linear, feats['val'], labels['val'])['acc1'] >= 75.0
