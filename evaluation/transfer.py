"""Transfer evaluation in the protocol of Kornblith et al. 2019 that SimCLR and BYOL report (docs/evaluation.md):
multinomial logistic regression on standardised frozen features, its L2 strength chosen on val/ (or a seeded
stratified holdout of train) from ``L2_GRID``, refit on train(+val) and scored on test/ when there is one.
"""
import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import SimRegError

L2_GRID = tuple(float(v) for v in np.logspace(-6, 5, 45))
HOLDOUT_FRACTION = 0.2
MAX_ITER = 1000
HISTORY_SIZE = 10          # scipy's L-BFGS default, what scikit-learn's lbfgs solver uses
TOLERANCE_GRAD = 1e-6
TOLERANCE_CHANGE = 1e-10


def stratified_holdout(labels, fraction=HOLDOUT_FRACTION, seed=0):
    """(fit_indices, holdout_indices), both sorted: ``round(fraction * n_c)`` images of each class held out
    (at least one of a class of two or more, never all of it), drawn by a permutation seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels).long()
    held = []
    for label in torch.unique(labels).tolist():
        members = (labels == label).nonzero().flatten()
        n = len(members)
        count = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
        held.append(members[torch.randperm(n, generator=generator)[:count]])
    held = torch.cat(held).sort().values
    rows = torch.arange(len(labels))
    return rows[~torch.isin(rows, held)], held


class Standardizer:
    """Per-dimension (x - mean) / std with the fit rows' statistics; a constant dimension (std below 10 float64
    eps, as in scikit-learn's StandardScaler) is only centred."""

    def __init__(self, features, dtype):
        stats = features.to(torch.float64)
        self.mean = stats.mean(0)
        std = stats.std(0, correction=0)
        self.std = torch.where(std < 10 * torch.finfo(torch.float64).eps, torch.ones_like(std), std)
        self.dtype = dtype

    def __call__(self, features):
        return ((features.to(torch.float64) - self.mean) / self.std).to(self.dtype)


def solver_dtype(device):
    return torch.float64 if device.type == 'cpu' else torch.float32


def fit_logistic(x, y, num_classes, l2, start=None, max_iter=MAX_ITER):
    """Minimise ``mean_i CE(W x_i + b, y_i) + l2 / (2 n) * ||W||^2`` (scikit-learn's C = 1/l2 divided by n, bias
    not penalised) by full-batch L-BFGS from ``start`` (weight, bias), zeros by default: (weight, bias, iterations)."""
    if start is None:
        start = (torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device),
                 torch.zeros(num_classes, dtype=x.dtype, device=x.device))
    weight, bias = (t.detach().clone().requires_grad_(True) for t in start)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=HISTORY_SIZE,
                                  tolerance_grad=TOLERANCE_GRAD, tolerance_change=TOLERANCE_CHANGE,
                                  line_search_fn='strong_wolfe')
    penalty = 0.5 * l2 / len(x)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach(), optimizer.state[weight].get('n_iter', 0)


@torch.no_grad()
def score(weight, bias, x, y):
    """(correct count, mean cross-entropy, per-class mean top-1 %) of a fitted classifier."""
    logits = x @ weight.T + bias
    hits = logits.argmax(1) == y
    counts = torch.bincount(y)
    present = counts > 0
    per_class = torch.bincount(y, weights=hits.double())[present] / counts[present]
    return int(hits.sum().item()), F.cross_entropy(logits, y).item(), 100.0 * per_class.mean().item()


def search_l2(fit, held, num_classes, device, grid=L2_GRID, max_iter=MAX_ITER):
    """Fit on ``fit`` for every ``l2`` of ``grid`` (strongest first, warm-started), score on ``held``; both are
    (features, labels). Returns (rows in ascending ``l2``, the chosen row, its (weight, bias))."""
    standardize = Standardizer(fit[0], solver_dtype(device))
    fit_x, fit_y = standardize(fit[0]).to(device), fit[1].long().to(device)
    held_x, held_y = standardize(held[0]).to(device), held[1].long().to(device)
    rows, solution, best = [], None, None
    for l2 in sorted(grid, reverse=True):
        weight, bias, iterations = fit_logistic(fit_x, fit_y, num_classes, l2, solution, max_iter)
        solution = (weight, bias)
        correct, loss, _ = score(weight, bias, held_x, held_y)
        rows.append({'l2': l2, 'top1': 100.0 * correct / len(held_y), 'loss': loss, 'iterations': iterations,
                     'converged': iterations < max_iter})
        if best is None or (correct, -loss) > best[0]:    # strict: a full tie keeps the stronger l2
            best = ((correct, -loss), rows[-1], solution)
    return rows[::-1], best[1], best[2]


def evaluate_transfer(train, val, test, num_classes, seed=0, device=None, grid=L2_GRID, max_iter=MAX_ITER):
    """The protocol on (features, labels) pairs; ``val`` or ``test`` may be None, not both. The best held-out top-1
    wins (ties: lower loss, then stronger l2); without test/, the val top-1 of that train-only fit is reported.
    Fits run on ``device`` (default CPU), float64 on the CPU. Returns a JSON-ready dict."""
    device = device or torch.device('cpu')
    if val is None and test is None:
        raise SimRegError('the dataset has only train/: add a val/ or test/ split to report an accuracy on')
    if val is not None:
        fit, held = train, val
        selection = {'fit_on': 'train', 'scored_on': 'val'}
    else:
        fit_rows, held_rows = stratified_holdout(train[1], HOLDOUT_FRACTION, seed)
        fit, held = (train[0][fit_rows], train[1][fit_rows]), (train[0][held_rows], train[1][held_rows])
        selection = {'fit_on': 'train minus the holdout',
                     'scored_on': f'stratified {HOLDOUT_FRACTION:.0%} holdout of train (seed {seed})'}
    rows, chosen, (weight, bias) = search_l2(fit, held, num_classes, device, grid, max_iter)
    selection.update(num_fit=len(fit[1]), num_scored=len(held[1]), chosen_l2=chosen['l2'],
                     chosen_top1=chosen['top1'], grid=rows)

    final_fit, evaluated, on = knn_splits(train, val, test)  # without test/: fit and held, train -> val
    fit_on, evaluated_on = on.split(' -> ')
    final = {'fit_on': fit_on, 'evaluated_on': evaluated_on}
    dtype = solver_dtype(device)
    standardize = Standardizer(final_fit[0], dtype)
    iterations = chosen['iterations']
    if test is None:
        final['note'] = 'no test/ split: val top-1 of the train-only fit whose l2 was chosen on val (optimistic)'
    else:
        fit_x, fit_y = standardize(final_fit[0]).to(device), final_fit[1].long().to(device)
        weight, bias, iterations = fit_logistic(fit_x, fit_y, num_classes, chosen['l2'], (weight, bias), max_iter)
    correct, loss, per_class = score(weight, bias, standardize(evaluated[0]).to(device),
                                     evaluated[1].long().to(device))
    final.update(l2=chosen['l2'], top1=100.0 * correct / len(evaluated[1]), mean_per_class_top1=per_class,
                 loss=loss, num_fit=len(final_fit[1]), num_evaluated=len(evaluated[1]), iterations=iterations,
                 converged=iterations < max_iter)
    protocol = {'features': 'L2-normalised cached features, standardised with the fit rows\' mean/std',
                'objective': 'mean cross-entropy + l2 / (2 n) * ||W||^2 (= scikit-learn C = 1/l2)',
                'grid': f'{len(grid)} values, {min(grid):.0e} .. {max(grid):.0e}, log-spaced',
                'solver': f'full-batch L-BFGS (strong Wolfe), max {max_iter} iterations, '
                          f'history {HISTORY_SIZE}, {str(dtype).replace("torch.", "")}, warm starts '
                          f'from the strongest l2', 'seed': seed}
    return {'protocol': protocol, 'selection': selection, 'final': final}


def knn_splits(train, val, test):
    """(reference, query, 'reference -> query') of the probe's final fit and of the k-NN: train(+val) -> test, or
    train -> val without a test split."""
    if test is None:
        return train, val, 'train -> val'
    if val is None:
        return train, test, 'train -> test'
    return (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])), test, 'train+val -> test'
