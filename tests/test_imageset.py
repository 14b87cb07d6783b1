"""Tests for diffdistill.imageset: subsets, per-class ranks and balanced prefixes of an image set."""
import numpy as np
import pytest

from diffdistill import imageset


def made_set(n_per_class=(5, 4, 6), shape=(8, 8, 3), seed=0):
    """An image set in round-robin-ish generation order with uneven class counts."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(n_per_class)])
    labels = labels[rng.permutation(len(labels))].astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels),) + shape, dtype=np.uint8)
    return {"images": images, "labels": labels, "classes": np.array([f"c{k}" for k in range(len(n_per_class))])}


def test_balanced_prefix_nested_and_balanced():
    s = made_set()
    p2, p4 = imageset.balanced_prefix(s, 2), imageset.balanced_prefix(s, 4)
    assert np.bincount(p2["labels"]).tolist() == [2, 2, 2]
    assert np.bincount(p4["labels"]).tolist() == [4, 4, 4]
    for k in range(3):  # the first n of each class in generation order, nested
        first = s["images"][s["labels"] == k]
        np.testing.assert_array_equal(p2["images"][p2["labels"] == k], first[:2])
        np.testing.assert_array_equal(p4["images"][p4["labels"] == k], first[:4])
    with pytest.raises(ValueError, match="fewer than 5"):
        imageset.balanced_prefix(s, 5)
