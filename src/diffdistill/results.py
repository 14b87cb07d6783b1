"""The pipeline's result files, as the report reads them: where each lies for a dataset, and readers
that give None for a dataset that was not run (so a table says "not run" and never stops).

Inputs (per dataset ``ds``, relative to the project root; see ``dataset_paths``):
``results/{ds}/summary.json``, ``results/{ds}/eval/*.json``, ``results/{ds}/fid.json``,
``synthetic/{ds}/samples.npz`` + ``manifest.json``, ``checkpoints/{ds}/loss.csv``,
``fid_curve.csv``, ``train.json`` and ``benchmarks/{ds}/train_diffusion.tsv`` (the benchmark file
Snakemake writes for the ``train_diffusion`` rule).
"""
from pathlib import Path

import numpy as np
import pandas as pd

from .io import load_json

NOT_RUN = "not run"
EVAL_SETS = ("synthetic", "random_real", "full_real")
DATASET_LABELS = {"digits": "Digits", "cifar100": "CIFAR-100", "tinyimagenet": "Tiny-ImageNet"}


def label(ds):
    """How tables and figures name a dataset."""
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


def load_if(path):
    """JSON at ``path`` or None when the file does not exist (the dataset was not run)."""
    return load_json(path) if path is not None and Path(path).exists() else None


def read_csv_columns(path):
    """A CSV with a header -> {column: float array}."""
    frame = pd.read_csv(path)
    return {k: frame[k].to_numpy(dtype=float) for k in frame.columns}


def read_benchmark_seconds(path):
    """Wall-clock seconds of a job from Snakemake's ``benchmark:`` TSV (column ``s``; the mean when
    the rule was benchmarked with ``repeat()``)."""
    try:
        frame = pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    if frame.empty or "s" not in frame:
        raise ValueError(f"{path}: not a Snakemake benchmark file (needs a header with an 's' column "
                         f"and one row per run); rerun the training rule with its benchmark: directive")
    return float(np.mean(frame["s"].to_numpy(dtype=float)))


def read_fid(path):
    """fid.json -> (value, kind) with kind 'Inception' or 'ConvNet'; (None, None) when missing."""
    d = load_if(path)
    if d is None:
        return None, None
    for key, kind in (("fid_inception", "Inception"), ("fid_convnet", "ConvNet")):
        if key in d:
            return float(d[key]), kind
    raise ValueError(f"{path}: has neither 'fid_inception' nor 'fid_convnet'; rerun the fid step")


def manifest_counts(manifest):
    """Images sampled per class, from a manifest's ``per_class`` (dict or list); None when absent."""
    per_class = (manifest or {}).get("per_class")
    if not per_class:
        return None
    return list(per_class.values()) if isinstance(per_class, dict) else list(per_class)
