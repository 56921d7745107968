"""Atomic checkpoint writes and resume discovery."""
import glob
import hashlib
import os
import re
import tempfile

import numpy as np
import torch


def _write_atomic(path, mode, write):
    """``write(file)`` into a temp file in the same folder, flushed to disk, then renamed over ``path``:
    a crash never leaves half a file, and a failed write leaves no temp file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path), suffix='.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(state, path):
    """torch.save, atomically (checkpoints)."""
    _write_atomic(path, 'wb', lambda f: torch.save(state, f))


def save_npy_atomic(array, path):
    """np.save, atomically (feature caches)."""
    _write_atomic(path, 'wb', lambda f: np.save(f, array))


def write_text_atomic(text, path):
    """Small text/JSON result files, atomically."""
    _write_atomic(path, 'w', lambda f: f.write(text))


def epoch_checkpoint_path(ckpt_dir, epoch):
    return os.path.join(ckpt_dir, f'ckpt_epoch_{epoch}.pth')


def latest_checkpoint(ckpt_dir):
    """The checkpoint with the highest epoch among ``last.pth`` and ``ckpt_epoch_<n>.pth``, or None.

    Only complete files exist under these names (writes are atomic), so any of them is safe to
    resume from.
    """
    candidates = []
    for path in glob.glob(os.path.join(ckpt_dir, 'ckpt_epoch_*.pth')):
        m = re.search(r'ckpt_epoch_(\d+)\.pth$', path)
        if m:
            candidates.append((int(m.group(1)), 0, path))
    last = os.path.join(ckpt_dir, 'last.pth')
    if os.path.exists(last):
        epoch = torch.load(last, map_location='cpu', weights_only=True, mmap=True)['epoch']
        candidates.append((epoch, 1, last))
    return max(candidates)[2] if candidates else None


def file_digest(path, algorithm='sha256', chunk=1 << 22):
    """Hex digest of a file, read in chunks (``algorithm``: any name ``hashlib.new`` takes)."""
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def file_sha256(path):
    """Hex digest that identifies a weights file (recorded instead of storing the teacher)."""
    return file_digest(path, 'sha256')
