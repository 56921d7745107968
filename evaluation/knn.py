"""k-NN classification of L2-normalised features from one exact faiss search: the SimReg paper's majority vote
(k = 1 and 20, ties broken at random) and the weighted vote later SSL papers report (k = 20 and 200, exp(cos / 0.07)).
"""
import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import SimRegError

MAJORITY_KS = (1, 20)
WEIGHTED_KS = (20, 200)
TEMPERATURE = 0.07
VOTE_CHUNK = 4096


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SimRegError('k-NN evaluation needs faiss: pip install faiss-gpu (or faiss-cpu)') from None
    return faiss


def faiss_device():
    """'gpu x<n>' when faiss sees GPUs (the index is sharded over all of them), else 'cpu'."""
    faiss = _faiss()
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0
    return f'gpu x{n_gpus}' if n_gpus else 'cpu'


def search(train_feats, query_feats, k):
    """Exact top-``k`` cosine neighbours: (similarities [Q, k] float32, indices [Q, k] int64), best first.
    On unit vectors (re-normalised in float32) the inner product ranks as an L2 search does."""
    faiss = _faiss()
    if k > len(train_feats):
        raise SimRegError(f'k={k} is larger than the {len(train_feats)} train samples: use a smaller k')
    train = np.ascontiguousarray(F.normalize(train_feats.float(), dim=1).numpy())
    query = np.ascontiguousarray(F.normalize(query_feats.float(), dim=1).numpy())
    index = faiss.IndexFlatIP(train.shape[1])
    if faiss_device() != 'cpu':
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        index = faiss.index_cpu_to_all_gpus(index, co=options)
    index.add(train)
    similarities, indices = index.search(query, k)
    return torch.from_numpy(similarities), torch.from_numpy(indices).long()


def majority_vote(neighbor_labels, num_classes, generator):
    """Most frequent label of each row; a tie goes to one of the tied classes uniformly at random (noise in
    [0, 1) added to the integer counts only reorders tied classes)."""
    predictions = []
    for rows in neighbor_labels.split(VOTE_CHUNK):
        counts = torch.zeros(len(rows), num_classes).scatter_add_(1, rows, torch.ones(rows.shape))
        noise = torch.rand(counts.shape, generator=generator)
        predictions.append((counts + noise).argmax(dim=1))
    return torch.cat(predictions)


def weighted_scores(similarities, neighbor_labels, num_classes, temperature=TEMPERATURE):
    """Class scores [Q, C]: the sum of exp(cos / temperature) over the neighbours of each class."""
    weights = (similarities.double() / temperature).exp()
    return torch.zeros(len(neighbor_labels), num_classes, dtype=torch.float64).scatter_add_(
        1, neighbor_labels, weights)


def topk_accuracy(scores, labels, k):
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.double().mean().item()


def evaluate(train_feats, train_labels, val_feats, val_labels, num_classes, majority_ks=MAJORITY_KS,
             weighted_ks=WEIGHTED_KS, seed=0):
    """All k-NN numbers from one search at the largest k (ks above the train size are clipped):
    {'majority': {k: top1}, 'weighted': {k: {'top1', 'top5'}}}, in percent."""
    k_of = {k: min(k, len(train_feats)) for k in set(majority_ks) | set(weighted_ks)}
    similarities, indices = search(train_feats, val_feats, max(k_of.values()))
    neighbor_labels = train_labels.long()[indices]
    val_labels = val_labels.long()
    generator = torch.Generator().manual_seed(seed)
    results = {'majority': {}, 'weighted': {}}
    for k in sorted(majority_ks):
        predictions = majority_vote(neighbor_labels[:, :k_of[k]], num_classes, generator)
        results['majority'][k] = 100.0 * (predictions == val_labels).double().mean().item()
    for k in sorted(weighted_ks):
        scores = weighted_scores(similarities[:, :k_of[k]], neighbor_labels[:, :k_of[k]], num_classes)
        results['weighted'][k] = {'top1': topk_accuracy(scores, val_labels, 1),
                                  'top5': topk_accuracy(scores, val_labels, 5)}
    return results
