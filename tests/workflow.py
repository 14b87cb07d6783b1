"""Helpers for tests that run the real workflow in a temporary copy of the repository."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_params.yaml"
WORKFLOW_FILES = ["Snakefile", "rules", "params.yaml", "schemas", "profiles", "envs", "report", "slurm", "src"]


def copy_workflow(dst):
    """The workflow's own files (not data/, results/, …) into ``dst``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name)
        elif src.exists():
            shutil.copy2(src, dst / name)
    return dst


def env():
    """The running interpreter's bin first on PATH, so rules' `python -m diffdistill` is this install."""
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("SNAKEMAKE_PROFILE", None)
    return e


def run(cmd, cwd, check=True, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def snakemake(cwd, *args, check=True, timeout=900):
    return run([str(Path(sys.executable).parent / "snakemake"), *args], cwd, check=check, timeout=timeout)
