"""Beyond the paper (issue 9): the memorisation audit. Does the generator copy its training images?

For every generated image g: d_gen(g) = distance to its nearest training image. For every real
test image t: d_test(t) = distance to its nearest training image. Test images were never trained
on, so d_test is what "a fresh image of this distribution" looks like. Distances are Euclidean, in
pixel space (images as floats in [0, 1], flattened) and optionally in a feature space (any callable,
e.g. a ConvNet's ``.features``, or precomputed arrays).

A generated image is **flagged** (closer to a training image than any test image is) when
    d_gen(g) < min_t d_test(t)        or        d_gen(g) <= EXACT_TOL
The second clause makes an exact copy always flagged, even when the test split itself holds exact
duplicates of training images (then min d_test = 0; those are counted in ``test_exact_duplicates``).
``share_flagged`` is the share of generated images flagged. As a calibrated second number,
``share_below_test_q`` is the share with d_gen below the ``quantile`` (default 1%) of d_test: a
generator that produces fresh images from the data distribution scores about ``quantile`` there,
a copying one much more.
"""
import math

import numpy as np
import torch

from .figures import fig_audit_distances, fig_audit_pairs
from .io import save_json

EXACT_TOL = 1e-6  # distance at or below which two images are the same image (float rounding only)


# ----------------------------------------------------------------------------------------------
# nearest neighbours


def _as_float_rows(x):
    """uint8 [n,H,W,C] images -> float32 [n, H*W*C] in [0, 1]; float features -> float32 [n, d]."""
    t = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
    if t.dtype == torch.uint8:
        return t.reshape(len(t), -1).float().div_(255.0)
    return t.reshape(len(t), -1).float()


def nearest_neighbours(queries, refs, batch_size=1024, device="cpu"):
    """For each row of ``queries`` the index of and Euclidean distance to its nearest row of ``refs``.

    Inputs: uint8 images (compared as [0,1] floats, flattened) or float feature arrays. Blocks of
    ``batch_size`` × ``batch_size`` keep memory flat. ``torch.cdist`` (matrix-product form, fast)
    picks the neighbour; its distance is then recomputed directly as ||q - r||, because the
    matrix-product form loses precision near zero and an exact copy must come out at 0.
    Returns (dist float64 numpy [n], index int64 numpy [n]).
    """
    n, m = len(queries), len(refs)
    if m == 0:
        raise ValueError("the reference (training) set is empty; pass the training split")
    device = torch.device(device)
    best_d = torch.full((n,), math.inf, dtype=torch.float32)
    best_i = torch.zeros(n, dtype=torch.long)
    for qs in range(0, n, batch_size):
        q = _as_float_rows(queries[qs:qs + batch_size]).to(device)
        bd = torch.full((len(q),), math.inf, device=device)
        bi = torch.zeros(len(q), dtype=torch.long, device=device)
        for rs in range(0, m, batch_size):
            r = _as_float_rows(refs[rs:rs + batch_size]).to(device)
            dmin, imin = torch.cdist(q, r).min(dim=1)
            better = dmin < bd
            bd = torch.where(better, dmin, bd)
            bi = torch.where(better, imin + rs, bi)
        best_d[qs:qs + len(q)] = bd.cpu()
        best_i[qs:qs + len(q)] = bi.cpu()
    # Exact distance to the chosen neighbour, in float64.
    exact = np.empty(n)
    for qs in range(0, n, batch_size):
        q = _as_float_rows(queries[qs:qs + batch_size]).double()
        idx = best_i[qs:qs + batch_size].numpy()
        r = _as_float_rows(np.asarray(refs)[idx] if not torch.is_tensor(refs) else refs[idx]).double()
        exact[qs:qs + len(q)] = (q - r).norm(dim=1).numpy()
    return exact, best_i.numpy()


def compute_features(features_fn, images, batch_size=512):
    """Apply ``features_fn`` (uint8 images [b,H,W,C] -> array/tensor [b, d]) in batches."""
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            f = features_fn(images[s:s + batch_size])
            f = f.detach().cpu().float().numpy() if torch.is_tensor(f) else np.asarray(f, dtype=np.float32)
            out.append(f.reshape(len(f), -1))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _space_audit(gen, train, test, quantile, batch_size, device, top_k):
    d_gen, i_gen = nearest_neighbours(gen, train, batch_size, device)
    d_test, i_test = nearest_neighbours(test, train, batch_size, device)
    t_min = float(d_test.min())
    t_q = float(np.quantile(d_test, quantile))
    flagged = (d_gen < t_min) | (d_gen <= EXACT_TOL)
    order = np.argsort(d_gen, kind="stable")[:top_k]
    return {
        "gen_nn_dist": d_gen, "gen_nn_index": i_gen, "test_nn_dist": d_test, "test_nn_index": i_test,
        "threshold_min_test": t_min, "threshold_test_q": t_q, "quantile": quantile,
        "flagged": np.flatnonzero(flagged), "share_flagged": float(flagged.mean()) if len(d_gen) else 0.0,
        "share_below_test_q": float((d_gen < t_q).mean()) if len(d_gen) else 0.0,
        "gen_exact_copies": int((d_gen <= EXACT_TOL).sum()),
        "test_exact_duplicates": int((d_test <= EXACT_TOL).sum()),
        "gen_median": float(np.median(d_gen)), "test_median": float(np.median(d_test)),
        "closest_pairs": [{"generated_index": int(g), "train_index": int(i_gen[g]), "distance": float(d_gen[g])}
                          for g in order],
    }


def _images(s):
    return s["images"] if isinstance(s, dict) else s


def audit(samples, train_set, test_set, features_fn=None, features=None, quantile=0.01,
          batch_size=1024, device="cpu", top_k=8):
    """Memorisation audit (see the module docstring for the definitions).

    ``samples``, ``train_set``, ``test_set``: image-set dicts (or uint8 arrays [N,H,W,C]).
    Feature space: ``features_fn`` (uint8 images -> [b, d]) computed here, or ``features`` =
    {"samples", "train", "test"} precomputed arrays. Returns {"definition", "n_generated", "n_train",
    "n_test", "spaces": {"pixel": {...}, "feature": {...}}, "_images": {...}} where each space holds
    per-image distances, thresholds, the flagged indices and shares, and the ``top_k`` closest pairs.
    """
    gen, train, test = (np.asarray(_images(s)) for s in (samples, train_set, test_set))
    if gen.dtype != np.uint8 or train.dtype != np.uint8 or test.dtype != np.uint8:
        raise ValueError("audit: images must be uint8 [N,H,W,C] (the image-set format); convert with "
                         "data.from_model_space first")
    if gen.shape[1:] != train.shape[1:] or test.shape[1:] != train.shape[1:]:
        raise ValueError(f"audit: image shapes differ (generated {gen.shape[1:]}, train {train.shape[1:]}, "
                         f"test {test.shape[1:]}); audit samples of the dataset the model was trained on")
    if len(test) == 0:
        raise ValueError("audit: the test set is empty; it is the reference for what a fresh image looks like")
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"audit: quantile {quantile} must be in [0, 1)")
    spaces = {"pixel": _space_audit(gen, train, test, quantile, batch_size, device, top_k)}
    if features is None and features_fn is not None:
        features = {k: compute_features(features_fn, v) for k, v in
                    (("samples", gen), ("train", train), ("test", test))}
    if features is not None:
        spaces["feature"] = _space_audit(np.asarray(features["samples"]), np.asarray(features["train"]),
                                         np.asarray(features["test"]), quantile, batch_size, device, top_k)
    return {
        "definition": ("flagged: nearest-training-image distance below the smallest test->train "
                       f"nearest-neighbour distance, or <= {EXACT_TOL} (an exact copy); "
                       "share_below_test_q: below the given quantile of test->train distances"),
        "n_generated": len(gen), "n_train": len(train), "n_test": len(test),
        "spaces": spaces,
        "_images": {"samples": gen, "train": train},  # for the pairs figure; not written to JSON
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [round(float(v), 6) if x.dtype.kind == "f" else int(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def write_audit(result, out_json, fig_hist_path, fig_pairs_path):
    """Write the audit: JSON (everything but the images), a histogram of generated->train against
    test->train nearest-neighbour distances per space (thresholds marked), and the closest pairs
    side by side (generated | nearest training image). Returns the plotted data."""
    save_json(out_json, _jsonable(result))
    hist = fig_audit_distances(result["spaces"], fig_hist_path)
    pairs, layout = fig_audit_pairs(result["spaces"], result["_images"]["samples"], result["_images"]["train"],
                                    fig_pairs_path)
    return {"hist": hist, "pairs": pairs, "pairs_layout": layout}
