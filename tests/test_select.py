"""Tests for diffdistill.select: per-class counts of every strategy; k-center coverage."""
import numpy as np
import pytest

from diffdistill import imageset
from diffdistill.select import coverage_radius, kcenter_greedy, select, select_indices


def made_set(per_class=(10, 12, 9), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(per_class)])
    labels = labels[rng.permutation(len(labels))].astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels), 4, 4, 1), dtype=np.uint8)
    return {"images": images, "labels": labels, "classes": np.array(["a", "b", "c"][:len(per_class)])}


@pytest.mark.parametrize("strategy", ["all", "random", "kcenter", "confidence"])
def test_counts_per_class(strategy):
    s = made_set()
    rng = np.random.default_rng(1)
    feats, scores = rng.normal(size=(len(s["labels"]), 5)), rng.random(len(s["labels"]))
    out = select(s, strategy, 4, seed=0, features=feats, scores=scores)
    assert np.bincount(out["labels"], minlength=3).tolist() == [4, 4, 4]
    assert out["images"].dtype == np.uint8 and out["classes"].tolist() == ["a", "b", "c"]
    idx = select_indices(s, strategy, 4, seed=0, features=feats, scores=scores)
    assert (np.diff(idx) > 0).all()  # generation order, no repeats
    np.testing.assert_array_equal(out["images"], s["images"][idx])
    again = select_indices(s, strategy, 4, seed=0, features=feats, scores=scores)
    np.testing.assert_array_equal(idx, again)  # deterministic for a seed
    with pytest.raises(ValueError, match="fewer than 10"):
        select(s, strategy, 10, seed=0, features=feats, scores=scores)


def test_all_and_random_details():
    s = made_set()
    assert len(select(s, "all", None, 0)["labels"]) == len(s["labels"])
    np.testing.assert_array_equal(select(s, "all", 3, 0)["images"], imageset.balanced_prefix(s, 3)["images"])
    r0, r1 = select_indices(s, "random", 4, seed=0), select_indices(s, "random", 4, seed=1)
    assert not np.array_equal(r0, r1)
    with pytest.raises(ValueError, match="images_per_class"):
        select(s, "random", None, 0)
    with pytest.raises(ValueError, match="unknown strategy"):
        select(s, "best", 2, 0)
    with pytest.raises(ValueError, match="features"):
        select(s, "kcenter", 2, 0)
    with pytest.raises(ValueError, match="scores"):
        select(s, "confidence", 2, 0)


def test_confidence_keeps_top_scores():
    s = made_set()
    scores = np.random.default_rng(3).random(len(s["labels"]))
    idx = select_indices(s, "confidence", 3, seed=0, scores=scores)
    for k in range(3):
        in_class = np.flatnonzero(s["labels"] == k)
        top = in_class[np.argsort(-scores[in_class])[:3]]
        assert set(idx[s["labels"][idx] == k]) == set(top)
    # the alias name from SPEC.md works too
    np.testing.assert_array_equal(select(s, "confidence", 3, 0, classifier_scores=scores)["labels"],
                                  s["labels"][idx])


def test_kcenter_first_center_and_greedy():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.4, 0.0]])  # mean (2.85, 0): closest is 1.0
    assert kcenter_greedy(x, 3).tolist() == [1, 2, 0]


def clustered(seed=0, classes=3):
    """Per class: a big cluster of 200 points and four small far-away clusters of 3 points each."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for k in range(classes):
        centers = np.array([[0, 0], [20, 0], [0, 20], [-20, 0], [0, -20]], dtype=float) + 100 * k
        sizes = [200, 3, 3, 3, 3]
        for c, n in zip(centers, sizes):
            feats.append(c + rng.normal(scale=0.5, size=(n, 2)))
            labels += [k] * n
    labels = np.array(labels, dtype=np.int64)
    return np.concatenate(feats), labels


def test_kcenter_beats_random_on_coverage():
    feats, labels = clustered()
    s = {"images": np.zeros((len(labels), 2, 2, 1), np.uint8), "labels": labels,
         "classes": np.array(["a", "b", "c"])}
    kc = coverage_radius(feats, select_indices(s, "kcenter", 5, 0, features=feats), labels)
    assert kc < 3.0  # one center per cluster: radius within a cluster's spread
    for seed in range(5):
        rnd = coverage_radius(feats, select_indices(s, "random", 5, seed), labels)
        assert kc < rnd


def test_coverage_radius_by_hand():
    x = np.array([[0.0], [1.0], [3.0], [10.0], [14.0]])
    labels = np.array([0, 0, 0, 1, 1])
    # class 0 covered by point 0: farthest is 3 away; class 1 by point 3: farthest 4 away
    assert coverage_radius(x, [0, 3], labels) == pytest.approx(3.5)
    assert coverage_radius(x, [0, 1, 2]) == pytest.approx(11.0)
    with pytest.raises(ValueError, match="no selected point"):
        coverage_radius(x, [0], labels)
