"""Evaluation benchmarks: ours against a plain per-batch / per-query reference in the original's
style, side by side in one process on the same inputs. Each prints one line

    <name>: ours <x> <unit> | reference <y> <unit> | <ratio>x

    python benchmarks/bench_eval.py            # ImageNet-like sizes (meant for a GPU)
    python benchmarks/bench_eval.py --quick    # under a minute on a 2-core CPU

- probe epoch (cached features): ``utils.probe.train_epoch_cached`` (features kept on the device as
  one float16 tensor, metrics summed on the device) against the original's ``train_cached``
  (float32 features on the host, each batch copied to the device, loss/accuracy read back each step).
- k-NN vote: the seeded vectorised majority vote against the original's per-query Counter + shuffle.
- k-NN step: one faiss search at k=20 serving 1-NN and 20-NN, against the original's search per k.
"""
import argparse
import copy
import os
import random
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import knn, probe  # noqa: E402


def report(name, ours, reference, unit):
    """Times: lower is better, so the ratio is reference / ours (how many times faster we are)."""
    print(f'{name}: ours {ours:.4g} {unit} | reference {reference:.4g} {unit} | {reference / ours:.2f}x',
          flush=True)


def best_of(fn, repeats, device):
    """Shortest wall time of ``repeats`` calls: the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------------ reference (the original's way)

def reference_accuracy(output, target, topk=(1, 5)):
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / target.size(0)) for k in topk]


def reference_cached_epoch(linear, optimizer, host_feats, host_labels, batch_size, device):
    """Per batch: index host features, copy to the device, forward, read the loss back."""
    linear.train()
    loss_sum, top1_sum, seen = 0.0, 0.0, 0
    order = torch.randperm(len(host_feats))
    for batch in range(len(host_feats) // batch_size):
        ids = order[batch * batch_size:(batch + 1) * batch_size]
        output = linear(host_feats[ids].to(device))
        target = host_labels[ids].to(device)
        loss = F.cross_entropy(output, target)
        acc1, _ = reference_accuracy(output, target)
        loss_sum += loss.item() * len(ids)
        top1_sum += acc1[0] * len(ids)
        seen += len(ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss_sum / seen


def reference_vote(neighbor_labels, val_labels, num_classes):
    """The original: Counter of each query's neighbour labels, shuffled, max; plus its confusion matrix."""
    pred = np.zeros(len(neighbor_labels), dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in range(len(neighbor_labels)):
        votes = list(Counter(neighbor_labels[i]).items())
        random.shuffle(votes)
        pred[i] = max(votes, key=lambda x: x[1])[0]
        confusion[val_labels[i], pred[i]] += 1
    return 100.0 * (pred == val_labels).mean()


def reference_knn_step(train, train_labels, val, val_labels, num_classes):
    """The original's faiss_knn for k in (1, 20): an L2 index and a search per k, then the loop vote."""
    import faiss
    accuracies = []
    for k in knn.MAJORITY_KS:
        index = faiss.IndexFlatL2(train.shape[1])
        index.add(train)
        _, indices = index.search(val, k)
        accuracies.append(reference_vote(train_labels[indices], val_labels, num_classes))
    return accuracies


# ------------------------------------------------------------------ benchmarks

def bench_probe_epoch(n, dim, classes, batch_size, repeats, device):
    feats = F.normalize(torch.randn(n, dim), dim=1)
    labels = torch.randint(0, classes, (n,))
    var, mean = probe.feature_stats(feats)
    torch.manual_seed(0)
    ours_probe = probe.build_probe(var, mean, classes).to(device)
    reference_probe = copy.deepcopy(ours_probe)
    ours_opt = torch.optim.SGD(ours_probe.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)
    reference_opt = torch.optim.SGD(reference_probe.parameters(), 0.01, momentum=0.9, weight_decay=1e-4)
    device_feats, device_labels = feats.half().to(device), labels.to(device)
    ours = best_of(lambda: probe.train_epoch_cached(ours_probe, ours_opt, device_feats, device_labels,
                                                    batch_size), repeats, device)
    reference = best_of(lambda: reference_cached_epoch(reference_probe, reference_opt, feats, labels,
                                                       batch_size, device), repeats, device)
    report(f'probe epoch, cached {n}x{dim} features, {classes} classes, batch {batch_size} ({device.type})',
           ours, reference, 's/epoch')


def bench_knn(n_train, n_val, dim, classes, repeats):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dim, generator=g)
    train_labels = torch.randint(0, classes, (n_train,), generator=g)
    val_labels = torch.randint(0, classes, (n_val,), generator=g)
    train = F.normalize(centers[train_labels] + 2 * torch.randn(n_train, dim, generator=g), dim=1)
    val = F.normalize(centers[val_labels] + 2 * torch.randn(n_val, dim, generator=g), dim=1)
    cpu = torch.device('cpu')

    _, indices = knn.search(train, val, max(knn.MAJORITY_KS))
    neighbors = train_labels[indices]
    ours = best_of(lambda: [knn.majority_vote(neighbors[:, :k], classes, torch.Generator().manual_seed(0))
                            for k in knn.MAJORITY_KS], repeats, cpu)
    np_neighbors, np_val = neighbors.numpy(), val_labels.numpy()
    reference = best_of(lambda: [reference_vote(np_neighbors[:, :k], np_val, classes)
                                 for k in knn.MAJORITY_KS], repeats, cpu)
    report(f'k-NN vote, 1+20-NN of {n_val} queries, {classes} classes', ours, reference, 's')

    train_np, val_np = train.numpy(), val.numpy()
    ours = best_of(lambda: knn.evaluate(train, train_labels, val, val_labels, classes, weighted_ks=()), repeats, cpu)
    reference = best_of(lambda: reference_knn_step(train_np, train_labels.numpy(), val_np, np_val, classes),
                        repeats, cpu)
    report(f'k-NN step, {n_val} queries over {n_train}x{dim} ({knn.faiss_device()})', ours, reference, 's')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='small sizes: under a minute on a 2-core CPU')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: 1 with --quick, whose sizes gain little from more and '
                             'whose timings a busy shared CPU would otherwise swamp; else torch\'s choice)')
    args = parser.parse_args()
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if args.quick:
        bench_probe_epoch(n=50_000, dim=512, classes=100, batch_size=256, repeats=2, device=device)
        bench_knn(n_train=20_000, n_val=5_000, dim=128, classes=100, repeats=2)
    else:
        bench_probe_epoch(n=400_000, dim=2048, classes=1000, batch_size=256, repeats=3, device=device)
        bench_knn(n_train=200_000, n_val=20_000, dim=512, classes=1000, repeats=2)


if __name__ == '__main__':
    main()
