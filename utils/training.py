"""What the training loop keeps besides the model: the epoch's meter (``MetricLogger``, after torchvision's
references/classification), the one writer of a run's checkpoints (``Checkpointer``), and the stop signals (SIGTERM,
SIGUSR1) that end a run with exit 75 (``StopSignals``): after a step and its checkpoint once training runs
(``Preempted``), at once before."""
import contextlib
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from utils.checkpoint import describe_non_finite, non_finite, save_atomic
from utils.distributed import all_reduce_mean, is_main_process
from utils.errors import RESUME_EXIT_CODE, SimRegError, record_exit_code
from utils.logging import per_head, prefixed


class MetricLogger:
    """One training epoch's bookkeeping (after torchvision's references/classification): ``update`` adds a step's
    per-head losses (the dense loss last) on the device; every ``print_freq`` steps and at the last, one sync averages
    the window's loss over ranks (all ranks agree on a non-finite loss) and logs it with the lr, img/s and data wait."""

    def __init__(self, heads, epoch, steps, images_per_step, optimizer, ctx):
        self.heads, self.epoch, self.steps, self.images_per_step = list(heads), epoch, steps, images_per_step
        self.optimizer, self.logs, self.dense = optimizer, ctx.logs, ctx.dense_weight > 0
        self.epoch_sum = torch.zeros(len(self.heads) + self.dense, device=ctx.device)
        self.window_sum = torch.zeros(len(self.heads) + self.dense, device=ctx.device)
        self.step, self.window_start, self.first_step, self.data_time = 0, 0, 0, 0.0
        self.start, self.bar = time.perf_counter(), None

    def state_dict(self):
        return {'step': self.step, 'window_start': self.window_start, 'epoch_sum': self.epoch_sum.cpu(),
                'window_sum': self.window_sum.cpu()}

    def load_state_dict(self, state):
        """Continue the sums of a checkpoint written inside the epoch (None: nothing to continue)."""
        if state is None:
            return
        self.step, self.window_start = state['step'], state['window_start']
        self.epoch_sum.copy_(state['epoch_sum'])
        self.window_sum.copy_(state['window_sum'])

    def log_every(self, loader):
        """Yield the loader's batches (the steps of the epoch not done yet), timing the wait for each."""
        self.bar = tqdm(total=self.steps, initial=self.step, desc=f'epoch {self.epoch}',
                        disable=not is_main_process(), dynamic_ncols=True, leave=False)
        self.first_step, self.data_time = self.step, 0.0
        self.start = end = time.perf_counter()
        with self.bar:
            for batch in loader:
                self.data_time += time.perf_counter() - end
                yield batch
                end = time.perf_counter()

    def update(self, losses):
        """A step is done: add its losses; report a window every ``print_freq`` steps and at the last."""
        self.epoch_sum += losses
        self.window_sum += losses
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.step % self.logs.print_freq == 0 or self.step == self.steps:
            self.report_window()

    def speed(self):
        """Images per second over all processes, and the data-wait share, since ``log_every`` started."""
        elapsed = time.perf_counter() - self.start
        return {'images_per_s': (self.step - self.first_step) * self.images_per_step / elapsed,
                'data_wait_share': self.data_time / elapsed}

    def mean_losses(self, total, count):
        """(Mean loss, {head: loss}, {'loss_dense': dense loss} or {}) of ``total`` over ``count`` steps, averaged over
        ranks; non-finite: SimRegError."""
        losses = all_reduce_mean(total / count).tolist()
        dense = {'loss_dense': losses.pop()} if self.dense else {}
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss + sum(dense.values())):
            raise SimRegError(f'loss is {loss}{dense_text(dense)} at epoch {self.epoch} step {self.step}: training '
                              f'diverged; the last good checkpoint is kept: lower --learning_rate or use '
                              f'--precision fp32, then --resume auto')
        return loss, dict(zip(self.heads, losses)), dense

    def report_window(self):
        loss, heads, dense = self.mean_losses(self.window_sum, self.step - self.window_start)
        stats = {'loss': loss, **dense, 'lr': self.optimizer.param_groups[0]['lr'], **self.speed()}
        self.logs.tensorboard.scalars({f'train/{k}': v for k, v in {**stats, **prefixed(heads)}.items()},
                                      (self.epoch - 1) * self.steps + self.step)
        self.logs.json.write('window', epoch=self.epoch, step=self.step, steps=self.steps, **stats, **prefixed(heads))
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{loss:.4f}')
        if self.step % self.logs.print_freq == 0:
            self.logs.text.info('Train: [%d][%d/%d]  loss %.4f%s%s  %.1f img/s', self.epoch, self.step, self.steps,
                                loss, per_head(heads), dense_text(dense), stats['images_per_s'])
        self.window_sum.zero_()
        self.window_start = self.step

    def summary(self):
        """The epoch's mean loss (and per head), lr, img/s and data-wait share over ranks; logged and to TensorBoard."""
        loss, heads, dense = self.mean_losses(self.epoch_sum, self.steps)
        lr = self.optimizer.param_groups[0]['lr']
        stats = {'loss': loss, **dense, 'lr': lr, **self.speed()}
        self.logs.text.info('epoch %d  lr %.5f  loss %.4f%s%s  %.1f img/s  data wait %.0f%%', self.epoch, lr, loss,
                            per_head(heads), dense_text(dense), stats['images_per_s'], 100 * stats['data_wait_share'])
        scalars = {'loss': loss, 'lr': lr, **dense, **prefixed(heads)}
        self.logs.tensorboard.scalars({f'epoch/{k}': v for k, v in scalars.items()}, self.epoch)
        return {**stats, 'head_losses': heads}


def dense_text(dense):
    """'  dense 0.1234' beside the loss with dense heads, '' without."""
    return ''.join(f'  dense {v:.4f}' for v in dense.values())


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


def start_watchdog(done, deadline_s, say):
    """After a stop signal: a thread that calls ``say()`` and exits RESUME_EXIT_CODE unless ``done`` is set within
    ``deadline_s`` (the run is stuck in a call that does not return)."""
    def watch():
        if not done.wait(deadline_s):
            say()
            record_exit_code(RESUME_EXIT_CODE)
            os._exit(RESUME_EXIT_CODE)
    threading.Thread(target=watch, daemon=True).start()


class StoppedBeforeTraining(BaseException):
    """A stop signal came before the first step (a BaseException, so that no ``except Exception`` swallows it)."""


class StopSignals:
    """SIGTERM and SIGUSR1 from the first line of ``main`` to the end of the run. Before ``training(log)`` they raise
    ``StoppedBeforeTraining`` at once, wherever start-up is (a write in progress drops its temp file); from then on
    ``agreed()`` is True on every rank after the same step (a checkpoint, then ``Preempted``). Either way, a watchdog
    exits RESUME_EXIT_CODE if the stop has not ended the process within ``deadline_s`` (a call that does not return)."""

    def __init__(self, deadline_s=60.0):
        self.deadline_s, self.pid, self.log, self.group = deadline_s, os.getpid(), None, None
        self.signal, self.pending, self.done = None, None, threading.Event()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame):
        if os.getpid() != self.pid or self.signal is not None or self.done.is_set():
            return  # a loader worker (forked with this handler), the same request again, or the run is over
        self.signal = signal.Signals(signum).name
        if self.log is None:
            start_watchdog(self.done, self.deadline_s, lambda: print(
                f'==> start-up did not stop within {self.deadline_s:.0f} s of {self.signal}: exiting now',
                file=sys.stderr, flush=True))
            raise StoppedBeforeTraining(f'{self.signal} received before training started')
        self.log.warning('==> %s received: finishing the step, then a checkpoint and exit %d',
                         self.signal, RESUME_EXIT_CODE)
        start_watchdog(self.done, self.deadline_s, lambda: self.log.warning(
            '==> the step and checkpoint did not finish within %.0f s of %s: exiting now; the previous checkpoint '
            'is intact', self.deadline_s, self.signal))

    def training(self, log):
        """Training begins: a signal now ends the run after a step, agreed over this gloo group of every rank."""
        self.group = dist.new_group(backend='gloo') if dist.is_available() and dist.is_initialized() else None
        self.log = log

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

    def finish(self):
        """The run is over (finished, stopped or failed), its group still up: later signals are ignored, the
        watchdog stops, the last agreement is waited for."""
        self.done.set()
        if self.pending is not None:
            with contextlib.suppress(RuntimeError):  # a peer that is gone: the run ends anyway
                self.pending[0].wait()
            self.pending = None

    def close(self):
        """``main`` returns: the handlers before it are restored."""
        self.finish()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Preempted(Exception):
    """A stop signal (``StopSignals``) ended the run after a step, whose checkpoint is written."""

    def __init__(self, signal, epoch, step, steps, path):
        super().__init__(f'stopped by {signal} in epoch {epoch} after step {step}/{steps}')
        self.signal, self.epoch, self.step, self.steps, self.path = signal, epoch, step, steps, path


class Checkpointer:
    """The one writer of a run's checkpoints (only rank 0 writes; every rank calls).

    ``save(epoch)`` after an epoch (and at 0, the untrained student): ``ckpt_epoch_<n>.pth`` every ``--save_freq``
    epochs, at 0 and the last, and ``last.pth``. ``after_step(meter)``: ``last.pth`` every ``--ckpt_every_steps``
    steps or ``--ckpt_every_min`` minutes, and when ``stop`` (``StopSignals``) ends the run, then ``Preempted``.
    ``state_fn(epoch, meter)``: the state after ``epoch`` completed epochs (and the ``MetricLogger`` inside one).
    ``start``: where the run started (``{'epoch', 'step'}``, and ``meter`` and ``path`` when it resumed).
    Nothing that is not finite is written (``finite``)."""

    def __init__(self, ckpt_dir, state_fn, args, stop, start):
        self.ckpt_dir, self.path, self.state_fn = ckpt_dir, os.path.join(ckpt_dir, 'last.pth'), state_fn
        self.every_steps, self.every_s = args.ckpt_every_steps, 60 * args.ckpt_every_min
        self.save_freq, self.epochs, self.stop, self.start = args.save_freq, args.epochs, stop, start
        self.writer = is_main_process()
        self.written = [start['path']] if start.get('path') else []  # the files holding the weights trained on
        self.first_finite = None  # (rank 0) whether the first step from those weights had a finite loss
        self.wrote()

    def wrote(self, *paths):
        """A checkpoint was written (to ``paths``): the intervals start again."""
        self.steps, self.since = 0, time.monotonic()
        if paths:
            self.written, self.first_finite = list(paths), None

    def resumed_meter(self, epoch):
        """The meter's state to continue when the run resumed inside ``epoch``, else None."""
        return self.start.get('meter') if epoch == self.start['epoch'] else None

    def save(self, epoch):
        if self.writer:
            state, paths = self.finite(self.state_fn(epoch), f'after epoch {epoch}'), []
            if epoch == 0 or epoch % self.save_freq == 0 or epoch == self.epochs:
                paths.append(os.path.join(self.ckpt_dir, f'ckpt_epoch_{epoch}.pth'))
            if epoch > 0:
                paths.append(self.path)
            for path in paths:
                save_atomic(state, path)
            self.wrote(*(paths if epoch > 0 else []))  # the untrained student is never set aside
        self.wrote()

    def finite(self, state, when):
        """``state``, if its weights, optimizer state and loss sums are all finite; else a SimRegError and no write
        (the loss is checked every --print_freq steps only, and a step can make the weights non-finite with a finite
        loss). When the first step from the weights last written already had a non-finite loss, those weights
        diverge at once: their files are renamed ``<name>.diverged`` so that --resume auto takes an earlier one."""
        bad = non_finite(state)
        if not bad:
            return state
        loss = any(name.startswith('meter.') for name in bad)
        kept = 'the last good checkpoint is kept'
        if loss and self.written and self.first_finite is not None and not bool(self.first_finite):
            for path in self.written:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, path + '.diverged')
            names = ' and '.join(os.path.basename(path) for path in self.written)
            kept = f'the first step from the weights of {names} already had a non-finite loss: renamed *.diverged'
        raise SimRegError(f'{"the loss" if loss else f"the state ({describe_non_finite(bad)})"} is not finite {when}: '
                          f'training diverged; nothing was written, {kept}: lower --learning_rate or use '
                          f'--precision fp32, then --resume auto (the newest good checkpoint)')

    def after_step(self, meter):
        """Write ``last.pth`` when due; raise ``Preempted`` once written when the run must stop. At an epoch's last
        step a due checkpoint is left to ``save``, which writes one anyway."""
        self.steps += 1
        if self.steps == 1 and self.writer:  # the sums were finite at the last write: this step's loss decides
            self.first_finite = meter.epoch_sum.isfinite().all()  # no host sync until ``finite`` needs it
        stop = self.stop.agreed()
        due = (self.every_steps and self.steps >= self.every_steps) or \
              (self.every_s and time.monotonic() - self.since >= self.every_s)
        if stop or (due and meter.step < meter.steps):
            if self.writer:
                state = self.finite(self.state_fn(meter.epoch - 1, meter), f'at epoch {meter.epoch} step {meter.step}')
                save_atomic(state, self.path)
                self.wrote(self.path)
            self.wrote()
        if stop:
            raise Preempted(self.stop.signal or 'a signal on another process', meter.epoch, meter.step, meter.steps,
                            self.path)
