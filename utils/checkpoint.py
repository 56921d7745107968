"""Checkpoint files: atomic writes, finite states only, which checkpoint to resume from, reading any checkpoint
with ``weights_only=True``, file digests, and the experiment's lock (one run at a time). When to write them:
``utils.training.Checkpointer``."""
import argparse
import contextlib
import errno
import fcntl
import glob
import hashlib
import os
import pickle
import re
import socket
import tempfile
import time
import zipfile

import torch

from utils.errors import SimRegError


def write_atomic(path, mode, write):
    """``write(file)`` into a temp file beside ``path``, fsynced, then renamed over it: a crash or failed write never
    leaves half a file; a write the disk refuses is a SimRegError naming the folder and the fix."""
    folder = os.path.dirname(os.path.abspath(path))
    make_folder(folder)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path), suffix='.tmp')
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600: the file gets the permissions of any other file
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
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(exc, OSError):
            raise SimRegError(_write_error(f'write {path}', folder, exc)) from None
        raise


def umask():
    """The process's umask, read without changing it (os.umask sets it, which races with other threads' files)."""
    with contextlib.suppress(OSError, ValueError), open('/proc/self/status') as f:
        for line in f:
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (or a kernel before 4.7)
    os.umask(mask)
    return mask


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
    """``make_folder``, then a temp file made and dropped in it: refuse an unwritable folder before hours of work."""
    make_folder(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise SimRegError(_write_error(f'write in {folder}', folder, exc)) from None


def save_atomic(state, path):
    """torch.save, atomically (checkpoints)."""
    write_atomic(path, 'wb', lambda f: torch.save(state, f))


def write_file_atomic(data, path):
    """Text (results, JSON) or bytes already serialised (an ONNX model, a PNG), atomically."""
    write_atomic(path, 'wb' if isinstance(data, bytes) else 'w', lambda f: f.write(data))


def resume_candidates(ckpt_dir):
    """The experiment's checkpoints, newest first: ``last.pth``, then ``ckpt_epoch_<n>.pth`` by n, highest first.
    A file can be damaged after its atomic write: the caller takes the first that loads."""
    epochs = [(int(m.group(1)), path) for path in glob.glob(os.path.join(ckpt_dir, 'ckpt_epoch_*.pth'))
              if (m := re.search(r'ckpt_epoch_(\d+)\.pth$', path))]
    last = os.path.join(ckpt_dir, 'last.pth')
    return ([last] if os.path.exists(last) else []) + [path for _, path in sorted(epochs, reverse=True)]


def non_finite(state, prefix=''):
    """The names of the floating-point tensors in ``state`` (nested dicts, lists) that hold a NaN or an infinity:
    one pass over each tensor and one host sync per device."""
    tensors = {}
    _float_tensors(state, prefix, tensors)
    bad = []
    for device in {t.device for t in tensors.values()}:
        names = [name for name, t in tensors.items() if t.device == device]
        finite = torch.stack([tensors[name].isfinite().all() for name in names]).tolist()
        bad += [name for name, ok in zip(names, finite) if not ok]
    return sorted(bad)


def _float_tensors(state, prefix, found):
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            found[prefix or 'tensor'] = state.detach()
    elif isinstance(state, dict):
        for key, value in state.items():
            _float_tensors(value, f'{prefix}.{key}' if prefix else str(key), found)
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            _float_tensors(value, f'{prefix}.{i}' if prefix else str(i), found)


def describe_non_finite(bad):
    """'3 tensors (state_dict.fc.weight, ...)': a short account of ``non_finite``'s names."""
    return f'{len(bad)} tensor{"s" if len(bad) > 1 else ""} ({", ".join(bad[:2])}{", ..." if len(bad) > 2 else ""})'


LOCK_NAME = 'run.lock'
_held_locks = {}  # lock path -> file descriptor, held until release_experiment_locks or the process ends


def lock_experiment(exp_dir):
    """Rank 0, before anything else is written in ``exp_dir``: hold an exclusive flock on ``exp_dir/run.lock`` for
    the whole run, and write in it who holds it. A run already holding it is a SimRegError naming its host and pid.
    The kernel drops the lock when the process ends, however it ends (kill -9 too): a dead run never blocks."""
    path = os.path.join(exp_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise SimRegError(_write_error(f'create the lock file {path}', exp_dir, exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 300, 0).decode('utf-8', 'replace').strip() or 'it is starting'
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise SimRegError(f'{exp_dir} is in use by another run ({holder}): wait for it to end or stop it, or '
                              f'choose another --exp') from None
        raise SimRegError(f'cannot lock {path} ({exc.strerror or exc}): its file system does not support flock; '
                          'choose a --base_dir on one that does (local disks, NFS, GPFS, CephFS, BeeGFS, Lustre '
                          'mounted with -o flock)') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}, since '
                  f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode(), 0)
    _held_locks[path] = fd


def release_experiment_locks():
    """The run is over: drop the locks this process holds (the lock files stay: removing one would race a start)."""
    while _held_locks:
        os.close(_held_locks.popitem()[1])


# A forked child (a loader worker) closes its copy: else the lock outlives a killed run while its workers linger.
os.register_at_fork(after_in_child=release_experiment_locks)


def remove_stale_temp_files(folder):
    """Delete the ``.<name>*.tmp`` files of writes killed midway in ``folder`` (only under the experiment's lock: a
    running write's temp file looks the same); returns their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), '.*.tmp')))
    for path in stale:
        os.remove(path)
    return [os.path.basename(path) for path in stale]


def file_digest(path, algorithm='sha256'):
    """Hex digest of a file, read in chunks (``algorithm``: any name ``hashlib.new`` takes); the sha256
    identifies a weights file (recorded instead of storing the teacher)."""
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return h.hexdigest()


ZIP_MAGIC = b'PK\x03\x04'  # torch.save's format since PyTorch 1.6
LEGACY_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)  # what the legacy format pickles first


def read_checkpoint(path, mmap=False):
    """torch.load on CPU with weights_only=True (and argparse.Namespace, which SimReg's main.py saved); a
    damaged file is one line saying what it is (from its first bytes) and the fix. ``mmap``: a zip-format file's
    tensors are mapped, not read (to look at its keys)."""
    if not os.path.isfile(path):
        raise SimRegError(f'checkpoint {path} does not exist: check the path')
    kind, head = _checkpoint_kind(path)
    if kind == 'empty':
        raise SimRegError(f'checkpoint {path} is an empty file (0 bytes): download or copy it again')
    if kind == 'text':
        first = (head.decode('utf-8', 'replace').strip().splitlines() or [''])[0][:60]
        raise SimRegError(f'{path} is a text file, not a PyTorch checkpoint (it starts with "{first}"): pass the '
                          f'checkpoint itself (a text file here is often an error page or a Git LFS pointer)')
    if kind == 'other':
        raise SimRegError(f'{path} is not a PyTorch checkpoint (neither the zip nor the legacy pickle format of '
                          f'torch.save): pass the checkpoint itself')
    if kind == 'zip' and not zipfile.is_zipfile(path):
        raise SimRegError(f'cannot read checkpoint {path} (a zip-format PyTorch checkpoint without its end): the '
                          f'file is truncated; download or copy it again')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and kind == 'zip')
    except Exception as exc:  # torch.load signals a damaged file with many exception types
        if isinstance(exc, pickle.UnpicklingError) and 'weights only load failed' in str(exc).lower():
            reason = next((ln.strip() for ln in str(exc).splitlines() if 'GLOBAL' in ln), 'unsupported object')
            raise SimRegError(f'refusing to load {path}: unpickling it would run code or build objects other '
                              f'than tensors and plain data ({reason}); use the official file, or re-save '
                              f'only its state_dict') from None
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split('. ')[0]
        what = {'zip': 'a damaged zip-format PyTorch checkpoint', 'legacy': 'a legacy-format PyTorch checkpoint, '
                'truncated or damaged', 'pickle': 'a pickle but not a PyTorch checkpoint, or one cut short'}[kind]
        raise SimRegError(f'cannot read checkpoint {path} ({detail}): the file is {what}; download or copy it '
                          'again') from None


def _checkpoint_kind(path, size=4096):
    """('empty' | 'zip' | 'legacy' | 'pickle' | 'text' | 'other', the first ``size`` bytes) of a file."""
    with open(path, 'rb') as f:
        head = f.read(size)
    if not head:
        return 'empty', head
    if head.startswith(ZIP_MAGIC):
        return 'zip', head
    if head.startswith(LEGACY_MAGIC):
        return 'legacy', head
    if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05'):
        return 'pickle', head
    try:
        head.decode('utf-8')
        text = True
    except UnicodeDecodeError as exc:
        text = exc.start >= len(head) - 3  # only the cut at ``size`` split a character
    if text and not any(b < 32 and b not in b'\t\n\r\f' for b in head):
        return 'text', head
    return 'other', head
