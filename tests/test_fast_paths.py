"""Issue 16's opt-in fast paths (sample.cast_weights / compile / attention, evaluate.fast) on the CPU.

The default path must stay bit-identical: the reference values below were computed on the 2-core
development machine with the code as it was before the fast paths existed (commit 7ddf175).
"""
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdistill import augment, evaluate, sample
from diffdistill.uvit import UViT

TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
            qkv_bias=False, mlp_time_embed=False, num_classes=3, conv=True, skip=True)
BLOCK = dict(budget_seconds=None, max_per_class=3, batch_size=4, steps=6, variant="fast", seed=1)
EVAL = dict(depth=2, width=8, epochs=2, batch_size=16, lr=0.01, seeds=[0], dsa=True)
# Before the change (7ddf175), on the development machine:
SAMPLE_SHA = "d95ea7e04bfa3e27"
EVAL_LOSS = [1.4155624628067016, 1.4031129121780395, 1.3681572437286378]
EVAL_ACC = [0.3, 0.325, 0.35]


def tiny_model():
    torch.manual_seed(0)
    return UViT(**TINY).eval()


def draw(block):
    image_set, manifest = sample.sample(tiny_model(), block, 3, "cpu", progress=False)
    return image_set, manifest


def train_set():
    rng = np.random.default_rng(0)
    return dict(images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), labels=np.arange(40) % 4)


def test_default_sampling_unchanged():
    image_set, manifest = draw(BLOCK)
    assert hashlib.sha256(image_set["images"].tobytes()).hexdigest()[:16] == SAMPLE_SHA
    assert not {"cast_weights", "compile", "attention"} & set(manifest)      # a default manifest keeps its keys


def test_default_evaluation_unchanged():
    _, h = evaluate.train_classifier(train_set(), EVAL, 0, progress=False)
    # Exact on the development machine; rel 1e-6 leaves room for another CPU's float kernels.
    assert h["loss"] == pytest.approx(EVAL_LOSS, rel=1e-6)
    assert h["train_acc"] == EVAL_ACC
    assert "fast" not in evaluate._settings(EVAL)                           # the run hash is unchanged


def test_fast_evaluation_on_cpu_equals_default():
    # On the CPU evaluate.fast draws the same random numbers in the same order and sums the loss in
    # float64 as the default path does in Python floats: the same history, exactly.
    _, ref = evaluate.train_classifier(train_set(), EVAL, 0, progress=False)
    _, fast = evaluate.train_classifier(train_set(), dict(EVAL, fast=True), 0, progress=False)
    assert fast["loss"] == ref["loss"] and fast["train_acc"] == ref["train_acc"]
    assert evaluate._settings(dict(EVAL, fast=True))["fast"] is True        # a run of its own for resuming
    with pytest.raises(ValueError, match="evaluate.fast"):
        evaluate.train_classifier(train_set(), dict(EVAL, fast="yes"), 0, progress=False)


def test_dsa_pick_generator():
    x = torch.randn(6, 3, 8, 8)
    g = torch.Generator().manual_seed(3)
    ref = augment.dsa(x, g)
    same = augment.dsa(x, torch.Generator().manual_seed(3), pick_generator=None)
    assert torch.equal(ref, same)
    a = augment.dsa(x, torch.Generator().manual_seed(3), pick_generator=torch.Generator().manual_seed(9))
    b = augment.dsa(x, torch.Generator().manual_seed(3), pick_generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and a.shape == x.shape


def test_cast_weights_is_a_no_op_on_cpu():
    ref, _ = draw(BLOCK)
    fast, manifest = draw(dict(BLOCK, cast_weights=True, attention="flash"))
    assert np.array_equal(ref["images"], fast["images"])                   # CPU runs fp32; attention is CUDA-only
    assert manifest["cast_weights"] is True


def test_bad_fast_settings_rejected():
    for bad in (dict(compile="fastest"), dict(cast_weights="yes"), dict(attention="sdpa")):
        with pytest.raises(ValueError):
            sample.validate_sample_cfg(dict(BLOCK, **bad), 3)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, **kw):
        def call(*a):
            raise RuntimeError("no compiler here")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    ref, _ = draw(BLOCK)
    with caplog.at_level(logging.WARNING):
        fast, manifest = draw(dict(BLOCK, compile="reduce-overhead"))
    assert "running the network eagerly" in caplog.text
    assert manifest["count"] == 9 and fast["labels"].tolist() == ref["labels"].tolist()
    # The short last batch (1 image) ran at the full batch shape (4) and was cut: the same images up to
    # float rounding of a bigger batch, at most one grey level.
    assert np.abs(ref["images"].astype(int) - fast["images"]).max() <= 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compile_runs_on_cpu():
    # ~40 s on the 2-core machine (inductor compiling C++). Inductor fuses and reorders float ops,
    # so pixels may differ by one grey level after rounding; none differed when measured.
    ref, _ = draw(BLOCK)
    fast, manifest = draw(dict(BLOCK, compile=True))
    assert manifest["compile"] == "default"
    assert np.abs(ref["images"].astype(int) - fast["images"]).max() <= 1


@pytest.mark.slow
def test_gpu_suite_quick_runs(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_suite
    gpu_suite.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "suite.json").read_text())
    assert {r["path"] for r in result["sampling"]} == {"step", "fast"}
    assert len(result["fidelity"]) == 4 and "label_agreement" in result["fidelity"][-1]
    assert [r["path"] for r in result["convnet"]] == ["today", "fast"]
    assert result["uvit_step"]["rows"] and len(result["parity"]) == 2
    # On the CPU the fast paths are today's: the same accuracies, seed for seed.
    assert result["parity"][0]["accuracies"] == result["parity"][1]["accuracies"]
    assert (tmp_path / "suite.md").read_text().startswith("# Issue 16 suite")
