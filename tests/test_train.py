"""Tests of the finetune loop on a tiny U-ViT (img 8, patch 2, D 32, depth 2, heads 2) and made data."""
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill import diffusion
from diffdistill import train as train_mod
from diffdistill.checkpoint import build_model, null_class_index
from diffdistill.train import TrainingDiverged, batch_indices, draw_step, ema_update, lr_at, settings, train

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import TINY_MODEL, TINY_TRAIN, make_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "ddp_worker.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def run(out, data=None, stop_after=None, **overrides):
    return train(TINY_MODEL, {**TINY_TRAIN, **overrides}, make_data() if data is None else data, out,
                 device="cpu", progress=False, stop_after=stop_after)


def state(out):
    return torch.load(Path(out) / "state.pt", map_location="cpu", weights_only=True)


def assert_same(a, b, exact=True, rtol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            rel = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)
            assert rel < rtol, (k, float(rel))


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def worker_env():
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               DD_THREADS=str(torch.get_num_threads()))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---------------------------------------------------------------------------------------------- resume

def test_stop_after_then_resume_equals_uninterrupted(tmp_path):
    full = run(tmp_path / "full", steps=6, checkpoint_every=100)
    part = run(tmp_path / "part", steps=6, checkpoint_every=100, stop_after=3)
    assert part["stopped_early"] and state(tmp_path / "part")["step"] == 3
    assert not (tmp_path / "part" / "ema.pt").exists()          # a kill leaves no finished-looking output
    rest = run(tmp_path / "part", steps=6, checkpoint_every=100)
    assert rest["resumed_from"] == 3 and full["resumed_from"] is None
    a, b = state(tmp_path / "full"), state(tmp_path / "part")
    assert_same(a["model"], b["model"])
    assert_same(a["ema"], b["ema"])
    ema_a = torch.load(tmp_path / "full" / "ema.pt", weights_only=True)
    assert_same(ema_a, torch.load(tmp_path / "part" / "ema.pt", weights_only=True))
    assert_same(ema_a, a["ema"])
    # loss.csv is continuous across the stop: identical to the uninterrupted one
    assert (tmp_path / "full" / "loss.csv").read_text() == (tmp_path / "part" / "loss.csv").read_text()
    rows = list(csv.DictReader(open(tmp_path / "part" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((tmp_path / "part" / "train.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"] == 3 and summary["world_size"] == 1


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    cfg = dict(steps=6, checkpoint_every=2)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "killed"), json.dumps(cfg), "--slow", "0.25"],
                            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "killed" / "state.pt").exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, "worker wrote no checkpoint"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = state(tmp_path / "killed")["step"]
    assert killed_at in (2, 4) and not (tmp_path / "killed" / "ema.pt").exists()
    resumed = run(tmp_path / "killed", **cfg)
    assert resumed["resumed_from"] == killed_at
    run(tmp_path / "ref", **cfg)
    assert_same(state(tmp_path / "ref")["model"], state(tmp_path / "killed")["model"])
    assert_same(torch.load(tmp_path / "ref" / "ema.pt", weights_only=True),
                torch.load(tmp_path / "killed" / "ema.pt", weights_only=True))
    assert (tmp_path / "ref" / "loss.csv").read_text() == (tmp_path / "killed" / "loss.csv").read_text()
    # a kill mid-write may leave a temporary file, never a finished-looking one
    names = {p.name for p in (tmp_path / "killed").iterdir()}
    assert {n for n in names if ".tmp" not in n} == {"state.pt", "loss.csv", "ema.pt", "train.json"}


def test_resume_only_when_config_matches(tmp_path, caplog):
    run(tmp_path, steps=2)
    assert run(tmp_path, steps=3)["resumed_from"] == 2           # more steps: same run, continue
    with caplog.at_level("WARNING", logger="diffdistill.train"):
        fresh = run(tmp_path, steps=3, lr=5e-4)                  # another lr: another run
    assert fresh["resumed_from"] is None
    assert "starting fresh" in caplog.text and "hash" in caplog.text
    data = make_data(seed=1)                                     # other data: another run too
    assert run(tmp_path, data=data, steps=3, lr=5e-4)["resumed_from"] is None


# ---------------------------------------------------------------------------------------------- equivalences

def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    run(tmp_path / "one", steps=3, micro_batch=32, checkpoint_every=100)
    run(tmp_path / "acc", steps=3, micro_batch=8, checkpoint_every=100)
    a, b = state(tmp_path / "one"), state(tmp_path / "acc")
    assert_same(a["model"], b["model"], exact=False, rtol=1e-6)
    assert_same(a["ema"], b["ema"], exact=False, rtol=1e-6)
    assert np.allclose([r[1] for r in a["history"]], [r[1] for r in b["history"]], rtol=1e-6)
    torch.manual_seed(TINY_TRAIN["seed"])
    init = build_model(TINY_MODEL).state_dict()                 # the comparison is not vacuous:
    assert all(not torch.equal(init[k], a["model"][k]) for k in init)   # every tensor was trained


def test_ddp_two_processes_equal_one(tmp_path):
    cfg = dict(steps=3, micro_batch=8, checkpoint_every=100)     # 2 processes × 2 micro-batches × 8 = 32
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER),
                           str(tmp_path / "ddp"), json.dumps(cfg)],
                          env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run(tmp_path / "single", steps=3, micro_batch=32, checkpoint_every=100)
    a, b = state(tmp_path / "single"), state(tmp_path / "ddp")
    assert_same(a["model"], b["model"], exact=False, rtol=1e-6)
    assert_same(a["ema"], b["ema"], exact=False, rtol=1e-6)
    assert np.allclose([r[1] for r in a["history"]], [r[1] for r in b["history"]], rtol=1e-6)
    summary = json.loads((tmp_path / "ddp" / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    # only rank 0 wrote: no stray temporary files from a second writer
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["ema.pt", "loss.csv", "state.pt", "train.json"]


def test_draws_are_a_function_of_seed_and_step():
    cfg = settings({**TINY_TRAIN, "batch_size": 8})
    a, b, c = (draw_step(k, cfg, 40, (3, 8, 8), torch.device("cpu")) for k in (3, 3, 4))
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["noise"], c["noise"]) and not torch.equal(a["t"], c["t"])
    # one epoch of 40 images in batches of 8 visits every image exactly once
    epoch = torch.cat([batch_indices(k, 8, 40, seed=0) for k in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))
    # a batch that straddles two epochs (40 = 1.25 × 32) takes the end of one and the start of the next
    assert len(batch_indices(1, 32, 40, seed=0)) == 32


# ---------------------------------------------------------------------------------------------- divergence

def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, steps=6, checkpoint_every=2, stop_after=2)
    before = {p.name: sha(p) for p in tmp_path.iterdir() if p.is_file()}
    assert set(before) == {"state.pt", "loss.csv"}
    original, calls = diffusion.training_loss, []

    def nan_on_second_call(*args, **kwargs):                     # resumed at 2: the 2nd call is step 4
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(diffusion, "training_loss", nan_on_second_call)
    with pytest.raises(TrainingDiverged, match=r"step 4.*kept.*Lower train.lr.*fp32"):
        run(tmp_path, steps=6, checkpoint_every=2)
    after = {p.name: sha(p) for p in tmp_path.iterdir() if p.is_file()}
    assert after == before                                       # state.pt untouched, nothing new
    assert state(tmp_path)["step"] == 2


def test_huge_lr_diverges_with_clear_error(tmp_path):
    with pytest.raises(TrainingDiverged, match="became (nan|inf).*step"):
        run(tmp_path, steps=10, lr=1e30, warmup_steps=0, checkpoint_every=100)
    assert not (tmp_path / "state.pt").exists()
    assert issubclass(TrainingDiverged, ValueError)


# ---------------------------------------------------------------------------------------------- bad input

def _bad(kind):
    d = make_data()
    model, cfg = dict(TINY_MODEL), dict(TINY_TRAIN)
    if kind == "empty":
        d = {**d, "images": d["images"][:0], "labels": d["labels"][:0]}
    elif kind == "label":
        d["labels"] = d["labels"].copy()
        d["labels"][0] = 4
    elif kind == "negative":
        d["labels"] = d["labels"].copy()
        d["labels"][0] = -1
    elif kind == "size":
        model["img_size"] = 16
    elif kind == "channels":
        d = {**d, "images": d["images"][..., :1]}
    elif kind == "batch":
        cfg["micro_batch"] = 12
    elif kind == "classes":
        model["num_classes"] = 6
    return model, cfg, d


@pytest.mark.parametrize("kind,match", [
    ("empty", "non-empty"), ("label", "labels range over 0..4"), ("negative", "labels range over -1"),
    ("size", "expects 16x16"), ("channels", "with 1 channels"), ("batch", "not divisible by micro_batch"),
    ("classes", "names 4 classes"),
])
def test_bad_input_raises_before_writing(tmp_path, kind, match):
    model, cfg, d = _bad(kind)
    with pytest.raises(ValueError, match=match):
        train(model, cfg, d, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- pieces

def test_ema_math(tmp_path):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ea, pb = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * ea + 0.1 * pb)
    # in training: one step with decay 0.25 -> ema = 0.25 · initial + 0.75 · updated
    run(tmp_path, steps=1, ema_decay=0.25)
    torch.manual_seed(TINY_TRAIN["seed"])
    init = build_model(TINY_MODEL).state_dict()
    s = state(tmp_path)
    for k in init:
        assert torch.allclose(s["ema"][k], 0.25 * init[k] + 0.75 * s["model"][k], atol=1e-7), k
    assert not torch.equal(s["ema"]["pos_embed"], s["model"]["pos_embed"])


def test_warmup_lr(tmp_path):
    assert [lr_at(k, 1e-3, 4) for k in (1, 2, 3, 4, 5, 100)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert lr_at(1, 2e-4, 0) == 2e-4
    run(tmp_path, steps=6, warmup_steps=4)
    rows = list(csv.DictReader(open(tmp_path / "loss.csv")))
    assert [float(r["lr"]) for r in rows] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert all(np.isfinite(float(r["loss"])) for r in rows)


def test_fid_curve_and_best_ema(tmp_path):
    fids, seen = {2: 5.0, 4: 3.0, 5: 4.0}, {}

    def fake_fid(ema_model, step):
        assert isinstance(ema_model, torch.nn.Module) and not ema_model.training
        seen[step] = {k: v.clone() for k, v in ema_model.state_dict().items()}
        return fids[step]

    summary = train(TINY_MODEL, {**TINY_TRAIN, "steps": 5, "fid_every": 2}, make_data(), tmp_path,
                    eval_fn=fake_fid, device="cpu", progress=False)
    assert sorted(seen) == [2, 4, 5]                               # every fid_every steps and at the end
    rows = list(csv.DictReader(open(tmp_path / "fid_curve.csv")))
    assert [(int(r["step"]), float(r["fid"])) for r in rows] == [(2, 5.0), (4, 3.0), (5, 4.0)]
    assert_same(torch.load(tmp_path / "best_ema.pt", weights_only=True), seen[4])
    assert summary["best_fid"] == 3.0 and summary["best_fid_step"] == 4


def test_label_dropout_null_class_and_cpu_precision(tmp_path):
    cfg = {**TINY_TRAIN, "label_dropout": 0.5, "precision": "bf16", "hflip": True}
    assert null_class_index(TINY_MODEL, cfg) == 4 and null_class_index(TINY_MODEL, TINY_TRAIN) is None
    assert build_model(TINY_MODEL, cfg).label_emb.weight.shape == (5, 32)
    summary = train(TINY_MODEL, {**cfg, "steps": 2}, make_data(), tmp_path, device="cpu", progress=False)
    assert summary["null_class"] == 4 and summary["precision"] == "fp32"      # CPU never autocasts
    ema = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert ema["label_emb.weight"].shape == (5, 32)
    # the null row was trained (some labels were dropped): it moved away from its initial value
    torch.manual_seed(TINY_TRAIN["seed"])
    init = build_model(TINY_MODEL, cfg).state_dict()
    assert not torch.equal(ema["label_emb.weight"][4], init["label_emb.weight"][4])
    # flipping changes the data the model saw
    run(tmp_path / "noflip", steps=2, label_dropout=0.5)
    assert not torch.equal(state(tmp_path)["model"]["pos_embed"], state(tmp_path / "noflip")["model"]["pos_embed"])


# ---------------------------------------------------------------------------------------------- FID settings

def counting_fid(values=None):
    """A fake eval_fn: records the steps it was called at, returns 10 / step (or values[step])."""
    calls = []

    def fake(ema_model, step):
        calls.append(step)
        return (values or {}).get(step, 10.0 / step)

    fake.calls = calls
    return fake


def fid_rows(out):
    return [(int(r["step"]), float(r["fid"])) for r in csv.DictReader(open(Path(out) / "fid_curve.csv"))]


def test_changed_fid_settings_resume_instead_of_restarting(tmp_path, caplog):
    cfg = dict(TINY_TRAIN, steps=6, checkpoint_every=2, fid_every=2, fid_samples=10, fid_steps=4)
    first = counting_fid()
    part = train(TINY_MODEL, cfg, make_data(), tmp_path / "run", eval_fn=first, device="cpu", progress=False,
                 stop_after=4)
    assert part["stopped_early"] and first.calls == [2, 4] and state(tmp_path / "run")["step"] == 4
    # a killed multi-day run, restarted with other FID settings (more images, more solver steps)
    second = counting_fid({6: 1.5})
    with caplog.at_level("WARNING", logger="diffdistill.train"):
        rest = train(TINY_MODEL, dict(cfg, fid_samples=20, fid_steps=8, fid_batch_size=7), make_data(),
                     tmp_path / "run", eval_fn=second, device="cpu", progress=False)
    assert rest["resumed_from"] == 4 and rest["steps"] == 6 and "starting fresh" not in caplog.text
    assert second.calls == [6]                                   # steps 1-4 were not trained again
    rows = list(csv.DictReader(open(tmp_path / "run" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # The two points measured with 10 images are not comparable with ones of 20: they leave the curve
    # (kept in state.pt), the best FID restarts under the new settings.
    assert fid_rows(tmp_path / "run") == [(6, 1.5)]
    assert rest["fid_points_superseded"] == 2 and rest["best_fid"] == 1.5 and rest["best_fid_step"] == 6
    s = state(tmp_path / "run")
    assert s["fid_earlier"] == [{"settings": {"fid_samples": 10, "fid_steps": 4, "fid_batch_size": 500},
                                 "points": [[2, 5.0], [4, 2.5]]}]
    assert s["fid_settings"] == {"fid_samples": 20, "fid_steps": 8, "fid_batch_size": 7}
    assert "FID settings changed" in caplog.text
    # the weights are those of an uninterrupted run: the FID settings never touched training
    run(tmp_path / "ref", steps=6, checkpoint_every=100)
    assert_same(state(tmp_path / "ref")["model"], s["model"])
    assert_same(state(tmp_path / "ref")["ema"], s["ema"])


def test_finished_run_remeasures_its_final_fid_when_fid_settings_change(tmp_path):
    cfg = dict(TINY_TRAIN, steps=4, fid_every=2, fid_samples=10)
    train(TINY_MODEL, cfg, make_data(), tmp_path, eval_fn=counting_fid(), device="cpu", progress=False)
    same = counting_fid()
    assert train(TINY_MODEL, dict(cfg, fid_every=4), make_data(), tmp_path, eval_fn=same, device="cpu",
                 progress=False)["resumed_from"] == 4
    assert same.calls == [] and fid_rows(tmp_path) == [(2, 5.0), (4, 2.5)]   # fid_every alone: nothing to redo
    again = counting_fid({4: 7.0})
    summary = train(TINY_MODEL, dict(cfg, fid_steps=9), make_data(), tmp_path, eval_fn=again, device="cpu",
                    progress=False)
    assert summary["resumed_from"] == 4 and again.calls == [4]
    assert fid_rows(tmp_path) == [(4, 7.0)] and summary["best_fid"] == 7.0


def test_state_from_before_fid_settings_left_the_hash_is_resumed(tmp_path):
    """A run in flight when NOT_HASHED grew (its state.pt carries the old hash) is continued."""
    from diffdistill.train import _LEGACY_NOT_HASHED, config_hash, data_fingerprint

    cfg = dict(TINY_TRAIN, steps=4, checkpoint_every=2, fid_samples=10, fid_steps=4)
    run(tmp_path, stop_after=2, **cfg)
    s = state(tmp_path)
    data = make_data()
    legacy = config_hash(TINY_MODEL, cfg, data_fingerprint(data["images"], data["labels"]), _LEGACY_NOT_HASHED)
    assert legacy != s["config_hash"]                            # the old hash did include the FID settings
    s["config_hash"] = legacy
    del s["fid_settings"], s["fid_earlier"]
    torch.save(s, tmp_path / "state.pt")
    assert run(tmp_path, **cfg)["resumed_from"] == 2
    # under other FID settings the old hash no longer matches: that state belonged to another run
    s["config_hash"] = legacy
    torch.save(s, tmp_path / "state.pt")
    assert run(tmp_path, **dict(cfg, steps=4, fid_samples=11))["resumed_from"] is None


# ---------------------------------------------------------------------------------------------- FID under DDP

@pytest.fixture()
def convnet_stats(tmp_path):
    """FID statistics of the made data under a random (untrained) ConvNet: features that depend on the
    images, made in milliseconds. depth 2 at 8 px: 32-d features."""
    from diffdistill import fid
    from diffdistill.convnet import ConvNet

    torch.manual_seed(0)
    net = ConvNet(in_channels=3, num_classes=4, image_size=8, depth=2, width=8)
    classifier = tmp_path / "classifier.pt"
    fid.ConvNetFeatures(net, [0.5] * 3, [0.25] * 3).save(classifier, dict(in_channels=3, num_classes=4,
                                                                           image_size=8, depth=2, width=8))
    stats = tmp_path / "fid_stats.npz"
    fid.write_stats({"features": "convnet"}, make_data(), stats, classifier_path=classifier, progress=False)
    return stats


def test_sample_range_pieces_are_the_one_process_run(tmp_path):
    """sample_range over consecutive ranges gives the images of one cap run, whatever the split."""
    from ddp_worker import fixed_model

    from diffdistill import sample
    cfg = {"budget_seconds": None, "max_per_class": 3, "batch_size": 4, "steps": 3, "variant": "fast",
           "guidance_scale": 0.0, "seed": 5, "precision": "fp32"}
    model = fixed_model()
    whole, _ = sample.sample(model, cfg, 4, "cpu", progress=False)          # 12 images in batches of 4
    parts = [sample.sample_range(model, cfg, 4, "cpu", lo, hi) for lo, hi in ((0, 5), (5, 6), (6, 6), (6, 11))]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    assert images.shape == (11, 8, 8, 3) and labels.tolist() == [i % 4 for i in range(11)]
    diff = np.abs(images.astype(int) - whole["images"][:11].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3                      # float rounding at most
    assert len(np.unique(images.reshape(11, -1), axis=0)) == 11               # not one image repeated
    with pytest.raises(ValueError, match="start <= stop"):
        sample.sample_range(model, cfg, 4, "cpu", 3, 2)


def test_ddp_fid_points_are_shared_by_the_ranks_and_equal_one_process(tmp_path, convnet_stats):
    """Two gloo processes: each samples half of every FID point, and the curve and the FID of a fixed
    model equal the one-process values."""
    from ddp_worker import fid_block, fixed_model

    cfg = dict(steps=4, micro_batch=8, checkpoint_every=100, fid_every=2, fid_samples=10, fid_steps=3,
               fid_batch_size=4)
    t0 = time.time()
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER),
                           str(tmp_path / "ddp"), json.dumps(cfg), "--fid", str(convnet_stats)],
                          env=worker_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_seconds = time.time() - t0
    ranks = [json.loads((tmp_path / f"fid_rank{r}.json").read_text()) for r in (0, 1)]
    # points at steps 2 and 4, then the fixed model: rank 0 drew images 0-4, rank 1 images 5-9 each time
    assert ranks[0]["ranges"] == [[0, 5]] * 3 and ranks[1]["ranges"] == [[5, 10]] * 3
    assert ranks[0]["values"] == ranks[1]["values"]                         # every rank gets the value
    single_cfg = dict(TINY_TRAIN, **dict(cfg, micro_batch=32))
    eval_fn = train_mod.make_training_fid(fid_block(single_cfg), convnet_stats, device="cpu")
    fixed_one = eval_fn(fixed_model(), 0)
    fixed_two = json.loads((tmp_path / "ddp" / "fixed_fid.json").read_text())
    assert fixed_one > 0 and fixed_two == pytest.approx(fixed_one, rel=1e-6)
    train(TINY_MODEL, single_cfg, make_data(), tmp_path / "single", eval_fn=eval_fn, device="cpu", progress=False)
    one, two = fid_rows(tmp_path / "single"), fid_rows(tmp_path / "ddp")
    assert [s for s, _ in one] == [s for s, _ in two] == [2, 4]
    # the weights of the two runs agree to ~1e-6 (float summation order), so do the FIDs
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-4)
    assert one[0][1] != one[1][1]                                            # the points measure the weights
    print(f"two-process run with 3 FID points: {ddp_seconds:.1f} s")


def test_curve_csv_bytes_are_the_csv_modules(tmp_path):
    # loss.csv and fid_curve.csv are written with pandas; the bytes are those of the csv module's
    # writer with repr(float) that wrote them before (committed curves and dvc.lock stay valid).
    import io

    from diffdistill.train import _write_curve_csv

    def csv_module(header, rows):
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(header)
        for r in rows:
            w.writerow([int(r[0])] + [repr(float(v)) for v in r[1:]])
        return buf.getvalue().encode()

    rows = [(1, 0.1, 1e-05), (2, 123456.789, 2e-4), (3, np.float32(0.3), 1 / 3), (10, 1e16, 0.0),
            (11, float("nan"), float("inf")), (12, np.float64(5e-324), -0.0)]
    for header, table in ((["step", "loss", "lr"], rows), (["step", "fid"], [r[:2] for r in rows]),
                          (["step", "fid"], [])):
        _write_curve_csv(tmp_path / "c.csv", header, table)
        assert (tmp_path / "c.csv").read_bytes() == csv_module(header, table)
