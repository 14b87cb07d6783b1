"""`dvc repro` runs the same steps as Snakemake and gets the same bytes: metrics, a no-op second run, a
param change that reruns only what depends on it, a Snakemake run committed as the DVC record. On the
tiny settings, written into each copy's params.yaml (DVC's params file).

One module fixture runs the tiny DAG twice, side by side in two fresh copies: `dvc repro` in one,
`snakemake` in the other; every test reuses those two runs."""
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from diffdistill.config import deep_update
from workflow import REPO, TINY, copy_workflow, env, run

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

# What measures wall-clock time differs between any two runs, whichever tool runs them: JSON keys
# (seconds, images per second, the sampling timeline and the line fitted to it) and table columns
# (sampling and training time, images/s). Everything else must be byte-identical.
TIMED_KEY = re.compile(r"seconds|per_second|^timeline$|^linear_fit$")
TIMED_COLUMN = re.compile(r"seconds|time|hms|images / s|images_per_second")
# The sweep figure's right panel plots the sampling timeline.
TIMED_FIGURES = {"results/figures/digits_sweep.png"}


def stages_of(work):
    return set(yaml.safe_load((work / "dvc.yaml").read_text())["stages"])


def ran_stages(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


def tracked_files(work):
    """Every file dvc.lock records as a stage's output (outs, metrics and plots all land in `outs`)."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    return sorted({o["path"] for stage in lock.values() for o in stage.get("outs", [])})


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_timing(path):
    """A file's content less what measures time: timed JSON keys, timed table columns; None for a
    binary file (no timed parts to set aside)."""
    if path.suffix not in (".json", ".csv", ".md"):
        return None
    text = path.read_text()
    if path.suffix == ".json":
        def strip(x):
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if not TIMED_KEY.search(k)}
            return [strip(v) for v in x] if isinstance(x, list) else x
        return strip(json.loads(text))
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        keep = [i for i, h in enumerate(rows[0]) if not TIMED_COLUMN.search(h)]
        return [[r[i] for i in keep] for r in rows]
    if path.suffix == ".md":
        out, keep = [], None
        for line in text.splitlines():
            if not line.startswith("|"):
                keep = None                               # a table ends; the next has its own header
                out.append(line)
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if keep is None:                              # the header row names the columns
                keep = [i for i, h in enumerate(cells) if not TIMED_COLUMN.search(h)]
            out.append([cells[i] for i in keep])
    return out


def clean_env():
    """The test environment without OMP_NUM_THREADS: every step must set its own thread count
    (--threads), as it must for a user's `dvc repro`, where no Snakemake sets the variable."""
    e = env()
    e.pop("OMP_NUM_THREADS", None)
    return e


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load(TINY.read_text()))
    works = {}
    for name in ("dvc", "snakemake"):
        work = copy_workflow(tmp_path_factory.mktemp(name))
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run([DVC, "init", "--no-scm", "-q"], work)
        works[name] = work
    run([sys.executable, "-m", "diffdistill", "dvc-yaml"], works["dvc"])
    shutil.copy(works["dvc"] / "dvc.yaml", works["snakemake"] / "dvc.yaml")
    console = works["snakemake"] / "console.txt"
    # Side by side, to keep CI time down: the two copies share no file.
    with open(console, "w") as out:
        snake = subprocess.Popen([SNAKEMAKE, "--cores", "2"], cwd=works["snakemake"], env=clean_env(),
                                 stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            first = subprocess.run([DVC, "repro"], cwd=works["dvc"], env=clean_env(), capture_output=True,
                                   text=True, timeout=1200)
            snake_rc = snake.wait(timeout=1200)
        finally:
            if snake.poll() is None:
                snake.kill()
                snake.wait()
    assert first.returncode == 0, f"dvc repro failed:\n{first.stdout[-4000:]}\n{first.stderr[-4000:]}"
    assert snake_rc == 0, f"snakemake failed:\n{console.read_text()[-4000:]}"
    return SimpleNamespace(dvc=works["dvc"], dvc_output=first.stdout + first.stderr, snakemake=works["snakemake"],
                           console=console.read_text(), **fingerprints(works))


def fingerprints(works):
    """Hashed right after the runs, before any test changes a parameter and reruns something: the
    sha256 of every tracked file in each copy, and the content less timings of those that differ."""
    files = tracked_files(works["dvc"])
    hashes = {name: {f: sha256(w / f) for f in files if (w / f).exists()} for name, w in works.items()}
    differ = [f for f in files if f in hashes["dvc"] and f in hashes["snakemake"]
              and hashes["dvc"][f] != hashes["snakemake"][f]]
    timed = {f: {name: without_timing(w / f) for name, w in works.items()} for f in differ}
    return dict(files=files, hashes=hashes, timed=timed)


@pytest.fixture(scope="module")
def dvc_repo(runs):
    return runs.dvc, runs.dvc_output


def test_repro_runs_every_stage_and_records_metrics(dvc_repo):
    work, output = dvc_repo
    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    assert ran_stages(output) == set(stages)
    shown = run([DVC, "metrics", "show"], work).stdout
    # issue 14: the metrics file is results/{ds}/metrics.json (was summary.json, keys synthetic.mean...)
    assert "results/digits/metrics.json" in shown
    assert re.search(r"synthetic_acc\s", shown) and re.search(r"full_real_acc\s", shown)
    assert max(map(len, shown.splitlines())) <= 120


def test_snakemake_and_dvc_write_the_same_bytes(runs):
    """Every file dvc.lock tracks, from two fresh copies: one run by Snakemake, one by `dvc repro`."""
    missing = {name: [f for f in runs.files if f not in runs.hashes[name]] for name in runs.hashes}
    assert missing == {"dvc": [], "snakemake": []}
    same = {f for f in runs.files if runs.hashes["dvc"][f] == runs.hashes["snakemake"][f]}
    # The data, models, samples and curves are byte-identical: the reference classifier (once saved
    # under a random temporary name, recorded inside the file) and what depends on it included.
    for f in ("data/digits/classifier.pt", "data/digits/fid_stats.npz", "checkpoints/digits/ema.pt",
              "synthetic/digits/samples.npz", "synthetic/digits/selected.npz", "checkpoints/digits/loss.csv"):
        assert f in same, f
    assert {f for f in runs.files if f.endswith((".npz", ".pt"))} <= same
    # Anything else may differ only in what measures time; the rest of it (accuracies, FID, counts) agrees.
    for f in sorted(set(runs.files) - same):
        if f in TIMED_FIGURES:
            continue
        dvc_content, snakemake_content = runs.timed[f]["dvc"], runs.timed[f]["snakemake"]
        assert dvc_content is not None, f"{f} differs between the two runs"
        assert dvc_content == snakemake_content, f"{f} differs in more than its timings"


def test_a_snakemake_run_becomes_the_dvc_record(runs):
    """After `snakemake`, `dvc commit -f` records its outputs; DVC then finds nothing to do."""
    work = runs.snakemake
    run([DVC, "commit", "-f"], work)
    status = run([DVC, "status"], work)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    out = run([DVC, "repro"], work)
    assert ran_stages(out.stdout + out.stderr) == set()
    # The record names the same content as DVC's own run, timings aside.
    mine, theirs = (yaml.safe_load((w / "dvc.lock").read_text())["stages"] for w in (work, runs.dvc))
    assert set(mine) == set(theirs)
    for name, stage in mine.items():
        md5 = {o["path"]: o["md5"] for o in theirs[name].get("outs", [])}
        for o in stage.get("outs", []):
            if o["path"] not in runs.timed and o["path"] not in TIMED_FIGURES:
                assert o["md5"] == md5[o["path"]], o["path"]


def test_snakemake_console_is_calm(runs):
    """No progress frames on the console: one headline per finished step; progress goes to the logs."""
    console, work = runs.console, runs.snakemake
    assert "\r" not in console and "diffdistill.progress" not in console
    assert not re.search(r"\d+%\|", console)                      # no tqdm bar
    evaluations = sorted(p.stem for p in (work / "results/digits/eval").glob("*.json"))
    assert len(evaluations) == 6
    for stem in evaluations:
        set_, seed = re.fullmatch(r"(\w+)_seed(\d+)", stem).groups()
        assert re.search(rf"evaluate digits {set_} seed {seed}: accuracy \d\.\d{{4}}", console), stem
    assert re.search(r"train digits: \d+ steps", console)
    train_log = (work / "logs/digits/train_diffusion.log").read_text()
    assert "diffdistill.progress INFO train: " in train_log and "(100%)" in train_log


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
