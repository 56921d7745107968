"""Logging on rank 0: the text log, one JSON object per line (``log.jsonl``) and TensorBoard (the training
meter that writes to them: ``utils.training.MetricLogger``)."""
import json
import logging
import os
import sys

from torch.utils.tensorboard import SummaryWriter

from utils.distributed import is_main_process
from utils.tracking import build_trackers


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
    """A SummaryWriter on rank 0, made at the first scalar, and the ``--log_to`` trackers, which get the same scalars
    (``utils.tracking``); a no-op elsewhere."""

    def __init__(self, log_dir, trackers=()):
        self.log_dir, self.writer, self.trackers = log_dir, None, trackers

    def scalars(self, values, step):
        if not is_main_process():
            return
        if self.writer is None:
            self.writer = SummaryWriter(self.log_dir)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        for tracker in self.trackers:
            tracker.scalars(values, step)

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
    ``tensorboard`` (with the ``log_to`` trackers: a comma list of wandb, mlflow); ``print_freq``: the steps of a
    logged window."""

    def __init__(self, logs_dir, print_freq, log_to=None):
        self.text = setup_logger(os.path.join(logs_dir, 'train.log'))
        self.json = JsonLog(json_log_path(logs_dir))
        self.trackers = build_trackers(logs_dir, log_to) if is_main_process() else []
        self.tensorboard = TensorBoard(logs_dir, self.trackers)
        self.print_freq = print_freq

    def start(self, **record):
        """The ``start`` record (after train_args.json is written: the trackers start with it, a resumed run continues
        its tracked runs); its online k-NN values (``knn_*``) also go to TensorBoard at step 0."""
        for tracker in self.trackers:
            tracker.start(resume=record.get('resumed_from') is not None)
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
        for tracker in self.trackers:
            tracker.close()


def knn_scalars(name, values):
    """TensorBoard tags of k-NN values: {"1": .., "20": ..} -> ``knn/<name>_1nn``, ...; several teachers'
    {head: {"1": .., "20": ..}} -> ``knn/<name>_<head>_1nn``, ..."""
    if all(not isinstance(v, dict) for v in values.values()):
        return {f'knn/{name}_{k}nn': v for k, v in values.items()}
    return {tag: v for head, inner in values.items() for tag, v in knn_scalars(f'{name}_{head}', inner).items()}


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
