"""Evaluation benchmarks (run by ``benchmarks/run.py``): ours against the SimReg release's way (the reference),
side by side in one process on the same inputs.

- probe epoch (cached features): ``evaluation.probe.train_epoch_cached`` (features on the device as one float16
  tensor, metrics summed there) against ``train_cached`` (float32 features on the host, each batch copied over,
  loss/accuracy read back each step).
- k-NN vote: the seeded vectorised majority vote against a per-query Counter + shuffle.
- k-NN step: one faiss search at k=20 serving 1-NN and 20-NN, against a search per k.
"""
import copy
import random
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import best_of, report
from evaluation import knn, probe


# ------------------------------------------------------------------ the reference

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
    """Counter of each query's neighbour labels, shuffled, max; plus its confusion matrix."""
    pred = np.zeros(len(neighbor_labels), dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in range(len(neighbor_labels)):
        votes = list(Counter(neighbor_labels[i]).items())
        random.shuffle(votes)
        pred[i] = max(votes, key=lambda x: x[1])[0]
        confusion[val_labels[i], pred[i]] += 1
    return 100.0 * (pred == val_labels).mean()


def reference_knn_step(train, train_labels, val, val_labels, num_classes):
    """faiss_knn for k in (1, 20): an L2 index and a search per k, then the loop vote."""
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
    report('linear_cached', ours, reference, 's/epoch', higher_is_better=False,
           extra=f'  (one probe epoch on {n}x{dim} cached features, {classes} classes, batch {batch_size}, '
                 f'{device.type})')


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
    report('knn_vote', n_val / ours, n_val / reference, 'queries/s',
           extra=f'  (1-NN and 20-NN majority votes, {classes} classes)')

    train_np, val_np = train.numpy(), val.numpy()
    ours = best_of(lambda: knn.evaluate(train, train_labels, val, val_labels, classes, weighted_ks=()), repeats, cpu)
    reference = best_of(lambda: reference_knn_step(train_np, train_labels.numpy(), val_np, np_val, classes),
                        repeats, cpu)
    report('knn', n_val / ours, n_val / reference, 'queries/s',
           extra=f'  (exact search + 1/20-NN votes, {n_val} queries over {n_train}x{dim}, {knn.faiss_device()})')
