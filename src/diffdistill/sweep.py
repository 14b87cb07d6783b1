"""Beyond the paper (issue 9): the budget sweep's cost–accuracy curve.

Sampling runs once at the largest budget; smaller synthetic sets are balanced prefixes. The
sampler's manifest ``timeline`` ([images_so_far, seconds_so_far] after each batch) gives the
sampling cost of each prefix, and the images-vs-seconds points test the linear-cost claim with a
least-squares line and its R². Each prefix (and a random real set of the same size) is evaluated by
the evaluate step under ``results/{ds}/sweep/{set}_ipc{n}_seed{s}.json``; this module collects those
into the curve (``summarize_sweep``) and writes it with its figure (``write_sweep``).
"""
import re
from pathlib import Path

import numpy as np

from .figures import fig_sweep
from .io import load_json, save_json
from .results import manifest_counts

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
    counts = manifest_counts(manifest) or []
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


def timeline_fit(timeline):
    """The least-squares line of a timeline, or None for a run sampled in one batch (one point)."""
    tl = np.asarray(timeline, float)
    return linear_fit(tl[:, 0], tl[:, 1]) if len(tl) >= 2 else None


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
        out["linear_fit"] = timeline_fit(tl)
    for (name, ipc), runs in sorted(groups.items()):
        runs.sort()
        accs = [a for _, a, _ in runs]
        out["curve"].append({
            "set": name, "images_per_class": ipc, "n_images": runs[0][2],
            "mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs,
            "seeds": [s for s, _, _ in runs], "sampling_seconds": seconds.get(ipc),
        })
    return out


def write_sweep(sweep_results, out_json, out_fig):
    """``results/{ds}/sweep.json`` and the sweep figure (``figures.fig_sweep``). A sweep.json written
    before the fit was recorded gets its line fitted here, for the figure only."""
    save_json(out_json, sweep_results)
    if sweep_results.get("timeline") and not sweep_results.get("linear_fit"):
        sweep_results = {**sweep_results, "linear_fit": timeline_fit(sweep_results["timeline"])}
    return fig_sweep(sweep_results, out_fig)
