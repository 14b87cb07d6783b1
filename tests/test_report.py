"""report.py, tables.py, figures.py, results.py: every table and figure built from made inputs, content
checked."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml

from diffdistill import figures, report, results, tables
from diffdistill.io import save_json, save_npz

ROOT = Path(__file__).resolve().parents[1]

S2_100 = dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
              qkv_bias=False, mlp_time_embed=False, num_classes=100, conv=True, skip=True)
M4_200 = dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
              qkv_bias=False, mlp_time_embed=False, num_classes=200, conv=True, skip=True)
TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
            qkv_bias=False, mlp_time_embed=False, num_classes=10, conv=True, skip=True)


def _summary(syn=0.9, rnd=0.8, full=0.97, k=10):
    return {"synthetic": {"mean": syn, "std": 0.01, "runs": [syn - 0.01, syn, syn + 0.01]},
            "full_real": {"mean": full, "std": 0.0, "runs": [full] * 3},
            "random_real": {"mean": rnd, "std": 0.02, "runs": [rnd - 0.02, rnd, rnd + 0.02]},
            "n_synthetic": 10 * k, "gain_over_random": syn - rnd, "gap_to_full": full - syn,
            "per_class": {"synthetic": [0.5 + i / 40 for i in range(k)]}}


def _image_set(k, n_per_class, hw=8, c=1, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class).astype(np.int64)
    return {"images": rng.integers(0, 256, (len(labels), hw, hw, c), dtype=np.uint8), "labels": labels,
            "classes": np.array([f"class{i}" for i in range(k)])}


def make_run(root, ds, k=10, steps=(0, 100, 200), fid=12.5, fid_key="fid_convnet", seconds=61.25):
    """Write every file the pipeline produces for one dataset."""
    p = results.dataset_paths(ds, root)
    save_json(p["summary"], _summary(k=k))
    # as the evaluate step writes them: "name" is the set, the same for every seed
    for s in range(3):
        save_json(p["eval_dir"] / f"synthetic_seed{s}.json",
                  {"accuracy": 0.9, "per_class_accuracy": [0.9] * k, "n_train": 10 * k,
                   "loss_curve": [2.0, 1.0, 0.5 + s / 10], "seed": s, "name": "synthetic"})
    save_json(p["fid"], {fid_key: fid, "n_samples": 100})
    save_npz(p["samples"], **_image_set(k, 2))
    save_json(p["manifest"], {"count": 2 * k, "per_class": {str(i): 2 for i in range(k)}, "seconds": 4.0,
                              "images_per_second": 5.0 * k, "device": "cpu", "variant": "fast", "steps": 50,
                              "seed": 0, "budget_seconds": 5, "overrun_seconds": 0.0, "batch_size": k,
                              "timeline": [[k, 2.0], [2 * k, 4.0]]})
    p["loss"].parent.mkdir(parents=True, exist_ok=True)
    p["loss"].write_text("step,loss,lr\n" + "".join(f"{i},{1.0 / (i + 1)},{2e-4}\n" for i in range(1, 101)))
    p["fid_curve"].write_text("step,fid\n" + "".join(f"{s},{100.0 / (i + 1)}\n" for i, s in enumerate(steps)))
    save_json(p["train_json"], {"steps": 200, "seconds": 50.0, "images_per_second": 10.0, "final_loss": 0.01,
                                "device": "cpu", "precision": "fp32"})
    p["benchmark"].parent.mkdir(parents=True, exist_ok=True)
    p["benchmark"].write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                              f"{seconds}\t0:01:01\t500.1\t900.2\tNA\tNA\t0.1\t0.2\t95.0\t58.0\n")
    return p


def test_table_models_counts_parameters_from_instantiated_models(tmp_path):
    rows = tables.table_models({"cifar100": S2_100, "tinyimagenet": M4_200}, tmp_path / "m.md", tmp_path / "m.csv")
    cif, tin = rows
    assert cif["parameters"] == 44_307_040
    assert cif["model"] == "U-ViT-S/2" and tin["model"] == "U-ViT-M/4"
    assert (cif["layers"], cif["depth"], cif["hidden_size"], cif["mlp_size"], cif["heads"]) == (13, 12, 512, 2048, 8)
    assert (tin["layers"], tin["hidden_size"], tin["mlp_size"], tin["heads"]) == (17, 768, 3072, 12)
    assert 125e6 < tin["parameters"] < 135e6  # the paper's 131M
    md = (tmp_path / "m.md").read_text()
    assert "44307040" in md and "depth + 1" in md
    with open(tmp_path / "m.csv") as f:
        assert [r["parameters"] for r in csv.DictReader(f)] == ["44307040", str(tin["parameters"])]


def test_table_fid_reads_fid_sampler_and_benchmark(tmp_path):
    p = make_run(tmp_path, "digits", fid=12.5, seconds=61.25)
    rows = tables.table_fid({"digits": p, "cifar100": results.dataset_paths("cifar100", tmp_path)},
                            tmp_path / "fid.md", tmp_path / "fid.csv")
    d, c = rows
    assert d["_fid"] == 12.5 and d["fid_features"] == "ConvNet"
    assert d["sampler"] == "DPM-Solver (fast)" and d["steps"] == 50
    assert d["_train_seconds"] == pytest.approx(61.25) and d["train_hms"] == "0:01:01"
    assert d["train_time_source"] == tables.TRAIN_TIME_BENCHMARK
    assert c["fid"] == "not run" and c["train_seconds"] == "not run" and c["paper_fid"] == 39.85
    assert "12.50" in (tmp_path / "fid.md").read_text()


def test_table_fid_reads_the_benchmark_the_training_rule_writes(tmp_path):
    """The path the report reads is the one rules/diffusion.smk's benchmark: directive names; without
    it (dvc repro) the time is train.json's, and the table says so."""
    smk = (ROOT / "rules" / "diffusion.smk").read_text()
    bench = results.dataset_paths("{ds}", ".")["benchmark"].as_posix()
    assert f'"{bench}"' in smk
    p = make_run(tmp_path, "digits", seconds=61.25)
    p["benchmark"].unlink()
    (row,) = tables.table_fid({"digits": p}, tmp_path / "fid.md")
    assert row["_train_seconds"] == 50.0 and row["train_time_source"] == tables.TRAIN_TIME_TRAIN_JSON
    assert "| train.json | cpu |" in (tmp_path / "fid.md").read_text()


def test_benchmark_mean_over_repeats_and_bad_file(tmp_path):
    b = tmp_path / "b.tsv"
    b.write_text("s\th:m:s\tmax_rss\n10.0\t0:00:10\t1\n20.0\t0:00:20\t1\n")
    assert results.read_benchmark_seconds(b) == 15.0
    b.write_text("time\n3\n")
    with pytest.raises(ValueError, match="benchmark"):
        results.read_benchmark_seconds(b)


def test_table_results_and_summary(tmp_path):
    p = make_run(tmp_path, "digits")
    rows = tables.table_results({"digits": p, "cifar100": results.dataset_paths("cifar100", tmp_path)},
                                tmp_path / "r.md", tmp_path / "r.csv")
    d, c = rows
    assert d["synthetic"] == "0.9000 ± 0.0100" and d["random_real"] == "0.8000 ± 0.0200"
    assert d["gain_over_random"] == "+0.1000" and d["gap_to_full"] == "+0.0700"
    # what the ConvNet trained on (n_synthetic = 100 over 10 classes), not the 2 per class sampled
    # (this assertion was "2": the sampled count, the bug of issue 14)
    assert d["n_synthetic"] == 100 and d["images_per_class"] == "10" and d["sampled"] == "20 (2 / class)"
    assert d["seeds"] == "3"
    assert d["sampling_seconds"] == 4.0 and d["fid"] == "12.50 (ConvNet)"
    md = (tmp_path / "r.md").read_text()
    assert "population standard deviation" in md and "(3 seeds)" in md
    assert c["synthetic"] == "not run" and c["fid"] == "not run"
    out = tables.table_summary(p["summary"], tmp_path / "s.md", dataset="digits")
    assert [r["set"] for r in out["rows"]] == ["synthetic", "random_real", "full_real"]
    text = (tmp_path / "s.md").read_text()
    assert "0.8900, 0.9000, 0.9100" in text and "per-class accuracy" in text
    assert "population standard deviation (ddof = 0) over the seeds (3 seeds)" in text


def test_images_per_class_from_recorded_training_counts(tmp_path):
    p = make_run(tmp_path, "digits")
    s = json.loads(p["summary"].read_text())
    s["synthetic"]["per_class_train_counts"] = [9] * 5 + [11] * 5
    save_json(p["summary"], s)
    (row,) = tables.table_results({"digits": p}, tmp_path / "r.md")
    assert row["images_per_class"] == "9–11"


def test_fig_fid_curve_one_line_per_dataset(tmp_path):
    a = make_run(tmp_path, "digits", steps=(0, 50, 100, 150))
    b = make_run(tmp_path, "cifar100", k=3, steps=(500, 1000))
    data = figures.fig_fid_curve({"digits": a["fid_curve"], "cifar100": b["fid_curve"],
                                 "tinyimagenet": tmp_path / "missing.csv"}, tmp_path / "fid.png")
    assert set(data) == {"digits", "cifar100"}
    assert data["digits"]["step"] == [0, 50, 100, 150] and data["cifar100"]["fid"] == [100.0, 50.0]
    assert (tmp_path / "fid.png").stat().st_size > 0


@pytest.mark.parametrize("kinds, ylabel", [
    ({"digits": "convnet"}, "FID (ConvNet features)"),
    ({"digits": "inception", "cifar100": "inception"}, "FID (Inception features)"),
    ({"digits": "convnet", "cifar100": "inception"}, "FID (features per line, see legend)"),
])
def test_fig_fid_curve_axis_names_the_features(tmp_path, kinds, ylabel):
    curves = {ds: make_run(tmp_path, ds, k=3)["fid_curve"] for ds in kinds}
    out = figures.fig_fid_curve(curves, tmp_path / "fid.png", kinds=kinds, return_axes=True)
    assert out["ylabel"] == ylabel and set(out["curves"]) == set(kinds)


def test_fig_leaderboard_bars_and_not_run(tmp_path, monkeypatch):
    p = make_run(tmp_path, "cifar100", k=4)
    figs = []
    monkeypatch.setattr(figures, "save_fig", lambda fig, out: (figs.append(fig), Path(out).write_bytes(b"x")))
    data = figures.fig_leaderboard({"cifar100": p["summary"], "tinyimagenet": None, "digits": _summary()},
                                  tmp_path / "lb.png")
    assert data["groups"] == ["cifar100", "tinyimagenet", "digits"]
    assert data["panels"] == {"challenge": ["cifar100", "tinyimagenet"], "other": ["digits"]}
    assert data["collisions"] == []
    teams = [b for b in data["bars"] if not b["ours"]]
    ours = [b for b in data["bars"] if b["ours"]]
    assert len(teams) == 10 and {b["value"] for b in teams if b["label"] == "zheli"} == {0.3756, 0.2353}
    assert [(b["group"], b["value"]) for b in ours] == [("cifar100", 0.9), ("digits", 0.9)]
    assert data["not_run"] == ["tinyimagenet"]
    # digits is not on the leaderboard's axis: the challenge panel holds the 10 team bars and our
    # CIFAR-100 bar; digits has a panel (and y axis) of its own. (This test counted 12 bars on one
    # axis before issue 14 moved digits apart.)
    ax, ax_other = figs[0].axes[:2]
    assert len(ax.patches) == 11 and len(ax_other.patches) == 1
    assert ax_other.get_xticklabels()[0].get_text() == "Digits"
    assert "not in the challenge" in ax_other.get_title()
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("not run") == 1
    # the not-run dataset never shows a number in our slot: its only text is "not run"
    assert ax.get_ylabel() == "test accuracy"
    hatched = [r for a in (ax, ax_other) for r in a.patches if r.get_hatch()]
    assert sorted(r.get_height() for r in hatched) == [0.9, 0.9]
    assert ax.get_ylim()[1] < 0.9 * 1.5  # the challenge axis is scaled to the challenge's bars and ours


def test_fig_leaderboard_labels_never_collide(tmp_path):
    """The committed default run's digits result and the paper datasets: every value label is clear
    of every other label and of every bar (the old figure printed "10.921" into its bar)."""
    digits = json.loads((ROOT / "results" / "digits" / "summary.json").read_text())
    measured = {"cifar100": _summary(syn=0.3700), "tinyimagenet": _summary(syn=0.2330), "digits": digits}
    data = figures.fig_leaderboard(measured, tmp_path / "lb.png")
    assert data["collisions"] == []
    assert data["labels"] == ["0.370", "0.233", f"{digits['synthetic']['mean']:.3f}"]


@pytest.mark.parametrize("k,grids,shape", [(10, 1, (1, 10)), (200, 2, (10, 10))])
def test_fig_class_grid_sizes(tmp_path, k, grids, shape):
    s = _image_set(k, 1, hw=4, c=3 if k > 10 else 1)
    s["labels"] = s["labels"][::-1].copy()  # first image of class j is not at index j
    outs = figures.class_grid_paths("ds", k, tmp_path)
    assert len(outs) == grids
    res = figures.fig_class_grid(s, outs)
    assert len(res) == grids and all(Path(o).exists() for o in outs)
    assert res[0]["shape"] == shape and sum(len(g["classes"]) for g in res) == k
    assert res[-1]["classes"][-1] == f"class{k - 1}"
    assert res[0]["indices"][0] == k - 1  # the image labelled 0 sits last
    for g in res:  # readable and clear of each other and of the images, and says which image is shown
        assert min(g["fontsizes"]) >= 8 and g["collisions"] == []
        assert "first image of each class" in g["subtitle"]
    with pytest.raises(ValueError, match="output paths"):
        figures.fig_class_grid(s, outs[:1] if grids == 2 else outs * 2)


def test_fig_class_grid_long_names_fit(tmp_path):
    s = _image_set(20, 1, hw=16, c=3)
    s["classes"] = np.array([f"n0{i:07d}, a rather long class name {i}" for i in range(20)])
    (g,) = figures.fig_class_grid(s, [tmp_path / "g.png"])
    assert g["collisions"] == [] and min(g["fontsizes"]) >= 8


def test_fig_loss_curves(tmp_path):
    p = make_run(tmp_path, "digits")
    for name in ("random_real", "full_real"):
        for s in range(3):
            save_json(p["eval_dir"] / f"{name}_seed{s}.json", {"accuracy": 0.9, "loss_curve": [2.0, 1.0 + s],
                                                               "seed": s, "name": name})
    evals = sorted(p["eval_dir"].glob("*.json"))
    data = figures.fig_loss_curves(p["loss"], tmp_path / "loss.png", eval_jsons=evals)
    assert data["diffusion"]["step"][:2] == [1, 2] and data["diffusion"]["loss"][0] == 0.5
    # every seed of every set is drawn, each with its own curve (runs were keyed by set name, and
    # each seed overwrote the last)
    assert {k for k in data["convnet"] if k.startswith("synthetic")} == {"synthetic_seed0", "synthetic_seed1",
                                                                         "synthetic_seed2"}
    assert len(data["convnet"]) == 9 and data["lines"] == 9
    assert data["convnet"]["synthetic_seed2"][-1] == 0.7 and data["convnet"]["full_real_seed1"] == [2.0, 2.0]
    assert (tmp_path / "loss.png").exists()


def test_build_report_with_one_dataset_missing(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["digits"]["model"] = TINY  # cheap; parameter counts still come from instantiation
    make_run(tmp_path, "digits")
    out = report.build_report(params, ["digits", "cifar100"], root=tmp_path, out_dir="results")
    res = tmp_path / "results"
    for f in ["tables/models.md", "tables/fid.md", "tables/results.md",
              "figures/fid_curve.png", "figures/leaderboard.png", "figures/digits_classes.png",
              "figures/digits_loss.png", "plots/digits_fid_curve.csv", "plots/digits_diffusion_loss.csv",
              "digits/metrics.json"]:
        assert (res / f).exists(), f
    assert not (res / "tables/digits_summary.md").exists()  # the summarize step's, not the report's
    assert any("cifar100" in what for what, _ in out["skipped"])
    results_md = (res / "tables/results.md").read_text()
    assert "| CIFAR-100 | not run" in results_md and "0.9000 ± 0.0100" in results_md
    assert "44307040" in (res / "tables/models.md").read_text()
    # one metrics file per dataset (results/{ds}/metrics.json; was results/metrics.json keyed by dataset)
    m = json.loads((res / "digits" / "metrics.json").read_text())
    assert m["synthetic_acc"] == 0.9 and m["fid_convnet"] == 12.5
    assert not (res / "cifar100" / "metrics.json").exists()
    # no stray temporary files
    assert not [f for f in res.rglob("*") if ".tmp" in f.name]


def test_agg_backend():
    assert matplotlib.get_backend().lower() == "agg"


# ----------------------------------------------------------------------------------------------
# dvc metrics show: numbers only, readable in 120 columns

DVC = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def _leaves(d):
    for v in d.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def _dvc_metrics_show(work, metric_files):
    (work / "dvc.yaml").write_text(yaml.safe_dump({"metrics": [str(f) for f in metric_files]}))
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=work, check=True)
    out = subprocess.run([DVC, "metrics", "show"], cwd=work, check=True, capture_output=True, text=True,
                         env={**__import__("os").environ, "COLUMNS": "120"})
    return out.stdout


def test_metrics_files_are_the_committed_dvc_yamls_and_hold_numbers_only():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {next(iter(m)) for s in stages.values() for m in s.get("metrics", [])}
    assert declared == {"results/digits/metrics.json"}
    m = report.metrics({"digits": results.dataset_paths("digits", ROOT)})["digits"]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in _leaves(m))
    assert set(m) == set(report.METRIC_KEYS) | {"fid_convnet"}


@pytest.mark.skipif(not Path(DVC).exists(), reason="dvc is not installed")
@pytest.mark.parametrize("datasets", [("digits",), ("cifar100", "tinyimagenet")])
def test_dvc_metrics_show_fits_120_columns(tmp_path, datasets):
    """`dvc metrics show` on the default run's committed results (and on the paper pair) prints a row
    per dataset, within 120 columns, with the accuracies and the FID named by its features."""
    files = []
    for ds in datasets:
        if ds == "digits":  # the committed results of the default run
            paths = results.dataset_paths("digits", ROOT)
        else:
            paths = make_run(tmp_path / "made", ds, fid_key="fid_inception")
        out = tmp_path / "results" / ds / "metrics.json"
        save_json(out, report.metrics({ds: paths})[ds])
        files.append(out.relative_to(tmp_path))
    shown = _dvc_metrics_show(tmp_path, files)
    lines = shown.rstrip("\n").splitlines()
    assert len(lines) == 1 + len(datasets), shown
    assert max(map(len, lines)) <= 120, shown
    for key in ("synthetic_acc", "synthetic_std", "random_real_acc", "full_real_acc"):
        assert key in lines[0]
    assert ("fid_convnet" if "digits" in datasets else "fid_inception") in lines[0]


def test_summarize_records_training_counts_and_the_table_shows_them(tmp_path):
    from diffdistill.evaluate import summarize

    runs = [{"name": name, "seed": s, "accuracy": 0.5 + s / 100, "n_train": 40,
             "per_class_train_counts": [10, 10, 10, 10], "per_class_accuracy": [0.5] * 4}
            for name in ("synthetic", "random_real", "full_real") for s in range(2)]
    summary = summarize(runs)
    assert summary["synthetic"]["per_class_train_counts"] == [10, 10, 10, 10]
    assert summary["synthetic"]["n_seeds"] == 2
    save_json(tmp_path / "summary.json", summary)
    (row,) = tables.table_results({"digits": {"summary": tmp_path / "summary.json"}}, tmp_path / "r.md")
    assert row["images_per_class"] == "10" and row["seeds"] == "2" and row["sampled"] == "not run"
    tables.table_summary(tmp_path / "summary.json", tmp_path / "s.md", dataset="digits")
    assert "(10 per class)" in (tmp_path / "s.md").read_text()
