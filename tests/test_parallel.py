"""diffdistill.parallel: sampling one run on several devices: the shard split, the merge, failures, and the CLI.

The worker processes are real (spawned, each loading the checkpoint); on this machine their devices
are CPUs, which exercises everything but CUDA itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffdistill import parallel
from diffdistill.io import file_digest, load_npz
from diffdistill.checkpoint import MissingCheckpointError, build_model

ROOT = Path(__file__).resolve().parents[1]
K = 3
TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
            qkv_bias=False, mlp_time_embed=False, num_classes=K, conv=True, skip=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "ema.pt"
    torch.save(build_model(TINY).state_dict(), path)
    return path


def cfg(**kw):
    base = dict(budget_seconds=None, max_per_class=5, batch_size=4, steps=3, variant="fast",
                guidance_scale=0.0, seed=0)
    base.update(kw)
    return base


def test_cap_run_on_two_workers_is_the_one_device_run(checkpoint):
    # 15 images in batches of 4: worker 0 draws batches 0 and 2, worker 1 batches 1 and 3 (3 images).
    one, man1 = parallel.sample_parallel(TINY, checkpoint, cfg(), K, ["cpu"], progress=False)
    two, man2 = parallel.sample_parallel(TINY, checkpoint, cfg(), K, ["cpu", "cpu"], progress=False)
    np.testing.assert_array_equal(two["labels"], one["labels"])
    np.testing.assert_array_equal(two["images"], one["images"])
    assert man2["count"] == 15 and man2["per_class"] == [5, 5, 5] and man2["dropped_for_balance"] == 0
    assert [(w["count"], w["num_batches"]) for w in man2["workers"]] == [(8, 2), (7, 2)]
    assert man2["device"] == "2 × cpu" and man2["stopped_by"] == "cap" and man2["num_batches"] == 4
    assert man2["checkpoint_sha256"] == man1["checkpoint_sha256"] == file_digest(checkpoint)
    assert man2["seconds"] == max(w["seconds"] for w in man2["workers"])
    totals = [n for n, _ in man2["timeline"]]
    times = [t for _, t in man2["timeline"]]
    assert totals == sorted(totals) and totals[-1] == 15 and times == sorted(times)
    assert "batch_indices" not in man2


def test_budget_run_on_two_workers_is_balanced_and_reproducible_per_batch(checkpoint):
    # Batches of 5 over 3 classes: batches that each worker happens to finish leave the counts uneven.
    got, man = parallel.sample_parallel(TINY, checkpoint, cfg(budget_seconds=2.0, max_per_class=None, batch_size=5),
                                      K, ["cpu", "cpu"], progress=False)
    workers = man["workers"]
    assert len(workers) == 2 and all(w["num_batches"] >= 1 for w in workers)
    assert man["count"] == sum(w["count"] for w in workers) - man["dropped_for_balance"] == len(got["labels"])
    assert max(man["per_class"]) - min(man["per_class"]) <= 1
    assert man["per_class"] == np.bincount(got["labels"], minlength=K).tolist()
    assert man["stopped_by"] == "budget" and man["budget_seconds"] == 2.0
    assert man["timeline"][-1][0] == sum(w["count"] for w in workers)
    # Every merged image is the image the one-device run draws at some index with the same label.
    last_batch = max(2 * (w["num_batches"] - 1) + rank for rank, w in enumerate(workers))
    per_class = -(-(last_batch + 1) * 5 // K)
    ref, _ = parallel.sample_parallel(TINY, checkpoint, cfg(max_per_class=per_class, batch_size=5), K, ["cpu"],
                                    progress=False)
    known = {(img.tobytes(), int(lab)) for img, lab in zip(ref["images"], ref["labels"])}
    assert all((img.tobytes(), int(lab)) in known for img, lab in zip(got["images"], got["labels"]))


def made_part(batches, bs=4, k=K):
    """A worker's output without a model: image value = the run's image index (so order is visible)."""
    idx = np.concatenate([np.arange(b * bs, (b + 1) * bs) for b in batches])
    part = {"images": (idx % 256).astype(np.uint8).reshape(-1, 1, 1, 1), "labels": idx % k,
            "classes": np.array([str(c) for c in range(k)])}
    manifest = {"batch_indices": list(batches), "timeline": [[bs * (i + 1), 0.5 * (i + 1)] for i in range(len(batches))],
                "seconds": 0.5 * len(batches), "device": "cpu", "count": len(idx), "num_batches": len(batches),
                "batch_seconds": [0.5] * len(batches), "budget_seconds": 1.0, "stopped_by": "budget"}
    return part, manifest


def test_merge_restores_run_order_and_trims_to_balance():
    # Worker 0 finished batches 0, 2, 4; worker 1 only 1 (it was slower): run images 0-11 and 16-19.
    merged, man = parallel.merge_shards([made_part([0, 2, 4]), made_part([1])], K)
    kept = merged["images"].reshape(-1).tolist()
    assert kept == sorted(kept)  # the run's order, not the workers'
    # Indices 0-11 and 16-19 have labels counted 5/6/5: within one of each other, all kept.
    assert np.bincount(merged["labels"], minlength=K).tolist() == [5, 6, 5] == man["per_class"]
    assert man["dropped_for_balance"] == 0 and man["count"] == 16
    # A run that is more uneven loses its latest extra images of the crowded classes.
    merged, man = parallel.merge_shards([made_part([0, 2, 4], bs=2), made_part([1], bs=2)], K)
    # indices 0-5, 8-9 → labels 0,1,2,0,1,2,2,0 → counts 3/2/3; m = 2 so nothing goes
    assert man["dropped_for_balance"] == 0
    merged, man = parallel.merge_shards([made_part([0, 2], bs=1), made_part([4, 5, 8], bs=1)], K)
    # indices 0,2,4,5,8 → labels 0,2,1,2,2 → counts 1/1/3: class 2 keeps its first two (2 and 5)
    assert merged["images"].reshape(-1).tolist() == [0, 2, 4, 5]
    assert man["dropped_for_balance"] == 1 and man["per_class"] == [1, 1, 2]
    assert man["seconds"] == 1.5 and [w["num_batches"] for w in man["workers"]] == [2, 3]


def test_merge_refuses_overlapping_shards():
    with pytest.raises(ValueError, match="same batch"):
        parallel.merge_shards([made_part([0, 2]), made_part([2, 3])], K)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_worker_stops_the_run_and_names_its_device(checkpoint):
    with pytest.raises(RuntimeError, match=r"cuda:0 \(worker 1 of 2\).*nothing was written"):
        parallel.sample_parallel(TINY, checkpoint, cfg(), K, ["cpu", "cuda:0"], progress=False)


def test_missing_checkpoint_fails_before_any_worker(tmp_path):
    with pytest.raises(MissingCheckpointError, match="does not exist"):
        parallel.sample_parallel(TINY, tmp_path / "nope.pt", cfg(), K, ["cpu", "cpu"], progress=False)


def test_sample_devices(monkeypatch):
    assert parallel.sample_devices(4, "cpu") == [torch.device("cpu")]
    assert parallel.sample_devices(1, "cuda:1") == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parallel.sample_devices(2, "cuda") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="sample.gpus is 4 but only 2 CUDA devices"):
        parallel.sample_devices(4, "cuda")


def test_cli_samples_on_two_devices(checkpoint, tmp_path):
    override = {"digits": {"model": {k: TINY[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim",
                                                            "depth", "num_heads", "mlp_ratio", "num_classes")},
                           "sample": cfg(max_per_class=4, batch_size=6, gpus=2)}}
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    outs = {}
    for devices in ("cpu", "cpu,cpu"):
        out = tmp_path / devices.replace(",", "_")
        subprocess.run([sys.executable, "-m", "diffdistill", "sample", "--params", str(ROOT / "params.yaml"),
                        "--params", "override.yaml", "--dataset", "digits", "--checkpoint", str(checkpoint),
                        "--out", str(out), "--devices", devices, "--log-file", "sample.log"],
                       cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
        outs[devices] = (load_npz(out / "samples.npz"), json.loads((out / "manifest.json").read_text()))
    (one, m1), (two, m2) = outs["cpu"], outs["cpu,cpu"]
    np.testing.assert_array_equal(two["images"], one["images"])
    assert m2["per_class"] == [4, 4, 4] and m2["device"] == "2 × cpu" and len(m2["workers"]) == 2
    assert "sampling on 2 devices" in (tmp_path / "sample.log").read_text()
