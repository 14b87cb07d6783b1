"""`--profile slurm` against a real single-node Slurm (tests/slurm/harness.sh), and the cluster
profile's resource requests (a dry run, no Slurm needed).

The Slurm tests need Debian's slurm-wlm and munge (`apt-get install -y slurm-wlm munge`) and root
(slurmd); without them they are skipped. `pytest -m slurm` runs only them.
"""
import json
import os
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
from conftest import needs_slurm
from test_cluster import paper_need_minutes as _need_minutes

ROOT = Path(__file__).resolve().parents[1]
TEST_PROFILE = ROOT / "tests" / "slurm" / "profile"
TINY = ROOT / "tests" / "tiny_params.yaml"
OVERLAY = ROOT / "tests" / "slurm" / "tiny_overlay.yaml"
CONFIGFILES = ["--configfile", "tiny_params.yaml", "tiny_overlay.yaml"]  # copied into each run's folder
# What a run needs; src too, so that jobs import this checkout's package (PYTHONPATH) even if the
# installed one is elsewhere or being edited.
WORKFLOW = ["Snakefile", "rules", "params.yaml", "schemas", "profiles", "envs", "report", "src", "slurm"]
RUN_TIMEOUT = 900
LOCAL_TARGETS = ["checkpoints/digits/ema.pt", "results/digits/summary.json"]




def copy_workflow(dest: Path) -> Path:
    """The workflow in dest, with the tiny overrides next to it, to be edited in place: the paths of
    the --configfile files are part of every step's params, so a new one would rerun every step."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(TINY, dest / "tiny_params.yaml")
    shutil.copy2(OVERLAY, dest / "tiny_overlay.yaml")
    for name in WORKFLOW:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def run_env(workdir: Path, base=None) -> dict:
    env = dict(base or os.environ)
    # The jobs' `python -m diffdistill` and snakemake itself: this interpreter's environment first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(workdir / "src")
    return env


def snakemake(workdir: Path, *args, env=None, popen=False):
    cmd = [sys.executable, "-m", "snakemake", *map(str, args)]
    kw = dict(cwd=workdir, env=env or run_env(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if popen:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=RUN_TIMEOUT, **kw)


# ---------------------------------------------------------------------------------------------
# The cluster profile's requests: a dry run of `--profile slurm` (slurm/config.yaml), no Slurm.

def dry_run_jobs(output: str) -> list:
    """Every job of a `snakemake -n` printout: {rule, wildcards: {...}, resources: {...}}. (A dry run
    prints each job's evaluated resources, profile and rule values merged, as the plugin receives them.)"""
    jobs, current = [], None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip())
        if m:
            current = {"rule": m.group(1), "wildcards": {}, "resources": {}}
            jobs.append(current)
            continue
        m = re.match(r"^\s+(wildcards|resources): (.*)$", line)
        if m and current is not None:
            current[m.group(1)] = dict(kv.split("=", 1) for kv in m.group(2).split(", "))
    return jobs


def _gpu(resources):
    return int(resources.get("gpu", 0))


# Which params section's `gpus` each rule's job asks for (diffdistill/cluster.py, GPU_SECTION).
GPU_SECTIONS = {"train_diffusion": "train", "sample": "sample", "evaluate": "evaluate", "sweep_evaluate": "evaluate",
                "reference_classifier": "classifier", "audit": "classifier", "fid": "fid", "fid_stats": "fid"}
PARTITION_ENV = ("SBATCH_ACCOUNT", "SBATCH_PARTITION", "DIFFDISTILL_GPU_PARTITION", "DIFFDISTILL_GPU_MODEL")


def test_profile_dry_run_gpu_requests(tmp_path):
    """Each job's GPU count comes from its own params section, and its partition from its GPU count: the
    same rule (evaluate) sends digits' jobs to the CPU partition and cifar100's to the GPU partition."""
    work = copy_workflow(tmp_path / "wf")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    env = run_env(work)
    for var in PARTITION_ENV:
        env.pop(var, None)
    res = snakemake(work, "-n", "--profile", "slurm", "--config", "datasets=[digits,cifar100]", env=env)
    assert res.returncode == 0, res.stdout[-3000:]
    jobs = dry_run_jobs(res.stdout)
    assert {"train_diffusion", "sample", "prepare_data", "evaluate", "fid", "fid_stats",
            "reference_classifier"} <= {j["rule"] for j in jobs}
    for job in jobs:
        ds = job["wildcards"].get("ds")
        want = int(params[ds][GPU_SECTIONS[job["rule"]]].get("gpus", 0)) if job["rule"] in GPU_SECTIONS and ds else 0
        assert _gpu(job["resources"]) == want, job
    assert params["cifar100"]["train"]["gpus"] > 1 and params["cifar100"]["evaluate"]["gpus"] == 1
    assert all(params["digits"][s]["gpus"] == 0 for s in set(GPU_SECTIONS.values()))
    # No account, partition or GPU model unless the environment names them.
    assert not any(k in j["resources"] for j in jobs for k in ("slurm_account", "slurm_partition", "gpu_model"))

    # Account, partitions and GPU model come from the environment, without editing the profile.
    env.update(SBATCH_ACCOUNT="proj42", SBATCH_PARTITION="cpu", DIFFDISTILL_GPU_PARTITION="gpu",
               DIFFDISTILL_GPU_MODEL="a100")
    res = snakemake(work, "-n", "--profile", "slurm", "--config", "datasets=[digits,cifar100]", env=env)
    assert res.returncode == 0, res.stdout[-3000:]
    jobs = dry_run_jobs(res.stdout)
    for job in jobs:
        r = job["resources"]
        assert r.get("slurm_account") == "proj42", job
        assert r.get("slurm_partition") == ("gpu" if _gpu(r) else "cpu"), job
        assert r.get("gpu_model") == ("a100" if _gpu(r) else None), job
    evaluate = {j["wildcards"]["ds"]: j["resources"]["slurm_partition"] for j in jobs if j["rule"] == "evaluate"}
    assert evaluate == {"digits": "cpu", "cifar100": "gpu"}


def test_paper_dag_on_a_cluster(tmp_path):
    """`--profile slurm` for the paper datasets: GPU jobs on the GPU partition and CPU jobs on the CPU one,
    the downloads local, and no GPU job's time limit below what its work needs."""
    from diffdistill.dag import snakemake_jobs

    work = copy_workflow(tmp_path / "wf")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    env = run_env(work)
    for var in PARTITION_ENV:
        env.pop(var, None)
    env.update(DIFFDISTILL_GPU_PARTITION="gpuq", SBATCH_PARTITION="cpuq")
    res = snakemake(work, "-n", "--profile", "slurm", "--config", "datasets=[cifar100,tinyimagenet]", env=env)
    assert res.returncode == 0, res.stdout[-3000:]
    jobs = dry_run_jobs(res.stdout)
    assert len(jobs) > 40

    # Every job that asks for a GPU is on the GPU partition, every other one on the CPU partition.
    gpu_rules = {j["rule"] for j in jobs if _gpu(j["resources"]) > 0}
    assert {"train_diffusion", "sample", "evaluate", "fid", "fid_stats"} <= gpu_rules
    for job in jobs:
        want = "gpuq" if _gpu(job["resources"]) > 0 else "cpuq"
        assert job["resources"].get("slurm_partition") == want, job

    # The network steps are local rules (they run where Snakemake runs: a login node with internet),
    # and each paper dataset's archive is downloaded by a job of its own, the input of its conversion.
    (work / "paper.yaml").write_text("datasets: [cifar100, tinyimagenet]\n")
    api_jobs = snakemake_jobs(work, [work / "paper.yaml"])
    local = {j["rule"] for j in api_jobs if j["local"]}
    assert local == {"download_data", "fetch_weights"}, local
    downloads = {j["wildcards"]["ds"]: j["output"] for j in api_jobs if j["rule"] == "download_data"}
    assert downloads == {"cifar100": ["data/downloads/cifar100/cifar-100-python.tar.gz"],
                         "tinyimagenet": ["data/downloads/tinyimagenet/tiny-imagenet-200.zip"]}
    for job in api_jobs:
        if job["rule"] == "prepare_data":
            assert downloads[job["wildcards"]["ds"]][0] in job["input"], job
            assert "--archive " + downloads[job["wildcards"]["ds"]][0] in job["shell"], job

    # No GPU job's time limit is below its need; training may stop at the partition's limit and
    # continue on retry, within (retries + 1) jobs.
    cap = params["cluster"]["max_runtime_minutes"]
    checked = {}
    for job in jobs:
        if _gpu(job["resources"]) == 0:
            continue
        runtime = int(job["resources"]["runtime"])
        need = _need_minutes(job, params, profile["retries"])
        assert need <= runtime <= cap, (job, need)
        checked[(job["rule"], job["wildcards"]["ds"], job["wildcards"].get("set"))] = (need, runtime)
    # The case of the issue: 1001 epochs on the ~146,000 images of a 10-minute CIFAR-100 set take ~48
    # minutes at the measured 50,400 images/s, over the old 60-minute limit's margin.
    need, runtime = checked[("evaluate", "cifar100", "synthetic")]
    assert 45 < need < 52 and runtime >= 1.5 * need, (need, runtime)
    # Full-real Tiny-ImageNet at 64 px takes hours.
    assert checked[("evaluate", "tinyimagenet", "full_real")][0] > 120


# ---------------------------------------------------------------------------------------------
# The tiny DAG under a real Slurm.

@pytest.fixture(scope="module")
def tiny_runs(slurm_env, tmp_path_factory):
    """The tiny DAG twice from the same checkout: through `--profile` on Slurm, and locally.
    Both run at once: the Slurm run mostly waits on the plugin's polling."""
    base = tmp_path_factory.mktemp("slurm_runs")
    slurm_dir, local_dir = copy_workflow(base / "slurm"), copy_workflow(base / "local")
    procs = {
        "slurm": snakemake(slurm_dir, "--profile", TEST_PROFILE, *CONFIGFILES,
                           env=run_env(slurm_dir, slurm_env), popen=True),
        # Locally only what is compared below (no sweep, audit, FID, export, report).
        "local": snakemake(local_dir, *LOCAL_TARGETS, "--cores", "2", *CONFIGFILES, popen=True),
    }
    outputs, t0 = {}, time.monotonic()
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1, RUN_TIMEOUT - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs[name] = (proc.returncode, out)
        print(f"{name} run: {time.monotonic() - t0:.0f} s (or less: waited in turn)")
    return {"slurm": slurm_dir, "local": local_dir, "outputs": outputs, "env": slurm_env}


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


@pytest.mark.slurm
@needs_slurm
def test_tiny_dag_through_slurm(tiny_runs):
    for name in ("slurm", "local"):
        rc, out = tiny_runs["outputs"][name]
        assert rc == 0, f"{name} run failed:\n{out[-5000:]}"
    work, local = tiny_runs["slurm"], tiny_runs["local"]
    rc, out = tiny_runs["outputs"]["slurm"]

    # The jobs really went through Slurm: one sbatch job per non-local job, each with its Slurm log,
    # all known to slurmctld as COMPLETED.
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out))
    assert len(submitted) >= 15, out[-3000:]
    logs = list((work / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in logs} >= set(submitted.values())
    ran_rules = {p.relative_to(work / ".snakemake" / "slurm_logs").parts[0] for p in logs}
    assert {"rule_prepare_data", "rule_train_diffusion", "rule_sample", "rule_evaluate", "rule_report"} <= ran_rules
    squeue = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T"], env=tiny_runs["env"],
                            capture_output=True, text=True, check=True).stdout
    states = dict(line.split("|") for line in squeue.split())
    assert all(states.get(j) == "COMPLETED" for j in submitted.values()), (submitted, states)

    # The summary a local run gives.
    summary = json.loads((work / "results/digits/summary.json").read_text())
    assert {"synthetic", "full_real", "random_real"} <= set(summary)
    for key in ("synthetic", "full_real", "random_real"):
        accs = [r["accuracy"] for r in summary[key]["runs"]]
        assert accs and all(0.0 <= a <= 1.0 for a in accs)
    with np.load(work / "synthetic/digits/selected.npz") as sel:
        assert summary["n_synthetic"] == len(sel["labels"])

    # Same seed, same machine: the same data and the same trained weights as the local run.
    for f in ("data/digits/train.npz", "data/digits/test.npz", "synthetic/digits/samples.npz",
              "synthetic/digits/selected.npz"):
        with np.load(work / f) as a, np.load(local / f) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                assert np.array_equal(a[k], b[k]), (f, k)
    ema_s = torch.load(work / "checkpoints/digits/ema.pt", map_location="cpu")
    ema_l = torch.load(local / "checkpoints/digits/ema.pt", map_location="cpu")
    assert ema_s.keys() == ema_l.keys()
    for k in ema_s:
        assert torch.equal(ema_s[k], ema_l[k]), k
    local_summary = json.loads((local / "results/digits/summary.json").read_text())
    assert _without_timings(summary) == _without_timings(local_summary)


@pytest.mark.slurm
@needs_slurm
def test_failing_slurm_job_fails_the_run(tiny_runs):
    """A step that fails at run time under Slurm fails the run, and the output names its log."""
    work = tiny_runs["slurm"]
    assert tiny_runs["outputs"]["slurm"][0] == 0
    # Valid for the schema, impossible at run time: more images per class than were sampled. Edited
    # in place: a new --configfile would change every step's --params and rerun the whole DAG.
    overlay = work / "tiny_overlay.yaml"
    params = yaml.safe_load(overlay.read_text())
    params["digits"]["select"] = {"images_per_class": 1000}
    overlay.write_text(yaml.safe_dump(params, sort_keys=False))
    res = snakemake(work, "--profile", TEST_PROFILE, *CONFIGFILES, env=run_env(work, tiny_runs["env"]))
    assert res.returncode != 0, res.stdout[-3000:]
    assert "Error in rule select" in res.stdout, res.stdout[-3000:]
    assert "logs/digits/select.log" in res.stdout
    m = re.search(r"SLURM-job '(\d+)' failed", res.stdout)
    assert m, res.stdout[-3000:]
    assert "images_per_class" in (work / "logs/digits/select.log").read_text()
    assert not (work / "synthetic/digits/selected.npz").exists()
    # Only the edited step (and nothing downstream of it) was submitted.
    submitted = re.findall(r"has been submitted with SLURM jobid \d+ \(log: \S+/slurm_logs/rule_(\w+)/", res.stdout)
    assert submitted == ["select"], submitted
