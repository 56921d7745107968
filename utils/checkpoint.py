"""Atomic checkpoint writes, when to write inside an epoch, and which checkpoint to resume from."""
import glob
import hashlib
import os
import re
import tempfile
import time

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


def resume_candidates(ckpt_dir):
    """The experiment's checkpoints, newest first: ``last.pth`` (written at every epoch end and inside
    epochs), then ``ckpt_epoch_<n>.pth`` by n, highest first. Only complete files exist under these names
    (writes are atomic), but a file can still be damaged afterwards: the caller takes the first that
    loads."""
    epochs = []
    for path in glob.glob(os.path.join(ckpt_dir, 'ckpt_epoch_*.pth')):
        m = re.search(r'ckpt_epoch_(\d+)\.pth$', path)
        if m:
            epochs.append((int(m.group(1)), path))
    last = os.path.join(ckpt_dir, 'last.pth')
    return ([last] if os.path.exists(last) else []) + [path for _, path in sorted(epochs, reverse=True)]


def remove_stale_temp_files(folder):
    """Delete the temp files that a process killed while writing left in ``folder`` (``_write_atomic``'s
    ``.<name>*.tmp``); returns their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), '.*.tmp')))
    for path in stale:
        os.remove(path)
    return [os.path.basename(path) for path in stale]


class Checkpointer:
    """When to write ``last.pth`` inside an epoch: every ``every_steps`` steps, every ``every_min`` minutes
    (0: never), and after a step that ``stop`` (a ``utils.preemption.StopRequest``) says ends the run.
    ``state_fn()`` makes the state to write; only rank 0 (``writer``) writes."""

    def __init__(self, ckpt_dir, state_fn, every_steps, every_min, stop, writer):
        self.path, self.state_fn = os.path.join(ckpt_dir, 'last.pth'), state_fn
        self.every_steps, self.every_s, self.stop, self.writer = every_steps, 60 * every_min, stop, writer
        self.wrote()

    def wrote(self):
        """A checkpoint was written (here or at an epoch's end): the intervals start again."""
        self.steps, self.since = 0, time.monotonic()

    def after_step(self, epoch_done):
        """Write when due; True when the run must stop (its checkpoint is then written). At an epoch's last
        step (``epoch_done``) a due checkpoint is left to the epoch's end, which writes one anyway."""
        self.steps += 1
        stop = self.stop.agreed()
        due = (self.every_steps and self.steps >= self.every_steps) or \
              (self.every_s and time.monotonic() - self.since >= self.every_s)
        if stop or (due and not epoch_done):
            if self.writer:
                save_atomic(self.state_fn(), self.path)
            self.wrote()
        return stop


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
