"""The labelled image set the project passes around, and what can be done to one.

An image set is a dict ``{"images": uint8 [N,H,W,C], "labels": int64 [N], "classes": str [K]}``: the
layout of ``data/{ds}/*.npz`` and ``synthetic/{ds}/samples.npz``. Other keys ride along unchanged.
Images are in generation (or file) order; "the first n of a class" always means in that order.
"""
import numpy as np


def from_arrays(images, labels, classes):
    """An image set from arrays: images as contiguous uint8 (a grayscale [N,H,W] gets its channel axis),
    labels int64, class names str."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    return {"images": images, "labels": np.asarray(labels, dtype=np.int64),
            "classes": np.asarray([str(c) for c in classes], dtype=np.str_)}


def check(image_set):
    """Raise ValueError unless the images, labels and classes fit together."""
    images, labels, classes = image_set["images"], image_set["labels"], image_set["classes"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"image set: images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"image set: labels shape {labels.shape} does not match {images.shape[0]} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"image set: labels must lie in [0, {len(classes)}), the classes array's length")


def subset(image_set, idx):
    """The images at ``idx`` (order kept); every other key is carried over unchanged."""
    idx = np.asarray(idx, dtype=np.int64)
    out = dict(image_set)
    out["images"] = image_set["images"][idx]
    out["labels"] = np.asarray(image_set["labels"])[idx].astype(np.int64)
    return out


def rank_in_class(labels, num_classes):
    """Each image's position within its own class, in generation order (0 for a class's first image)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # stable: generation order within a class
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


def balanced_prefix(image_set, n_per_class):
    """The first ``n_per_class`` images of every class, in generation order.

    Nested by construction: prefix(n) is a subset of prefix(m) for n < m. Raises if a class has fewer."""
    if not (isinstance(n_per_class, (int, np.integer)) and n_per_class > 0):
        raise ValueError(f"balanced_prefix: n_per_class must be a positive integer, got {n_per_class!r}")
    labels = np.asarray(image_set["labels"])
    K = len(image_set["classes"])
    counts = np.bincount(labels, minlength=K)
    rank = rank_in_class(labels, K)
    short = [(str(image_set["classes"][k]), int(counts[k])) for k in range(K) if counts[k] < n_per_class]
    if short:
        raise ValueError(f"balanced_prefix: {len(short)} classes have fewer than {n_per_class} images "
                         f"(e.g. {short[:5]}); sample more (raise sample.budget_seconds/max_per_class) "
                         f"or ask for fewer per class")
    keep = np.flatnonzero(rank < n_per_class)
    return subset(image_set, keep)


def class_major(image_set, images_per_class):
    """The first ``images_per_class`` of each class, grouped by class in label order (class 0's images,
    then class 1's, ...), generation order within a class."""
    prefix = balanced_prefix(image_set, images_per_class)
    order = np.argsort(prefix["labels"], kind="stable")  # stable: keeps generation order within a class
    return subset(prefix, order)
