"""The helpers the benchmarks compute their figures with are right (benchmarks/gpu_check.py --smoke runs them)."""
import os

import pytest

from benchmarks.run import jpeg_folder, steady_state


def test_steady_state_is_the_rate_between_windows():
    """Window records hold figures since the epoch's start; between two of them: 8 steps of 10 images in 2 s
    (after 1 s for the first 2 steps), 0.5 s of it waiting for data."""
    first = {'step': 2, 'images_per_s': 20 / 1.0, 'data_wait_share': 0.5}  # 1 s, 0.5 s waiting
    last = {'step': 10, 'images_per_s': 100 / 3.0, 'data_wait_share': 1.0 / 3.0}  # 3 s, 1 s waiting
    speed, wait = steady_state([first, last], 10)
    assert speed == pytest.approx(80 / 2.0) and wait == pytest.approx(0.5 / 2.0)


def test_jpeg_folder_is_made_once_with_links(tmp_path, monkeypatch):
    monkeypatch.setenv('SIMREG_BENCH_CACHE', str(tmp_path))
    root = jpeg_folder(7, (30, 40), unique=3, classes=2)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, 'train')) for f in fs)
    assert len(files) == 7 and len({os.stat(f).st_ino for f in files}) == 3  # 4 hard links to the 3 images
    from PIL import Image
    assert {Image.open(f).size for f in files} == {(40, 30), (30, 40), (40, 20)}  # (width, height)
    os.remove(files[0])
    assert jpeg_folder(7, (30, 40), unique=3, classes=2) == root and not os.path.exists(files[0])  # reused
