"""Fixtures shared by test files: one real single-node Slurm for the whole session."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent / "slurm" / "harness.sh"


def missing_slurm():
    """Why the real-Slurm tests cannot run here, or None."""
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch", "squeue") if shutil.which(c) is None]
    if missing:
        return f"Slurm not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "the single-node Slurm harness runs slurmd, which needs root"
    return None


needs_slurm = pytest.mark.skipif(missing_slurm() is not None, reason=missing_slurm() or "")


@pytest.fixture(scope="session")
def slurm_env():
    """A running single-node Slurm (tests/slurm/harness.sh); the environment that reaches it. Stopped
    at the end of the session, so the digits test and the rehearsal share one start."""
    state = Path(tempfile.mkdtemp(prefix="dd-slurm-"))
    start = subprocess.run(["bash", str(HARNESS), "start", str(state)], capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, f"harness failed to start:\n{start.stdout}\n{start.stderr}"
        env = dict(os.environ)
        env["SLURM_CONF"] = str(state / "slurm.conf")
        env["PATH"] = f"{state / 'bin'}{os.pathsep}{env['PATH']}"
        yield env
    finally:
        subprocess.run(["bash", str(HARNESS), "stop", str(state)], capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
