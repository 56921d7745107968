"""Logging on rank 0: the text log, one JSON object per line (``log.jsonl``), TensorBoard, tqdm, and the
training meter (``MetricLogger``, after torchvision's references/classification)."""
import json
import logging
import math
import os
import sys
import time

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.distributed import all_reduce_mean, is_main_process
from utils.errors import SimRegError


def setup_logger(log_file=None, name='simreg'):
    """Log to stdout and (rank 0) to ``log_file``; other ranks only print warnings."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file and is_main_process():
        handlers.append(logging.FileHandler(log_file, mode='a'))
    for handler in handlers:
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', datefmt='%Y-%m-%d %H:%M:%S'))
        logger.addHandler(handler)
    return logger


class TensorBoard:
    """A SummaryWriter on rank 0, made at the first scalar; a no-op elsewhere."""

    def __init__(self, log_dir):
        self.log_dir, self.writer = log_dir, None

    def scalars(self, values, step):
        if not is_main_process():
            return
        if self.writer is None:
            self.writer = SummaryWriter(self.log_dir)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


class JsonLog:
    """The machine-readable log, as DINO's log.txt: one JSON object per line, appended on rank 0 (a no-op
    elsewhere). Every record has ``event``: ``start`` (a run began; ``resumed_from`` is the epoch it
    continues after, or null), ``window`` (every ``--print_freq`` steps) or ``epoch``."""

    def __init__(self, path):
        self.path = path if is_main_process() else None

    def write(self, event, **values):
        if self.path is None:
            return
        # one write() of the whole line in append mode: a process killed meanwhile leaves no half line
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps({'event': event, **values}) + '\n').encode())
        finally:
            os.close(fd)


def read_json_log(path, event=None):
    """The records of a ``JsonLog`` file, those of one ``event`` if given."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if event is None or r['event'] == event]


class Logs:
    """A training run's log sinks, written on rank 0: ``text`` (stdout and train.log), ``json`` (log.jsonl) and
    ``tensorboard``; ``print_freq``: the steps of a logged window."""

    def __init__(self, logs_dir, print_freq):
        self.text = setup_logger(os.path.join(logs_dir, 'train.log'))
        self.json = JsonLog(json_log_path(logs_dir))
        self.tensorboard = TensorBoard(logs_dir)
        self.print_freq = print_freq

    def start(self, **record):
        """The ``start`` record; its online k-NN values (``knn_*``) also go to TensorBoard at step 0."""
        for key, value in record.items():
            if key.startswith('knn_'):
                self.tensorboard.scalars(knn_scalars(key[len('knn_'):], value), 0)
        self.json.write('start', **record)

    def epoch(self, epoch, stats, knn=None):
        """The ``epoch`` record of ``MetricLogger.summary``'s ``stats``, with the online k-NN when measured."""
        if knn is not None:
            self.text.info('epoch %d  online k-NN: 1-NN %.2f  20-NN %.2f', epoch, knn['1'], knn['20'])
            self.tensorboard.scalars(knn_scalars('student', knn), epoch)
        values = {k: v for k, v in stats.items() if k != 'head_losses'}
        self.json.write('epoch', epoch=epoch, **values, **prefixed(stats['head_losses']),
                        **({'knn': knn} if knn is not None else {}))

    def close(self):
        self.tensorboard.close()


def knn_scalars(name, values):
    """TensorBoard tags of k-NN values: {"1": .., "20": ..} -> ``knn/<name>_1nn``, ...; several teachers'
    {head: {"1": .., "20": ..}} -> ``knn/<name>_<head>_1nn``, ..."""
    if all(not isinstance(v, dict) for v in values.values()):
        return {f'knn/{name}_{k}nn': v for k, v in values.items()}
    return {tag: v for head, inner in values.items() for tag, v in knn_scalars(f'{name}_{head}', inner).items()}


class MetricLogger:
    """The bookkeeping of one training epoch (after torchvision's references/classification).

    ``update(losses)`` adds a step's per-head losses on the device (no host sync). Every ``print_freq`` steps and at
    the epoch's last step the window's mean loss is averaged over ranks (one sync, so every rank takes the same
    decision on a non-finite loss) and reported with the lr, the images per second and the loader-wait share."""

    def __init__(self, heads, epoch, steps, images_per_step, optimizer, ctx):
        self.heads, self.epoch, self.steps, self.images_per_step = list(heads), epoch, steps, images_per_step
        self.optimizer, self.logs = optimizer, ctx.logs
        self.epoch_sum = torch.zeros(len(self.heads), device=ctx.device)
        self.window_sum = torch.zeros(len(self.heads), device=ctx.device)
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
        """(Mean loss, {head: loss}) of ``total`` over ``count`` steps, averaged over ranks; non-finite: SimRegError."""
        losses = all_reduce_mean(total / count).tolist()
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss):
            raise SimRegError(f'loss is {loss} at epoch {self.epoch} step {self.step}: training diverged; the '
                              f'last good checkpoint is kept: lower --learning_rate or use '
                              f'--precision fp32, then --resume auto')
        return loss, dict(zip(self.heads, losses))

    def report_window(self):
        loss, heads = self.mean_losses(self.window_sum, self.step - self.window_start)
        stats = {'loss': loss, 'lr': self.optimizer.param_groups[0]['lr'], **self.speed()}
        self.logs.tensorboard.scalars({f'train/{k}': v for k, v in {**stats, **prefixed(heads)}.items()},
                                      (self.epoch - 1) * self.steps + self.step)
        self.logs.json.write('window', epoch=self.epoch, step=self.step, steps=self.steps, **stats, **prefixed(heads))
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{loss:.4f}')
        if self.step % self.logs.print_freq == 0:
            self.logs.text.info('Train: [%d][%d/%d]  loss %.4f%s  %.1f img/s', self.epoch, self.step, self.steps,
                                loss, per_head(heads), stats['images_per_s'])
        self.window_sum.zero_()
        self.window_start = self.step

    def summary(self):
        """The epoch's mean loss (and per head), lr, img/s and data-wait share over ranks; logged and to TensorBoard."""
        loss, heads = self.mean_losses(self.epoch_sum, self.steps)
        lr = self.optimizer.param_groups[0]['lr']
        stats = {'loss': loss, 'lr': lr, **self.speed()}
        self.logs.text.info('epoch %d  lr %.5f  loss %.4f%s  %.1f img/s  data wait %.0f%%', self.epoch, lr, loss,
                            per_head(heads), stats['images_per_s'], 100 * stats['data_wait_share'])
        self.logs.tensorboard.scalars({'epoch/loss': loss, 'epoch/lr': lr,
                                       **{f'epoch/{k}': v for k, v in prefixed(heads).items()}}, self.epoch)
        return {**stats, 'head_losses': heads}


def prefixed(head_losses):
    """{'loss_<head>': value} with several heads, {} with one."""
    return {f'loss_{name}': v for name, v in head_losses.items()} if len(head_losses) > 1 else {}


def per_head(head_losses):
    """' (name 0.1234, name 0.2345)' with several heads, '' with one."""
    if len(head_losses) < 2:
        return ''
    return ' (' + ', '.join(f'{name} {v:.4f}' for name, v in head_losses.items()) + ')'


def json_log_path(logs_dir):
    return os.path.join(logs_dir, 'log.jsonl')
