"""Every figure the project draws: Fig. 3 (FID during finetuning), Fig. 4 (the Track 2 leaderboard
and ours), Figs. 5-7 (one generated image per class), the training curves, the budget sweep, and the
memorisation audit's distance histograms and closest pairs.

Each ``fig_*`` function writes one figure (``save_fig``: atomically, 150 dpi) and returns the data
it plotted, so tests check content and not only that a file appeared; the figures whose labels could
collide also return the collisions found in the drawn figure (``text_boxes``, ``overlapping``), which
must be empty. A dataset whose inputs are missing shows "not run".
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_path, load_json  # noqa: E402
from .results import EVAL_SETS, NOT_RUN, label, load_if, read_csv_columns  # noqa: E402

# Track 2 (generative) leaderboard of the First Dataset Distillation Challenge (ECCV 2024), as
# reported in the paper: team -> accuracy on (CIFAR-100, Tiny-ImageNet).
LEADERBOARD_DATASETS = ("cifar100", "tinyimagenet")
LEADERBOARD = {
    "zheli": (0.3756, 0.2353),
    "Mel": (0.1459, 0.1184),
    "Guang": (0.01, 0.046),
    "Unigen": (0.01, 0.005),
    "Fanjunqiao": (0.01, 0.005),
}
FID_KIND_NAMES = {"inception": "Inception", "convnet": "ConvNet"}
# What a distance is measured in, per space of the memorisation audit: on the axes and pair labels.
SPACE_UNITS = {"pixel": "L2 on [0, 1] pixel values", "feature": "L2 in the reference classifier's feature units"}


# ----------------------------------------------------------------------------------------------
# saving, and checking that labels do not collide


def save_fig(fig, out):
    """Save a figure atomically (format from the real suffix, not the temporary name's)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=150, bbox_inches="tight")
    plt.close(fig)


def text_boxes(fig, texts):
    """Display-space bounding boxes (pixels at the figure's dpi) of ``texts`` after a draw."""
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    return [t.get_window_extent(renderer) for t in texts]


def overlapping(boxes_a, boxes_b=None, tol=0.5):
    """Index pairs (i, j) of boxes that overlap by more than ``tol`` pixels in both directions;
    within one list when ``boxes_b`` is None. A figure's labels must give an empty list."""
    def hit(a, b):
        return (min(a.x1, b.x1) - max(a.x0, b.x0) > tol) and (min(a.y1, b.y1) - max(a.y0, b.y0) > tol)
    if boxes_b is None:
        return [(i, j) for i in range(len(boxes_a)) for j in range(i + 1, len(boxes_a))
                if hit(boxes_a[i], boxes_a[j])]
    return [(i, j) for i, a in enumerate(boxes_a) for j, b in enumerate(boxes_b) if hit(a, b)]


# ----------------------------------------------------------------------------------------------
# Fig. 3: FID during finetuning


def fig_fid_curve(curves, out, kinds=None, return_axes=False):
    """Fig. 3: FID against training step. ``curves``: {dataset: fid_curve.csv}; missing files are
    left out (and listed as not run in the title). ``kinds``: {dataset: "inception" | "convnet"}
    (params' fid.features), named on the axis. Returns {dataset: {"step", "fid"}}, or with
    ``return_axes`` {"curves": that, "ylabel": the y-axis label}."""
    kinds = {ds: FID_KIND_NAMES.get(str(k).lower(), k) for ds, k in (kinds or {}).items()}
    data, missing = {}, []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for ds, path in curves.items():
        if path is None or not Path(path).exists():
            missing.append(ds)
            continue
        c = read_csv_columns(path)
        data[ds] = {"step": c["step"].tolist(), "fid": c["fid"].tolist()}
        kind = f" ({kinds[ds]} features)" if ds in kinds else ""
        ax.plot(c["step"], c["fid"], marker="o", ms=3, label=f"{label(ds)}{kind}")
    ax.set_xlabel("training step")
    # FID with Inception features and FID with the reference ConvNet's features are different
    # quantities: the axis names the one it shows (or defers to the legend when lines differ).
    shown = {kinds.get(ds) for ds in data}
    ylabel = f"FID ({shown.pop()} features)" if len(shown) == 1 and None not in shown else \
        "FID (features per line, see legend)"
    ax.set_ylabel(ylabel)
    ax.set_title("FID during finetuning")
    if data:
        ax.legend(fontsize=8)
    if missing:
        ax.text(0.99, 0.98, NOT_RUN + ": " + ", ".join(label(d) for d in missing), transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="0.4")
    save_fig(fig, out)
    return {"curves": data, "ylabel": ylabel} if return_axes else data


# ----------------------------------------------------------------------------------------------
# Fig. 4: the Track 2 leaderboard and ours


def _summary_block(source):
    """A summary.json path or dict -> its 'synthetic' block, or None when not run."""
    if source is None:
        return None
    s = source if isinstance(source, dict) else load_if(source)
    return None if s is None else s.get("synthetic")


def fig_leaderboard(measured, out):
    """Fig. 4: the Track 2 leaderboard as grouped bars (one group per challenge dataset, one bar per
    team) plus this project's accuracy as its own hatched bar marked "ours". ``measured``: {dataset:
    summary.json path or dict or None}. A challenge dataset missing from ``measured`` (or whose
    summary does not exist) shows the text "not run" in place of our bar, never a number.

    Datasets outside the challenge (digits) are not on the leaderboard's axis: a 0.92 on 8×8 digits
    beside 0.38 on CIFAR-100 would dwarf the challenge's bars and invite a comparison that means
    nothing. They get a panel of their own to the right, titled as not part of the challenge.
    Every value label sits above its bar and error bar, horizontally; the returned ``collisions``
    (label/label and label/bar overlaps in the drawn figure) is empty.

    Returns {"groups", "panels": {"challenge": [...], "other": [...]}, "bars": [{"group", "label",
    "value", "std", "ours"}], "not_run", "labels": [text], "collisions": [(what, what)]}.
    """
    challenge = list(LEADERBOARD_DATASETS)
    other = [d for d in measured if d not in LEADERBOARD_DATASETS]
    groups = challenge + other
    teams = list(LEADERBOARD)
    width = 0.8 / (len(teams) + 1)
    ratios = [2.2 * len(challenge)] + ([1.2 * len(other)] if other else [])
    fig, axes = plt.subplots(1, len(ratios), figsize=(2.0 + sum(ratios), 4.0), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})
    ax, ax_other = axes[0, 0], (axes[0, 1] if other else None)
    cmap = plt.get_cmap("Blues")
    bars, not_run, value_texts, bar_patches = [], [], [], []

    def ours_bar(a, x, w, ds, first):
        block = _summary_block(measured.get(ds))
        if block is None:
            not_run.append(ds)
            t = a.text(x, 0.01, NOT_RUN, rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")
            value_texts.append(t)
            return 0.0
        std = block.get("std", 0.0)
        rect = a.bar(x, block["mean"], w, yerr=std, color="tab:red", hatch="//", edgecolor="black",
                     linewidth=0.5, capsize=2, label="ours (mean ± std over seeds)" if first else None)
        bar_patches.extend(rect.patches)
        # offset in points above the error bar's cap, so the label never touches it at any y scale
        t = a.annotate(f"{block['mean']:.3f}", (x, block["mean"] + std), xytext=(0, 3),
                       textcoords="offset points", ha="center", va="bottom", fontsize=7)
        value_texts.append(t)
        bars.append({"group": ds, "label": "ours", "value": block["mean"], "std": std, "ours": True})
        return block["mean"] + std

    top = 0.0
    for gi, ds in enumerate(challenge):
        col = LEADERBOARD_DATASETS.index(ds)
        for ti, team in enumerate(teams):
            x = gi - 0.4 + width * (ti + 0.5)
            v = LEADERBOARD[team][col]
            rect = ax.bar(x, v, width, color=cmap(0.3 + 0.15 * ti), edgecolor="black", linewidth=0.5,
                          label=team if gi == 0 else None)
            bar_patches.extend(rect.patches)
            bars.append({"group": ds, "label": team, "value": v, "std": None, "ours": False})
            top = max(top, v)
        x_ours = gi - 0.4 + width * (len(teams) + 0.5)
        top = max(top, ours_bar(ax, x_ours, width, ds, first=not any(b["ours"] for b in bars)))
    ax.set_xticks(range(len(challenge)))
    ax.set_xticklabels([label(d) for d in challenge])
    ax.set_ylabel("test accuracy")
    ax.set_xlabel("dataset")
    ax.set_ylim(0, top * 1.25 + 0.02)  # headroom for the value labels and the legend
    ax.set_title("Track 2 leaderboard (ECCV 2024 DD challenge) and ours", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper right")

    if ax_other is not None:
        top = 0.0
        for gi, ds in enumerate(other):
            top = max(top, ours_bar(ax_other, gi, 0.5, ds, first=False))
        ax_other.set_xticks(range(len(other)))
        ax_other.set_xticklabels([label(d) for d in other])
        ax_other.set_xlim(-0.75, len(other) - 0.25)
        ax_other.set_ylim(0, max(1.0, top * 1.1))
        ax_other.set_ylabel("test accuracy (ours)")
        ax_other.set_xlabel("ours: mean ± std over seeds", fontsize=8)
        ax_other.set_title("not in the challenge\n(own axis; not comparable)", fontsize=9)

    fig.tight_layout()
    boxes = text_boxes(fig, value_texts)
    patch_boxes = [r.get_window_extent() for r in bar_patches]
    collisions = [("label", i, "label", j) for i, j in overlapping(boxes)]
    collisions += [("label", i, "bar", j) for i, j in overlapping(boxes, patch_boxes)]
    labels = [t.get_text() for t in value_texts]
    save_fig(fig, out)
    return {"groups": groups, "panels": {"challenge": challenge, "other": other}, "bars": bars,
            "not_run": not_run, "labels": labels, "collisions": collisions}


# ----------------------------------------------------------------------------------------------
# Figs. 5-7: one generated image per class


def class_grid_count(num_classes, per_grid=100):
    return max(1, math.ceil(num_classes / per_grid))


def class_grid_paths(ds, num_classes, fig_dir, per_grid=100, ext="png"):
    """Output paths of Figs. 5-7 for a dataset: one file, or ``_1``, ``_2``... when split."""
    n = class_grid_count(num_classes, per_grid)
    fig_dir = Path(fig_dir)
    if n == 1:
        return [fig_dir / f"{ds}_classes.{ext}"]
    return [fig_dir / f"{ds}_classes_{i + 1}.{ext}" for i in range(n)]


CLASS_LABEL_PT = 8  # class names at 8 pt at the saved size (savefig never rescales the figure)
CLASS_LABEL_CHARS = 12  # per line: 12 characters at 8 pt fit a 1.1-inch cell


def _cell_name(name):
    """A class name in at most two lines of CLASS_LABEL_CHARS (long names end in "…")."""
    import textwrap

    lines = textwrap.wrap(name, CLASS_LABEL_CHARS, break_long_words=True) or [""]
    if len(lines) > 2:
        lines = [lines[0], lines[1][:CLASS_LABEL_CHARS - 1] + "…"]
    return "\n".join(lines)


def fig_class_grid(samples, out_paths, per_grid=100, cols=10, source="samples.npz"):
    """Figs. 5-7: one generated image per class, in grids of ``per_grid`` classes with their names
    (Tiny-ImageNet: two grids of 100). The image shown for a class is the FIRST image of that class
    in the file (generation order; no picking by quality), and the figure's subtitle says so.

    The grid is drawn as one mosaic image with the names written under each cell (one Axes, not
    one per class: a hundred Axes make matplotlib slow). Each cell is 1.1 inch wide and has a band
    under the image for its name at ``CLASS_LABEL_PT``. ``samples``: samples.npz path or an
    image-set dict; ``source``: how the subtitle names it. ``out_paths``: one path per grid
    (``class_grid_paths`` gives them). Returns one dict per grid: {"path", "classes", "indices",
    "shape": (rows, cols), "fontsizes", "subtitle", "collisions"}; an index is None when the class
    has no image (its cell stays blank); ``collisions`` lists label/label and label/image overlaps
    in the drawn figure (empty)."""
    from matplotlib.transforms import Bbox

    from .io import load_npz

    if not isinstance(samples, dict):
        source = Path(samples).name
        samples = load_npz(samples)
    s = samples
    images, labels, classes = s["images"], np.asarray(s["labels"]), [str(c) for c in s["classes"]]
    need = class_grid_count(len(classes), per_grid)
    if len(out_paths) != need:
        raise ValueError(f"{len(classes)} classes in grids of {per_grid} need {need} output paths, got "
                         f"{len(out_paths)}; build them with figures.class_grid_paths()")
    _, h, w, c = images.shape
    pad = max(1, h // 8)
    cell_in = 1.1                                   # inches per cell, across
    units_per_in = (w + 2 * pad) / cell_in          # data units (pixels of the mosaic) per inch
    # room for two lines of name (1.2 line spacing) and a gap, in pixels of the mosaic
    band = int(math.ceil(3.0 * CLASS_LABEL_PT / 72 * units_per_in))
    cell_h = h + 2 * pad + band
    subtitle = (f"the first image of each class in {source} (generation order, not picked by quality)")
    grids = []
    for g, out in enumerate(out_paths):
        ks = list(range(g * per_grid, min(len(classes), (g + 1) * per_grid)))
        ncol = min(cols, len(ks))
        nrow = math.ceil(len(ks) / ncol)
        # white canvas; each cell is the image, a padding border and the band for its name
        mosaic = np.full((nrow * cell_h, ncol * (w + 2 * pad), c), 255, dtype=np.uint8)
        fig, ax = plt.subplots(figsize=(cell_in * ncol, cell_in * ncol * nrow * cell_h / mosaic.shape[1] + 0.6))
        indices, texts, cells = [], [], []
        for cell, k in enumerate(ks):
            r, q = divmod(cell, ncol)
            where = np.flatnonzero(labels == k)
            idx = int(where[0]) if len(where) else None
            indices.append(idx)
            y0, x0 = r * cell_h + pad, q * (w + 2 * pad) + pad
            if idx is not None:
                mosaic[y0:y0 + h, x0:x0 + w] = images[idx]
            cells.append((x0, y0))
            name = _cell_name(classes[k])
            texts.append(ax.text(x0 + w / 2, y0 + h + pad, name if idx is not None else f"{name} (none)",
                                 ha="center", va="top", fontsize=CLASS_LABEL_PT))
        if c == 1:
            ax.imshow(mosaic[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(mosaic, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"One generated image per class (classes {ks[0]}–{ks[-1]})\n{subtitle}", fontsize=9)
        boxes = text_boxes(fig, texts)
        to_px = ax.transData
        img_boxes = [Bbox(to_px.transform([[x0 - 0.5, y0 + h - 0.5], [x0 + w - 0.5, y0 - 0.5]]))
                     for x0, y0 in cells]
        collisions = overlapping(boxes) + [(i, j) for i, j in overlapping(boxes, img_boxes)]
        fontsizes = [t.get_fontsize() for t in texts]
        save_fig(fig, out)
        grids.append({"path": str(out), "classes": [classes[k] for k in ks], "indices": indices,
                      "shape": (nrow, ncol), "fontsizes": fontsizes, "subtitle": subtitle,
                      "collisions": collisions})
    return grids


# ----------------------------------------------------------------------------------------------
# training curves


def fig_loss_curves(loss_csv, out, eval_jsons=(), title=None):
    """Training curves of one dataset: the diffusion loss (raw and a moving average, log scale) from
    ``loss.csv``; with ``eval_jsons``, a second panel of the ConvNet's per-epoch loss for EVERY
    evaluation run: one colour per set, one line style per seed. Returns {"diffusion": {"step",
    "loss", "smoothed"}, "convnet": {"{set}_seed{s}": [...]}, "lines": number of ConvNet lines drawn}."""
    c = read_csv_columns(loss_csv)
    step, loss = c["step"], c["loss"]
    win = max(1, len(loss) // 50)
    smoothed = np.convolve(loss, np.ones(win) / win, mode="valid") if len(loss) else loss
    runs = {}
    for p in eval_jsons:
        r = load_json(p)
        # An evaluation JSON's "name" is its set (synthetic, random_real, full_real), the same for
        # every seed: keyed by the name alone, each seed overwrote the last and one curve per set
        # was drawn. The key is set and seed (the file stem when a run lacks either).
        name, seed = r.get("name"), r.get("seed")
        key = f"{name}_seed{seed}" if name in EVAL_SETS and seed is not None else Path(p).stem
        if key in runs:
            raise ValueError(f"{p}: a second evaluation run named {key}; pass each run once")
        runs[key] = list(r.get("loss_curve", []))
    ncols = 2 if runs else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(step, loss, color="0.75", lw=0.7, label="loss")
    ax.plot(step[win - 1:], smoothed, color="tab:blue", lw=1.2, label=f"moving average ({win})")
    if len(loss) and np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("diffusion loss (noise MSE)")
    ax.set_title(title or "U-ViT training loss")
    ax.legend(fontsize=8)
    if runs:
        ax2 = axes[0, 1]
        colors = {"synthetic": "tab:red", "random_real": "tab:green", "full_real": "tab:blue"}
        styles = ["-", "--", ":", "-."]
        seed_rank = {}
        for name in sorted(runs):
            kind = next((k for k in colors if name.startswith(k)), None)
            seed_rank.setdefault(kind, []).append(name)
        for name, curve in sorted(runs.items()):
            kind = next((k for k in colors if name.startswith(k)), None)
            ls = styles[seed_rank[kind].index(name) % len(styles)]
            ax2.plot(np.arange(1, len(curve) + 1), curve, lw=0.9, ls=ls, color=colors.get(kind),
                     label=name.replace("_seed", ", seed "))
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("ConvNet training loss")
        ax2.set_title(f"ConvNet training ({len(runs)} evaluation runs, every seed)")
        top = max((max(c) for c in runs.values() if len(c)), default=1.0)
        ax2.set_ylim(0, top * 1.45)  # headroom: the legend sits above the curves, not on them
        ax2.legend(fontsize=6, ncol=max(1, len(seed_rank)), loc="upper right")
    save_fig(fig, out)
    return {"diffusion": {"step": step.tolist(), "loss": loss.tolist(), "smoothed": smoothed.tolist()},
            "convnet": runs, "lines": len(axes[0, 1].get_lines()) if runs else 0}


# ----------------------------------------------------------------------------------------------
# the budget sweep


SWEEP_COLORS = {"synthetic": "tab:red", "random_real": "tab:green"}
SWEEP_SET_NAMES = {"synthetic": "generated, unselected (balanced prefix of all samples)",
                   "random_real": "random real, same count"}


def _accuracy_panel(ax, curve, sets, x_key, xlabel, title, ylim, legend_title):
    """Mean accuracy ± std against ``x_key`` of the curve's rows, one line per set (rows without an
    x value left out). Returns ({set: {"x", "y"}}, the legend)."""
    data = {}
    for s in sets:
        rows = sorted((r for r in curve if r["set"] == s and r.get(x_key) is not None),
                      key=lambda r: r["images_per_class"])
        x = [r[x_key] for r in rows]
        y = [r["mean"] for r in rows]
        ax.errorbar(x, y, yerr=[r["std"] for r in rows], marker="o", capsize=2, color=SWEEP_COLORS.get(s),
                    label=SWEEP_SET_NAMES.get(s, s))
        data[s] = {"x": x, "y": y}
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.set_ylim(*ylim)
    return data, ax.legend(fontsize=7, title=legend_title, title_fontsize=7, loc="upper left")


def _sampling_cost_panel(ax, timeline, fit):
    """Sampling seconds against images generated, per batch, with the least-squares line (none for
    a run sampled in one batch: one point, nothing to fit)."""
    tl = np.asarray(timeline, float)
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
    return {"x": tl[:, 0].tolist(), "y": tl[:, 1].tolist(), "fit": fit}


def fig_sweep(sweep_results, out):
    """Budget sweep figure: (a) accuracy vs images per class, (b) accuracy vs sampling seconds,
    both with the random-real baseline at equal image count; (c) sampling seconds vs images with the
    least-squares line and R² (the linear-cost claim; ``sweep_results["linear_fit"]``, None for one
    batch). (b) and (c) only when ``sweep_results`` has a timeline.

    The generated sets here are balanced prefixes of ALL the samples, with no selection; the
    headline accuracy (summary.json) trains on the selected subset. The legend says so, and says
    what the error bars are: the population std (ddof 0) over the seeds, with their count.
    Returns the plotted data per panel and "legend" (the accuracy panels' legend title and labels)."""
    curve = sweep_results["curve"]
    sets = sorted({r["set"] for r in curve}, key=lambda s: (s != "synthetic", s))
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
    data["accuracy_vs_ipc"], leg = _accuracy_panel(axes[0], curve, sets, "images_per_class", "images per class",
                                                   "accuracy vs images per class", ylim, legend_title)
    data["legend"] = {"title": leg.get_title().get_text(), "labels": [t.get_text() for t in leg.get_texts()]}
    if has_tl:
        data["accuracy_vs_seconds"], _ = _accuracy_panel(
            axes[1], curve, sets, "sampling_seconds", "sampling seconds (time to generate the prefix)",
            "accuracy vs sampling budget", ylim, legend_title)
        data["seconds_vs_images"] = _sampling_cost_panel(axes[2], sweep_results["timeline"],
                                                         sweep_results.get("linear_fit"))
    fig.suptitle("Budget sweep: the generated sets are NOT selected (unlike the headline accuracy, "
                 "which trains on the selected subset)", fontsize=9)
    fig.tight_layout()
    save_fig(fig, out)
    return data


# ----------------------------------------------------------------------------------------------
# the memorisation audit


def _show(ax, img):
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
              vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def fig_audit_distances(spaces, out):
    """Histograms of generated->train against test->train nearest-neighbour distances, one panel per
    space of the audit (``audit.audit``'s "spaces"), the closest test image's distance marked.
    Returns {space: {"bins", "generated", "test"}}."""
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
    save_fig(fig, out)
    return hist_data


def fig_audit_pairs(spaces, gen, train, out):
    """The audit's closest pairs side by side (generated | nearest training image), a column pair per
    space, each pair's distance and flag beside it. ``gen``, ``train``: the uint8 images the indices
    point into. Returns ({space: [(generated_index, train_index, distance)]}, the layout: the blank
    gap under the title in inches, the figure height, header collisions (empty) and header texts)."""
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
    header = [title] + [t for t in fig.texts if t is not title] + [ax.title for ax in axes.flat if ax.get_title()]
    header_boxes = [t.get_window_extent(renderer) for t in header]
    layout = {"title_gap_in": float((title_bottom - axes_top) / fig.dpi), "height_in": height,
              "collisions": overlapping(header_boxes),
              "header": [t.get_text() for t in header]}
    save_fig(fig, out)
    return pairs, layout

