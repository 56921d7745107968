"""SIGTERM and SIGUSR1, what a scheduler sends before it stops a job: finish the step, checkpoint, exit 75. Every
rank agrees on the step through an asynchronous MAX all-reduce per step (read a step later, ``StopRequest.agreed``);
a watchdog exits anyway ``deadline_s`` after the first signal; a repeated signal is one request."""
import contextlib
import os
import signal
import threading

import torch
import torch.distributed as dist

from utils.errors import RESUME_EXIT_CODE, record_exit_code

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
