"""The report step: every table and figure of the paper, and each dataset's ``dvc metrics`` file,
rebuilt from the pipeline's own output files (``build_report``).

What each table and figure shows lives in ``tables.py`` and ``figures.py``; where the inputs lie and
how they are read, in ``results.py``. A dataset whose inputs are missing (it was not run) shows
"not run" in tables and figures; it never stops the report for the datasets that were run.
"""
import logging
from pathlib import Path

from .figures import LEADERBOARD_DATASETS, class_grid_paths, fig_class_grid, fig_fid_curve, fig_leaderboard, \
    fig_loss_curves
from .io import load_npz, save_json
from .results import EVAL_SETS, dataset_paths, label, load_if, read_csv_columns, read_fid
from .tables import table_fid, table_models, table_results, write_plot_csv

log = logging.getLogger(__name__)


# ``dvc metrics show`` prints ONE table: a row per metrics file, a column per key of any of them. So the
# project has one metrics file per dataset (results/{ds}/metrics.json, dag.METRICS_SUFFIXES) holding
# the same few numeric keys: a row per dataset, columns shared, within 120 terminal columns. Everything
# else (per-seed runs, per-class accuracy, the audit's distances and definitions, the sweep's curve)
# stays in the detailed JSONs beside it, which are plain outputs.
# DD-Ranking's hard-label LRS is one of them; the ARS is not: a ninth column would pass 120 (summary.json
# and the tables carry it).
METRIC_KEYS = ("synthetic_acc", "synthetic_std", "random_real_acc", "full_real_acc", "lrs")


def dataset_metrics(summary, fid_path=None):
    """The numbers ``dvc metrics show`` prints for one dataset: the ConvNet's mean test accuracy on
    the synthetic set (and its population std over seeds), on the two real baselines, DD-Ranking's
    hard-label ``lrs``, and the FID named by its features
    (``fid_inception`` and ``fid_convnet`` are different quantities)."""
    m = {}
    for k in EVAL_SETS:
        if summary.get(k):
            m[f"{k}_acc"] = float(summary[k]["mean"])
    if summary.get("synthetic"):
        m["synthetic_std"] = float(summary["synthetic"].get("std", 0.0))
    hard = (summary.get("dd_ranking") or {}).get("hard_label")   # DD-Ranking's label-robust score
    if hard:
        m["lrs"] = float(hard["lrs"])
    m = {k: m[k] for k in METRIC_KEYS if k in m}
    fid, kind = read_fid(fid_path)
    if fid is not None:
        m[f"fid_{kind.lower()}"] = fid
    return m


def metrics(inputs):
    """{dataset: dataset_metrics} for the datasets that were run (those with a summary.json)."""
    out = {}
    for ds, p in inputs.items():
        summary = load_if(p.get("summary"))
        if summary is not None:
            out[ds] = dataset_metrics(summary, p.get("fid"))
    return out


# ----------------------------------------------------------------------------------------------
# the report step, phase by phase


def _model_datasets(params):
    return [k for k, v in params.items() if isinstance(v, dict) and isinstance(v.get("model"), dict)]


def _skip(skipped, what, reason):
    log.warning("report: skipping %s: %s", what, reason)
    skipped.append((what, reason))


def _tables(params, paths, tables):
    """Table 1, Table 2 and the results table, a row for every dataset in ``paths``."""
    model_cfgs = {ds: params[ds]["model"] for ds in paths if isinstance(params.get(ds, {}).get("model"), dict)}
    table_models(model_cfgs, tables / "models.md", tables / "models.csv")
    fid_inputs = {ds: {**p, "sample_cfg": params.get(ds, {}).get("sample")} for ds, p in paths.items()}
    table_fid(fid_inputs, tables / "fid.md", tables / "fid.csv")
    table_results(paths, tables / "results.md", tables / "results.csv")
    return [tables / f"{name}.{ext}" for name in ("models", "fid", "results") for ext in ("md", "csv")]


def _metrics_files(paths, datasets, out_dir, skipped):
    """results/{ds}/metrics.json of each run dataset (the numbers `dvc metrics show` prints)."""
    built = []
    for ds, m in metrics({ds: paths[ds] for ds in datasets}).items():
        save_json(out_dir / ds / "metrics.json", m)
        built.append(out_dir / ds / "metrics.json")
    for ds in datasets:
        if not paths[ds]["summary"].exists():
            _skip(skipped, f"{ds} metrics", f"{paths[ds]['summary']} missing (dataset not run)")
    return built


def _cross_dataset_figures(params, paths, datasets, figures):
    """Fig. 3 (FID curves of the run datasets) and Fig. 4 (the leaderboard and ours)."""
    kinds = {ds: params[ds].get("fid", {}).get("features") for ds in paths if params.get(ds, {}).get("fid")}
    fig_fid_curve({ds: paths[ds]["fid_curve"] for ds in datasets}, figures / "fid_curve.png",
                  kinds={k: v for k, v in kinds.items() if v})
    fig_leaderboard({ds: paths[ds]["summary"] for ds in paths if ds in LEADERBOARD_DATASETS or ds in datasets},
                    figures / "leaderboard.png")
    return [figures / "fid_curve.png", figures / "leaderboard.png"]


def _dataset_outputs(ds, p, figures, plots, skipped):
    """One run dataset's class grid(s), training curves and `dvc plots` CSVs, each when its input exists."""
    built = []
    if p["samples"].exists():
        s = load_npz(p["samples"])
        outs = class_grid_paths(ds, len(s["classes"]), figures)
        fig_class_grid(s, outs, source=f"synthetic/{ds}/samples.npz")
        built += outs
    else:
        _skip(skipped, f"{ds} class grid", f"{p['samples']} missing (dataset not run)")
    if p["loss"].exists():
        evals = sorted(p["eval_dir"].glob("*.json")) if p["eval_dir"].is_dir() else []
        fig_loss_curves(p["loss"], figures / f"{ds}_loss.png", eval_jsons=evals,
                        title=f"{label(ds)}: U-ViT training loss")
        c = read_csv_columns(p["loss"])
        write_plot_csv({"step": c["step"], "loss": c["loss"]}, plots / f"{ds}_diffusion_loss.csv")
        built += [figures / f"{ds}_loss.png", plots / f"{ds}_diffusion_loss.csv"]
    else:
        _skip(skipped, f"{ds} loss curve", f"{p['loss']} missing (dataset not run)")
    if p["fid_curve"].exists():
        c = read_csv_columns(p["fid_curve"])
        write_plot_csv({"step": c["step"], "fid": c["fid"]}, plots / f"{ds}_fid_curve.csv")
        built.append(plots / f"{ds}_fid_curve.csv")
    else:
        _skip(skipped, f"{ds} FID curve data", f"{p['fid_curve']} missing (dataset not run)")
    return built


def build_report(params, datasets, root=".", out_dir="results"):
    """Build every table and figure whose inputs exist; log and skip the rest.

    Tables 1, 2, the results table and Fig. 4 cover every dataset block of ``params`` (rows and bars
    of datasets that were not run say "not run"). Per-dataset outputs (class grid, loss figure, plot
    CSVs; the summary table is the summarize step's) are built for each of ``datasets`` whose inputs
    exist. Missing inputs of one dataset never stop the others. Returns {"built": [paths], "skipped":
    [(what, reason)]}.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not out_dir.is_absolute():
        out_dir = root / out_dir
    all_ds = _model_datasets(params)
    all_ds += [ds for ds in dict.fromkeys(datasets) if ds not in all_ds]  # run datasets without a block too
    paths = {ds: dataset_paths(ds, root) for ds in all_ds}
    skipped = []
    built = _tables(params, paths, out_dir / "tables")
    built += _metrics_files(paths, datasets, out_dir, skipped)
    built += _cross_dataset_figures(params, paths, datasets, out_dir / "figures")
    for ds in datasets:
        built += _dataset_outputs(ds, paths[ds], out_dir / "figures", out_dir / "plots", skipped)
    return {"built": [str(b) for b in built], "skipped": skipped}
