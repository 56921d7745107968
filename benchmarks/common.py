"""What every benchmark shares: the one-line report and a timer that resists a busy machine."""
import time

import torch


def report(name, ours, reference, unit, higher_is_better=True, extra=''):
    """Print ``<name>: ours <x> <unit> | reference <y> <unit> | <ratio>x``, ratio > 1 when ours wins."""
    ratio = ours / reference if higher_is_better else reference / ours
    print(f'{name}: ours {ours:.4g} {unit} | reference {reference:.4g} {unit} | {ratio:.2f}x{extra}',
          flush=True)
    return ratio


def wall_times(fn, repeats, device=None):
    """Wall time of each of ``repeats`` calls, synchronised on CUDA."""
    cuda = device is not None and torch.device(device).type == 'cuda'
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def best_of(fn, repeats, device=None):
    """Shortest wall time of ``repeats`` calls: the least disturbed by the rest of the machine."""
    return min(wall_times(fn, repeats, device))


def median_of(fn, repeats, device=None):
    """Median wall time of ``repeats`` calls (synchronised on CUDA): for comparisons shown side by side."""
    times = sorted(wall_times(fn, repeats, device))
    return times[len(times) // 2]
