"""Every table the project writes: Table 1 (the diffusion models), Table 2 (FID, sampler, training
time), the results across datasets, one summary per dataset, and the small CSVs ``dvc plots`` reads.

A table is a DataFrame with one column per (key, header) of its ``*_COLUMNS`` list, written as
markdown (headers) and CSV (keys). Each ``table_*`` function takes input paths, writes atomically and
returns its rows (with raw numbers under ``_`` keys for tests and callers). A dataset whose inputs are
missing gets a row of "not run".

Every ± is the population standard deviation (``np.std``, ddof=0) over the evaluation seeds, and the
tables say over how many.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_path, load_json
from .results import EVAL_SETS, NOT_RUN, label, load_if, manifest_counts, read_benchmark_seconds, read_fid

PAPER_FID = {"cifar100": 39.85, "tinyimagenet": 41.51}  # U-ViT, DPM-Solver, 50 steps (paper, Table 2)
# (embed_dim, depth) -> U-ViT size name, as named in the U-ViT paper's configurations.
UVIT_SIZES = {(512, 12): "S", (512, 16): "S-Deep", (768, 16): "M", (1024, 20): "L", (1152, 28): "H"}
SAMPLER_NAMES = {"fast": "DPM-Solver (fast)", "multistep": "DPM-Solver++ (2M)"}


# ----------------------------------------------------------------------------------------------
# writing a table


def table_frame(rows, columns):
    """rows (dicts) -> a DataFrame with one column per key of ``columns`` [(key, header)]; a missing
    cell is "". Object dtype: cells stay the Python values they are (no int -> float on a column
    with a string in it), so both files print them as str() does."""
    keys = [k for k, _ in columns]
    return pd.DataFrame([[row.get(k, "") for k in keys] for row in rows], columns=keys, dtype=object)


def to_markdown(frame, headers):
    """A pipe table with unpadded cells and ``---`` rules; ``|`` in a cell is escaped.

    Not ``DataFrame.to_markdown``: tabulate pads and aligns every cell, which would rewrite every
    committed table."""
    body = [[str(v).replace("|", "\\|") for v in row] for row in frame.itertuples(index=False)]
    lines = [headers, ["---"] * len(headers), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_csv(frame, path):
    """CSV with the frame's column names as header; NaN as "nan" (as the csv module writes it)."""
    write_text(path, frame.to_csv(index=False, lineterminator="\n", na_rep="nan"))


def write_table(rows, columns, out_md, out_csv=None, title=None):
    """``rows`` under ``columns`` [(key, header)] to markdown (with ``title`` above) and CSV."""
    frame = table_frame(rows, columns)
    md = to_markdown(frame, [h for _, h in columns])
    write_text(out_md, f"{title}\n\n{md}" if title else md)
    if out_csv is not None:
        write_csv(frame, out_csv)


# ----------------------------------------------------------------------------------------------
# cells


def hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt(x, digits=4):
    return NOT_RUN if x is None else f"{x:.{digits}f}"


def _pm(block, digits=4):
    if not block:
        return NOT_RUN
    return f"{block['mean']:.{digits}f} ± {block.get('std', 0.0):.{digits}f}"


def _count_range(counts):
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}–{hi}"


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


def _score(summary, kind, key):
    """A DD-Ranking score of summary.json's ``dd_ranking`` block, or "not run" (its runs were not made)."""
    block = (summary.get("dd_ranking") or {}).get(kind)
    return NOT_RUN if block is None else f"{block[key]:.4f}"


DD_RANKING_COLUMNS = [("protocol", "DD-Ranking"), ("synthetic", "synthetic"), ("random_real", "random real"),
                      ("full_real", "full real"), ("hlr", "HLR"), ("ior", "IOR"), ("score", "score")]


def _dd_ranking_table(s):
    """The DD-Ranking rows of a summary: LRS with hard (and soft) labels, ARS from the runs with and
    without augmentation; None when the summary has no scores."""
    scores = s.get("dd_ranking") or {}
    if not scores:
        return None
    mean = lambda block, k: f"{block[k]['mean']:.4f}" if (block or {}).get(k) else ""  # noqa: E731
    rows = []
    for kind, name, block in (("hard_label", "hard labels (the challenge's runs)", s),
                              ("soft_label", "soft labels (reference classifier, T = temperature)",
                               s.get("soft_labels"))):
        if kind in scores:
            sc = scores[kind]
            rows.append({"protocol": name, "synthetic": mean(block, "synthetic"),
                         "random_real": mean(block, "random_real"), "full_real": mean(s, "full_real"),
                         "hlr": f"{sc['hlr']:.4f}", "ior": f"{sc['ior']:+.4f}", "score": f"LRS {sc['lrs']:.4f}"})
    if "augmentation" in scores:
        sc, plain = scores["augmentation"], s.get("no_augmentation")
        rows.append({"protocol": "hard labels, no augmentation", "synthetic": mean(plain, "synthetic"),
                     "random_real": mean(plain, "random_real"), "full_real": "", "hlr": "",
                     "ior": f"{sc['gain_without_augmentation']:+.4f}", "score": f"ARS {sc['ars']:.4f}"})
    return to_markdown(table_frame(rows, DD_RANKING_COLUMNS), [h for _, h in DD_RANKING_COLUMNS])


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
    write_table(rows, TABLE_MODELS_COLUMNS, out_md, out_csv,
                "Table 1. Diffusion models. Layers count every transformer block (in + mid + out); "
                "parameters are counted from the instantiated U-ViT.")
    return rows


# ----------------------------------------------------------------------------------------------
# Table 2: FID, sampler, training time


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
        manifest = load_if(p.get("manifest")) or {}
        sample_cfg = p.get("sample_cfg") or {}
        train = load_if(p.get("train_json")) or {}
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
    write_table(rows, TABLE_FID_COLUMNS, out_md, out_csv,
                "Table 2. FID of the finetuned models (features named: Inception or the reference "
                "ConvNet; the two are not comparable), sampler and steps, and training time: the "
                "wall clock of the train_diffusion job from Snakemake's benchmark file "
                "(benchmarks/{ds}/train_diffusion.tsv), or, where the run wrote none (dvc repro), "
                "the training loop's own clock from train.json; the column \"training time from\" "
                "says which.")
    return rows


# ----------------------------------------------------------------------------------------------
# Results across datasets


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
    k = len(manifest_counts(manifest) or (summary.get("per_class") or {}).get("synthetic") or [])
    if n is None or not k:
        return NOT_RUN
    return str(n // k) if n % k == 0 else f"≈{n / k:.1f}"


def _sampled(manifest):
    counts = manifest_counts(manifest)
    if not counts:
        return NOT_RUN
    return f"{sum(counts)} ({_count_range(counts)} / class)"


TABLE_RESULTS_COLUMNS = [
    ("dataset", "dataset"), ("synthetic", "synthetic acc (mean ± std)"),
    ("random_real", "random real, same count"), ("full_real", "full real"),
    ("gain_over_random", "gain over random"), ("gap_to_full", "gap to full"),
    ("lrs", "LRS (DD-Ranking)"), ("ars", "ARS (DD-Ranking)"),
    ("seeds", "seeds"),
    ("n_synthetic", "synthetic images the ConvNet trained on"), ("images_per_class", "of them per class"),
    ("sampled", "images sampled (per class)"),
    ("sampling_seconds", "sampling time (s)"), ("images_per_second", "images / s"), ("fid", "FID"),
]


def table_results(inputs, out_md, out_csv=None):
    """Results across datasets. ``inputs``: {dataset: {"summary", "manifest", "fid"} paths}."""
    rows = []
    for ds, p in inputs.items():
        summary = load_if(p.get("summary"))
        manifest = load_if(p.get("manifest"))
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
            "lrs": _score(summary, "hard_label", "lrs"), "ars": _score(summary, "augmentation", "ars"),
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
    write_table(rows, TABLE_RESULTS_COLUMNS, out_md, out_csv,
                "Results. ConvNet test accuracy when trained on the generated images only (the selected "
                "set: \"synthetic images the ConvNet trained on\"; \"images sampled\" is what the "
                "diffusion model generated before selection), against a random real subset of the same "
                "size per class and the full real training split (same recipe, same seeds). "
                + std_note(" or ".join(seeds) if seeds else "no"))
    return rows


# ----------------------------------------------------------------------------------------------
# One dataset's summary (the summarize step's table)


SUMMARY_COLUMNS = [("set", "training set"), ("mean", "mean"), ("std", "± (population std over the seeds)"),
                   ("runs", "runs (one per seed)"), ("n", "seeds")]


def _run_accuracy(run):
    """summary.json's runs are per-seed records ({"seed", "accuracy", ...}) or bare accuracies."""
    return run["accuracy"] if isinstance(run, dict) else run


def _per_class_table(per_class):
    """Per-class accuracy: every class when there are at most 20, else min / median / max."""
    k = max(len(v) for v in per_class.values())
    if k <= 20:
        rows = [{"set": name, **{str(i): f"{a:.3f}" for i, a in enumerate(accs)}} for name, accs in per_class.items()]
        columns = [("set", "per-class accuracy")] + [(str(i), str(i)) for i in range(k)]
    else:
        rows = [{"set": name, "min": f"{np.min(a):.3f}", "median": f"{np.median(a):.3f}",
                 "max": f"{np.max(a):.3f}"} for name, a in per_class.items()]
        columns = [("set", "per-class accuracy"), ("min", "min"), ("median", "median"), ("max", "max")]
    return to_markdown(table_frame(rows, columns), [h for _, h in columns])


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
          to_markdown(table_frame(rows, SUMMARY_COLUMNS), [h for _, h in SUMMARY_COLUMNS])]
    gain, gap = _gain_gap(s)
    counts = (s.get("synthetic") or {}).get("per_class_train_counts")
    per = f" ({_count_range(counts)} per class)" if counts else ""
    md.append(f"\n{std_note(n_seeds(s))}\n\nSynthetic images the ConvNet trained on: "
              f"{s.get('n_synthetic', 'unknown')}{per}. "
              f"Gain over random real: {_fmt(gain)}. Gap to full real: {_fmt(gap)}.\n")
    dd = _dd_ranking_table(s)
    if dd:
        md += ["\n", dd, "\nDD-Ranking (accuracies as fractions, λ = 0.5): HLR = full real − synthetic, IOR = "
               "synthetic − random real; LRS = (e^α − e^−1)/(e − e^−1) with α = λ·IOR − (1−λ)·HLR; ARS the same "
               "map of β = λ·IOR(with DSA) + (1−λ)·IOR(without augmentation). Higher is better.\n"]
    per_class = s.get("per_class") or {}
    if per_class:
        md += ["\n", _per_class_table(per_class)]
    write_text(out_md, "".join(md))
    return {"rows": rows, "gain_over_random": gain, "gap_to_full": gap, "per_class": per_class}


# ----------------------------------------------------------------------------------------------
# CSVs for `dvc plots`


def _downsample(n, max_points):
    return np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int)) if n else np.zeros(0, int)


def _plain_number(x):
    """An int when the value is a whole number (steps), else a float: "100", not "100.0"."""
    x = float(x)
    return int(x) if x.is_integer() else x


def write_plot_csv(columns, out, max_points=2000):
    """A small CSV for ``dvc plots`` (downsampled to ``max_points`` rows). ``columns``: {name: array}.
    Returns the rows written, as dicts."""
    n = len(next(iter(columns.values())))
    keep = _downsample(n, max_points)
    frame = pd.DataFrame({name: [_plain_number(values[i]) for i in keep] for name, values in columns.items()},
                         columns=list(columns), dtype=object)
    write_csv(frame, out)
    return frame.to_dict("records")
