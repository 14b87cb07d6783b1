"""io.py: outputs are atomic, reproducible to the byte, and get the mode the user's umask gives; the
progress helper logs lines when it may not draw bars; the CLI sets its thread count."""
import hashlib
import logging
import os
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from diffdistill import io as dio
from diffdistill import progress as P
from diffdistill.convnet import ConvNet
from diffdistill.fid import ConvNetFeatures


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def umask():
    """Set a umask for the test, and restore the one before."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask):
        os.umask(mask)
    yield set_
    os.umask(saved)


# ---------------------------------------------------------------- the same content, the same bytes

def test_save_torch_gives_the_same_bytes_whatever_the_temporary_name(tmp_path):
    # The reference classifier was the case: torch.save to a file records the (random) file name.
    net = ConvNet(in_channels=1, num_classes=3, width=8, depth=2, image_size=8)
    ext = ConvNetFeatures(net, [0.5], [0.25])
    ext.save(tmp_path / "a.pt", dict(in_channels=1, num_classes=3, width=8, depth=2, image_size=8))
    ext.save(tmp_path / "b.pt", dict(in_channels=1, num_classes=3, width=8, depth=2, image_size=8))
    assert sha(tmp_path / "a.pt") == sha(tmp_path / "b.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as z:
        assert {n.split("/")[0] for n in z.namelist()} == {"archive"}   # no temporary name inside
    loaded = ConvNetFeatures.load(tmp_path / "b.pt")
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.convnet.state_dict()[k], v)
    # the plain torch.save of the same object differs between two names: what save_torch avoids
    torch.save({"w": torch.ones(3)}, tmp_path / "x.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "y.pt")
    assert sha(tmp_path / "x.pt") != sha(tmp_path / "y.pt")
    dio.save_torch(tmp_path / "x.pt", {"w": torch.ones(3)})
    dio.save_torch(tmp_path / "y.pt", {"w": torch.ones(3)})
    assert sha(tmp_path / "x.pt") == sha(tmp_path / "y.pt")


def test_save_npz_gives_the_same_bytes_at_another_time(tmp_path, monkeypatch):
    import time as time_mod

    arrays = dict(images=np.arange(24, dtype=np.uint8).reshape(2, 3, 4, 1), labels=np.array([0, 1]),
                  classes=np.array(["a", "b"]))
    dio.save_npz(tmp_path / "a.npz", **arrays)
    # npz is a zip, whose members could carry the time they were written: they must not
    later = time_mod.time() + 3 * 86400
    monkeypatch.setattr(time_mod, "time", lambda: later)
    dio.save_npz(tmp_path / "b.npz", **arrays)
    assert sha(tmp_path / "a.npz") == sha(tmp_path / "b.npz")
    back = dio.load_npz(tmp_path / "b.npz")
    assert set(back) == set(arrays)
    for k in arrays:
        assert back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k])


# ---------------------------------------------------------------- modes under the umask

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_mode_of_any_new_file(tmp_path, umask, mask):
    umask(mask)
    dio.save_json(tmp_path / "r.json", {"a": 1})
    dio.save_npz(tmp_path / "r.npz", x=np.zeros(2))
    dio.save_torch(tmp_path / "r.pt", {"x": torch.zeros(2)})
    with dio.atomic_dir(tmp_path / "pngs") as tmp:
        (tmp / "0_0.png").write_bytes(b"x")
    (tmp_path / "plain").write_text("")           # what open() gives any new file
    want = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert want == 0o666 & ~mask
    for name in ("r.json", "r.npz", "r.pt", "pngs/0_0.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert stat.S_IMODE((tmp_path / "pngs").stat().st_mode) == 0o777 & ~mask


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with dio.atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- atomic_dir never loses both

def _folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)


def test_atomic_dir_replaces_the_old_folder(tmp_path):
    _folder(tmp_path / "out", "old")
    with dio.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("new")
    assert (tmp_path / "out" / "f.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]           # no temporary or old folder left


def _crash(*args, **kwargs):
    raise OSError("crash")


def test_without_an_atomic_swap_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(dio, "_exchange", lambda a, b: False)    # e.g. not Linux: rename aside
    _folder(tmp_path / "out", "old")
    real_replace, calls = os.replace, []

    def replace(a, b):   # the 2nd rename (the new folder in) fails, after the old one went aside
        calls.append(b)
        if len(calls) == 2:
            raise OSError("crash")
        real_replace(a, b)

    monkeypatch.setattr(dio.os, "replace", replace)
    with pytest.raises(OSError, match="crash"):
        with dio.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("new")
    assert (tmp_path / "out" / "f.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-swap", "rename-aside"])
def test_a_crash_before_the_old_folder_is_deleted_leaves_the_new_one(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(dio, "_exchange", lambda a, b: False)
    _folder(tmp_path / "out", "old")
    monkeypatch.setattr(dio.shutil, "rmtree", _crash)   # the last step, deleting the old folder, fails
    with pytest.raises(OSError, match="crash"):
        with dio.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("new")
    assert (tmp_path / "out" / "f.txt").read_text() == "new"


def test_the_exchange_is_atomic_where_the_system_has_it(tmp_path):
    _folder(tmp_path / "a", "a")
    _folder(tmp_path / "b", "b")
    if not dio._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2 RENAME_EXCHANGE here")
    assert (tmp_path / "a" / "f.txt").read_text() == "b" and (tmp_path / "b" / "f.txt").read_text() == "a"


# ---------------------------------------------------------------- progress

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_progress_logs_every_tenth_and_every_30_seconds(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger=P.log.name):
        bar = P.LogProgress(total=1000, desc="train", unit="step", clock=clock)
        for _ in range(1000):
            clock.t += 0.001
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10, lines                        # 10%, 20%, … 100%; close adds nothing
    assert lines[0].startswith("train: 100/1000 step (10%)") and "1000/1000 step (100%)" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=P.log.name):
        bar = P.LogProgress(total=10_000, desc="slow", unit="img", clock=clock)
        for _ in range(5):             # 5 images in 100 s: no tenth reached, so time decides
            clock.t += 20
            bar.update(1)
        bar.set_postfix(loss="0.5")
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[0].startswith("slow: 2/10000 img") and lines[-1].endswith("loss 0.5")


def test_log_progress_without_a_total_and_disabled(caplog):
    with caplog.at_level(logging.INFO, logger=P.log.name):
        assert list(P.LogProgress(range(3), desc="x")) == [0, 1, 2]
        quiet = P.LogProgress(total=5, disable=True)
        quiet.update(5)
        quiet.close()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["x: 3 it"]


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(P, "_bars", None)
    monkeypatch.delenv(P.ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))
    assert not P.bars_enabled() and isinstance(P.progress(total=3), P.LogProgress)
    P.configure(True)
    from tqdm import tqdm
    bar = P.progress(total=3)
    assert isinstance(bar, tqdm)
    bar.close()
    assert os.environ[P.ENV] == "bars"          # spawned workers inherit the choice
    P.configure(False)
    assert os.environ[P.ENV] == "lines" and not P.bars_enabled()
    P.configure(None)
    assert P.ENV not in os.environ


def test_cli_under_a_log_file_keeps_progress_and_details_off_the_console(tmp_path):
    """What a Snakemake job prints: the headline and nothing else; the log file has the progress."""
    from workflow import REPO, env

    cmd = [sys.executable, "-m", "diffdistill", "prepare", "--params", str(REPO / "params.yaml"),
           "--dataset", "digits", "--out", "data/digits", "--threads", "1", "--log-file", "prepare.log"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    console = [line for line in r.stderr.splitlines() if line.strip()]
    n_train, n_test = (len(dio.load_npz(tmp_path / f"data/digits/{s}.npz")["labels"]) for s in ("train", "test"))
    assert len(console) == 1, console
    assert f"prepare digits: {n_train} training and {n_test} test images" in console[0], console
    assert "prepared digits" in (tmp_path / "prepare.log").read_text()
    assert r.stdout == ""


def test_cli_threads(tmp_path):
    from workflow import REPO, env

    code = ("import sys, torch; from diffdistill import cli; cli._set_threads(int(sys.argv[1])); "
            "import os; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])")
    e = env()
    e.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code, "3"], env=e, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "3", "3"]
    bad = subprocess.run([sys.executable, "-m", "diffdistill", "prepare", "--params", str(REPO / "params.yaml"),
                          "--dataset", "digits", "--out", "d", "--threads", "0"], cwd=tmp_path, env=e,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--threads: must be a whole number of threads, 1 or more" in bad.stderr
    assert not (tmp_path / "d").exists()
