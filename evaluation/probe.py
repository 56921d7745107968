"""SimReg's linear probe: L2-normalise, standardise with the mean and (unbiased) variance of the
L2-normalised train features on the evaluation view, one Linear; an ``nn.Sequential`` whose state-dict keys are
SimReg's (``1.inv_std``, ``1.mean``, ``2.weight``, ``2.bias``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from data.transforms import normalize
from utils.distributed import all_reduce_mean

STD_EPS = 1e-5
STATS_CHUNK = 65536
GRAPH_WARMUP_STEPS = 3


def probe_train_transform(size):
    """RandomResizedCrop(size) with torchvision's default scale (0.08, 1) + flip, on uint8 tensors."""
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


@torch.no_grad()
def feature_stats(features):
    """(var, mean) over rows of the L2-normalised ``features``, as ``torch.var_mean(x, 0)``, in float64 chunks
    (no float32 copy of all rows)."""
    total = torch.zeros(features.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in features.split(STATS_CHUNK):
        chunk = F.normalize(chunk.double(), dim=1)
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    n = len(features)
    mean = total / n
    var = (total_sq - n * mean * mean) / (n - 1)
    return var.clamp_min(0).float(), mean.float()


class L2Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


class Standardize(nn.Module):
    """(x - mean) / sqrt(var + 1e-5) with fixed train statistics."""

    def __init__(self, var, mean):
        super().__init__()
        self.register_buffer('inv_std', 1.0 / torch.sqrt(var + STD_EPS))
        self.register_buffer('mean', mean.clone())

    def forward(self, x):
        return (x - self.mean) * self.inv_std


def build_probe(var, mean, num_classes):
    return nn.Sequential(L2Normalize(), Standardize(var, mean), nn.Linear(len(mean), num_classes))


def train_epoch_cached(probe, optimizer, features, labels, batch_size, cuda_graph=True):
    """One epoch over features on the device, in batches of a random permutation (the last partial one dropped
    unless it is the only one). On CUDA the step is captured as a CUDA graph after a few eager warm-up steps
    (each epoch captures its own: the learning rate is a constant of the graph) unless ``cuda_graph=False``."""
    probe.train()
    n_batches = max(1, len(features) // batch_size)
    order = torch.randperm(len(features), device=features.device)
    rows = order[:batch_size].clone()  # the step reads its batch's rows from this fixed buffer
    totals = torch.zeros(2, device=features.device)  # loss sum, correct predictions

    def load(batch):
        rows.copy_(order[batch * batch_size:(batch + 1) * batch_size])

    def step():
        targets = labels[rows]
        logits = probe(features[rows].float())
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals[0] += loss.detach() * len(rows)
        totals[1] += (logits.detach().argmax(1) == targets).sum()

    one_step, first = step, 0
    if cuda_graph and features.is_cuda and n_batches > GRAPH_WARMUP_STEPS:
        side = torch.cuda.Stream()  # warm-up off the default stream, as graph capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for batch in range(GRAPH_WARMUP_STEPS):
                load(batch)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        one_step, first = graph.replay, GRAPH_WARMUP_STEPS
    for batch in range(first, n_batches):
        load(batch)
        one_step()
    seen = n_batches * len(rows)
    return {'loss': totals[0].item() / seen, 'acc1': 100.0 * totals[1].item() / seen}


def train_epoch_images(feature_model, probe, loader, optimizer, device, amp=False):
    """One epoch on augmented images through the frozen network; metrics averaged over ranks."""
    feature_model.eval()
    probe.train()
    totals = torch.zeros(3, device=device)  # loss sum, correct predictions, images seen
    for _, images, targets in loader:
        images = normalize(images.to(device, non_blocking=True), feature_model.input_mean, feature_model.input_std)
        targets = targets.to(device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            features = feature_model(images)
        logits = probe(features.float())
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals[0] += loss.detach() * len(targets)
        totals[1] += (logits.detach().argmax(1) == targets).sum()
        totals[2] += len(targets)
    totals = all_reduce_mean(totals)
    return {'loss': (totals[0] / totals[2]).item(), 'acc1': (100.0 * totals[1] / totals[2]).item()}


@torch.no_grad()
def evaluate(probe, features, labels, batch_size=4096):
    """Top-1 / top-5 accuracy (%) and mean loss of the probe on (cached) features."""
    probe.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=features.device)  # loss sum, top-1, top-5 hits
    for rows, targets in zip(features.split(batch_size), labels.split(batch_size)):
        logits = probe(rows.float())
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals += torch.stack([F.cross_entropy(logits, targets, reduction='sum').double(),
                               (best[:, 0] == targets).sum().double(),
                               (best == targets[:, None]).any(dim=1).sum().double()])
    loss_sum, top1, top5 = totals.tolist()
    n = len(features)
    return {'loss': loss_sum / n, 'acc1': 100.0 * top1 / n, 'acc5': 100.0 * top5 / n}
