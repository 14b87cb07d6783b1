"""The rehearsal (tests/rehearsal.py, tests/rehearsal.yaml): the paper's configuration end to end on
this CPU machine, through plain Snakemake, through `dvc repro` and through `--profile` on a real
single-node Slurm. Architectures and code paths are the paper blocks'; only scale knobs are shrunk.

The three routes share the work: plain Snakemake runs the whole DAG of both datasets; DVC runs the
Tiny-ImageNet chain up to the M/4 finetuning under torchrun as DVC stages; Slurm runs the CIFAR-100
chain up to the S/2 finetuning under torchrun as Slurm jobs, with the download and weight rules local. What the three would test alike (the steps' own code) is checked once, on the
plain run."""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import rehearsal
from conftest import needs_slurm
from diffdistill.config import deep_update
from diffdistill.uvit import UViT, count_parameters

pytestmark = pytest.mark.slow

DATASETS = {"cifar100": ("cifar10_uvit_small.pth", rehearsal.S2), "tinyimagenet": ("imagenet64_uvit_mid.pth", rehearsal.M4)}


def params():
    base = yaml.safe_load((rehearsal.REPO / "params.yaml").read_text())
    return deep_update(base, yaml.safe_load(rehearsal.OVERRIDE.read_text()))


def npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The made archives and checkpoints, once for every rehearsal of the module (hard-linked)."""
    folder = tmp_path_factory.mktemp("made")
    rehearsal.make_files(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, made):
    work = tmp_path_factory.mktemp("rehearsal")
    proc = rehearsal.run(work, timeout=1500, files_from=made)
    print(f"plain Snakemake rehearsal: {proc.seconds:.0f} s")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return work


def test_the_paper_architectures_are_unchanged():
    base = yaml.safe_load((rehearsal.REPO / "params.yaml").read_text())
    # The parameter counts of U-ViT-S/2 (100 classes) and U-ViT-M/4 (200 classes), as in Table 1.
    assert count_parameters(UViT(**base["cifar100"]["model"])) == 44_307_040
    assert count_parameters(UViT(**base["tinyimagenet"]["model"])) == 130_325_892
    shrunk = params()
    for ds in DATASETS:
        changed = {k for k in base[ds]["model"] if base[ds]["model"][k] != shrunk[ds]["model"][k]}
        assert changed == {"num_classes"}, changed


@pytest.mark.parametrize("ds", DATASETS)
def test_finetuning_started_from_the_released_checkpoint(run, ds):
    name, released_cfg = DATASETS[ds]
    source = torch.load(run / rehearsal.FILES / name, weights_only=True)
    ema = torch.load(run / f"checkpoints/{ds}/ema.pt", weights_only=True)
    cfg = params()[ds]
    assert cfg["train"]["ema_decay"] == 0.9999 and cfg["train"]["steps"] == 2
    # EMA 0.9999 over two updates moves a weight by < 1e-6 of its change: the EMA is where training
    # started. Every transformer tensor equals the checkpoint's; the label embedding is new.
    for key, value in source.items():
        if key == "label_emb.weight":
            continue
        if key == "pos_embed" and released_cfg["num_classes"] == 0:
            # unconditional source: its tokens [time, patches] move up one slot; slot 0 is the new label token
            torch.testing.assert_close(ema[key][:, 1:], value, atol=1e-5, rtol=0)
            assert not torch.allclose(ema[key][:, :1], value[:, :1], atol=1e-3)
        else:
            torch.testing.assert_close(ema[key], value, atol=1e-5, rtol=0, msg=key)
    k = cfg["model"]["num_classes"]
    assert ema["label_emb.weight"].shape == (k, released_cfg["embed_dim"])
    if "label_emb.weight" in source:  # 1000 ImageNet classes -> k new ones, none copied
        assert not torch.allclose(ema["label_emb.weight"], source["label_emb.weight"][:k], atol=1e-3)
    summary = json.loads((run / f"checkpoints/{ds}/train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2  # torchrun, two gloo processes
    assert summary["parameters"] == count_parameters(UViT(**cfg["model"]))
    assert summary["init"]["fresh"] >= 1 and summary["init"]["copied"] >= len(source) - 1


@pytest.mark.parametrize("ds", DATASETS)
def test_downloads_and_prepared_data(run, ds):
    cfg = params()[ds]
    train, test = npz(run / f"data/{ds}/train.npz"), npz(run / f"data/{ds}/test.npz")
    k, size = cfg["model"]["num_classes"], cfg["data"]["image_size"]
    assert train["images"].shape == (k * rehearsal.TRAIN_PER_CLASS, size, size, 3)
    assert test["images"].shape == (k * rehearsal.TEST_PER_CLASS, size, size, 3)
    assert np.bincount(train["labels"]).tolist() == [rehearsal.TRAIN_PER_CLASS] * k
    expected = rehearsal.CIFAR_NAMES if ds == "cifar100" else [
        rehearsal.TINY_WNIDS[w].split(",")[0] for w in sorted(rehearsal.TINY_WNIDS)]
    assert [str(c) for c in train["classes"]] == expected


@pytest.mark.parametrize("ds", DATASETS)
def test_inception_fid_curve_and_final_fid(run, ds):
    cfg = params()[ds]
    with open(run / f"checkpoints/{ds}/fid_curve.csv") as f:
        rows = [line.split(",") for line in f.read().split()[1:]]
    assert [int(r[0]) for r in rows] == [1, 2] and all(np.isfinite(float(r[1])) and float(r[1]) > 0 for r in rows)
    fid = json.loads((run / f"results/{ds}/fid.json").read_text())
    manifest = json.loads((run / f"synthetic/{ds}/manifest.json").read_text())
    assert fid["n_samples"] == min(manifest["count"], cfg["fid"]["final_samples"])
    assert np.isfinite(fid["fid_inception"]) and fid["fid_inception"] > 0


@pytest.mark.parametrize("ds", DATASETS)
def test_sampling_selection_and_evaluation(run, ds):
    cfg = params()[ds]
    k = cfg["model"]["num_classes"]
    manifest = json.loads((run / f"synthetic/{ds}/manifest.json").read_text())
    assert manifest["count"] == k * cfg["sample"]["max_per_class"] and manifest["per_class"] == [10] * k
    assert manifest["steps"] == cfg["sample"]["steps"] and manifest["variant"] == "fast"
    samples, selected = npz(run / f"synthetic/{ds}/samples.npz"), npz(run / f"synthetic/{ds}/selected.npz")
    assert cfg["select"]["strategy"] == "all" and np.array_equal(samples["labels"], selected["labels"])
    assert samples["images"].shape[1:] == (cfg["data"]["image_size"],) * 2 + (3,)
    summary = json.loads((run / f"results/{ds}/summary.json").read_text())
    for name in ("synthetic", "random_real", "full_real"):
        assert sorted(r["seed"] for r in summary[name]["runs"]) == cfg["evaluate"]["seeds"]
    run0 = json.loads((run / f"results/{ds}/eval/synthetic_seed0.json").read_text())
    assert run0["epochs"] == cfg["evaluate"]["epochs"] + 1  # the challenge's range(Epoch + 1)


@pytest.mark.parametrize("ds", DATASETS)
def test_the_export_loads_as_the_challenge_evaluator_loads_it(run, ds):
    cfg = params()[ds]
    k, size = cfg["model"]["num_classes"], cfg["data"]["image_size"]
    data = torch.load(run / f"synthetic/{ds}/challenge/{ds}.pt")   # the evaluator: torch.load(submit_dir/…)
    assert list(data.shape) == [10 * k, 3, size, size] and data.dtype == torch.float32
    labels = torch.load(run / f"synthetic/{ds}/challenge/{ds}_labels.pt")
    assert labels.tolist() == np.concatenate([np.ones(10) * i for i in range(k)]).astype(int).tolist()
    selected = npz(run / f"synthetic/{ds}/selected.npz")
    mean, std = (torch.tensor(cfg["evaluate"][m]).view(1, 3, 1, 1) for m in ("mean", "std"))
    pixels = ((data * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(k):   # block i is the first ten selected images of class i
        assert np.array_equal(pixels[10 * i:10 * i + 10], selected["images"][selected["labels"] == i][:10])


def test_tables_and_figures_carry_the_rehearsal_numbers(run):
    results = (run / "results/tables/results.md").read_text()
    fid_table = (run / "results/tables/fid.md").read_text()
    models = (run / "results/tables/models.md").read_text()
    for ds, label in (("cifar100", "CIFAR-100"), ("tinyimagenet", "Tiny-ImageNet")):
        summary = json.loads((run / f"results/{ds}/summary.json").read_text())
        row = next(line for line in results.splitlines() if line.startswith(f"| {label}"))
        assert f"{summary['synthetic']['mean']:.4f} ± {summary['synthetic']['std']:.4f}" in row
        fid = json.loads((run / f"results/{ds}/fid.json").read_text())["fid_inception"]
        fid_row = next(line for line in fid_table.splitlines() if line.startswith(f"| {label}"))
        assert f"{fid:.2f}" in fid_row
        assert f"{count_parameters(UViT(**params()[ds]['model'])):,}" in models or \
            f"{count_parameters(UViT(**params()[ds]['model']))}" in models
    for fig in ("fid_curve", "leaderboard", "cifar100_classes", "tinyimagenet_classes", "cifar100_loss",
                "tinyimagenet_loss"):
        png = (run / f"results/figures/{fig}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, fig


def test_a_second_run_has_nothing_to_do(run):
    proc = rehearsal.run(run, ["-n"])
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]


# --- bad input -------------------------------------------------------------------------------------

def test_asking_for_cuda_without_it_stops_clearly(tmp_path, made):
    # The paper blocks ask for GPUs; without `device: cpu` a machine without CUDA must refuse them.
    (tmp_path / "gpu.yaml").write_text("device: auto\n")
    proc = rehearsal.run(tmp_path, ["data/cifar100/classifier.pt"], configfiles=["gpu.yaml"], files_from=made)
    assert proc.returncode != 0
    text = (tmp_path / "logs/cifar100/reference_classifier.log").read_text()
    assert "device: cpu" in text and "Traceback" in text
    assert "logs/cifar100/reference_classifier.log" in proc.stdout + proc.stderr
    assert not (tmp_path / "data/cifar100/classifier.pt").exists()
    assert (tmp_path / "data/cifar100/train.npz").exists()  # the steps before it ran


def test_a_download_that_answers_404_stops_clearly(tmp_path, made):
    proc = rehearsal.run(tmp_path, ["data/cifar100/train.npz"], withhold=["cifar-100-python.tar.gz"], files_from=made)
    assert proc.returncode != 0
    logs = list((tmp_path / "logs/cifar100").glob("download*.log"))
    assert logs, sorted(p.name for p in (tmp_path / "logs").rglob("*"))
    text = logs[0].read_text()
    assert "404" in text and "cifar-100-python.tar.gz" in text and "place it at" in text
    leftovers = [p for p in (tmp_path / "data").rglob("*") if p.is_file()] if (tmp_path / "data").exists() else []
    assert leftovers == []


# --- the other two routes ----------------------------------------------------------------------------

def ran_stages(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_runs_the_tinyimagenet_finetuning(tmp_path, made):
    """The Tiny-ImageNet chain as DVC stages: download, conversion, weights, FID statistics and the
    M/4 finetuning under torchrun, from the generated dvc.yaml."""
    proc = rehearsal.run(tmp_path, ["train_diffusion_tinyimagenet"], dvc=True, timeout=1200, files_from=made)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    print(f"dvc repro of the Tiny-ImageNet finetuning: {proc.seconds:.0f} s")
    expected = {"download_data_tiny-imagenet-200_zip_tinyimagenet", "prepare_data_tinyimagenet",
                "fetch_weights_imagenet64_uvit_mid_pth", "fetch_weights_pt_inception-2015-12-05-6726825d_pth",
                "fid_stats_tinyimagenet", "train_diffusion_tinyimagenet"}
    assert ran_stages(out) == expected, sorted(ran_stages(out))
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert expected <= set(lock)
    assert "torchrun --standalone --nproc_per_node 2" in lock["train_diffusion_tinyimagenet"]["cmd"]
    summary = json.loads((tmp_path / "checkpoints/tinyimagenet/train.json").read_text())
    assert summary["world_size"] == 2 and summary["init"]["fresh"] >= 1
    again = rehearsal.run(tmp_path, ["train_diffusion_tinyimagenet"], dvc=True)
    assert again.returncode == 0 and ran_stages(again.stdout + again.stderr) == set()


@pytest.mark.slurm
@needs_slurm
def test_slurm_runs_the_cifar100_finetuning(tmp_path, slurm_env, made):
    """The CIFAR-100 chain through `--profile` on a real Slurm: downloads and weights as local rules
    (they never become Slurm jobs), the S/2 finetuning under torchrun inside a Slurm job."""
    profile = rehearsal.REPO / "tests" / "slurm" / "profile"
    proc = rehearsal.run(tmp_path, ["--profile", str(profile), "checkpoints/cifar100/ema.pt"],
                         env=dict(slurm_env, PYTHONPATH=str(tmp_path / "src")), timeout=1500, files_from=made)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    print(f"Slurm run of the CIFAR-100 finetuning: {proc.seconds:.0f} s")
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S+/slurm_logs/rule_(\w+)/", out)
    rules = sorted(rule for _, rule in submitted)
    assert rules == sorted(["prepare_data", "fid_stats", "train_diffusion"]), rules
    local = set(re.findall(r"^localrule (\w+):", out, re.M))
    assert local >= {"download_data", "fetch_weights"}, local
    squeue = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T"], env=slurm_env,
                            capture_output=True, text=True, check=True).stdout
    states = dict(line.split("|") for line in squeue.split())
    assert all(states.get(job) == "COMPLETED" for job, _ in submitted), (submitted, states)
    summary = json.loads((tmp_path / "checkpoints/cifar100/train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (tmp_path / "data/downloads/cifar100/cifar-100-python.tar.gz").exists()
