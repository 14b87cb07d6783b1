"""The cluster requests of each job (diffdistill/cluster.py): GPU counts, partitions, and Slurm time
limits derived from the work at the throughputs of params.yaml's `cluster:` block. Plain functions of
the params and a job's wildcards: no Snakemake run (tests/test_slurm.py dry-runs the profile)."""
import copy
from pathlib import Path

import pytest
import yaml

from diffdistill import cluster

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
RETRIES = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())["retries"]
PAPER = ("cifar100", "tinyimagenet")


def paper_need_minutes(job, params, retries):
    """What a paper job needs at the throughputs of params.yaml's cluster block (one H100, measured):
    this test's own reading of the formula documented in slurm/config.yaml, without the margin."""
    c, ds, w = params["cluster"], job["wildcards"]["ds"], job["wildcards"]
    p, t = params[ds], params["cluster"]["throughput"][ds]
    k = p["model"]["num_classes"]
    sample_rate = t["sample_images_per_s"] * 50 / p["sample"]["steps"]
    synthetic = p["sample"]["budget_seconds"] * sample_rate * p["sample"]["gpus"]
    if p["sample"].get("max_per_class"):
        synthetic = min(synthetic, p["sample"]["max_per_class"] * k)
    if p["select"].get("images_per_class"):
        synthetic = min(synthetic, p["select"]["images_per_class"] * k)

    def convnet(section, images):  # range(Epoch + 1) epochs
        return (section["epochs"] + 1) * images / (t["convnet_images_per_s"] * (128 / section["width"]) ** 2)

    rule = job["rule"]
    if rule == "evaluate":
        images = {"full_real": t["train_images"], "synthetic": synthetic,
                  "random_real": min(synthetic, t["train_images"])}[w["set"]]
        seconds = convnet(p["evaluate"], images)
    elif rule == "reference_classifier":
        seconds = convnet(p["classifier"], t["train_images"])
    elif rule == "fid":
        seconds = p["fid"]["final_samples"] / c["inception_images_per_s"]
    elif rule == "fid_stats":
        seconds = t["train_images"] / c["inception_images_per_s"]
    elif rule == "sample":
        seconds = p["sample"]["budget_seconds"]
    elif rule == "train_diffusion":
        tr = p["train"]
        fid_points = tr["steps"] // tr["fid_every"] + 1
        seconds = (tr["steps"] * t["train_step_s"] / tr["gpus"]
                   + fid_points * tr["fid_samples"] * (tr["fid_steps"] / 50 / t["sample_images_per_s"]
                                                       + 1 / c["inception_images_per_s"]))
        # One Slurm job may stop at the partition's limit: the retries resume from state.pt.
        return seconds / 60 / (retries + 1)
    else:
        raise AssertionError(f"no estimate for GPU rule {rule}: add it to diffdistill/cluster.py and here")
    return seconds / 60


def paper_gpu_jobs():
    """The GPU jobs of the paper datasets with an estimate, as {rule, wildcards} (one seed: the
    estimate does not depend on it)."""
    jobs = []
    for ds in PAPER:
        jobs += [{"rule": "evaluate", "wildcards": {"ds": ds, "set": s, "seed": "0"}}
                 for s in ("synthetic", "full_real", "random_real")]
        jobs += [{"rule": r, "wildcards": {"ds": ds}}
                 for r in ("reference_classifier", "fid", "fid_stats", "sample", "train_diffusion")]
    return jobs


def test_paper_time_limits_cover_the_work():
    """No paper GPU job's time limit is below its need; training may stop at the partition's limit and
    continue on retry, within (retries + 1) jobs."""
    params = PARAMS
    cap = params["cluster"]["max_runtime_minutes"]
    checked = {}
    for job in paper_gpu_jobs():
        assert cluster.step_gpus(params, job["rule"], job["wildcards"]["ds"]) > 0, job
        runtime = cluster.requested_minutes(params, job["rule"], job["wildcards"], default=None)
        need = paper_need_minutes(job, params, RETRIES)
        assert need <= runtime <= cap, (job, need)
        checked[(job["rule"], job["wildcards"]["ds"], job["wildcards"].get("set"))] = (need, runtime)
    # The case of the issue: 1001 epochs on the ~146,000 images of a 10-minute CIFAR-100 set take ~48
    # minutes at the measured 50,400 images/s, over the old 60-minute limit's margin.
    need, runtime = checked[("evaluate", "cifar100", "synthetic")]
    assert 45 < need < 52 and runtime >= 1.5 * need, (need, runtime)
    # Full-real Tiny-ImageNet at 64 px takes hours.
    assert checked[("evaluate", "tinyimagenet", "full_real")][0] > 120


def test_paper_time_limits_are_the_documented_ones():
    """The minutes slurm/config.yaml lists for the paper's params."""
    documented = {
        "cifar100": {"synthetic": 107, "random_real": 44, "full_real": 44, "reference_classifier": 12,
                     "fid": 14, "fid_stats": 14, "sample": 30, "train_diffusion": 464},
        "tinyimagenet": {"synthetic": 177, "random_real": 177, "full_real": 275, "reference_classifier": 24,
                         "fid": 14, "fid_stats": 17, "sample": 30, "train_diffusion": 1437},
    }
    for job in paper_gpu_jobs():
        w = job["wildcards"]
        key = w["set"] if job["rule"] == "evaluate" else job["rule"]
        assert cluster.requested_minutes(PARAMS, job["rule"], w, default=None) == documented[w["ds"]][key], job


def test_expected_synthetic_images_caps():
    params = copy.deepcopy(PARAMS)
    # 600 s at 243 images/s (50 calls) on one GPU
    assert cluster.expected_synthetic_images(params, "cifar100") == pytest.approx(600 * 243)
    params["cifar100"]["sample"]["gpus"] = 2
    assert cluster.expected_synthetic_images(params, "cifar100") == pytest.approx(2 * 600 * 243)
    params["cifar100"]["sample"]["max_per_class"] = 500
    assert cluster.expected_synthetic_images(params, "cifar100") == 500 * 100
    params["cifar100"]["select"]["images_per_class"] = 50
    assert cluster.expected_synthetic_images(params, "cifar100") == 50 * 100
    params["cifar100"]["sample"].update(budget_seconds=None, max_per_class=None)
    params["cifar100"]["select"]["images_per_class"] = None
    assert cluster.expected_synthetic_images(params, "cifar100") == float("inf")


def test_estimates_follow_the_params():
    params = copy.deepcopy(PARAMS)
    c = params["cluster"]
    t = c["throughput"]["cifar100"]
    evaluate = params["cifar100"]["evaluate"]
    # sweep_evaluate: images_per_class × classes images, for epochs + 1 epochs
    need = cluster.needed_minutes(params, "sweep_evaluate", {"ds": "cifar100", "set": "synthetic", "n": "10"})
    assert need == pytest.approx((evaluate["epochs"] + 1) * 10 * 100 / t["convnet_images_per_s"] / 60)
    # the short100 variant trains 101 epochs; a narrower ConvNet is (128 / width)² faster
    evaluate.update(variant="short100", width=64)
    need = cluster.needed_minutes(params, "evaluate", {"ds": "cifar100", "set": "full_real"})
    assert need == pytest.approx(101 * t["train_images"] / (t["convnet_images_per_s"] * 4) / 60)
    # fid_stats on at most stats_samples images
    params["cifar100"]["fid"]["stats_samples"] = 1000
    assert cluster.needed_minutes(params, "fid_stats", {"ds": "cifar100"}) == pytest.approx(
        1000 / c["inception_images_per_s"] / 60)
    # sampling without a budget: max_per_class × classes at the rate of `steps` calls on sample.gpus GPUs
    params["cifar100"]["sample"].update(budget_seconds=None, max_per_class=100, steps=25, gpus=2)
    assert cluster.needed_minutes(params, "sample", {"ds": "cifar100"}) == pytest.approx(
        100 * 100 / (t["sample_images_per_s"] * 2 * 2) / 60)


def test_cpu_jobs_and_jobs_without_an_estimate_keep_the_rules_limit():
    params = copy.deepcopy(PARAMS)
    # digits asks for no GPU
    assert cluster.step_gpus(params, "train_diffusion", "digits") == 0
    assert cluster.requested_minutes(params, "train_diffusion", {"ds": "digits"}, 2880) == 2880
    # a step that is not a GPU step, and the GPU step without an estimate (audit)
    assert cluster.requested_minutes(params, "select", {"ds": "cifar100"}, 60) == 60
    assert cluster.requested_minutes(params, "audit", {"ds": "cifar100"}, 120) == 120
    # a dataset without a throughput entry
    del params["cluster"]["throughput"]["tinyimagenet"]
    assert cluster.requested_minutes(params, "sample", {"ds": "tinyimagenet"}, 60) == 60
    # device: cpu (the rehearsal) asks for no GPU whatever the params' gpus
    params["device"] = "cpu"
    assert cluster.step_gpus(params, "train_diffusion", "cifar100") == 0
    assert cluster.section_gpus(params, "cifar100", "train") == 4
    assert cluster.requested_minutes(params, "evaluate", {"ds": "cifar100", "set": "synthetic"}, 240) == 240


def test_margin_overhead_and_cap():
    params = copy.deepcopy(PARAMS)
    w = {"ds": "cifar100"}
    need = cluster.needed_minutes(params, "sample", w)
    assert need == pytest.approx(10.0)  # the 600-second budget
    params["cluster"].update(margin=1.5, overhead_minutes=3)
    assert cluster.requested_minutes(params, "sample", w, None) == 18
    params["cluster"]["max_runtime_minutes"] = 17
    assert cluster.requested_minutes(params, "sample", w, None) == 17
    # defaults when the block leaves them out: margin 2, overhead 10, cap 48 h
    params["cluster"] = {"throughput": PARAMS["cluster"]["throughput"]}
    assert cluster.requested_minutes(params, "sample", w, None) == 30
    params["cifar100"]["train"]["steps"] = 1_000_000  # ~30 h at 4 GPUs, ×2 margin: over 48 h
    assert cluster.requested_minutes(params, "train_diffusion", w, None) == 2880


def test_slurm_targets_follow_the_gpu_count():
    assert cluster.SlurmTargets.from_environ({}) == cluster.SlurmTargets("", "", "")
    none = cluster.SlurmTargets.from_environ({})
    assert (none.partition(0), none.partition(1), none.model(0), none.model(1)) == (None, None, None, None)
    both = cluster.SlurmTargets.from_environ({"SBATCH_PARTITION": "cpu", "DIFFDISTILL_GPU_PARTITION": "gpu",
                                              "DIFFDISTILL_GPU_MODEL": "a100"})
    assert (both.partition(0), both.partition(4), both.model(0), both.model(4)) == ("cpu", "gpu", None, "a100")
    # no GPU partition: GPU jobs go to SBATCH_PARTITION
    cpu_only = cluster.SlurmTargets.from_environ({"SBATCH_PARTITION": "cpu"})
    assert (cpu_only.partition(0), cpu_only.partition(1)) == ("cpu", "cpu")


def test_warning_for_gpu_datasets_without_throughput():
    params = copy.deepcopy(PARAMS)
    assert cluster.throughput_warnings(params, ["digits", "cifar100", "tinyimagenet"]) == []
    del params["cluster"]["throughput"]["tinyimagenet"]
    assert cluster.throughput_warnings(params, ["digits", "tinyimagenet"]) == [
        "params: cluster.throughput has no entry for 'tinyimagenet', whose steps ask for GPUs: on Slurm they "
        "get the rules' fixed time limits. Add one (see cifar100's) for limits derived from the work."]
