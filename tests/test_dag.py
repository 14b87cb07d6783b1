"""The two orchestrators name the same DAG: dvc.yaml is generated from Snakemake's jobs."""
import pytest
import yaml

from diffdistill.dag import STEP_PARAMS, STEP_THREADS, dvc_yaml, snakemake_jobs
from workflow import REPO, snakemake


def test_committed_dvc_yaml_is_generated_from_the_snakemake_dag():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(REPO), (
        "dvc.yaml is stale: run `python -m diffdistill dvc-yaml` and commit it")


def test_every_snakemake_job_is_a_dvc_stage_with_the_same_command_and_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    jobs = snakemake_jobs(REPO)
    assert len(stages) == len(jobs) > 20
    by_cmd = {s["cmd"]: s for s in stages.values()}
    for job in jobs:
        cmd = " ".join(job["shell"].replace(f" --log-file {job['log'][0]}", "").split())
        stage = by_cmd[cmd]  # the same command, less Snakemake's log file
        outs = [next(iter(o)) if isinstance(o, dict) else o
                for key in ("outs", "metrics", "plots") for o in stage.get(key, [])]
        assert sorted(outs) == sorted(job["output"])
        assert set(job["input"]) <= set(stage["deps"])
        # the thread count is in the command: Snakemake's run and DVC's compute alike
        assert f" --threads {STEP_THREADS[job['rule']]} " in f" {stage['cmd']} "
        ds = job["wildcards"].get("ds")
        if job["rule"] in STEP_PARAMS:
            assert stage["params"] == [f"{ds}.{k}" for k in STEP_PARAMS[job["rule"]]]


def test_accuracies_and_fid_are_dvc_metrics():
    # Issue 14: one metrics file per dataset (accuracies and FID; report.METRIC_KEYS) so that
    # `dvc metrics show` is a row per dataset; summary.json and fid.json (asserted to be metrics here
    # before) are plain outputs with the details.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    metrics = {next(iter(m)) for s in stages.values() for m in s.get("metrics", [])}
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])}
    assert metrics == {"results/digits/metrics.json"}
    assert {"results/digits/summary.json", "results/digits/fid.json"} <= outs


def test_lint_is_clean():
    out = snakemake(REPO, "--lint", check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_paper_dag_lists_the_paper_steps():
    out = snakemake(REPO, "-n", "--cores", "all", "--config", "datasets=[cifar100,tinyimagenet]")
    text = out.stdout
    for ds in ("cifar100", "tinyimagenet"):
        assert f"data/{ds}/train.npz" in text and f"checkpoints/{ds}/ema.pt" in text
    assert "weights/cifar10_uvit_small.pth" in text and "weights/imagenet64_uvit_mid.pth" in text
    assert "weights/pt_inception-2015-12-05-6726825d.pth" in text
    assert "torchrun --standalone --nproc_per_node 4" in text  # the paper trained on 4 GPUs


def test_step_modules_follow_the_imports_of_each_command():
    from diffdistill.dag import step_modules
    evaluate = step_modules("evaluate")
    # cmd_evaluate imports evaluate and imageset; evaluate imports convnet and augment; cli's main, progress.
    assert {"cli.py", "evaluate.py", "imageset.py", "convnet.py", "augment.py", "progress.py"} <= set(evaluate)
    assert "uvit.py" not in evaluate and "train.py" not in evaluate and "report.py" not in evaluate
    assert {"parallel.py", "checkpoint.py", "uvit.py", "diffusion.py"} <= set(step_modules("sample"))
    assert {"sweep.py", "figures.py"} <= set(step_modules("sweep")) and "audit.py" not in step_modules("sweep")
    assert all((REPO / "src" / "diffdistill" / m).is_file() for m in step_modules("train"))
    with pytest.raises(ValueError, match="no command 'nonsense'"):
        step_modules("nonsense")


def test_every_stage_depends_on_the_code_its_command_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    sweep = next(s for name, s in stages.items() if name.startswith("sweep_summary"))
    assert "src/diffdistill/sweep.py" in sweep["deps"] and "src/diffdistill/figures.py" in sweep["deps"]
    ev = next(s for name, s in stages.items() if name.startswith("evaluate"))
    assert "src/diffdistill/evaluate.py" in ev["deps"] and "src/diffdistill/train.py" not in ev["deps"]
