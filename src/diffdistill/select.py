"""Choose a subset S of the generated images, the same number per class.

Strategies (``select.strategy`` in params.yaml):
- ``all``: every image, or the balanced prefix (first n per class in generation order) when
  ``images_per_class`` is set;
- ``random``: n per class drawn uniformly without replacement (seeded);
- ``kcenter``: greedy k-center per class in a feature space the caller computes (e.g. a ConvNet's
  ``.features`` trained on real data): the first center is the image closest to the class mean, then
  repeatedly the image farthest from the centers chosen so far. Deterministic; covers the class's modes;
- ``confidence``: keep the n images per class a real-data classifier gives the highest probability of
  their own label (the most typical of their class).
The result is an image set with the selected images in generation order.
"""
import numpy as np

from .imageset import rank_in_class, subset

STRATEGIES = ("all", "random", "kcenter", "confidence")


def _class_indices(labels, num_classes, images_per_class, classes):
    """Indices of each class in generation order; raises if any class has fewer than asked."""
    groups = [np.flatnonzero(labels == k) for k in range(num_classes)]
    if images_per_class is not None:
        short = [(str(classes[k]), len(g)) for k, g in enumerate(groups) if len(g) < images_per_class]
        if short:
            raise ValueError(f"select: {len(short)} classes have fewer than {images_per_class} images "
                             f"(e.g. {short[:5]}); lower select.images_per_class or sample more images")
    return groups


def kcenter_greedy(features, k):
    """Indices (into ``features`` [n,d]) of k greedy k-center points; the first is the point closest
    to the mean. Ties go to the lowest index, so the result is deterministic."""
    x = np.asarray(features, dtype=np.float64)
    if k > len(x):
        raise ValueError(f"kcenter: asked for {k} centers from {len(x)} points")
    first = int(np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    chosen = [first]
    dist = np.sqrt(((x - x[first]) ** 2).sum(axis=1))  # distance of every point to its nearest center
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.sqrt(((x - x[nxt]) ** 2).sum(axis=1)))
    return np.array(chosen, dtype=np.int64)


def select_indices(image_set, strategy, images_per_class, seed=0, features=None, scores=None):
    """The indices (sorted, i.e. generation order) that ``select`` keeps."""
    labels = np.asarray(image_set["labels"], dtype=np.int64)
    classes = image_set["classes"]
    K, N = len(classes), len(labels)
    if strategy not in STRATEGIES:
        raise ValueError(f"select: unknown strategy {strategy!r}; use one of {STRATEGIES} (select.strategy)")
    if images_per_class is not None and not (isinstance(images_per_class, (int, np.integer)) and images_per_class > 0):
        raise ValueError(f"select: images_per_class must be a positive integer or null, got {images_per_class!r}")
    if strategy == "all":
        if images_per_class is None:
            return np.arange(N, dtype=np.int64)
        _class_indices(labels, K, images_per_class, classes)  # clear error if a class is short
        return np.flatnonzero(rank_in_class(labels, K) < images_per_class)
    if images_per_class is None:
        raise ValueError(f"select: strategy {strategy!r} needs select.images_per_class (a positive integer)")
    groups = _class_indices(labels, K, images_per_class, classes)

    if strategy == "random":
        rng = np.random.default_rng(seed)
        keep = [rng.choice(g, size=images_per_class, replace=False) for g in groups]
    elif strategy == "kcenter":
        if features is None:
            raise ValueError("select: kcenter needs features [N, d] (e.g. a real-data ConvNet's .features)")
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] != N:
            raise ValueError(f"select: features must be [N={N}, d], got {features.shape}")
        keep = [g[kcenter_greedy(features[g], images_per_class)] for g in groups]
    else:  # confidence
        if scores is None:
            raise ValueError("select: confidence needs scores [N] (a real-data classifier's probability of "
                             "each image's own label)")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape[0] != N:
            raise ValueError(f"select: scores must have one value per image ({N}), got {scores.shape[0]}")
        # Highest score first; a stable sort breaks ties by generation order.
        keep = [g[np.argsort(-scores[g], kind="stable")[:images_per_class]] for g in groups]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def select(image_set, strategy, images_per_class, seed=0, features=None, scores=None, classifier_scores=None):
    """Return the subset of ``image_set`` the strategy keeps (same keys; generation order).

    ``classifier_scores`` is an alias of ``scores`` (the name SPEC.md uses)."""
    if scores is None:
        scores = classifier_scores
    idx = select_indices(image_set, strategy, images_per_class, seed=seed, features=features, scores=scores)
    return subset(image_set, idx)


def coverage_radius(features, selected_idx, labels=None):
    """How well the selected points cover the set: for each class, the largest distance from any of its
    points to the nearest selected point of the same class; averaged over classes (lower is better).
    Without ``labels`` the whole set is one class."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.zeros(len(x), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    selected = np.zeros(len(x), dtype=bool)
    selected[np.asarray(selected_idx, dtype=np.int64)] = True
    radii = []
    for k in np.unique(labels):
        pts, centers = x[labels == k], x[(labels == k) & selected]
        if len(centers) == 0:
            raise ValueError(f"coverage_radius: class {k} has no selected point")
        # Pairwise distances via |a|² + |b|² - 2ab, clipped at 0 against rounding.
        d2 = (pts ** 2).sum(1)[:, None] + (centers ** 2).sum(1)[None] - 2 * pts @ centers.T
        radii.append(float(np.sqrt(np.clip(d2, 0, None).min(axis=1).max())))
    return float(np.mean(radii))
