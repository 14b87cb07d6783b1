"""The real DAG end to end on a tiny override of params.yaml (tests/tiny_params.yaml): every step runs
its real code with small settings; the checks are on what the steps produced."""
import csv
import json

import numpy as np
import pytest
import torch
import yaml

from diffdistill.config import deep_update
from diffdistill.uvit import UViT, count_parameters
from workflow import REPO, TINY, copy_workflow, snakemake

pytestmark = pytest.mark.slow
OVERRIDE = "tiny_params.yaml"


@pytest.fixture(scope="module")
def tiny_params():
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return deep_update(base, yaml.safe_load(TINY.read_text()))["digits"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("tiny"))
    # The override lives in the run's folder, as a user's would: Snakemake reruns a step when the
    # list of params files it is given changes, so every call here names the same file.
    (work / OVERRIDE).write_text(TINY.read_text())
    snakemake(work, "--cores", "2", "--configfile", OVERRIDE)
    return work


def load(work, path):
    with np.load(work / path) as z:
        return {k: z[k] for k in z.files}


def test_summary_holds_three_sets_over_the_seeds(tiny_run, tiny_params):
    summary = json.loads((tiny_run / "results/digits/summary.json").read_text())
    seeds = tiny_params["evaluate"]["seeds"]
    selected = load(tiny_run, "synthetic/digits/selected.npz")
    assert summary["n_synthetic"] == len(selected["labels"]) == 10 * tiny_params["select"]["images_per_class"]
    for name in ("synthetic", "full_real", "random_real"):
        block = summary[name]
        accs = [r["accuracy"] for r in block["runs"]]
        assert sorted(r["seed"] for r in block["runs"]) == sorted(seeds)
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert block["mean"] == pytest.approx(np.mean(accs)) and block["std"] == pytest.approx(np.std(accs))
    # 4 epochs on the real split already beat chance (0.1) by far; the synthetic set is what it is.
    assert summary["full_real"]["mean"] > 0.3
    assert summary["gain_over_random"] == pytest.approx(summary["synthetic"]["mean"] - summary["random_real"]["mean"])
    assert summary["gap_to_full"] == pytest.approx(summary["full_real"]["mean"] - summary["synthetic"]["mean"])


def test_dd_ranking_scores_come_from_their_own_runs(tiny_run, tiny_params):
    import math
    res = tiny_run / "results/digits"
    summary = json.loads((res / "summary.json").read_text())
    seeds = tiny_params["evaluate"]["seeds"]

    def mean(folder, name):
        runs = [json.loads((res / folder / f"{name}_seed{k}.json").read_text()) for k in seeds]
        assert {r.get("protocol", "challenge") for r in runs} == {{"eval": "challenge"}.get(folder, folder[5:])}
        return float(np.mean([r["accuracy"] for r in runs])), runs

    def squash(x):
        return (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))

    syn, syn_runs = mean("eval", "synthetic")
    rnd, _ = mean("eval", "random_real")
    full, _ = mean("eval", "full_real")
    hard = summary["dd_ranking"]["hard_label"]
    assert hard["hlr"] == pytest.approx(full - syn) and hard["ior"] == pytest.approx(syn - rnd)
    assert hard["lrs"] == pytest.approx(squash(0.5 * (syn - rnd) - 0.5 * (full - syn)))
    # Without augmentation: the same sets and seeds, another training (no DSA), its own folder.
    syn_plain, plain_runs = mean("eval_plain", "synthetic")
    rnd_plain, _ = mean("eval_plain", "random_real")
    assert plain_runs[0]["loss_curve"] != syn_runs[0]["loss_curve"]
    assert summary["no_augmentation"]["synthetic"]["mean"] == pytest.approx(syn_plain)
    ars = summary["dd_ranking"]["augmentation"]
    assert ars["ars"] == pytest.approx(squash(0.5 * (syn - rnd) + 0.5 * (syn_plain - rnd_plain)))
    # Soft labels: the reference classifier's, on the synthetic and random real sets; full real stays hard.
    syn_soft, soft_runs = mean("eval_soft", "synthetic")
    rnd_soft, _ = mean("eval_soft", "random_real")
    assert soft_runs[0]["loss_curve"] != syn_runs[0]["loss_curve"]
    soft = summary["dd_ranking"]["soft_label"]
    assert soft["ior"] == pytest.approx(syn_soft - rnd_soft) and soft["hlr"] == pytest.approx(full - syn_soft)
    # The challenge's columns are the hard-label runs' only.
    assert summary["synthetic"]["mean"] == pytest.approx(syn)
    metrics = json.loads((res / "metrics.json").read_text())
    assert metrics["lrs"] == pytest.approx(hard["lrs"])
    table = (tiny_run / "results/tables/digits_summary.md").read_text()
    assert f"LRS {hard['lrs']:.4f}" in table and f"ARS {ars['ars']:.4f}" in table
    assert f"LRS {soft['lrs']:.4f}" in table
    results = (tiny_run / "results/tables/results.md").read_text()
    assert f"| {hard['lrs']:.4f} | {ars['ars']:.4f} |" in results


def test_random_real_baseline_matches_the_synthetic_counts(tiny_run):
    selected = load(tiny_run, "synthetic/digits/selected.npz")
    run = json.loads((tiny_run / "results/digits/eval/random_real_seed0.json").read_text())
    assert run["per_class_train_counts"] == np.bincount(selected["labels"], minlength=10).tolist()
    assert len(run["per_class_accuracy"]) == 10


def test_samples_are_balanced_and_described_by_the_manifest(tiny_run, tiny_params):
    samples = load(tiny_run, "synthetic/digits/samples.npz")
    manifest = json.loads((tiny_run / "synthetic/digits/manifest.json").read_text())
    counts = np.bincount(samples["labels"], minlength=10)
    assert samples["images"].dtype == np.uint8 and samples["images"].shape[1:] == (16, 16, 1)
    assert counts.max() - counts.min() <= 1 and manifest["per_class"] == counts.tolist()
    assert manifest["count"] == len(samples["labels"]) <= 10 * tiny_params["sample"]["max_per_class"]
    assert manifest["steps"] == tiny_params["sample"]["steps"] and manifest["variant"] == "fast"
    assert manifest["timeline"][-1][0] == manifest["count"]
    # Images are real samples, not blank: they use the range and differ from each other.
    assert samples["images"].std() > 10 and len({im.tobytes() for im in samples["images"]}) == len(samples["images"])


def test_training_curves(tiny_run, tiny_params):
    with open(tiny_run / "checkpoints/digits/loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, tiny_params["train"]["steps"] + 1))
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    with open(tiny_run / "checkpoints/digits/fid_curve.csv") as f:
        fid_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in fid_rows] == [15, 30]
    assert all(float(r["fid"]) > 0 for r in fid_rows)
    # ema.pt is a plain U-ViT state dict for the configured model.
    model = UViT(**tiny_params["model"])
    model.load_state_dict(torch.load(tiny_run / "checkpoints/digits/ema.pt", weights_only=True))


def test_report_tables_carry_the_measured_numbers(tiny_run, tiny_params):
    summary = json.loads((tiny_run / "results/digits/summary.json").read_text())
    results = (tiny_run / "results/tables/results.md").read_text()
    digits_row = next(line for line in results.splitlines() if line.startswith("| Digits"))
    assert f"{summary['synthetic']['mean']:.4f} ± {summary['synthetic']['std']:.4f}" in digits_row
    assert "not run" in next(line for line in results.splitlines() if line.startswith("| CIFAR-100"))
    models = (tiny_run / "results/tables/models.md").read_text()
    assert f"| {count_parameters(UViT(**tiny_params['model']))} |" in models
    fid = json.loads((tiny_run / "results/digits/fid.json").read_text())
    assert set(fid) >= {"fid_convnet", "n_samples"} and fid["fid_convnet"] > 0
    for fig in ("digits_classes", "digits_loss", "fid_curve", "leaderboard", "digits_sweep", "digits_audit_pairs"):
        png = (tiny_run / f"results/figures/{fig}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_sweep_and_audit(tiny_run, tiny_params):
    sweep = json.loads((tiny_run / "results/digits/sweep.json").read_text())
    points = {(p["set"], p["images_per_class"]) for p in sweep["curve"]}
    assert points == {(s, n) for s in ("synthetic", "random_real") for n in tiny_params["sweep"]["images_per_class"]}
    audit = json.loads((tiny_run / "results/digits/audit.json").read_text())
    assert set(audit["spaces"]) == {"pixel", "feature"}
    assert audit["n_generated"] == json.loads((tiny_run / "synthetic/digits/manifest.json").read_text())["count"]


def test_challenge_export_loads_back(tiny_run, tiny_params):
    # As the challenge's evaluator loads it: a bare tensor, {ds}.pt, class-major; labels beside it.
    images = torch.load(tiny_run / "synthetic/digits/challenge/digits.pt")
    labels = torch.load(tiny_run / "synthetic/digits/challenge/digits_labels.pt")
    selected = load(tiny_run, "synthetic/digits/selected.npz")
    K = tiny_params["model"]["num_classes"]
    ipc = tiny_params.get("export", {}).get("images_per_class") or int(np.bincount(selected["labels"]).min())
    assert isinstance(images, torch.Tensor) and list(images.shape) == [ipc * K, 1, 16, 16]
    assert labels.tolist() == np.concatenate([np.ones(ipc, dtype=np.int64) * i for i in range(K)]).tolist()


def test_a_second_run_has_nothing_to_do(tiny_run):
    out = snakemake(tiny_run, "-n", "--cores", "2", "--configfile", OVERRIDE)
    assert "Nothing to be done" in out.stdout + out.stderr


def test_a_changed_parameter_reruns_only_what_depends_on_it(tiny_run):
    override = yaml.safe_load(TINY.read_text())
    override["digits"]["evaluate"]["epochs"] = 5
    (tiny_run / OVERRIDE).write_text(yaml.safe_dump(override))
    try:
        out = snakemake(tiny_run, "-n", "--cores", "2", "--configfile", OVERRIDE)
    finally:
        (tiny_run / OVERRIDE).write_text(TINY.read_text())
    text = out.stdout + out.stderr
    table = text[text.index("Job stats"):]
    assert "evaluate" in table and "summarize" in table
    for upstream in ("train_diffusion", "sample", "prepare_data"):
        assert f"\n{upstream} " not in table


def test_html_report_bundles_the_captioned_tables_and_figures(tiny_run, tmp_path):
    out = tmp_path / "report.html"
    snakemake(tiny_run, "--report", str(out), "--configfile", OVERRIDE)
    html = out.read_text()
    assert "Track 2 leaderboard of the ECCV 2024" in html  # report/fig4.rst, the caption
    for name in ("leaderboard.png", "digits_classes.png", "digits_sweep.png", "results.md", "models.md"):
        assert name in html
