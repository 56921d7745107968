"""Atomic checkpoint writes and resume discovery."""
import errno
import glob
import hashlib
import os
import re
import tempfile

import numpy as np
import torch

from utils.errors import SimRegError


def _write_atomic(path, mode, write):
    """``write(file)`` into a temp file in the same folder, flushed to disk, then renamed over ``path``:
    a crash never leaves half a file, and a failed write leaves no temp file behind and the file that was
    at ``path`` as it was. A write the disk refuses (full, read-only, no permission) is a SimRegError that
    names the folder and the fix."""
    folder = os.path.dirname(os.path.abspath(path))
    make_folder(folder)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path), suffix='.tmp')
        with os.fdopen(fd, mode) as f:
            recorder = _WriteErrors(f)
            try:
                write(recorder)
            except RuntimeError:  # torch.save reports a failed write without its OSError
                if recorder.error is None:
                    raise
                raise recorder.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise SimRegError(_write_error(f'write {path}', folder, exc)) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


class _WriteErrors:
    """A file object that remembers the OSError of a failed write (torch.save turns it into a RuntimeError)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def _remove_quietly(tmp):
    """Remove this write's own temp file (None: none was made yet)."""
    if tmp is not None and os.path.exists(tmp):
        try:
            os.remove(tmp)
        except OSError:
            pass


def _write_error(what, folder, exc):
    """The one line for an OSError of ``what`` ('write <path>') in ``folder``: what the system said, and the fix."""
    where = 'choose another --base_dir/--save/--output'
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f'free space in {folder} or {where}'
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f'choose a writable folder (--base_dir/--save/--output) instead of {folder}'
    else:
        fix = f'check the disk of {folder} or {where}'
    return f'cannot {what} ({exc.strerror or exc}): {fix}'


def make_folder(folder):
    """os.makedirs(folder, exist_ok=True), with a SimRegError naming the fix when the disk refuses."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise SimRegError(_write_error(f'create the folder {folder}', folder, exc)) from None


def writable_folder(folder):
    """``make_folder``, then a temp file made and dropped in it: a script's start-up refuses a folder it could
    not write its results to (read-only, no permission) before it works for hours."""
    make_folder(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise SimRegError(_write_error(f'write in {folder}', folder, exc)) from None


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
