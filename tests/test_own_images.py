"""Your own images: a folder of unlabelled images at any depth or a list of files trains, and the held-out imitation
cosine it logs equals the one computed by hand from the checkpoints, on the same held-out images whatever the number
of processes or a resume; bad folders and lists end in one line."""
import json
import os
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from conftest import ROOT, check_report_png, run_command, torchrun, train, train_log, write_teacher_checkpoint
from data.folders import build_dataset, decode_rgb
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, NORMS, eval_transform, normalize
from evaluation.holdout import holdout_indices, holdout_size
from models.loading import load_backbone
from models.student import load_student
from utils.errors import SimRegError, exit_on_user_error

FORMATS = ('jpg', 'png', 'bmp', 'tiff', 'webp')
N_IMAGES = 40  # the default holdout: a tenth, 4 images
SEED = 3


def make_shoots(root, n=N_IMAGES, size=40):
    """``root/shoot<s>/day<d>/<i>.<format>``: n images in nested folders, in a few formats, plus a note and a hidden
    file that are not images."""
    rng = np.random.RandomState(0)
    for i in range(n):
        folder = os.path.join(root, f'shoot{i % 2}', f'day{i % 3}')
        os.makedirs(folder, exist_ok=True)
        pixels = np.clip(127 + 60 * np.sin(np.arange(size) * (i % 5 + 1) / 7)[:, None, None]
                         + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f'{i}.{FORMATS[i % len(FORMATS)]}'))
    (root / 'notes.txt').write_text('not an image')
    (root / 'shoot0' / '.thumbs.jpg').write_bytes(b'hidden')
    return root


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp('own_images')
    make_shoots(ws / 'images')
    write_teacher_checkpoint(ws / 'teacher.pth')
    return ws


def train_args(ws, exp, *extra, data='images'):
    return ['--base_dir', str(ws / 'runs'), '--exp', exp, '--arch_teacher', 'resnet18', '--arch_student',
            'mobilenet', '--teacher_weights', str(ws / 'teacher.pth'), '--batch_size', '8', '--image_size', '32',
            '--num_workers', '0', '--print_freq', '2', '--single_aug', '--weak_weak', '--epochs', '1',
            '--save_freq', '1', '--knn_every', '1', '--seed', str(SEED), *extra, str(ws / data)]


def by_hand(ws, checkpoint, paths, teacher_rows=None, teacher_input=None):
    """Mean cos(head output, teacher feature) over ``paths``' 32 px evaluation views, from the files alone; the
    teacher's features are ``teacher_rows`` when given (a cache's); ``teacher_input`` (size, mean, std): the
    teacher's own, the view then cut at its size and resized for the student."""
    backbone, head = load_student(str(checkpoint))
    teacher = load_backbone('resnet18', str(ws / 'teacher.pth')).eval()
    size, mean, std = teacher_input or (32, IMAGENET_MEAN, IMAGENET_STD)
    crops = torch.stack([eval_transform(max(size, 32))(decode_rgb(p)) for p in paths])
    images = normalize(v2.functional.resize(crops, [32, 32], antialias=True) if size > 32 else crops)
    with torch.no_grad():
        target = teacher(normalize(crops, mean, std)) if teacher_rows is None else teacher_rows.float()
        return (F.normalize(head(backbone(images)), dim=1) * F.normalize(target, dim=1)).sum(1).mean().item()


def held_out_paths(ws, count, data='images'):
    dataset = build_dataset(str(ws / data), 'train', None)
    return [dataset.samples[i][0] for i in holdout_indices(len(dataset), count, SEED)]


def test_a_folder_at_any_depth_is_its_images_unlabelled_in_sorted_order(ws):
    dataset = build_dataset(str(ws / 'images'), 'train', None)
    names = [os.path.relpath(p, ws / 'images') for p, _ in dataset.samples]
    assert len(names) == N_IMAGES and names == sorted(names) and set(dataset.targets) == {0}
    assert os.path.join('shoot1', 'day1', '7.bmp') in names and os.path.join('shoot0', 'day1', '4.webp') in names
    assert dataset.skipped.startswith(f'note: {ws / "images"}: left out 2 files that are not images (1 .txt, 1 hidden)')
    index, image, label = dataset[names.index(os.path.join('shoot1', 'day0', '3.tiff'))]
    assert image.shape == (3, 40, 40) and image.dtype == torch.uint8 and label == 0
    assert torch.equal(image, decode_rgb(str(ws / 'images' / 'shoot1' / 'day0' / '3.tiff')))
    with pytest.raises(SimRegError, match='--dataset imagenet100 .* drop --dataset'):
        build_dataset(str(ws / 'images'), 'train', None, 'imagenet100')


def test_default_holdout_is_a_tenth_up_to_256_for_unlabelled_images_and_none_for_class_folders():
    args = lambda holdout=None, knn_every=1: types.SimpleNamespace(holdout=holdout, knn_every=knn_every)
    assert holdout_size(args(), False, 40) == 4 and holdout_size(args(), False, 10 ** 5) == 256
    assert holdout_size(args(), True, 10 ** 5) == 0 and holdout_size(args(knn_every=0), False, 10 ** 5) == 0
    assert holdout_size(args(3), True, 40) == 3
    with pytest.raises(SimRegError, match=r'--holdout 5: at most a tenth of the 40 training images \(4\)'):
        holdout_size(args(5), False, 40)
    assert holdout_indices(40, 4, SEED) == holdout_indices(40, 4, SEED) != holdout_indices(40, 4, SEED + 1)
    assert holdout_indices(40, 4, SEED) == sorted(holdout_indices(40, 4, SEED))


def test_unlabelled_folder_trains_and_logs_the_held_out_cosine_of_its_checkpoints(ws, one_thread):
    train(train_args(ws, 'one', '--epochs', '2'))
    exp = ws / 'runs' / 'exp' / 'one'
    start, epochs = train_log(exp, 'start')[-1], train_log(exp, 'epoch')
    assert start['holdout_images'] == 4 and 'knn_init' not in start and 'knn' not in epochs[-1]
    paths = held_out_paths(ws, 4)
    init = by_hand(ws, exp / 'checkpoints' / 'ckpt_epoch_0.pth', paths)
    assert start['holdout_cosine_init'] == pytest.approx(init, abs=1e-5)
    for record in epochs:
        now = by_hand(ws, exp / 'checkpoints' / f"ckpt_epoch_{record['epoch']}.pth", paths)
        assert record['holdout_cosine'] == pytest.approx(now, abs=1e-5)
        assert record['holdout_cosine_change'] == pytest.approx(now - init, abs=1e-5)
    assert epochs[-1]['holdout_cosine'] != pytest.approx(init, abs=1e-3)  # training moved it
    log = (exp / 'logs' / 'train.log').read_text()
    assert '==> 36 training images' in log and 'held-out imitation: cos(head, teacher)' in log
    assert f"epoch 2  held-out imitation: cos(head, teacher) {epochs[-1]['holdout_cosine']:.4f} on 4 images" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(exp / 'logs'))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars('holdout/cosine')]
    expected = [(0, start['holdout_cosine_init'])] + [(r['epoch'], r['holdout_cosine']) for r in epochs]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], abs=1e-6)


def test_the_held_out_teacher_takes_its_own_input(ws, one_thread):
    train(train_args(ws, 'own_input', '--teacher_image_size', '48', '--teacher_norm', 'clip'))
    exp = ws / 'runs' / 'exp' / 'own_input'
    start, epoch = train_log(exp, 'start')[-1], train_log(exp, 'epoch')[-1]
    paths, own = held_out_paths(ws, 4), (48, *NORMS['clip'])
    assert start['holdout_cosine_init'] == pytest.approx(
        by_hand(ws, exp / 'checkpoints' / 'ckpt_epoch_0.pth', paths, teacher_input=own), abs=1e-5)
    assert epoch['holdout_cosine'] == pytest.approx(
        by_hand(ws, exp / 'checkpoints' / 'ckpt_epoch_1.pth', paths, teacher_input=own), abs=1e-5)


def test_a_multi_view_cache_is_refused_with_holdout(ws):
    from evaluation.holdout import HeldOutImitation
    dataset = build_dataset(str(ws / 'images'), 'train', None)
    cached = types.SimpleNamespace(boxes=np.zeros((N_IMAGES, 2, 5)))  # what a multi-view CachedTeacher carries
    with pytest.raises(SimRegError, match='the cache of resnet18 holds weak views only: pass --holdout 0'):
        HeldOutImitation(dataset, [1, 2], 32, {'resnet18': cached}, 8)


def samples_drawn(ws, held_out, world_size):
    """The sample indices one epoch of the training loader draws, over all ranks, and the steps of the epoch."""
    import train_student
    args = types.SimpleNamespace(batch_size=8, seed=SEED, num_workers=0, gpu_decode=False)
    dataset = build_dataset(str(ws / 'images'), 'train', None)
    drawn = []
    for rank in range(world_size):
        loader = train_student.make_loader(dataset, args, world_size, rank, held_out)
        loader.batch_sampler.set_epoch(1)
        drawn += [int(loader.dataset[key][0]) for batch in loader.batch_sampler for key in batch]
    return drawn, loader.batch_sampler.steps


def test_held_out_images_are_never_drawn_for_training_on_any_number_of_processes(ws):
    held_out = holdout_indices(N_IMAGES, 4, SEED)
    one, steps = samples_drawn(ws, held_out, 1)
    two, _ = samples_drawn(ws, held_out, 2)
    assert steps == 36 // 8 and len(one) == len(set(one)) == 32 and sorted(one) == sorted(two)
    assert set(one).isdisjoint(held_out) and set(one) <= set(range(N_IMAGES))


@pytest.mark.slow
def test_the_held_out_set_is_the_same_on_two_processes_and_after_a_resume(ws, one_thread):
    if not (ws / 'runs' / 'exp' / 'one').exists():
        train(train_args(ws, 'one', '--epochs', '2'))
    one = train_log(ws / 'runs' / 'exp' / 'one', 'start')[0]
    run_command(torchrun(os.path.join(ROOT, 'train_student.py'), *train_args(ws, 'two')))
    two = train_log(ws / 'runs' / 'exp' / 'two', 'start')[0]
    assert two['world_size'] == 2 and two['holdout_images'] == 4
    assert two['holdout_cosine_init'] == one['holdout_cosine_init']  # same untrained student, same images
    # resumed after epoch 1 for a second epoch: measured on the same images, its trend from the first start
    train(train_args(ws, 'resumed', '--epochs', '2', '--resume', 'auto'))  # fresh: epochs 1-2
    exp = ws / 'runs' / 'exp' / 'resumed'
    os.remove(exp / 'checkpoints' / 'last.pth')
    os.remove(exp / 'checkpoints' / 'ckpt_epoch_2.pth')
    train(train_args(ws, 'resumed', '--epochs', '2', '--resume', 'auto'))
    start, last = train_log(exp, 'start')[-1], train_log(exp, 'epoch')[-1]
    assert start['resumed_from'] == 1 and 'holdout_cosine_init' not in start and start['holdout_images'] == 4
    now = by_hand(ws, exp / 'checkpoints' / 'ckpt_epoch_2.pth', held_out_paths(ws, 4))
    assert last['epoch'] == 2 and last['holdout_cosine'] == pytest.approx(now, abs=1e-5)
    first = train_log(exp, 'start')[0]['holdout_cosine_init']
    assert last['holdout_cosine_change'] == pytest.approx(now - first, abs=1e-5)


def test_a_file_list_and_a_cache_of_it_train_and_the_cache_rows_are_the_teacher(ws, one_thread):
    listed = sorted(os.path.relpath(p, ws / 'images') for p, _ in build_dataset(str(ws / 'images'), 'train',
                                                                                 None).samples)[:30]
    lines = [os.path.join('images', p) for p in listed[:20]] + [str(ws / 'images' / p) for p in listed[20:]]
    (ws / 'list.txt').write_text('\n'.join(lines[:10]) + '\n\n' + '\n'.join(lines[10:]) + '\n')
    dataset = build_dataset(str(ws / 'list.txt'), 'train', None)
    assert [p for p, _ in dataset.samples] == [str(ws / 'images' / p) for p in listed]
    import cache_teacher_feats
    cache_teacher_feats.main(cache_teacher_feats.get_args_parser().parse_args(
        [str(ws / 'list.txt'), '--teacher_weights', str(ws / 'teacher.pth'), '--arch_teacher', 'resnet18',
         '--output', str(ws / 'list.npy'), '--image_size', '32', '--batch_size', '8', '--num_workers', '0']))
    train(train_args(ws, 'listed', '--holdout', '3', '--use_cache', '--teacher_feats', str(ws / 'list.npy'),
                     data='list.txt'))
    exp = ws / 'runs' / 'exp' / 'listed'
    start, last = train_log(exp, 'start')[-1], train_log(exp, 'epoch')[-1]
    held_out = holdout_indices(30, 3, SEED)
    rows = torch.from_numpy(np.load(ws / 'list.npy')[held_out])
    paths = [dataset.samples[i][0] for i in held_out]
    assert start['holdout_cosine_init'] == pytest.approx(
        by_hand(ws, exp / 'checkpoints' / 'ckpt_epoch_0.pth', paths, rows), abs=1e-5)
    # the cache's fp16 rows are the live teacher's features on the same view
    assert start['holdout_cosine_init'] == pytest.approx(
        by_hand(ws, exp / 'checkpoints' / 'ckpt_epoch_0.pth', paths), abs=2e-3)
    assert last['holdout_cosine'] == pytest.approx(
        by_hand(ws, exp / 'checkpoints' / 'ckpt_epoch_1.pth', paths, rows), abs=1e-5)


def user_error(capsys, argv):
    """The exit code and stderr lines of train_student.py on ``argv``, run as its command line runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(lambda: train(argv))
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def test_an_empty_folder_a_missing_file_and_an_unreadable_list_give_one_line(ws, tmp_path, capsys):
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'sub' / 'readme.md').write_text('no images here')
    (tmp_path / 'missing.txt').write_text(f"{ws / 'images' / 'shoot0' / 'day0' / '0.jpg'}\nnowhere/1.jpg\n")
    (tmp_path / 'blank.txt').write_text('\n\n')
    (tmp_path / 'binary.txt').write_bytes(b'\xff\xd8\xff\xe0 a jpeg')
    expected = {
        'empty': f"error: {tmp_path / 'empty'} holds no images (at any depth): put images in it (e.g. jpg jpeg "
                 f"png ppm bmp), or pass another folder",
        'missing.txt': f"error: image list {tmp_path / 'missing.txt'} names 1 file(s) that do not exist (e.g. "
                       f"{tmp_path / 'nowhere' / '1.jpg'}): fix the list (paths are relative to {tmp_path}, or "
                       f"absolute)",
        'blank.txt': f"error: image list {tmp_path / 'blank.txt'} names no images: write one image path per line "
                     f"(relative to {tmp_path}, or absolute)",
        'binary.txt': f"error: cannot read {tmp_path / 'binary.txt'} as a list of image paths ('utf-8' codec can't "
                      f"decode byte 0xff in position 0: invalid start byte): pass a folder of images or a text file "
                      f"with one image path per line",
        'nowhere': f"error: data folder {tmp_path / 'nowhere'} does not exist: pass a folder of images (at any "
                   f"depth), a text file listing image paths, or a dataset root holding train/<class>/<image>",
    }
    for name, line in expected.items():
        argv = train_args(ws, f'bad_{name}', data='x')[:-1] + [str(tmp_path / name)]
        assert user_error(capsys, argv) == (2, [line])
    assert user_error(capsys, train_args(ws, 'too_many', '--holdout', '5')) == (
        2, ['error: --holdout 5: at most a tenth of the 40 training images (4) can be held out: lower it'])
    assert user_error(capsys, train_args(ws, 'no_knn', '--holdout', '2', '--knn_every', '0')) == (
        2, ['error: --holdout 2 is measured every --knn_every epochs: pass --knn_every N too, or drop --holdout'])



def test_the_report_draws_the_held_out_cosine_beside_eval_imitation(tmp_path, capsys):
    from evaluation import report
    exp = shutil.copytree(os.path.join(ROOT, 'tests', 'fixtures', 'report_exp'), tmp_path / 'exp')
    records = [json.loads(line) for line in (exp / 'logs' / 'log.jsonl').read_text().splitlines()]
    for r in records:
        if r['event'] == 'start':
            r.update(holdout_images=4, holdout_cosine_init=0.125)
        if r['event'] == 'epoch' and r['epoch'] != 2:  # measured at epochs 1 and 3
            r.update(holdout_cosine=0.25 * r['epoch'], holdout_cosine_change=0.25 * r['epoch'] - 0.125)
    (exp / 'logs' / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    got = report.main(report.get_args_parser().parse_args([str(exp)]))
    assert got['holdout_cosine'] == {'epoch': [0, 1, 3], 'cosine': [0.125, 0.25, 0.75]}
    assert 'cos(head, teacher) on held-out train images, epoch 0 -> 3  0.125 -> 0.750' in capsys.readouterr().out
    check_report_png(exp, panels=3)
    shutil.rmtree(exp / 'imitation')  # without eval_imitation.py's files the panel shows the held-out line alone
    for name in ('features_teacher', 'features_init', 'features', 'linear'):
        shutil.rmtree(exp / name)
    got = report.main(report.get_args_parser().parse_args([str(exp)]))
    assert got['imitation_cosine'] is None and report.panels(got) == ['loss', 'imitation']
    check_report_png(exp, panels=2)
