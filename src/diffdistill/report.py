"""The paper's tables and figures, rebuilt from the pipeline's own output files.

Every function takes explicit input paths (or dicts), writes its output atomically, and returns the
data it tabulated or plotted, so tests can check the content and not only that a file appeared.
A dataset whose inputs are missing (it was not run) shows "not run" in tables and figures; it never
stops the report for the datasets that were run (``build_report``).

Inputs (per dataset ``ds``, relative to the project root; see ``dataset_paths``):
``results/{ds}/summary.json``, ``results/{ds}/eval/*.json``, ``results/{ds}/fid.json``,
``synthetic/{ds}/samples.npz`` + ``manifest.json``, ``checkpoints/{ds}/loss.csv``,
``fid_curve.csv``, ``train.json`` and ``benchmarks/{ds}/train_diffusion.tsv`` (the benchmark file
Snakemake writes for the ``train_diffusion`` rule).

Every ± in a table or figure is the population standard deviation (``np.std``, ddof=0) over the
evaluation seeds, and the tables say over how many.
"""
import csv
import io as _stdio
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_path, load_json, save_json  # noqa: E402

log = logging.getLogger(__name__)

NOT_RUN = "not run"
DATASET_LABELS = {"digits": "Digits", "cifar100": "CIFAR-100", "tinyimagenet": "Tiny-ImageNet"}

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
PAPER_FID = {"cifar100": 39.85, "tinyimagenet": 41.51}  # U-ViT, DPM-Solver, 50 steps (paper, Table 2)

# (embed_dim, depth) -> U-ViT size name, as named in the U-ViT paper's configurations.
UVIT_SIZES = {(512, 12): "S", (512, 16): "S-Deep", (768, 16): "M", (1024, 20): "L", (1152, 28): "H"}
SAMPLER_NAMES = {"fast": "DPM-Solver (fast)", "multistep": "DPM-Solver++ (2M)"}
EVAL_SETS = ("synthetic", "random_real", "full_real")


def label(ds):
    return DATASET_LABELS.get(ds, ds)


def dataset_paths(ds, root="."):
    """Where the pipeline writes each input of the report for dataset ``ds``."""
    root = Path(root)
    return {
        "summary": root / "results" / ds / "summary.json",
        "eval_dir": root / "results" / ds / "eval",
        "fid": root / "results" / ds / "fid.json",
        "samples": root / "synthetic" / ds / "samples.npz",
        "manifest": root / "synthetic" / ds / "manifest.json",
        "loss": root / "checkpoints" / ds / "loss.csv",
        "fid_curve": root / "checkpoints" / ds / "fid_curve.csv",
        "train_json": root / "checkpoints" / ds / "train.json",
        # The file rules/diffusion.smk's `benchmark:` directive names; a different name here would
        # silently fall back to train.json's clock (as it once did).
        "benchmark": root / "benchmarks" / ds / "train_diffusion.tsv",
        "metrics": root / "results" / ds / "metrics.json",
    }


# ----------------------------------------------------------------------------------------------
# small readers and writers


def _load_if(path):
    """JSON at ``path`` or None when the file does not exist (the dataset was not run)."""
    return load_json(path) if path is not None and Path(path).exists() else None


def read_csv_columns(path):
    """A CSV with a header -> {column: float array}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        return {k: np.zeros(0) for k in header}
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def read_benchmark_seconds(path):
    """Wall-clock seconds of a job from Snakemake's ``benchmark:`` TSV (column ``s``; the mean when
    the rule was benchmarked with ``repeat()``)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "s" not in rows[0]:
        raise ValueError(f"{path}: not a Snakemake benchmark file (needs a header with an 's' column "
                         f"and one row per run); rerun the training rule with its benchmark: directive")
    return float(np.mean([float(r["s"]) for r in rows]))


def hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header). Cells are rendered with str()."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(str(r.get(k, "")).replace("|", "\\|") for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def _write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _write_csv(path, rows, columns):
    buf = _stdio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([k for k, _ in columns])
    for r in rows:
        w.writerow([r.get(k, "") for k, _ in columns])
    _write_text(path, buf.getvalue())


def _write_tables(rows, columns, out_md, out_csv, title=None):
    md = markdown_table(rows, columns)
    if title:
        md = f"{title}\n\n{md}"
    _write_text(out_md, md)
    if out_csv is not None:
        _write_csv(out_csv, rows, columns)


def _save_fig(fig, out):
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


def _fmt(x, digits=4):
    return NOT_RUN if x is None else f"{x:.{digits}f}"


def _pm(block, digits=4):
    if not block:
        return NOT_RUN
    return f"{block['mean']:.{digits}f} ± {block.get('std', 0.0):.{digits}f}"


# ----------------------------------------------------------------------------------------------
# Table 1: the diffusion models


def count_model_parameters(model_cfg):
    """Parameters of ``UViT(**model_cfg)``, instantiated on the meta device (no memory, no init)."""
    import torch

    from .uvit import UViT, count_parameters

    # The initial values do not change the count. nn.Embedding's normal_ on a meta tensor goes
    # through torch's Python reference ops, whose first use imports the compiler stack (seconds);
    # a no-op normal_ for the duration of the construction avoids that.
    normal_ = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            model = UViT(**model_cfg)
    finally:
        torch.nn.init.normal_ = normal_
    return count_parameters(model)


def model_name(model_cfg):
    size = UVIT_SIZES.get((model_cfg["embed_dim"], model_cfg["depth"]), f"D{model_cfg['embed_dim']}")
    return f"U-ViT-{size}/{model_cfg['patch_size']}"


TABLE_MODELS_COLUMNS = [
    ("dataset", "dataset"), ("model", "model"), ("layers", "layers (depth + 1 mid block)"),
    ("depth", "depth (config)"), ("hidden_size", "hidden size"), ("mlp_size", "MLP size"),
    ("heads", "heads"), ("patch_size", "patch"), ("num_classes", "classes"),
    ("parameters", "parameters"), ("parameters_m", "parameters (M)"),
]


def table_models(model_cfgs, out_md, out_csv=None):
    """Table 1. ``model_cfgs``: {dataset: U-ViT constructor args (params[ds]["model"])}.

    ``layers`` counts transformer blocks as the paper does: depth//2 in-blocks + 1 mid block +
    depth//2 out-blocks = depth + 1 (13 for U-ViT-S/2); ``depth`` is the config value (12).
    Parameters are counted from the instantiated model, never typed in.
    """
    rows = []
    for ds, cfg in model_cfgs.items():
        n = count_model_parameters(cfg)
        rows.append({
            "dataset": label(ds), "model": model_name(cfg),
            "layers": 2 * (cfg["depth"] // 2) + 1, "depth": cfg["depth"],
            "hidden_size": cfg["embed_dim"], "mlp_size": int(cfg["embed_dim"] * cfg.get("mlp_ratio", 4.0)),
            "heads": cfg["num_heads"], "patch_size": cfg["patch_size"], "num_classes": cfg.get("num_classes", -1),
            "parameters": n, "parameters_m": f"{n / 1e6:.1f}",
        })
    _write_tables(rows, TABLE_MODELS_COLUMNS, out_md, out_csv,
                  "Table 1. Diffusion models. Layers count every transformer block (in + mid + out); "
                  "parameters are counted from the instantiated U-ViT.")
    return rows


# ----------------------------------------------------------------------------------------------
# Table 2: FID, sampler, training time


def read_fid(path):
    """fid.json -> (value, kind) with kind 'Inception' or 'ConvNet'; (None, None) when missing."""
    d = _load_if(path)
    if d is None:
        return None, None
    for key, kind in (("fid_inception", "Inception"), ("fid_convnet", "ConvNet")):
        if key in d:
            return float(d[key]), kind
    raise ValueError(f"{path}: has neither 'fid_inception' nor 'fid_convnet'; rerun the fid step")


TABLE_FID_COLUMNS = [
    ("dataset", "dataset"), ("fid", "FID"), ("fid_features", "FID features"), ("paper_fid", "paper FID"),
    ("sampler", "sampler"), ("steps", "steps"), ("train_steps", "training steps"),
    ("train_seconds", "training time (s)"), ("train_hms", "training time (h:m:s)"),
    ("train_time_source", "training time from"), ("device", "device"),
]
TRAIN_TIME_BENCHMARK = "Snakemake benchmark"
TRAIN_TIME_TRAIN_JSON = "train.json"


def table_fid(inputs, out_md, out_csv=None):
    """Table 2. ``inputs``: {dataset: {"fid": fid.json, "benchmark": train_diffusion.tsv, "manifest":
    manifest.json, "train_json": train.json, "sample_cfg": params[ds]["sample"] (fallback for the
    sampler when no manifest exists)}}; any path may be missing. Training time is the train_diffusion
    rule's Snakemake benchmark (wall clock of the whole job); where no benchmark file exists (a run
    through `dvc repro`, which writes none) it is train.json's own wall clock of the training loop.
    The column "training time from" says which, per row."""
    rows = []
    for ds, p in inputs.items():
        fid, kind = read_fid(p.get("fid"))
        manifest = _load_if(p.get("manifest")) or {}
        sample_cfg = p.get("sample_cfg") or {}
        train = _load_if(p.get("train_json")) or {}
        bench = p.get("benchmark")
        if bench is not None and Path(bench).exists():
            secs, source = read_benchmark_seconds(bench), TRAIN_TIME_BENCHMARK
        else:
            secs = train.get("seconds")
            source = TRAIN_TIME_TRAIN_JSON if secs is not None else NOT_RUN
        variant = manifest.get("variant", sample_cfg.get("variant"))
        steps = manifest.get("steps", sample_cfg.get("steps"))
        rows.append({
            "dataset": label(ds), "fid": _fmt(fid, 2), "fid_features": kind or NOT_RUN,
            "paper_fid": PAPER_FID.get(ds, "—"),
            "sampler": SAMPLER_NAMES.get(variant, variant) if variant else "—",
            "steps": steps if steps is not None else "—",
            "train_steps": train.get("steps", NOT_RUN),
            "train_seconds": NOT_RUN if secs is None else round(secs, 1),
            "train_hms": NOT_RUN if secs is None else hms(secs),
            "train_time_source": source,
            "device": train.get("device", manifest.get("device", NOT_RUN)),
            # raw numbers for tests and callers
            "_fid": fid, "_train_seconds": secs,
        })
    _write_tables(rows, TABLE_FID_COLUMNS, out_md, out_csv,
                  "Table 2. FID of the finetuned models (features named: Inception or the reference "
                  "ConvNet; the two are not comparable), sampler and steps, and training time: the "
                  "wall clock of the train_diffusion job from Snakemake's benchmark file "
                  "(benchmarks/{ds}/train_diffusion.tsv), or, where the run wrote none (dvc repro), "
                  "the training loop's own clock from train.json; the column \"training time from\" "
                  "says which.")
    return rows


# ----------------------------------------------------------------------------------------------
# Results across datasets; one summary table per dataset


def _count_range(counts):
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _manifest_counts(manifest):
    per_class = (manifest or {}).get("per_class")
    if not per_class:
        return None
    return list(per_class.values()) if isinstance(per_class, dict) else list(per_class)


def _trained_per_class(summary, manifest):
    """Images per class the ConvNet trained on (the selected set S), not what was sampled.

    summary.json records the synthetic runs' per-class training counts (``per_class_train_counts``);
    an older summary without them gives n_synthetic / K, K from the manifest's or the per-class
    accuracies' class count ("≈" marks that it is an average)."""
    block = summary.get("synthetic") or {}
    counts = block.get("per_class_train_counts")
    if counts:
        return _count_range(counts)
    n = summary.get("n_synthetic")
    k = len(_manifest_counts(manifest) or (summary.get("per_class") or {}).get("synthetic") or [])
    if n is None or not k:
        return NOT_RUN
    return str(n // k) if n % k == 0 else f"≈{n / k:.1f}"


def _sampled(manifest):
    counts = _manifest_counts(manifest)
    if not counts:
        return NOT_RUN
    return f"{sum(counts)} ({_count_range(counts)} / class)"


def n_seeds(summary):
    """Seeds per evaluated set: one int when every set has the same count, else {set: count}."""
    counts = {k: len(summary[k].get("runs", [])) for k in EVAL_SETS if summary.get(k)}
    values = set(counts.values())
    return values.pop() if len(values) == 1 else counts


def _seeds_cell(seeds):
    return str(seeds) if isinstance(seeds, int) else ", ".join(f"{k}: {n}" for k, n in seeds.items())


def std_note(seeds):
    """The sentence every table prints under ±."""
    if isinstance(seeds, dict):
        seeds = ", ".join(f"{n} for {k}" for k, n in seeds.items())
    return f"± is the population standard deviation (ddof = 0) over the seeds ({seeds} seeds)."


def _gain_gap(summary):
    syn, rnd, full = (summary.get(k) for k in EVAL_SETS)
    gain = summary.get("gain_over_random")
    gap = summary.get("gap_to_full")
    if gain is None and syn and rnd:
        gain = syn["mean"] - rnd["mean"]
    if gap is None and syn and full:
        gap = full["mean"] - syn["mean"]
    return gain, gap


TABLE_RESULTS_COLUMNS = [
    ("dataset", "dataset"), ("synthetic", "synthetic acc (mean ± std)"),
    ("random_real", "random real, same count"), ("full_real", "full real"),
    ("gain_over_random", "gain over random"), ("gap_to_full", "gap to full"),
    ("seeds", "seeds"),
    ("n_synthetic", "synthetic images the ConvNet trained on"), ("images_per_class", "of them per class"),
    ("sampled", "images sampled (per class)"),
    ("sampling_seconds", "sampling time (s)"), ("images_per_second", "images / s"), ("fid", "FID"),
]


def table_results(inputs, out_md, out_csv=None):
    """Results across datasets. ``inputs``: {dataset: {"summary", "manifest", "fid"} paths}."""
    rows = []
    for ds, p in inputs.items():
        summary = _load_if(p.get("summary"))
        manifest = _load_if(p.get("manifest"))
        fid, kind = read_fid(p.get("fid"))
        if summary is None:
            row = {k: NOT_RUN for k, _ in TABLE_RESULTS_COLUMNS}
            row.update(dataset=label(ds), _synthetic_mean=None)
            rows.append(row)
            continue
        gain, gap = _gain_gap(summary)
        rows.append({
            "dataset": label(ds),
            "synthetic": _pm(summary.get("synthetic")), "random_real": _pm(summary.get("random_real")),
            "full_real": _pm(summary.get("full_real")),
            "gain_over_random": NOT_RUN if gain is None else f"{gain:+.4f}",
            "gap_to_full": NOT_RUN if gap is None else f"{gap:+.4f}",
            "seeds": _seeds_cell(n_seeds(summary)),
            # What the ConvNet trained on (the selected set), never the sampled count: selection keeps
            # a subset, and the sampled count is its own column.
            "n_synthetic": summary.get("n_synthetic", NOT_RUN),
            "images_per_class": _trained_per_class(summary, manifest),
            "sampled": _sampled(manifest),
            "sampling_seconds": NOT_RUN if not manifest else round(float(manifest["seconds"]), 1),
            "images_per_second": NOT_RUN if not manifest else round(float(manifest["images_per_second"]), 1),
            "fid": NOT_RUN if fid is None else f"{fid:.2f} ({kind})",
            "_synthetic_mean": (summary.get("synthetic") or {}).get("mean"),
        })
    seeds = sorted({r["seeds"] for r in rows if r["seeds"] != NOT_RUN}, key=str)
    _write_tables(rows, TABLE_RESULTS_COLUMNS, out_md, out_csv,
                  "Results. ConvNet test accuracy when trained on the generated images only (the selected "
                  "set: \"synthetic images the ConvNet trained on\"; \"images sampled\" is what the "
                  "diffusion model generated before selection), against a random real subset of the same "
                  "size per class and the full real training split (same recipe, same seeds). "
                  + std_note(" or ".join(seeds) if seeds else "no"))
    return rows


def _run_accuracy(run):
    """summary.json's runs are per-seed records ({"seed", "accuracy", ...}) or bare accuracies."""
    return run["accuracy"] if isinstance(run, dict) else run


def table_summary(summary_json, out_md, dataset=None):
    """One dataset's markdown table from its summary.json: every evaluated set with mean, std and the
    per-seed runs, gain/gap, and per-class accuracy (all classes up to 20, else min/median/max)."""
    s = load_json(summary_json)
    ds = label(dataset) if dataset else Path(summary_json).parent.name
    rows = []
    for key in EVAL_SETS:
        b = s.get(key)
        if b is None:
            continue
        rows.append({"set": key, "mean": f"{b['mean']:.4f}", "std": f"± {b.get('std', 0.0):.4f}",
                     "runs": ", ".join(f"{_run_accuracy(r):.4f}" for r in b.get("runs", [])),
                     "n": len(b.get("runs", []))})
    md = [f"# {ds}: ConvNet test accuracy\n\n",
          markdown_table(rows, [("set", "training set"), ("mean", "mean"),
                                ("std", "± (population std over the seeds)"),
                                ("runs", "runs (one per seed)"), ("n", "seeds")])]
    gain, gap = _gain_gap(s)
    counts = (s.get("synthetic") or {}).get("per_class_train_counts")
    per = f" ({_count_range(counts)} per class)" if counts else ""
    md.append(f"\n{std_note(n_seeds(s))}\n\nSynthetic images the ConvNet trained on: "
              f"{s.get('n_synthetic', 'unknown')}{per}. "
              f"Gain over random real: {_fmt(gain)}. Gap to full real: {_fmt(gap)}.\n")
    per_class = s.get("per_class") or {}
    if per_class:
        k = max(len(v) for v in per_class.values())
        if k <= 20:
            pc_rows = [{"set": name, **{str(i): f"{a:.3f}" for i, a in enumerate(accs)}} for name, accs in per_class.items()]
            cols = [("set", "per-class accuracy")] + [(str(i), str(i)) for i in range(k)]
        else:
            pc_rows = [{"set": name, "min": f"{np.min(a):.3f}", "median": f"{np.median(a):.3f}",
                        "max": f"{np.max(a):.3f}"} for name, a in per_class.items()]
            cols = [("set", "per-class accuracy"), ("min", "min"), ("median", "median"), ("max", "max")]
        md += ["\n", markdown_table(pc_rows, cols)]
    _write_text(out_md, "".join(md))
    return {"rows": rows, "gain_over_random": gain, "gap_to_full": gap, "per_class": per_class}


# ``dvc metrics show`` prints ONE table: a row per metrics file, a column per key of any of them. So the
# project has one metrics file per dataset (results/{ds}/metrics.json, dag.METRICS_SUFFIXES) holding
# the same few numeric keys: a row per dataset, columns shared, within 120 terminal columns. Everything
# else (per-seed runs, per-class accuracy, the audit's distances and definitions, the sweep's curve)
# stays in the detailed JSONs beside it, which are plain outputs.
METRIC_KEYS = ("synthetic_acc", "synthetic_std", "random_real_acc", "full_real_acc")


def dataset_metrics(summary, fid_path=None):
    """The numbers ``dvc metrics show`` prints for one dataset: the ConvNet's mean test accuracy on
    the synthetic set (and its population std over seeds), on the two real baselines, and the FID
    named by its features (``fid_inception`` and ``fid_convnet`` are different quantities)."""
    m = {}
    for k in EVAL_SETS:
        if summary.get(k):
            m[f"{k}_acc"] = float(summary[k]["mean"])
    if summary.get("synthetic"):
        m["synthetic_std"] = float(summary["synthetic"].get("std", 0.0))
    m = {k: m[k] for k in METRIC_KEYS if k in m}
    fid, kind = read_fid(fid_path)
    if fid is not None:
        m[f"fid_{kind.lower()}"] = fid
    return m


def metrics(inputs):
    """{dataset: dataset_metrics} for the datasets that were run (those with a summary.json)."""
    out = {}
    for ds, p in inputs.items():
        summary = _load_if(p.get("summary"))
        if summary is not None:
            out[ds] = dataset_metrics(summary, p.get("fid"))
    return out


# ----------------------------------------------------------------------------------------------
# Figures


FID_KIND_NAMES = {"inception": "Inception", "convnet": "ConvNet"}


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
    _save_fig(fig, out)
    return {"curves": data, "ylabel": ylabel} if return_axes else data


def _summary_block(source):
    """A summary.json path or dict -> its 'synthetic' block, or None when not run."""
    if source is None:
        return None
    s = source if isinstance(source, dict) else _load_if(source)
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
    _save_fig(fig, out)
    return {"groups": groups, "panels": {"challenge": challenge, "other": other}, "bars": bars,
            "not_run": not_run, "labels": labels, "collisions": collisions}


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
                         f"{len(out_paths)}; build them with report.class_grid_paths()")
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
        _save_fig(fig, out)
        grids.append({"path": str(out), "classes": [classes[k] for k in ks], "indices": indices,
                      "shape": (nrow, ncol), "fontsizes": fontsizes, "subtitle": subtitle,
                      "collisions": collisions})
    return grids


def _downsample(n, max_points):
    return np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int)) if n else np.zeros(0, int)


def fig_loss_curves(loss_csv, out, eval_jsons=(), title=None):
    """Training curves of one dataset: the diffusion loss (raw and a moving average, log scale) from
    ``loss.csv``; with ``eval_jsons``, a second panel of the ConvNet's per-epoch loss for EVERY
    evaluation run: one colour per set, one line style per seed. Returns {"diffusion": {"step",
    "loss", "smoothed"}, "convnet": {"{set}_seed{s}": [...]}, "lines": number of ConvNet lines drawn}."""
    c = read_csv_columns(loss_csv)
    step, loss = c["step"], c["loss"]
    win = max(1, len(loss) // 50)
    smoothed = np.convolve(loss, np.ones(win) / win, mode="valid") if len(loss) else loss
    runs, seeds_of = {}, {}
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
    _save_fig(fig, out)
    return {"diffusion": {"step": step.tolist(), "loss": loss.tolist(), "smoothed": smoothed.tolist()},
            "convnet": runs, "lines": len(axes[0, 1].get_lines()) if runs else 0}


def write_plot_csv(columns, out, max_points=2000):
    """A small CSV for ``dvc plots`` (downsampled to ``max_points`` rows). ``columns``: {name: array}."""
    names = list(columns)
    n = len(columns[names[0]])
    keep = _downsample(n, max_points)
    rows = [{k: (float(columns[k][i]) if not float(columns[k][i]).is_integer() else int(columns[k][i]))
             for k in names} for i in keep]
    _write_csv(out, rows, [(k, k) for k in names])
    return rows


# ----------------------------------------------------------------------------------------------
# Everything at once


def _model_datasets(params):
    return [k for k, v in params.items() if isinstance(v, dict) and isinstance(v.get("model"), dict)]


def build_report(params, datasets, root=".", out_dir="results"):
    """Build every table and figure whose inputs exist; log and skip the rest.

    Tables 1, 2, the results table and Fig. 4 cover every dataset block of ``params`` (rows and bars
    of datasets that were not run say "not run"). Per-dataset outputs (class grid, loss figure, plot
    CSVs; the summary table is the summarize step's) are built for each of ``datasets`` whose inputs exist. Missing inputs
    of one dataset never stop the others. Returns {"built": [paths], "skipped": [(what, reason)]}.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not out_dir.is_absolute():
        out_dir = root / out_dir
    tables, figures, plots = out_dir / "tables", out_dir / "figures", out_dir / "plots"
    built, skipped = [], []

    def skip(what, reason):
        log.warning("report: skipping %s: %s", what, reason)
        skipped.append((what, reason))

    all_ds = _model_datasets(params)
    for ds in datasets:
        if ds not in all_ds:
            all_ds.append(ds)
    paths = {ds: dataset_paths(ds, root) for ds in all_ds}

    model_cfgs = {ds: params[ds]["model"] for ds in all_ds if isinstance(params.get(ds, {}).get("model"), dict)}
    table_models(model_cfgs, tables / "models.md", tables / "models.csv")
    built += [tables / "models.md", tables / "models.csv"]

    fid_inputs = {ds: {**paths[ds], "sample_cfg": params.get(ds, {}).get("sample")} for ds in all_ds}
    table_fid(fid_inputs, tables / "fid.md", tables / "fid.csv")
    table_results(paths, tables / "results.md", tables / "results.csv")
    built += [tables / "fid.md", tables / "fid.csv", tables / "results.md", tables / "results.csv"]

    for ds, m in metrics({ds: paths[ds] for ds in datasets}).items():
        save_json(out_dir / ds / "metrics.json", m)
        built.append(out_dir / ds / "metrics.json")
    for ds in datasets:
        if not paths[ds]["summary"].exists():
            skip(f"{ds} metrics", f"{paths[ds]['summary']} missing (dataset not run)")

    kinds = {ds: params[ds].get("fid", {}).get("features") for ds in all_ds if params.get(ds, {}).get("fid")}
    fig_fid_curve({ds: paths[ds]["fid_curve"] for ds in datasets}, figures / "fid_curve.png",
                  kinds={k: v for k, v in kinds.items() if v})
    built.append(figures / "fid_curve.png")

    fig_leaderboard({ds: paths[ds]["summary"] for ds in all_ds if ds in LEADERBOARD_DATASETS or ds in datasets},
                    figures / "leaderboard.png")
    built.append(figures / "leaderboard.png")

    for ds in datasets:
        p = paths[ds]
        if p["samples"].exists():
            from .io import load_npz

            s = load_npz(p["samples"])
            outs = class_grid_paths(ds, len(s["classes"]), figures)
            fig_class_grid(s, outs, source=f"synthetic/{ds}/samples.npz")
            built += outs
        else:
            skip(f"{ds} class grid", f"{p['samples']} missing (dataset not run)")
        if p["loss"].exists():
            evals = sorted(p["eval_dir"].glob("*.json")) if p["eval_dir"].is_dir() else []
            fig_loss_curves(p["loss"], figures / f"{ds}_loss.png", eval_jsons=evals,
                            title=f"{label(ds)}: U-ViT training loss")
            c = read_csv_columns(p["loss"])
            write_plot_csv({"step": c["step"], "loss": c["loss"]}, plots / f"{ds}_diffusion_loss.csv")
            built += [figures / f"{ds}_loss.png", plots / f"{ds}_diffusion_loss.csv"]
        else:
            skip(f"{ds} loss curve", f"{p['loss']} missing (dataset not run)")
        if p["fid_curve"].exists():
            c = read_csv_columns(p["fid_curve"])
            write_plot_csv({"step": c["step"], "fid": c["fid"]}, plots / f"{ds}_fid_curve.csv")
            built.append(plots / f"{ds}_fid_curve.csv")
        else:
            skip(f"{ds} FID curve data", f"{p['fid_curve']} missing (dataset not run)")
    return {"built": [str(b) for b in built], "skipped": skipped}
