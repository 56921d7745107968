"""Atomic checkpoint writes, when to write inside an epoch, which checkpoint to resume from, and the stop signals
(SIGTERM, SIGUSR1) that end a run after a step with a checkpoint and exit 75."""
import argparse
import contextlib
import errno
import glob
import hashlib
import os
import pickle
import re
import signal
import tempfile
import threading
import time
import zipfile

import torch
import torch.distributed as dist

from utils.distributed import is_main_process
from utils.errors import RESUME_EXIT_CODE, SimRegError, record_exit_code


def write_atomic(path, mode, write):
    """``write(file)`` into a temp file beside ``path``, fsynced, then renamed over it: a crash or failed write never
    leaves half a file; a write the disk refuses is a SimRegError naming the folder and the fix."""
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
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(exc, OSError):
            raise SimRegError(_write_error(f'write {path}', folder, exc)) from None
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


def remove_stale_temp_files(folder):
    """Delete the ``.<name>*.tmp`` files of writes killed midway in ``folder``; returns their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), '.*.tmp')))
    for path in stale:
        os.remove(path)
    return [os.path.basename(path) for path in stale]


SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_in_loader_worker(worker_id):
    """``worker_init_fn`` of the training loader: its workers outlive the stop signals a scheduler sends to every
    process of the job (else the main process raises mid-step), while the main process's own SIGTERM, the loader
    shutting a worker down, still ends it. Both signals are blocked, and a thread takes them with their sender."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    def take_signals():
        while True:
            info = signal.sigwaitinfo(SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_signals, daemon=True).start()


class StopRequest:
    """Installs the handlers; ``agreed()`` is True on every rank after the same step once a signal came."""

    def __init__(self, log, deadline_s=60.0):
        self.log, self.deadline_s = log, deadline_s
        self.signal, self.pending, self.pid, self.done = None, None, os.getpid(), threading.Event()
        self.group = dist.new_group(backend='gloo') if dist.is_available() and dist.is_initialized() else None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame):
        if os.getpid() != self.pid or self.signal is not None:
            return  # a loader worker (forked with this handler), or the same request again
        self.signal = signal.Signals(signum).name
        self.log.warning('==> %s received: finishing the step, then a checkpoint and exit %d',
                         self.signal, RESUME_EXIT_CODE)
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self):
        if not self.done.wait(self.deadline_s):
            self.log.warning('==> the step and checkpoint did not finish within %.0f s of %s: exiting now; '
                             'the previous checkpoint is intact', self.deadline_s, self.signal)
            record_exit_code(RESUME_EXIT_CODE)
            os._exit(RESUME_EXIT_CODE)

    def agreed(self):
        """Whether to stop after this step; every rank gets the same answer at the same step."""
        if self.group is None:
            return self.signal is not None
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(self.signal is not None)])
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def close(self):
        """The run is over (finished, stopped or failed): restore the handlers, stop the watchdog."""
        self.done.set()
        if self.pending is not None:
            with contextlib.suppress(RuntimeError):  # a peer that is gone: the run ends anyway
                self.pending[0].wait()
            self.pending = None
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Preempted(Exception):
    """A stop signal (``StopRequest``) ended the run after a step, whose checkpoint is written."""

    def __init__(self, signal, epoch, step, steps, path):
        super().__init__(f'stopped by {signal} in epoch {epoch} after step {step}/{steps}')
        self.signal, self.epoch, self.step, self.steps, self.path = signal, epoch, step, steps, path


class Checkpointer:
    """The one writer of a run's checkpoints (only rank 0 writes; every rank calls).

    ``save(epoch)`` after an epoch (and at 0, the untrained student): ``ckpt_epoch_<n>.pth`` every ``--save_freq``
    epochs, at 0 and the last, and ``last.pth``. ``after_step(meter)``: ``last.pth`` every ``--ckpt_every_steps``
    steps or ``--ckpt_every_min`` minutes, and when ``stop`` (``StopRequest``) ends the run, then ``Preempted``.
    ``state_fn(epoch, meter)``: the state after ``epoch`` completed epochs (and the ``MetricLogger`` inside one).
    ``start``: where the run started (``{'epoch', 'step'}``, and ``meter`` when it resumed inside an epoch)."""

    def __init__(self, ckpt_dir, state_fn, args, stop, start):
        self.ckpt_dir, self.path, self.state_fn = ckpt_dir, os.path.join(ckpt_dir, 'last.pth'), state_fn
        self.every_steps, self.every_s = args.ckpt_every_steps, 60 * args.ckpt_every_min
        self.save_freq, self.epochs, self.stop, self.start = args.save_freq, args.epochs, stop, start
        self.writer = is_main_process()
        self.wrote()

    def wrote(self):
        """A checkpoint was written: the intervals start again."""
        self.steps, self.since = 0, time.monotonic()

    def resumed_meter(self, epoch):
        """The meter's state to continue when the run resumed inside ``epoch``, else None."""
        return self.start.get('meter') if epoch == self.start['epoch'] else None

    def save(self, epoch):
        if self.writer:
            state = self.state_fn(epoch)
            if epoch == 0 or epoch % self.save_freq == 0 or epoch == self.epochs:
                save_atomic(state, os.path.join(self.ckpt_dir, f'ckpt_epoch_{epoch}.pth'))
            if epoch > 0:
                save_atomic(state, self.path)
        self.wrote()

    def after_step(self, meter):
        """Write ``last.pth`` when due; raise ``Preempted`` once written when the run must stop. At an epoch's last
        step a due checkpoint is left to ``save``, which writes one anyway."""
        self.steps += 1
        stop = self.stop.agreed()
        due = (self.every_steps and self.steps >= self.every_steps) or \
              (self.every_s and time.monotonic() - self.since >= self.every_s)
        if stop or (due and meter.step < meter.steps):
            if self.writer:
                save_atomic(self.state_fn(meter.epoch - 1, meter), self.path)
            self.wrote()
        if stop:
            raise Preempted(self.stop.signal or 'a signal on another process', meter.epoch, meter.step, meter.steps,
                            self.path)


def file_digest(path, algorithm='sha256'):
    """Hex digest of a file, read in chunks (``algorithm``: any name ``hashlib.new`` takes)."""
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            h.update(block)
    return h.hexdigest()


def file_sha256(path):
    """Hex digest that identifies a weights file (recorded instead of storing the teacher)."""
    return file_digest(path)


ZIP_MAGIC = b'PK\x03\x04'  # torch.save's format since PyTorch 1.6
LEGACY_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)  # what the legacy format pickles first


def read_checkpoint(path):
    """torch.load on CPU with weights_only=True (and argparse.Namespace, which SimReg's main.py saved); a
    damaged file is one line saying what it is (from its first bytes) and the fix."""
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
            return torch.load(path, map_location='cpu', weights_only=True)
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
