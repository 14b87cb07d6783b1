"""Beyond the paper (issue 9): a memorisation audit and the budget sweep's cost–accuracy curve.

Memorisation audit
------------------
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

Budget sweep
------------
Sampling runs once at the largest budget; smaller synthetic sets are balanced prefixes. The
sampler's manifest ``timeline`` ([images_so_far, seconds_so_far] after each batch) gives the
sampling cost of each prefix, and the images-vs-seconds points test the linear-cost claim with a
least-squares line and its R².
"""
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .io import atomic_path, load_json, save_json  # noqa: E402

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


# What a distance is measured in, per space: on the figures' axes and in the pairs' labels.
SPACE_UNITS = {"pixel": "L2 on [0, 1] pixel values", "feature": "L2 in the reference classifier's feature units"}


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


def _show(ax, img):
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def _save_fig(fig, out):
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=150, bbox_inches="tight")
    plt.close(fig)


def write_audit(result, out_json, fig_hist_path, fig_pairs_path):
    """Write the audit: JSON (everything but the images), a histogram of generated->train against
    test->train nearest-neighbour distances per space (thresholds marked), and the closest pairs
    side by side (generated | nearest training image). Returns the plotted data."""
    save_json(out_json, _jsonable(result))
    spaces = result["spaces"]
    fig, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 3.5), squeeze=False)
    hist_data = {}
    for ax, (name, sp) in zip(axes.flat, spaces.items()):
        d_gen, d_test = np.asarray(sp["gen_nn_dist"]), np.asarray(sp["test_nn_dist"])
        hi = max(d_gen.max(initial=0), d_test.max(initial=0))
        bins = np.linspace(0, hi if hi > 0 else 1, 41)
        ax.hist(d_test, bins=bins, alpha=0.6, density=True, label="test → train", color="tab:blue")
        ax.hist(d_gen, bins=bins, alpha=0.6, density=True, label="generated → train", color="tab:red")
        ax.axvline(sp["threshold_min_test"], color="black", ls="--", lw=1, label="closest test image")
        ax.set_xlabel(f"distance to nearest training image\n({name} space: {SPACE_UNITS.get(name, 'L2')})")
        ax.set_ylabel("density")
        ax.set_title(f"{name}: {100 * sp['share_flagged']:.1f}% of generated images flagged", fontsize=9)
        ax.legend(fontsize=7)
        hist_data[name] = {"bins": bins.tolist(), "generated": d_gen.tolist(), "test": d_test.tolist()}
    _save_fig(fig, fig_hist_path)

    gen, train = result["_images"]["samples"], result["_images"]["train"]
    k = max((len(sp["closest_pairs"]) for sp in spaces.values()), default=0)
    rows = max(k, 1)
    # Fixed inches for the header (suptitle + column titles) and per row, placed with explicit
    # margins: the old layout (height 1.1·k + 0.4 with the default top margin and a suptitle at
    # y=1) left a band of blank space under the title.
    row_in, head_in = 1.1, 0.75
    height = head_in + row_in * rows
    fig, axes = plt.subplots(rows, 2 * len(spaces), figsize=(2.6 * len(spaces), height), squeeze=False)
    fig.subplots_adjust(top=1 - head_in / height, bottom=0.02, left=0.12, right=0.98, hspace=0.35, wspace=0.1)
    pairs = {}
    for si, (name, sp) in enumerate(spaces.items()):
        pairs[name] = []
        flagged = set(np.asarray(sp["flagged"]).tolist())
        for row in range(axes.shape[0]):
            a, b = axes[row, 2 * si], axes[row, 2 * si + 1]
            a.set_axis_off()
            b.set_axis_off()
            if row >= len(sp["closest_pairs"]):
                continue
            p = sp["closest_pairs"][row]
            _show(a, gen[p["generated_index"]])
            _show(b, train[p["train_index"]])
            a.set_axis_on()
            b.set_axis_on()
            flag = "\nflagged" if p["generated_index"] in flagged else ""
            a.set_ylabel(f"d = {p['distance']:.3g}{flag}", fontsize=7)
            if row == 0:
                a.set_title("generated", fontsize=7)
                b.set_title("nearest train", fontsize=7)
            pairs[name].append((p["generated_index"], p["train_index"], p["distance"]))
        # the column pair's header: which space, and the unit of d
        x_mid = (axes[0, 2 * si].get_position().x0 + axes[0, 2 * si + 1].get_position().x1) / 2
        fig.text(x_mid, 1 - 0.42 / height, f"{name} space\nd: {SPACE_UNITS.get(name, 'L2')}", ha="center",
                 va="center", fontsize=7)
    title = fig.suptitle("Closest generated–training pairs", fontsize=9, y=1 - 0.12 / height, va="top")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title_bottom = title.get_window_extent(renderer).y0
    axes_top = max(ax.get_tightbbox(renderer).y1 for ax in axes.flat if ax.axison) if k else title_bottom
    from .report import overlapping
    header = [title] + [t for t in fig.texts if t is not title] + [ax.title for ax in axes.flat if ax.get_title()]
    header_boxes = [t.get_window_extent(renderer) for t in header]
    layout = {"title_gap_in": float((title_bottom - axes_top) / fig.dpi), "height_in": height,
              "collisions": overlapping(header_boxes),
              "header": [t.get_text() for t in header]}
    _save_fig(fig, fig_pairs_path)
    return {"hist": hist_data, "pairs": pairs, "pairs_layout": layout}


# ----------------------------------------------------------------------------------------------
# budget sweep


SWEEP_NAME = re.compile(r"^(?P<set>[a-z_]+)_ipc(?P<ipc>\d+)_seed(?P<seed>\d+)\.json$")


def _timeline(manifest):
    tl = np.asarray(manifest.get("timeline") or [], dtype=float).reshape(-1, 2)
    if len(tl) == 0:
        raise ValueError("manifest has no 'timeline' ([images_so_far, seconds_so_far] per batch); "
                         "rerun the sampling step with a version that records it")
    return tl


def sweep_points(manifest, images_per_class_list, num_classes=None):
    """Sampling cost of each balanced prefix of ``n`` images per class.

    The cost of n·K images is the measured time at which the batch that brought the sampler's count
    to at least n·K finished (from the manifest's timeline: no interpolation, nothing modelled).
    K is ``num_classes`` or the number of entries of the manifest's ``per_class``.
    Returns [{"images_per_class", "n_images", "seconds"}]. Raises ValueError when a prefix needs more
    images per class than were sampled.
    """
    per_class = manifest.get("per_class") or {}
    counts = list(per_class.values()) if isinstance(per_class, dict) else list(per_class)
    k = num_classes or len(counts)
    if not k:
        raise ValueError("sweep_points: cannot tell the class count; pass num_classes")
    tl = _timeline(manifest)
    have = min(counts) if counts else int(tl[-1, 0]) // k
    points = []
    for n in images_per_class_list:
        if n > have:
            raise ValueError(f"sweep: {n} images per class requested but the sample holds only {have} per "
                             f"class; raise sample.budget_seconds (or max_per_class) or drop {n} from the sweep")
        total = n * k
        j = int(np.searchsorted(tl[:, 0], total, side="left"))
        j = min(j, len(tl) - 1)
        points.append({"images_per_class": int(n), "n_images": int(total), "seconds": float(tl[j, 1])})
    return points


def linear_fit(x, y):
    """Least-squares y = slope·x + intercept, with R² (1 - SS_res/SS_tot; 1.0 when y is constant
    and fitted exactly)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        raise ValueError("linear_fit needs at least two points")
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float((resid ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res < 1e-12 else 0.0)
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "n_points": int(len(x))}


def summarize_sweep(paths, manifest=None, num_classes=None):
    """Collect the sweep's evaluation runs ``{set}_ipc{n}_seed{s}.json`` into the curve's data.

    Returns {"curve": [{"set", "images_per_class", "n_images", "mean", "std", "runs", "seeds",
    "sampling_seconds"}], "timeline": [[images, seconds], ...], "linear_fit": {...}}; the last two
    (and ``sampling_seconds``) only when ``manifest`` is given. Rows are sorted by set, then n.
    """
    groups = {}
    for p in paths:
        m = SWEEP_NAME.match(Path(p).name)
        if m is None:
            raise ValueError(f"{p}: not a sweep result name; expected {{set}}_ipc{{n}}_seed{{s}}.json")
        r = load_json(p)
        key = (m["set"], int(m["ipc"]))
        groups.setdefault(key, []).append((int(m["seed"]), float(r["accuracy"]), int(r.get("n_train", 0))))
    seconds = {}
    out = {"curve": []}
    if manifest is not None:
        ipcs = sorted({ipc for _, ipc in groups})
        seconds = {pt["images_per_class"]: pt["seconds"] for pt in sweep_points(manifest, ipcs, num_classes)}
        tl = _timeline(manifest)
        out["timeline"] = tl.tolist()
        out["linear_fit"] = linear_fit(tl[:, 0], tl[:, 1]) if len(tl) >= 2 else None
    for (name, ipc), runs in sorted(groups.items()):
        runs.sort()
        accs = [a for _, a, _ in runs]
        out["curve"].append({
            "set": name, "images_per_class": ipc, "n_images": runs[0][2],
            "mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs,
            "seeds": [s for s, _, _ in runs], "sampling_seconds": seconds.get(ipc),
        })
    return out


def fig_sweep(sweep_results, out):
    """Budget sweep figure: (a) accuracy vs images per class, (b) accuracy vs sampling seconds,
    both with the random-real baseline at equal image count; (c) sampling seconds vs images with the
    least-squares line and R² (the linear-cost claim).

    The generated sets here are balanced prefixes of ALL the samples, with no selection; the
    headline accuracy (summary.json) trains on the selected subset. The legend says so, and says
    what the error bars are: the population std (ddof 0) over the seeds, with their count.
    Returns the plotted data per panel and "legend" (the accuracy panels' legend title and labels)."""
    curve = sweep_results["curve"]
    sets = sorted({r["set"] for r in curve}, key=lambda s: (s != "synthetic", s))
    colors = {"synthetic": "tab:red", "random_real": "tab:green"}
    names = {"synthetic": "generated, unselected (balanced prefix of all samples)",
             "random_real": "random real, same count"}
    seeds = sorted({len(r.get("runs") or r.get("seeds") or []) for r in curve})
    n_seeds = " or ".join(str(n) for n in seeds) if seeds else "?"
    legend_title = f"mean ± population std over {n_seeds} seeds"
    lo = min((r["mean"] - r["std"] for r in curve), default=0.0)
    hi = max((r["mean"] + r["std"] for r in curve), default=1.0)
    span = (hi - lo) or 0.1
    ylim = (lo - 0.05 * span, hi + 0.6 * span)  # headroom: the legend sits above the curves
    has_tl = bool(sweep_results.get("timeline"))
    fig, axes = plt.subplots(1, 3 if has_tl else 1, figsize=(14 if has_tl else 5, 3.6), squeeze=False)
    axes = axes.flat
    data = {"accuracy_vs_ipc": {}, "accuracy_vs_seconds": {}, "seconds_vs_images": None}
    ax = axes[0]
    for s in sets:
        rows = sorted((r for r in curve if r["set"] == s), key=lambda r: r["images_per_class"])
        x = [r["images_per_class"] for r in rows]
        y = [r["mean"] for r in rows]
        ax.errorbar(x, y, yerr=[r["std"] for r in rows], marker="o", capsize=2, color=colors.get(s),
                    label=names.get(s, s))
        data["accuracy_vs_ipc"][s] = {"x": x, "y": y}
    ax.set_xlabel("images per class")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs images per class")
    ax.set_ylim(*ylim)
    leg = ax.legend(fontsize=7, title=legend_title, title_fontsize=7, loc="upper left")
    data["legend"] = {"title": leg.get_title().get_text(), "labels": [t.get_text() for t in leg.get_texts()]}
    if has_tl:
        ax = axes[1]
        for s in sets:
            rows = sorted((r for r in curve if r["set"] == s and r.get("sampling_seconds") is not None),
                          key=lambda r: r["images_per_class"])
            x = [r["sampling_seconds"] for r in rows]
            y = [r["mean"] for r in rows]
            ax.errorbar(x, y, yerr=[r["std"] for r in rows], marker="o", capsize=2, color=colors.get(s),
                        label=names.get(s, s))
            data["accuracy_vs_seconds"][s] = {"x": x, "y": y}
        ax.set_xlabel("sampling seconds (time to generate the prefix)")
        ax.set_ylabel("test accuracy")
        ax.set_title("accuracy vs sampling budget")
        ax.set_ylim(*ylim)
        ax.legend(fontsize=7, title=legend_title, title_fontsize=7, loc="upper left")
        ax = axes[2]
        tl = np.asarray(sweep_results["timeline"], float)
        # A run that sampled everything in one batch has one point: nothing to fit a line to.
        fit = sweep_results.get("linear_fit") or (linear_fit(tl[:, 0], tl[:, 1]) if len(tl) >= 2 else None)
        ax.plot(tl[:, 0], tl[:, 1], "o", ms=3, color="tab:blue", label="measured (per batch)")
        if fit is not None:
            xs = np.array([0.0, tl[:, 0].max()])
            ax.plot(xs, fit["slope"] * xs + fit["intercept"], "-", color="black", lw=1,
                    label=f"least squares: {1000 * fit['slope']:.3g} s / 1000 img, R² = {fit['r2']:.4f}")
        else:
            ax.plot([], [], " ", label="one batch: no line fitted (sample in smaller batches)")
        ax.set_xlabel("images generated")
        ax.set_ylabel("sampling seconds")
        ax.set_title("sampling cost vs images")
        ax.legend(fontsize=7)
        data["seconds_vs_images"] = {"x": tl[:, 0].tolist(), "y": tl[:, 1].tolist(), "fit": fit}
    fig.suptitle("Budget sweep: the generated sets are NOT selected (unlike the headline accuracy, "
                 "which trains on the selected subset)", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, out)
    return data


def write_sweep(sweep_results, out_json, out_fig):
    """``results/{ds}/sweep.json`` and the sweep figure."""
    save_json(out_json, _jsonable(sweep_results))
    return fig_sweep(sweep_results, out_fig)
