"""`dvc repro` runs the same steps as Snakemake: metrics, a no-op second run, a param change that reruns
only what depends on it. On the tiny settings, written into the copy's params.yaml (DVC's params file)."""
import re
import sys
from pathlib import Path

import pytest
import yaml

from diffdistill.config import deep_update
from workflow import REPO, TINY, copy_workflow, run

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")


def stages_of(work):
    return set(yaml.safe_load((work / "dvc.yaml").read_text())["stages"])


def ran_stages(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("dvc"))
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load(TINY.read_text()))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([DVC, "init", "--no-scm", "-q"], work)
    run([sys.executable, "-m", "diffdistill", "dvc-yaml"], work)
    first = run([DVC, "repro"], work, timeout=1200)
    return work, first.stdout + first.stderr


def test_repro_runs_every_stage_and_records_metrics(dvc_repo):
    work, output = dvc_repo
    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    assert ran_stages(output) == set(stages)
    shown = run([DVC, "metrics", "show"], work).stdout
    # issue 14: the metrics file is results/{ds}/metrics.json (was summary.json, keys synthetic.mean...)
    assert "results/digits/metrics.json" in shown
    assert re.search(r"synthetic_acc\s", shown) and re.search(r"full_real_acc\s", shown)
    assert max(map(len, shown.splitlines())) <= 120


def test_second_repro_does_nothing(dvc_repo):
    work, _ = dvc_repo
    out = run([DVC, "repro"], work)
    assert ran_stages(out.stdout + out.stderr) == set()


def test_changed_parameter_reruns_only_its_dependents(dvc_repo):
    work, _ = dvc_repo
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["digits"]["evaluate"]["epochs"] += 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([DVC, "repro"], work)
    rerun = ran_stages(out.stdout + out.stderr)
    upstream = ("prepare_data_", "reference_classifier_", "fid_stats_", "train_diffusion_", "sample_",
                "select_", "fid_digits", "audit_")
    assert not [s for s in rerun if s.startswith(upstream)], rerun
    assert {s for s in rerun if s.startswith("evaluate_")} == {s for s in stages_of(work) if s.startswith("evaluate_")}
