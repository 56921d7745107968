"""Text log, TensorBoard and tqdm, on rank 0 only."""
import logging
import sys

from torch.utils.tensorboard import SummaryWriter

from utils.distributed import is_main_process


def setup_logger(log_file=None, name='simreg'):
    """Log to stdout and (rank 0) to ``log_file``; other ranks only print warnings."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    fmt = logging.Formatter('%(asctime)s %(message)s', datefmt='%Y-%m-%d %H:%M:%S')
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    if log_file and is_main_process():
        file_handler = logging.FileHandler(log_file, mode='a')
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


class TensorBoard:
    """A SummaryWriter on rank 0, a no-op elsewhere."""

    def __init__(self, log_dir):
        self.writer = SummaryWriter(log_dir) if is_main_process() else None

    def scalars(self, values, step):
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
