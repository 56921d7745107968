"""Bad files (an empty or truncated image, a stale feature cache, a text file as a checkpoint, a full or
read-only disk) end a command with one clear line, exit code 2, and the files already there intact."""
import errno
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder, run_command, write_teacher_checkpoint
from data.folders import decode_rgb, read_bytes
from benchmarks.reference import decode_views_on
from utils import checkpoint
from utils.checkpoint import read_checkpoint
from utils.errors import SimRegError
from utils.store import save_blocks_atomic


def snapshot(root):
    """{relative path: bytes} of every file under ``root`` except logs (which a failed run may append to)."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if 'logs' not in os.path.relpath(path, root):
                with open(path, 'rb') as f:
                    files[os.path.relpath(path, root)] = f.read()
    return files


def assert_one_line(proc, before, root, *fragments):
    """Exit code 2, a last line ``error: ...`` holding every fragment, no traceback, no file changed."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    after = snapshot(root)
    assert {k: after.get(k) for k in before} == before


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """<ws>/data: 3 classes x 7 images a split, file names unique over classes as in ImageNet's val/;
    <ws>/teacher.pth: a resnet18."""
    ws = tmp_path_factory.mktemp('badfiles')
    make_image_folder(ws / 'data', n_classes=3, per_class=7, size=40)
    for split in ('train', 'val'):
        for c in range(3):
            folder = ws / 'data' / split / f'class_{c}'
            for name in os.listdir(folder):
                os.rename(folder / name, folder / f'{split}_{c}_{name}')
    write_teacher_checkpoint(ws / 'teacher.pth')
    return ws


def copy_data(ws, name):
    shutil.copytree(ws / 'data', ws / name)
    return ws / name


def knn(ws, data, save, *extra, weights='teacher.pth', expect=2):
    return run_command([sys.executable, 'eval_knn.py', '--weights', str(ws / weights), '--arch', 'resnet18',
                        '--save', str(save), '--image_size', '32', *extra, str(data)], expect=expect)


def png_bytes(image):
    buf = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buf, 'PNG')
    return buf.getvalue()


def short_png():
    """A PNG whose header claims 64x4000 pixels (CRC fixed) over the data of 64x64: torchvision's decoder
    crashed the process on it (SIGSEGV), PIL silently fills the missing rows with black."""
    data = bytearray(png_bytes(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)))
    data[20:24] = struct.pack('>I', 4000)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# 1. an empty image file -------------------------------------------------------------------------------

def test_empty_training_image_is_named_from_a_loader_worker(ws):
    data = copy_data(ws, 'empty')
    bad = data / 'train' / 'class_1' / 'train_1_003.jpg'
    bad.write_bytes(b'')
    before = snapshot(ws)
    proc = run_command([sys.executable, 'train_student.py', str(data), '--base_dir', str(ws / 'runs'),
                        '--teacher_weights', str(ws / 'teacher.pth'), '--arch_teacher', 'resnet18',
                        '--arch_student', 'resnet18', '--batch_size', '7', '--epochs', '1', '--image_size', '32',
                        '--num_workers', '1', '--single_aug', '--weak_weak', '--exp', 'e'], expect=2)  # 3 steps: all 21
    assert_one_line(proc, before, ws, f'cannot read image {bad} (empty file): delete or replace the file')


# 2. a truncated PNG named .JPEG -----------------------------------------------------------------------

@pytest.mark.parametrize('decoder', ['decode_rgb(path)',
                                     'decode_views_on(torch.device("cpu"), [read_bytes(path)], None, lambda j: path, int)'],
                         ids=['loader', 'gpu_decode_fallback'])
def test_short_png_is_reported_where_torchvision_crashed(tmp_path, decoder):
    """In the loader's decoder and in --gpu_decode's CPU fallback (without workers: no worker to die)."""
    bad = tmp_path / 'n0_short.JPEG'
    bad.write_bytes(short_png())
    before = snapshot(tmp_path)
    code = ('import sys, torch; from data.folders import decode_rgb, read_bytes; '
            'from benchmarks.reference import decode_views_on; from utils.errors import exit_on_user_error; '
            f'path = sys.argv[1]; exit_on_user_error(lambda: {decoder})')
    proc = subprocess.run([sys.executable, '-c', code, str(bad)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert_one_line(proc, before, tmp_path, f'cannot read image {bad}', '64x4000', 'delete or replace the file')


def test_short_png_in_the_val_folder_is_named_from_a_loader_worker(ws):
    data = copy_data(ws, 'short_png')
    bad = data / 'val' / 'class_2' / 'val_2_004.jpg'
    bad.write_bytes(short_png())
    before = snapshot(ws)
    proc = knn(ws, data, ws / 'short_png_out', '--workers', '1')
    assert_one_line(proc, before, ws, f'cannot read image {bad}', 'PNG data ends', 'delete or replace the file')


def adam7_png(rgb):
    """``rgb`` (H, W, 3 uint8) as an interlaced (Adam7) PNG, which PIL cannot write."""
    raw = b''
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b''.join(b'\0' + row.tobytes() for row in sub)
    chunk = lambda kind, body: struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    header = struct.pack('>IIBBBBB', rgb.shape[1], rgb.shape[0], 8, 2, 0, 0, 1)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw))
            + chunk(b'IEND', b''))


def test_valid_pngs_named_jpeg_decode_to_pils_pixels(tmp_path):
    """Every PNG kind passes the row check and decodes as PIL does, in the loader and the --gpu_decode fallback."""
    rng = np.random.RandomState(1)
    rgb = rng.randint(0, 255, (37, 29, 3), dtype=np.uint8)
    cases = {'rgb': png_bytes(rgb), 'gray': png_bytes(rgb[..., 0]), 'rgba': png_bytes(np.dstack([rgb, rgb[..., :1]])),
             'palette': png_bytes(Image.fromarray(rgb).quantize(4)),
             'gray16': png_bytes(rng.randint(0, 65535, (37, 29)).astype(np.uint16)), 'interlaced': adam7_png(rgb)}
    Image.fromarray(rgb).save(tmp_path / 'plain.JPEG', quality=90)
    for name, data in cases.items():
        path = tmp_path / f'{name}.JPEG'
        path.write_bytes(data)
        with Image.open(path) as image:  # PIL's pixels; 16 bits scaled to 8 and alpha over white (data.folders.to_rgb)
            pixels = np.array(image.convert('RGB') if image.mode in ('RGB', 'L', 'P') else image)
        if name == 'gray16':
            pixels = (pixels >> 8).astype(np.uint8)
        elif name == 'rgba':
            alpha = pixels[..., 3:] / 255
            pixels = np.rint(pixels[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        expected = torch.from_numpy(np.broadcast_to(pixels[..., None], pixels.shape + (3,)).copy()
                                    if pixels.ndim == 2 else pixels).permute(2, 0, 1)
        assert (decode_rgb(str(path)).int() - expected.int()).abs().max() <= (name == 'rgba'), name
        batch = decode_views_on(torch.device('cpu'), [read_bytes(tmp_path / 'plain.JPEG'), read_bytes(path)],
                                lambda image: image[:, :8, :8], str, int)
        assert torch.equal(batch[1], decode_rgb(str(path))[:, :8, :8]), name
    assert torch.equal(decode_rgb(str(tmp_path / 'interlaced.JPEG')), torch.from_numpy(rgb).permute(2, 0, 1))


# 3. a feature cache of other images -------------------------------------------------------------------

def test_feature_cache_of_other_files_is_refused(ws):
    """Two val classes' images swapped: same count, same classes, other labels; the cache made before is refused."""
    data = copy_data(ws, 'swapped')
    out = ws / 'swapped_out'
    knn(ws, data, out, '--workers', '0', expect=0)
    val = data / 'val'
    os.rename(val / 'class_0', val / 'tmp')
    os.rename(val / 'class_1', val / 'class_0')
    os.rename(val / 'tmp', val / 'class_1')
    before = snapshot(ws)
    proc = knn(ws, data, out, '--workers', '0', '--load_cache')
    assert_one_line(proc, before, ws, f'cached val features {out}/val_feats.json were made for other files',
                    '--load_cache')


# 4. a file that is no checkpoint ----------------------------------------------------------------------

def damaged(path, keep):
    with open(path, 'rb') as f:
        data = f.read()
    return data[:keep(len(data))]


@pytest.mark.parametrize('kind, expected', [
    ('text', r'is a text file, not a PyTorch checkpoint \(it starts with "version https://git-lfs'),
    ('empty', r'is an empty file \(0 bytes\): download or copy it again'),
    ('binary', r'is not a PyTorch checkpoint \(neither the zip nor the legacy pickle format'),
    ('zip_cut', r'\(a zip-format PyTorch checkpoint without its end\): the file is truncated'),
    ('legacy_cut', r'the file is a legacy-format PyTorch checkpoint, truncated or damaged'),
    ('zip', None), ('legacy', None)])
def test_each_kind_of_non_checkpoint_gets_its_own_reason(tmp_path, kind, expected):
    state = {'w': torch.arange(5000.)}
    torch.save(state, tmp_path / 'zip')
    torch.save(state, tmp_path / 'legacy', _use_new_zipfile_serialization=False)
    contents = {'text': b'version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n', 'empty': b'',
                'binary': bytes(range(256)) * 8, 'zip_cut': damaged(tmp_path / 'zip', lambda n: n // 2),
                'legacy_cut': damaged(tmp_path / 'legacy', lambda n: n // 2)}
    path = tmp_path / f'{kind}.pth'
    if kind in contents:
        path.write_bytes(contents[kind])
    else:
        shutil.copy(tmp_path / kind, path)
    if expected is None:
        assert torch.equal(read_checkpoint(str(path))['w'], state['w'])
    else:
        with pytest.raises(SimRegError, match=expected):
            read_checkpoint(str(path))


def test_text_file_as_weights_says_so(ws, tmp_path):
    text = tmp_path / 'notes.pth'
    text.write_text('these are my notes, not weights\n')
    before = snapshot(tmp_path)
    proc = knn(ws, ws / 'data', tmp_path / 'out', weights=text)
    assert_one_line(proc, before, tmp_path, f'{text} is a text file, not a PyTorch checkpoint', 'these are my notes')


# 5. a full or read-only disk --------------------------------------------------------------------------

WRITERS = {'torch': (checkpoint.save_atomic, {'w': torch.ones(300, 300)}),
           'npy': (lambda array, path: save_blocks_atomic([array], path), np.ones((300, 300), np.float32)),
           'text': (checkpoint.write_file_atomic, 'x' * 100)}


def full_disk_mkstemp(real):
    """mkstemp whose file is real (so cleanup removes a real file) but written through /dev/full (ENOSPC)."""
    def mkstemp(**kwargs):
        fd, tmp = real(**kwargs)
        os.close(fd)
        return os.open('/dev/full', os.O_WRONLY), tmp
    return mkstemp


def read_only_mkstemp(real):
    def mkstemp(**kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get('dir'))
    return mkstemp


@pytest.mark.parametrize('writer', list(WRITERS))
@pytest.mark.parametrize('disk, expected', [
    (full_disk_mkstemp, 'cannot write {path} (No space left on device): free space in {folder} or choose another '
                        '--base_dir/--save/--output'),
    (read_only_mkstemp, 'cannot write {path} (Read-only file system): choose a writable folder '
                        '(--base_dir/--save/--output) instead of {folder}')], ids=['full', 'read_only'])
def test_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, writer, disk, expected):
    write, value = WRITERS[writer]
    path = tmp_path / 'out' / 'result'
    os.makedirs(path.parent)
    path.write_bytes(b'the previous result')
    monkeypatch.setattr(tempfile, 'mkstemp', disk(tempfile.mkstemp))
    with pytest.raises(SimRegError) as caught:
        write(value, str(path))
    assert str(caught.value) == expected.format(path=path, folder=path.parent)
    assert path.read_bytes() == b'the previous result' and os.listdir(path.parent) == ['result']


def unshare_works():
    try:
        return subprocess.run(['unshare', '-rm', 'true'], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


REAL_DISK = r'''
import os, subprocess, sys
import numpy as np, torch
from utils import checkpoint
from utils.errors import SimRegError, exit_on_user_error
from utils.store import save_blocks_atomic
mnt = sys.argv[1]
big = {'torch': {'w': torch.ones(600, 600)}, 'npy': np.ones((600, 600), np.float32), 'text': 'x' * 2000000}
writers = {'torch': checkpoint.save_atomic, 'npy': lambda array, path: save_blocks_atomic([array], path),
           'text': checkpoint.write_file_atomic}
for name, write in writers.items():
    write({'torch': {'w': torch.ones(3)}, 'npy': np.ones(3), 'text': 'old'}[name], os.path.join(mnt, name))
old = {name: open(os.path.join(mnt, name), 'rb').read() for name in writers}
for remount in ('', 'remount,ro'):
    if remount:
        subprocess.run(['mount', '-o', remount, mnt], check=True)
    for name, write in writers.items():
        try:
            write(big[name], os.path.join(mnt, name))
            sys.exit(f'{name}: no error')
        except SimRegError as exc:
            print(exc)
        assert sorted(os.listdir(mnt)) == sorted(writers), os.listdir(mnt)
        assert {n: open(os.path.join(mnt, n), 'rb').read() for n in writers} == old
exit_on_user_error(lambda: checkpoint.writable_folder(os.path.join(mnt, 'new')))
'''


@pytest.mark.skipif(not unshare_works(), reason='needs unshare -rm (a user + mount namespace) for a tmpfs')
def test_real_full_then_read_only_tmpfs(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace: filled by each writer, then remounted read-only."""
    mnt = tmp_path / 'mnt'
    mnt.mkdir()
    script = f'mount -t tmpfs -o size=1m tmpfs "$1" && exec "{sys.executable}" -c "$2" "$1"'
    proc = subprocess.run(['unshare', '-rm', 'sh', '-c', script, 'sh', str(mnt), REAL_DISK], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6, proc.stdout + proc.stderr
    for line, name in zip(lines[:3], ('torch', 'npy', 'text')):
        assert line == (f'cannot write {mnt}/{name} (No space left on device): free space in {mnt} or choose '
                        f'another --base_dir/--save/--output'), line
    for line, name in zip(lines[3:], ('torch', 'npy', 'text')):
        assert line.startswith(f'cannot write {mnt}/{name} (Read-only file system): choose a writable'), line
    assert_one_line(proc, {}, tmp_path, f'cannot create the folder {mnt}/new (Read-only file system)',
                    'choose a writable folder')
