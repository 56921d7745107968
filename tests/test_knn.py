"""k-NN: known answers on synthetic features, seeded tie-breaking, faiss vs brute force."""
import math

import pytest
import torch
import torch.nn.functional as F

from evaluation import knn
from utils.errors import SimRegError


pytestmark = pytest.mark.usefixtures('one_thread')


def clusters(n_classes=5, per_class=40, dim=16, spread=0.05, seed=0):
    """Unit-norm features tightly grouped around one random direction per class."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    feats = F.normalize(centers[labels] + spread * torch.randn(len(labels), dim, generator=g), dim=1)
    return feats, labels


def test_well_separated_clusters_are_classified_perfectly():
    train, train_labels = clusters(n_classes=8, seed=0)  # more than 5 classes, so top-5 can miss
    val, val_labels = clusters(n_classes=8, per_class=10, seed=0)
    val = F.normalize(val + 0.01 * torch.randn(val.shape), dim=1)
    results = knn.evaluate(train.half(), train_labels, val.half(), val_labels, num_classes=8)
    assert results['majority'] == {1: 100.0, 20: 100.0}
    for k in knn.WEIGHTED_KS:
        assert results['weighted'][k] == {'top1': 100.0, 'top5': 100.0}


def test_ties_are_broken_at_random_but_reproducibly():
    tied = torch.tensor([[0, 1, 2, 2, 1, 0]]).repeat(3000, 1)   # three classes, two votes each
    clear = torch.tensor([[2, 2, 2, 1, 1, 0]])
    votes = lambda seed: knn.majority_vote(torch.cat([tied, clear]), 4, torch.Generator().manual_seed(seed))
    first, again, other = votes(0), votes(0), votes(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first[-1] == 2 and other[-1] == 2                   # no tie: the majority always wins
    counts = torch.bincount(first[:-1], minlength=4)
    assert counts[3] == 0                                      # never a class without votes
    assert all(900 < c < 1100 for c in counts[:3].tolist())    # each tied class about a third


def test_faiss_search_equals_brute_force_torch():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(700, 32, generator=g), dim=1)
    query = F.normalize(torch.randn(90, 32, generator=g), dim=1)
    similarities, indices = knn.search(train, query, 20)
    expected = (query @ train.T).topk(20, dim=1)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(similarities, expected.values, atol=1e-5, rtol=0)


def test_weighted_vote_matches_a_hand_computed_example():
    similarities = torch.tensor([[0.9, 0.8, 0.7]])
    labels = torch.tensor([[1, 0, 0]])
    scores = knn.weighted_scores(similarities, labels, num_classes=3, temperature=0.07)
    expected = [math.exp(0.8 / 0.07) + math.exp(0.7 / 0.07), math.exp(0.9 / 0.07), 0.0]
    torch.testing.assert_close(scores[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_weighted_and_majority_votes_disagree_where_they_should():
    """One close neighbour of class 1 against two farther ones of class 0 (2-d unit circle)."""
    angle = torch.tensor([0.1, 0.6, -0.6, 3.0])
    train = torch.stack([angle.cos(), angle.sin()], 1)
    train_labels = torch.tensor([1, 0, 0, 2])
    query, query_labels = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    results = knn.evaluate(train, train_labels, query, query_labels, num_classes=3,
                           majority_ks=(1, 3), weighted_ks=(3,))
    assert results['majority'] == {1: 100.0, 3: 0.0}
    assert results['weighted'][3]['top1'] == 100.0


def test_k_larger_than_the_train_set_is_clipped_in_evaluate_and_refused_in_search():
    train, labels = clusters(n_classes=2, per_class=5)
    results = knn.evaluate(train, labels, train, labels, num_classes=2)
    assert results['weighted'][200]['top1'] == 100.0
    with pytest.raises(SimRegError, match='smaller k'):
        knn.search(train, train, 11)
