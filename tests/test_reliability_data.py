"""Hostile images (every PIL mode and bit depth, every format, animations, corrupt files, decompression bombs,
files that are not images), damaged teacher caches, and exit codes through every launcher: the right pixels, or
one line naming the file and the fix, exit 2, nothing already there changed."""
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (ROOT, build_cache, cache_workspace, free_port, make_image_folder, run_command,
                      write_teacher_checkpoint)
from data.folders import IndexedImageFolder, decode_rgb, read_checked, to_rgb
from data.gpu_views import decode_batch_on
from data.teacher_cache import dataset_fingerprint, open_teacher_cache, write_cache
from test_bad_files import assert_one_line, snapshot
from utils.errors import SimRegError

SIZE = 16
GRADIENT = np.arange(SIZE * SIZE, dtype=np.int64).reshape(SIZE, SIZE)  # 0 .. 255


def encoded(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def png16(samples, colour):
    """A 16-bit PNG of ``samples`` (H, W, C) uint16, colour type ``colour`` (0 gray, 2 RGB, 4 gray+alpha, 6 RGBA)."""
    height, width = samples.shape[:2]
    rows = b''.join(b'\x00' + samples[y].astype('>u2').tobytes() for y in range(height))
    header = struct.pack('>IIBBBBB', width, height, 16, colour, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', header) + png_chunk(b'IDAT', zlib.compress(rows))
            + png_chunk(b'IEND', b''))


def gray(values):
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, -1)


def over_white(rgb, alpha):
    """What a pixel of colour ``rgb`` and opacity ``alpha`` (0-255) shows over white."""
    a = np.asarray(alpha, np.float64)[..., None] / 255
    return np.rint(np.asarray(rgb, np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def mode_cases():
    """name -> (file bytes and extension, or an in-memory PIL image; the RGB it must decode to)."""
    wide16 = (GRADIENT * 257).astype(np.uint16)               # 0 .. 65535
    rng = np.random.RandomState(0)
    rgb16 = rng.randint(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    la16 = rng.randint(0, 65536, (SIZE, SIZE, 2)).astype(np.uint16)
    ints = GRADIENT * 400 - 1000                                # -1000 .. 101000: stretched
    unit = (GRADIENT / 255).astype(np.float32)                  # 0 .. 1: times 255
    wide = (GRADIENT * 3.5 - 20).astype(np.float32)             # -20 .. 872.5: stretched
    alpha = (GRADIENT % 256).astype(np.uint8)
    colour = rng.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    palette = Image.fromarray((GRADIENT % 8).astype(np.uint8), 'P')
    palette.putpalette([v for i in range(8) for v in (i * 30, 255 - i * 30, 7)])
    stretched = lambda a: gray(np.rint((a - a.min()) * 255 / (a.max() - a.min())))
    cmyk = Image.merge('CMYK', [Image.fromarray(c) for c in rng.randint(0, 256, (4, SIZE, SIZE)).astype(np.uint8)])
    c, m, y, k = (np.asarray(ch, np.float64) for ch in cmyk.split())
    cmyk_rgb = np.rint(np.stack([(255 - k) * (1 - ch / 255) for ch in (c, m, y)], -1)).astype(np.uint8)
    return {
        'I;16 png': ((encoded(Image.fromarray(wide16), 'PNG'), '.png'), gray(GRADIENT)),
        'I;16 tiff': ((encoded(Image.fromarray(wide16), 'TIFF'), '.tif'), gray(GRADIENT)),
        'I;16B tiff': ((encoded(Image.frombytes('I;16B', (SIZE, SIZE), wide16.astype('>u2').tobytes()), 'TIFF'),
                        '.tiff'), gray(GRADIENT)),
        'I 16-bit pgm': ((encoded(Image.fromarray(wide16), 'PPM'), '.pgm'), gray(GRADIENT)),
        'I 16-bit tiff': ((encoded(Image.fromarray(wide16.astype(np.int32), 'I'), 'TIFF'), '.tif'), gray(GRADIENT)),
        'I wide tiff': ((encoded(Image.fromarray(ints.astype(np.int32), 'I'), 'TIFF'), '.tif'), stretched(ints)),
        'F unit tiff': ((encoded(Image.fromarray(unit, 'F'), 'TIFF'), '.tif'), gray(GRADIENT)),
        'F wide tiff': ((encoded(Image.fromarray(wide, 'F'), 'TIFF'), '.tif'), stretched(wide.astype(np.float64))),
        '16-bit RGB png': ((png16(rgb16, 2), '.png'), (rgb16 >> 8).astype(np.uint8)),
        '16-bit gray+alpha png': ((png16(la16, 4), '.png'), over_white(gray(la16[..., 0] >> 8), la16[..., 1] >> 8)),
        '1 png': ((encoded(Image.fromarray(GRADIENT % 3 == 0), 'PNG'), '.png'), gray((GRADIENT % 3 == 0) * 255)),
        'L jpeg': ((encoded(Image.fromarray(gray(GRADIENT)[..., 0]), 'JPEG', quality=100), '.jpg'), gray(GRADIENT)),
        'LA png': ((encoded(Image.fromarray(np.stack([gray(GRADIENT)[..., 0], alpha], -1), 'LA'), 'PNG'), '.png'),
                   over_white(gray(GRADIENT), alpha)),
        'P png, index 3 transparent': ((encoded(palette, 'PNG', transparency=3), '.png'),
                                       np.where((GRADIENT % 8 == 3)[..., None], np.uint8(255),
                                                np.asarray(palette.convert('RGB')))),
        'RGB png, colour key': ((encoded(Image.fromarray(gray(GRADIENT)), 'PNG', transparency=(7, 7, 7)), '.png'),
                                np.where((GRADIENT == 7)[..., None], np.uint8(255), gray(GRADIENT))),
        'RGBA png': ((encoded(Image.fromarray(np.dstack([colour, alpha]), 'RGBA'), 'PNG'), '.png'),
                     over_white(colour, alpha)),
        'RGBA webp': ((encoded(Image.fromarray(np.dstack([colour, alpha]), 'RGBA'), 'WEBP', lossless=True,
                               exact=True), '.webp'), over_white(colour, alpha)),
        'CMYK tiff': ((encoded(cmyk, 'TIFF'), '.tif'), cmyk_rgb),
        'LAB tiff': ((encoded(Image.merge('LAB', [Image.fromarray(gray(GRADIENT)[..., 0])]
                                          + [Image.new('L', (SIZE, SIZE), 128)] * 2), 'TIFF'), '.tif'), None),
        'PA': (Image.merge('PA', [palette, Image.fromarray(alpha)]), over_white(palette.convert('RGB'), alpha)),
        'La': (Image.merge('LA', [Image.fromarray(gray(GRADIENT)[..., 0]), Image.fromarray(alpha)]).convert('La'),
               None),
        'RGBa': (Image.fromarray(np.dstack([colour, alpha]), 'RGBA').convert('RGBa'), None),
        'HSV': (Image.merge('HSV', [Image.fromarray(np.full((SIZE, SIZE), h, np.uint8)) for h in (0, 255, 255)]),
                np.broadcast_to(np.uint8([255, 0, 0]), (SIZE, SIZE, 3))),
        'YCbCr': (Image.new('YCbCr', (SIZE, SIZE), (128, 128, 128)), np.full((SIZE, SIZE, 3), 128, np.uint8)),
    }


CASES = mode_cases()


@pytest.mark.parametrize('name', list(CASES))
def test_every_mode_and_bit_depth_decodes_to_scaled_8_bit_rgb(tmp_path, name):
    """Before: 16-bit, 32-bit and float images clipped to white at 255, transparent pixels showed whatever colour
    they held (often black). Files are checked through the loader's decoder and --gpu_decode's."""
    source, expected = CASES[name]
    if isinstance(source, Image.Image):
        got = np.asarray(to_rgb(source))
    else:
        path = tmp_path / f'img{source[1]}'
        path.write_bytes(source[0])
        got = decode_rgb(str(path)).permute(1, 2, 0).numpy()
        on_device = decode_batch_on(torch.device('cpu'), [read_checked(str(path))], lambda j: str(path))[0]
        assert np.array_equal(on_device.permute(1, 2, 0).numpy(), got)
    assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE, 3)
    if name == 'LAB tiff':  # the gray axis of LAB: L 0..100% -> black .. white, none clipped
        assert max(got[0, 0]) <= 2 and min(got[-1, -1]) >= 253 and (np.diff(got[..., 1].ravel()) >= 0).all()
    elif name in ('La', 'RGBa'):  # premultiplied alpha: the colour un-multiplied, then over white
        straight = source.convert('LA' if name == 'La' else 'RGBA')
        want = over_white(np.asarray(straight.convert('RGBA'))[..., :3], np.asarray(straight)[..., -1])
        assert np.abs(got.astype(int) - want).max() <= 1
    else:
        assert np.abs(got.astype(int) - expected).max() <= (2 if 'jpeg' in name else 1), name


# 8x8 blocks of 4 levels: few colours (GIF is exact), and little for JPEG to lose
PALETTE_IMAGE = np.kron(np.random.RandomState(1).randint(0, 4, (4, 4)), np.ones((8, 8), np.int64)).astype(np.uint8) * 60
FORMATS = [  # extension, PIL format, save options, lossless
    ('.bmp', 'BMP', {}, True), ('.dib', 'DIB', {}, True), ('.gif', 'GIF', {}, True), ('.png', 'PNG', {}, True),
    ('.tif', 'TIFF', {'compression': 'tiff_lzw'}, True), ('.tiff', 'TIFF', {'compression': 'tiff_adobe_deflate'}, True),
    ('.webp', 'WEBP', {'lossless': True}, True), ('.ppm', 'PPM', {}, True), ('.pnm', 'PPM', {}, True),
    ('.ico', 'ICO', {'sizes': [(32, 32)]}, True), ('.tga', 'TGA', {}, True), ('.pcx', 'PCX', {}, True),
    ('.sgi', 'SGI', {}, True), ('.qoi', 'QOI', {}, True), ('.jp2', 'JPEG2000', {}, True),
    ('.j2k', 'JPEG2000', {}, True), ('.jpg', 'JPEG', {'quality': 95}, False), ('.jfif', 'JPEG', {'quality': 95}, False),
    ('.jpe', 'JPEG', {'quality': 95}, False), ('.webp', 'WEBP', {'quality': 95}, False),
    ('.avif', 'AVIF', {'quality': 95}, False), ('.pgm', 'PPM', {}, True), ('.pbm', 'PPM', {}, True),
]


@pytest.mark.parametrize('ext, fmt, options, lossless', FORMATS, ids=[f'{f[0]}-{f[1]}' for f in FORMATS])
def test_every_format_pil_reads_is_listed_and_decoded(tmp_path, ext, fmt, options, lossless):
    if fmt not in Image.SAVE:
        pytest.skip(f'this PIL cannot write {fmt}')
    rgb = np.dstack([PALETTE_IMAGE, 255 - PALETTE_IMAGE, PALETTE_IMAGE // 2])
    image = Image.fromarray(rgb)
    if ext == '.pgm':
        image, rgb = image.convert('L'), gray(np.asarray(image.convert('L')))
    elif ext == '.pbm':
        image = Image.fromarray(PALETTE_IMAGE > 60)
        rgb = gray((PALETTE_IMAGE > 60) * 255)
    folder = tmp_path / 'train' / 'a'
    folder.mkdir(parents=True)
    (folder / f'x{ext}').write_bytes(encoded(image, fmt, **options))
    dataset = IndexedImageFolder(str(tmp_path / 'train'))
    assert [os.path.basename(p) for p, _ in dataset.samples] == [f'x{ext}'] and dataset.skipped is None
    got = dataset[0][1].permute(1, 2, 0).numpy().astype(int)
    if lossless:
        assert np.array_equal(got, rgb)
    else:  # what PIL makes of it (JPEGs are decoded by torchvision), near the original
        with Image.open(folder / f'x{ext}') as image:
            assert np.abs(got - np.asarray(image.convert('RGB'), int)).max() <= 3
        assert np.abs(got - rgb).mean() < 12


def frames(fmt):
    """An animation of 3 frames of other colours in ``fmt``; its first frame."""
    first = Image.fromarray(np.dstack([PALETTE_IMAGE, 255 - PALETTE_IMAGE, PALETTE_IMAGE]))
    rest = [Image.new('RGB', first.size, colour) for colour in ((255, 0, 0), (0, 0, 255))]
    options = {'lossless': True} if fmt == 'WEBP' else {}
    if fmt == 'TIFF':
        return encoded(first, fmt, save_all=True, append_images=rest), np.asarray(first)
    return encoded(first, fmt, save_all=True, append_images=rest, duration=100, loop=0, **options), np.asarray(first)


@pytest.mark.parametrize('fmt, ext', [('GIF', '.gif'), ('PNG', '.apng'), ('WEBP', '.webp'), ('TIFF', '.tif')])
def test_animated_and_multi_page_files_decode_to_their_first_frame(tmp_path, fmt, ext):
    data, first = frames(fmt)
    path = tmp_path / f'anim{ext}'
    path.write_bytes(data)
    with Image.open(path) as image:
        assert getattr(image, 'n_frames', 1) == 3
    assert np.array_equal(decode_rgb(str(path)).permute(1, 2, 0).numpy(), first)


def jpeg_claiming(width, height):
    """A small JPEG whose frame header claims ``width`` x ``height`` pixels."""
    data = bytearray(encoded(Image.new('RGB', (16, 16), (9, 9, 9)), 'JPEG'))
    sof = data.index(b'\xff\xc0')
    data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    return bytes(data)


def png_claiming(width, height):
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', header) + png_chunk(b'IDAT', zlib.compress(b'\0' * 4096, 9))
            + png_chunk(b'IEND', b''))


def gif_claiming(width, height):
    data = bytearray(encoded(Image.new('P', (8, 8)), 'GIF'))
    data[6:10] = struct.pack('<HH', width, height)
    return bytes(data)


def tiff_claiming(width, height):
    """A small TIFF whose ImageWidth and ImageLength entries (SHORT or LONG) claim ``width`` x ``height``."""
    data = bytearray(encoded(Image.new('L', (8, 8)), 'TIFF'))  # little-endian: b'II*\0', then the IFD's offset
    ifd = struct.unpack('<I', data[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack('<H', data[ifd:ifd + 2])[0], 12):
        tag, kind = struct.unpack('<HH', data[entry:entry + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            data[entry + 8:entry + 12] = struct.pack('<HH', value, 0) if kind == 3 else struct.pack('<I', value)
    return bytes(data)


BOMBS = {'.jpg': jpeg_claiming(60000, 60000), '.png': png_claiming(100000, 100000),
         '.gif': gif_claiming(65535, 65535), '.tif': tiff_claiming(65000, 65000)}
CORRUPT = {  # what a scraped or copied folder holds: name -> (bytes, what the line says)
    'cut.jpg': (encoded(Image.new('RGB', (64, 64), (3, 90, 200)), 'JPEG')[:300], 'truncated'),
    'cut.gif': (frames('GIF')[0][:200], 'truncated'),
    'cut.tif': (encoded(Image.new('RGB', (64, 64)), 'TIFF')[:2000], 'truncated'),
    'cut.bmp': (encoded(Image.new('RGB', (64, 64)), 'BMP')[:2000], 'truncated'),
    'cut.webp': (encoded(Image.new('RGB', (64, 64)), 'WEBP')[:40], ''),
    'page.jpg': (b'<!DOCTYPE html><html><body>404 Not Found</body></html>', 'not an image format PIL knows'),
    'noise.png': (np.random.RandomState(3).bytes(3000), 'not an image format PIL knows'),
    'header_only.jpg': (b'\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00', ''),
    'empty.png': (b'', 'empty file'),
    'nan.tif': (encoded(Image.fromarray(np.float32([[np.nan, 1], [0, 1]]), 'F'), 'TIFF'), 'NaN or infinite'),
    'inf.tif': (encoded(Image.fromarray(np.float32([[np.inf, 1], [0, 1]]), 'F'), 'TIFF'), 'NaN or infinite'),
}


@pytest.mark.parametrize('ext', list(BOMBS))
def test_images_over_pils_bomb_limit_are_refused_from_the_header(tmp_path, ext):
    path = tmp_path / f'huge{ext}'
    path.write_bytes(BOMBS[ext])
    with pytest.raises(SimRegError, match=rf"cannot read image {path} \(.*decompression-bomb limit.*\): shrink "
                                          r'the image or delete the file'):
        decode_rgb(str(path))


def test_bomb_is_refused_before_any_large_allocation(tmp_path):
    """Each bomb in a fresh process: its peak memory grows by less than 100 MB (decoding would need 2.5-30 GB)."""
    for ext, data in BOMBS.items():
        (tmp_path / f'huge{ext}').write_bytes(data)
    code = '''
import resource, sys
from data.folders import decode_rgb, read_checked
from utils.errors import SimRegError
decode_rgb(sys.argv[2])  # warm up: the imports and decoders' own memory
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1].split(','):
    for read in (decode_rgb, read_checked):
        try:
            read(path)
        except SimRegError:
            pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
'''
    small = tmp_path / 'small.png'
    small.write_bytes(encoded(Image.new('RGB', (8, 8)), 'PNG'))
    paths = ','.join(str(tmp_path / f'huge{ext}') for ext in BOMBS)
    proc = subprocess.run([sys.executable, '-c', code, paths, str(small)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) < 100, proc.stdout


@pytest.mark.parametrize('name', list(CORRUPT))
def test_each_corrupt_file_is_one_line_naming_it(tmp_path, name):
    data, reason = CORRUPT[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SimRegError) as caught:
        decode_rgb(str(path))
    line = str(caught.value)
    assert line.startswith(f'cannot read image {path} (') and line.endswith('delete or replace the file')
    assert reason.lower() in line.lower() and '\n' not in line


def test_gpu_decode_workers_refuse_a_bomb_before_the_device_sees_it(tmp_path):
    folder = tmp_path / 'train' / 'a'
    folder.mkdir(parents=True)
    (folder / 'huge.jpg').write_bytes(BOMBS['.jpg'])
    dataset = IndexedImageFolder(str(tmp_path / 'train'), encoded=True)
    with pytest.raises(SimRegError, match=r"huge.jpg \(Image size \(3600000000 pixels\) exceeds limit .*: PIL's "
                                          r'decompression-bomb limit\)'):
        dataset[0]


def test_gpu_decode_workers_leave_a_damaged_jpeg_to_the_decode_that_names_it(tmp_path):
    for name in ('cut.jpg', 'header_only.jpg'):
        path = tmp_path / name
        path.write_bytes(CORRUPT[name][0])
        assert bytes(read_checked(str(path)).numpy()) == CORRUPT[name][0]  # the worker passes the bytes on
        with pytest.raises(SimRegError, match=rf'cannot read image {path} \(.*\): delete or replace the file'):
            decode_batch_on(torch.device('cpu'), [read_checked(str(path))], lambda j: str(path))


def test_files_left_out_are_counted_in_one_line(tmp_path, capsys, monkeypatch):
    """Before: notes.txt, a .gif, a macOS '._' file and a file without extension were left out without a word."""
    make_image_folder(tmp_path / 'data', n_classes=2, per_class=2, size=16, splits=('train',))
    folder = tmp_path / 'data' / 'train' / 'class_0'
    (folder / 'anim.GIF').write_bytes(frames('GIF')[0])
    for name in ('notes.txt', 'labels.txt', '.DS_Store', '._000.jpg', 'README', 'Thumbs.db'):
        (folder / name).write_bytes(b'x')
    dataset = IndexedImageFolder(str(tmp_path / 'data' / 'train'))
    assert sorted(os.path.basename(p) for p, _ in dataset.samples) == ['000.jpg', '000.jpg', '001.jpg', '001.jpg',
                                                                        'anim.GIF']
    line = (f"note: {tmp_path / 'data' / 'train'}: left out 6 files that are not images (2 .txt, 2 hidden, 1 .db, "
            f"1 no extension); to use them, convert them to one of jpg jpeg png ppm bmp pgm tif tiff webp ...")
    assert dataset.skipped == line and capsys.readouterr().out == line + '\n'
    monkeypatch.setenv('RANK', '1')  # said once, by the first process
    IndexedImageFolder(str(tmp_path / 'data' / 'train'))
    assert capsys.readouterr().out == ''


TRAIN = ['--arch_teacher', 'resnet18', '--arch_student', 'resnet18', '--image_size', '32', '--batch_size', '8',
         '--single_aug', '--weak_weak', '--epochs', '1', '--exp', 'e']


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp('reldata')
    make_image_folder(ws / 'data', n_classes=2, per_class=8, size=32, splits=('train',))
    write_teacher_checkpoint(ws / 'teacher.pth')
    return ws


@pytest.mark.slow
@pytest.mark.parametrize('name, data, fragment', [
    ('huge.jpg', BOMBS['.jpg'], "(Image size (3600000000 pixels) exceeds limit of 178956970 pixels: PIL's "
                                "decompression-bomb limit): shrink the image or delete the file"),
    ('page.jpg', CORRUPT['page.jpg'][0], '(not an image format PIL knows, or corrupt): delete or replace the file'),
], ids=['bomb', 'html'])
def test_training_on_a_hostile_image_ends_with_its_line(ws, name, data, fragment):
    folder = ws / f'data_{name}'
    shutil.copytree(ws / 'data', folder)
    bad = folder / 'train' / 'class_1' / name
    bad.write_bytes(data)
    (folder / 'train' / 'class_1' / 'notes.txt').write_text('scraped from ...')
    before = snapshot(ws)
    proc = run_command([sys.executable, 'train_student.py', str(folder), '--base_dir', str(ws / f'out_{name}'),
                        '--teacher_weights', str(ws / 'teacher.pth'), '--num_workers', '1', *TRAIN], expect=2)
    assert_one_line(proc, before, ws, f'cannot read image {bad} {fragment}')
    assert proc.stdout.count('left out 1 files that are not images (1 .txt)') == 1
    assert not [p for p in snapshot(ws) if p.endswith('.tmp') or '.tmp' in os.path.basename(p)]


# ---------------------------------------------------------------------------------------------- teacher caches

def cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


def poke(path, row, value):
    array = np.load(path, mmap_mode='r+')
    array[row, 1] = value
    array.flush()


def sidecar(path, change):
    meta = __import__('json').loads(path.with_suffix('.json').read_text())
    path.with_suffix('.json').write_text(__import__('json').dumps(change(meta)))


CACHE_DAMAGE = {  # kind -> (damage(npy path), the file the line names: npy or json, what it says)
    'cut short': (lambda p: cut(p, -10), 'npy', 'not a whole .npy array'),
    'header only': (lambda p: cut(p, 128), 'npy', 'not a whole .npy array'),
    'half a header': (lambda p: cut(p, 40), 'npy', 'not a whole .npy array'),
    'empty': (lambda p: cut(p, 0), 'npy', 'not a whole .npy array'),
    'overwritten': (lambda p: p.write_bytes(np.random.RandomState(0).bytes(3000)), 'npy', 'not a whole .npy array'),
    'bytes appended': (lambda p: p.write_bytes(p.read_bytes() + b'\0' * 64), 'npy', '64 bytes more than its header'),
    'NaN row': (lambda p: poke(p, 5, np.nan), 'npy', 'NaN or infinite features of sample 5'),
    'inf row': (lambda p: poke(p, 0, -np.inf), 'npy', 'NaN or infinite features of sample 0'),
    'sidecar cut short': (lambda p: cut(p.with_suffix('.json'), 30), 'json', 'Unterminated string'),
    'sidecar empty': (lambda p: cut(p.with_suffix('.json'), 0), 'json', 'Expecting value'),
    'sidecar binary': (lambda p: p.with_suffix('.json').write_bytes(b'\xff\xfe\0\x01'), 'json', "can't decode"),
    'sidecar without dim': (lambda p: sidecar(p, lambda m: {k: v for k, v in m.items() if k != 'dim'}), 'json',
                            'no valid dim'),
    'sidecar without dataset': (lambda p: sidecar(p, lambda m: {**m, 'dataset': None}), 'json', 'no valid dataset'),
    'sidecar dim a string': (lambda p: sidecar(p, lambda m: {**m, 'dim': '16'}), 'json', 'no valid dim'),
}


@pytest.fixture(scope='module')
def small_dataset(tmp_path_factory):
    from data.folders import build_dataset
    root = tmp_path_factory.mktemp('cachedata')
    return build_dataset(make_image_folder(root, n_classes=2, per_class=6, size=16, splits=('train',)), 'train', None)


@pytest.mark.parametrize('kind', list(CACHE_DAMAGE))
def test_each_kind_of_cache_damage_is_one_line_saying_rebuild_it(tmp_path, small_dataset, kind):
    damage, named, reason = CACHE_DAMAGE[kind]
    path = tmp_path / 'feats.npy'
    write_cache(str(path), [np.random.RandomState(0).randn(len(small_dataset), 16).astype(np.float16)],
                {'teacher': {'arch': 'resnet18'}, 'dataset': dataset_fingerprint(small_dataset),
                 'transform': 'eval', 'image_size': 32})
    damage(path)
    with pytest.raises(SimRegError) as caught:  # found when opened, or when the rows are read
        open_teacher_cache(str(path), small_dataset).rows(torch.arange(len(small_dataset)))
    line = str(caught.value)
    assert line.startswith(f'teacher cache file {path.with_suffix("." + named)} is damaged (') and reason in line
    assert line.endswith('rebuild it with cache_teacher_feats.py') and '\n' not in line


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['NaN row', 'cut short'])
def test_training_on_a_damaged_cache_names_the_cache_not_the_learning_rate(tmp_path, kind):
    """Before: NaN rows ended with 'loss is nan ... lower --learning_rate ... --resume auto', a cut file with numpy's
    traceback."""
    ws = cache_workspace(tmp_path)
    build_cache(ws, 'feats.npy', '--arch_teacher', 'resnet18', '--image_size', '32', '--batch_size', '8',
                '--num_workers', '0')
    CACHE_DAMAGE[kind][0](ws / 'feats.npy')
    before = snapshot(ws)
    proc = run_command([sys.executable, 'train_student.py', str(ws / 'data'), '--base_dir', str(ws / 'out'),
                        '--use_cache', '--teacher_feats', str(ws / 'feats.npy'), '--num_workers', '0',
                        '--print_freq', '1', *TRAIN], expect=2)
    assert_one_line(proc, before, ws, f'teacher cache file {ws / "feats.npy"} is damaged',
                    'rebuild it with cache_teacher_feats.py')
    assert 'learning_rate' not in proc.stderr and 'loss is' not in proc.stderr


# ------------------------------------------------------------------------------- exit codes through the launchers

def bash(script, **env):
    return subprocess.run(['bash', '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'NGPUS': '1', **env})


@pytest.mark.parametrize('launcher_code, ranks, expected', [
    (1, {'rank0': 2, 'rank1': -15}, 2), (1, {'rank0': 75, 'rank1': 2}, 2), (1, {'rank0': 75}, 75),
    (137, {'rank0': 3, 'rank1': 75}, 3), (1, {'rank0': 1}, 1), (1, {}, 1), (0, {'rank0': 0}, 0)])
def test_the_code_a_launcher_ends_with(tmp_path, launcher_code, ranks, expected):
    """Bad input on any process: 2, whatever the others did (rank 0 killed by torchrun and checkpointing would say
    75, and a requeued job would meet the same input); else rank 0's own 3 or 75; else the launcher's."""
    for name, code in ranks.items():
        (tmp_path / name).write_text(f'{code}\n')
    proc = bash(f'source scripts/launch.sh; exit_code {launcher_code} {tmp_path}')
    assert proc.stdout.strip() == str(expected), proc.stderr


SENDING = ('W1206 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 9 closing '
           'signal SIGTERM\n')
FAILED = ('E1206 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: {}) '
          'local_rank: 0\n')
CHILD_FAILED = '''Traceback (most recent call last):
  File "/bin/torchrun", line 8, in <module>
    sys.exit(main())
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
train_student.py FAILED
------------------------------------------------------------
Root Cause (first observed failure):
  exitcode  : 1 (pid: 8)
============================================================
'''
CRASH = '''Traceback (most recent call last):
  File "train_student.py", line 3, in <module>
    main()
ZeroDivisionError: division by zero
'''


@pytest.mark.parametrize('rank0, crash', [('2', ''), ('75', ''), ('1', CRASH)])
def test_launcher_report_is_left_out_only_after_our_exit_codes(tmp_path, rank0, crash):
    """torchrun's ChildFailedError traceback goes when a process ended with 2, 3 or 75 (it said why in one line, said
    once however many processes said it); a crash's traceback and torchrun's report of it stay."""
    (tmp_path / 'rank0').write_text(rank0)
    stream = tmp_path / 'stream'
    stream.write_text('error: bad\nerror: bad\n' + crash + SENDING + FAILED.format(rank0) + CHILD_FAILED)
    proc = bash(f'source scripts/launch.sh; quiet_launcher {tmp_path}; cat {stream} > {tmp_path}/stderr; wait')
    kept = '' if not crash else crash + FAILED.format(rank0) + CHILD_FAILED
    assert proc.stderr == 'error: bad\n' + kept and proc.stdout == ''


SIGNALLED = '''Traceback (most recent call last):
  File "/bin/torchrun", line 8, in <module>
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 4760 got signal: 15
'''


def test_torchruns_signal_traceback_is_left_out_after_a_checkpoint(tmp_path):
    (tmp_path / 'rank0').write_text('75')
    stream = tmp_path / 'stream'
    stream.write_text('W1206 elastic/agent/server/api.py:753] Received 15 death signal, shutting down workers\n'
                      + SIGNALLED + 'after\n')
    proc = bash(f'source scripts/launch.sh; quiet_launcher {tmp_path}; cat {stream} > {tmp_path}/stderr; wait')
    assert proc.stderr == 'after\n'


@pytest.fixture(scope='module')
def launch_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp('launchers')
    make_image_folder(ws / 'data', n_classes=2, per_class=4, size=32)
    write_teacher_checkpoint(ws / 'teacher.pth')
    return ws


def launch(script, ws, **env):
    return subprocess.run(['bash', os.path.join(ROOT, script)], cwd=ws, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1', 'NGPUS': '2',
                               'MASTER_PORT': str(free_port()), 'DATA': str(ws / 'data'), **env})


def assert_said_once(proc, expected_code, line, before, ws):
    assert proc.returncode == expected_code, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr and 'ChildFailedError' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(line) == 1 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-3000:]
    after = snapshot(ws)
    assert {k: after.get(k) for k in before} == before
    assert not [name for name in after if name.endswith('.tmp')]


@pytest.mark.slow
def test_run_sh_with_two_processes_ends_with_exit_2_and_one_line(launch_ws):
    """Before: torchrun's ChildFailedError traceback and exit 1."""
    before = snapshot(launch_ws)
    proc = launch('run.sh', launch_ws, BATCH_SIZE='7', BASE_DIR=str(launch_ws / 'out'), TEACHER_ARCH='resnet18',
                  TEACHER_WEIGHTS=str(launch_ws / 'teacher.pth'), IMAGE_SIZE='32', NUM_WORKERS='0', EPOCHS='1')
    assert_said_once(proc, 2, 'error: --batch_size 7 must divide by the 2 processes', before, launch_ws)


@pytest.mark.slow
@pytest.mark.parametrize('script', ['knn_eval.sh', 'lin_eval.sh'])
def test_eval_launchers_with_two_processes_end_with_exit_2_and_one_line(launch_ws, script):
    """Before: exit 1 and torchrun's ChildFailedError traceback (neither passed on any code)."""
    before = snapshot(launch_ws)
    proc = launch(script, launch_ws, WEIGHTS=str(launch_ws / 'missing.pth'), SAVE=str(launch_ws / 'save'))
    assert_said_once(proc, 2, f"error: checkpoint {launch_ws / 'missing.pth'} does not exist: check the path",
                     before, launch_ws)


LOST_PEER = '''
import os, time
from utils.errors import DistributedError, exit_on_user_error

def main():
    if os.environ['RANK'] == '0':
        time.sleep(1)
        raise DistributedError('rank 1 stopped answering: rerun with --resume auto')
    time.sleep(60)

exit_on_user_error(main)
'''


@pytest.mark.slow
def test_run_sh_ends_with_rank_0s_3_after_a_lost_peer(tmp_path):
    project = tmp_path / 'project'
    project.mkdir()
    shutil.copy(os.path.join(ROOT, 'run.sh'), project / 'run.sh')
    shutil.copytree(os.path.join(ROOT, 'scripts'), project / 'scripts')
    (project / 'train_student.py').write_text(LOST_PEER)
    proc = launch(str(project / 'run.sh'), tmp_path, PYTHONPATH=ROOT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr and proc.stderr.strip().splitlines()[-1] == (
        'error: rank 1 stopped answering: rerun with --resume auto')
