"""Shared test fixtures: tiny generated image folders, and the project root on sys.path."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.environ.get('SIMREG_TEST_GPU'):
    # The suite checks CPU results bit for bit (resume, DDP with 2 gloo processes on one machine), so it
    # hides GPUs from itself and from the commands it starts; tests/test_gpu.py needs SIMREG_TEST_GPU=1.
    os.environ['CUDA_VISIBLE_DEVICES'] = ''
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_image_folder(root, n_classes=3, per_class=8, size=48, splits=('train', 'val'), seed=0):
    """Write ``root/<split>/class_<c>/<i>.jpg``: each class a distinct colour pattern plus noise,
    so a network can tell classes apart."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split in splits:
        for c in range(n_classes):
            folder = os.path.join(root, split, f'class_{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                base = np.stack([np.sin((c + 1) * 6 * xx), np.cos((c + 1) * 4 * yy), xx * yy * c], -1)
                img = 127 + 100 * base + rng.normal(0, 20, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f'{i:03d}.jpg'), quality=90)
    return str(root)


@pytest.fixture(scope='module', autouse=True)
def free_the_modules_disk(request, tmp_path_factory):
    """Delete the folders a test module wrote (its checkpoints run to GBs) once the module is done, unless
    one of its tests failed; with pytest.ini's retention policy a whole run needs a few GB, not tens."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope='module')
def one_thread():
    """Run a test module's forward passes on one intra-op thread: on a small machine shared with other
    processes, OpenMP's barriers wait for descheduled threads and two threads run 3-4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_folder(tmp_path):
    """A 3-class, 8-images-per-class train/val folder at 48x48."""
    return make_image_folder(tmp_path / 'data')


def run_command(cmd, expect=0, **env):
    """Run a command from the project root on one OpenMP thread; assert its exit code."""
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1', **env})
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_json(path):
    with open(path) as f:
        return json.load(f)


def torchrun(script, *args, nproc=2):
    """The command line of ``script`` under torchrun with ``nproc`` processes on a free loopback port."""
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1',
            f'--master_port={free_port()}', script, *args]


def free_port():
    """A free TCP port on the loopback, for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def cache_workspace(ws):
    """<ws>/data (3 classes x 7 images of 40 px) and <ws>/teacher.pth (a seeded resnet18)."""
    from models.backbones import build_backbone
    make_image_folder(ws / 'data', n_classes=3, per_class=7, size=40, splits=('train',))
    torch.manual_seed(1)
    torch.save({'state_dict': build_backbone('resnet18').state_dict()}, ws / 'teacher.pth')
    return ws


def build_cache(ws, output, *args):
    """cache_teacher_feats.py on a cache_workspace, in this process."""
    import cache_teacher_feats
    parsed = cache_teacher_feats.get_args_parser().parse_args(
        [str(ws / 'data'), '--teacher_weights', str(ws / 'teacher.pth'), '--output', str(ws / output), *args])
    return cache_teacher_feats.main(parsed)


def train(argv):
    """train_student.py in this process, on these command-line arguments."""
    import train_student
    return train_student.main(train_student.get_args_parser().parse_args(argv))


def train_log(exp_dir, event):
    """The records of one event ('start', 'window', 'epoch') in the JSON log of the run in ``exp_dir``."""
    from utils.logging import json_log_path, read_json_log
    return read_json_log(json_log_path(os.path.join(exp_dir, 'logs')), event)


def resumed_from(exp_dir):
    """The epoch the last training run in ``exp_dir`` resumed after, from its log; None for a fresh start. A
    resume test needs it: a run that silently started over would replay the same per-sample seeds and
    end with the same weights."""
    return train_log(exp_dir, 'start')[-1]['resumed_from']


HEAD_DIM = 64


def write_student_checkpoint(path, head_dim=HEAD_DIM, linear_pred=False, seed=0):
    """A resnet18 student in this project's checkpoint layout (what train_student.py writes)."""
    import models
    torch.manual_seed(seed)
    backbone = models.build_backbone('resnet18')
    head = models.build_head(backbone.feat_dim, head_dim, linear_pred=linear_pred)
    state = {'encoder_q.' + k: v for k, v in backbone.state_dict().items()}
    state.update({'predict_q.' + k: v for k, v in head.state_dict().items()})
    torch.save({'epoch': 1, 'state_dict': state,
                'args': {'arch_student': 'resnet18', 'arch_teacher': 'resnet18', 'n_mlp_layers': 4,
                         'linear_pred': linear_pred, 'image_size': 32}}, path)
    return str(path)


def write_teacher_checkpoint(path, seed=1):
    """A plain torchvision-layout resnet18 (what a teacher file looks like)."""
    import models
    torch.manual_seed(seed)
    torch.save({'state_dict': models.build_backbone('resnet18').state_dict()}, path)
    return str(path)


PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def check_report(exp_dir, panels):
    """Check ``exp_dir``'s report.json against the result files at demo.sh's paths (null where a file is not
    there) and report.png (check_report_png); returns the report's dict."""
    exp_dir = str(exp_dir)
    report = read_json(os.path.join(exp_dir, 'report.json'))
    path = lambda *parts: os.path.join(exp_dir, *parts)
    optional = lambda *parts: read_json(path(*parts)) if os.path.exists(path(*parts)) else None
    for key, folder in [('teacher_knn', 'features_teacher'), ('student_knn_before', 'features_init'),
                        ('student_knn_after', 'features')]:
        knn = optional(folder, 'knn_results.json')
        assert report[key] == (knn and knn['majority_top1']), key
        assert report[key] is None or {'1', '20'} <= set(report[key])
    linear = optional('linear', 'linear_results.json')
    assert report['linear_top1'] == (linear and linear['best']['top1'])
    imitation = [read_json(path('imitation', n)) for n in os.listdir(path('imitation'))] \
        if os.path.isdir(path('imitation')) else []
    assert report['imitation_cosine'] == ({str(r['epoch']): r['mean_cosine'] for r in imitation} or None)
    assert 'wall_time_s' in report
    check_report_png(exp_dir, panels)
    return report


def check_report_png(exp_dir, panels):
    """report.png in ``exp_dir`` is a PNG of ``panels`` panels, with something drawn, that PIL and matplotlib
    read back; the atomic writes left no temp file."""
    import matplotlib.image
    from evaluation.report import DPI, PANEL_INCHES
    png = os.path.join(str(exp_dir), 'report.png')
    with open(png, 'rb') as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(png) as image:
        assert image.format == 'PNG'
        assert image.size == (int(PANEL_INCHES[0] * DPI * panels), int(PANEL_INCHES[1] * DPI))
        pixels = np.asarray(image.convert('L'))
    assert pixels.std() > 5  # something is drawn
    assert matplotlib.image.imread(png).shape[:2] == pixels.shape
    assert not [n for n in os.listdir(str(exp_dir)) if n.endswith('.tmp')]


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub folder for the preset tests (they pre-fill it), where any download is a test failure."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / 'hub'))

    def no_network(url, dst, *args, **kwargs):
        raise AssertionError(f'tests must not download {url}')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    yield tmp_path / 'hub'
    torch.hub.set_dir(old)
