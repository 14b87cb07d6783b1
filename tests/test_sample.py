"""Tests for diffdistill.sample: timed, class-balanced sampling and its output."""
import hashlib
import json

import numpy as np
import pytest
import torch

from diffdistill import diffusion, sample
from diffdistill.io import load_npz
from diffdistill.uvit import UViT
from test_imageset import made_set

K = 3
TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
            qkv_bias=False, mlp_time_embed=False, num_classes=K, conv=True, skip=True)


def ddim_stub(net, x_T, y=None, steps=50, variant="fast", eps=1e-4, guidance_scale=0.0, null_class=None):
    """Stands in for diffusion.dpm_solver_sample: a deterministic DDIM loop with `steps` real net calls."""
    calls["n"] += 1
    ts = torch.linspace(1.0, eps, steps + 1)
    x = x_T
    for i in range(steps):
        t = ts[i].expand(x.shape[0]).to(x.device)
        e = net(x, t * diffusion.TIME_SCALE, y)
        a, s = diffusion.alpha_sigma(ts[i])
        a2, s2 = diffusion.alpha_sigma(ts[i + 1])
        x = a2 * (x - s * e) / a + s2 * e
    return x


calls = {"n": 0}


@pytest.fixture(autouse=True)
def stub_sampler(monkeypatch):
    calls["n"] = 0
    monkeypatch.setattr(diffusion, "dpm_solver_sample", ddim_stub, raising=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UViT(**TINY).eval()


def cfg(**kw):
    base = dict(budget_seconds=None, max_per_class=4, batch_size=4, steps=3, variant="fast",
                guidance_scale=0.0, seed=0)
    base.update(kw)
    return base


def assert_round_robin(labels, k=K):
    """At every prefix of the run the per-class counts differ by at most one."""
    counts = np.zeros(k, dtype=int)
    for c in labels:
        counts[c] += 1
        assert counts.max() - counts.min() <= 1


def test_budget_respected(model):
    budget = 1.5
    imgs, man = sample.sample(model, cfg(budget_seconds=budget, max_per_class=None, batch_size=5, steps=4),
                              K, "cpu", progress=True)
    bt = man["batch_seconds"]
    assert man["stopped_by"] == "budget" and man["num_batches"] == len(bt) >= 2
    assert man["seconds"] == pytest.approx(budget + man["overrun_seconds"]) or man["overrun_seconds"] == 0.0
    assert man["seconds"] <= budget + man["overrun_seconds"] + 1e-9
    # The last batch started only when the mean batch time still fitted, so the run overruns by less
    # than one batch and stops less than one mean batch early.
    assert 0.0 <= man["overrun_seconds"] <= max(bt)
    assert man["seconds"] > budget - np.mean(bt) - 1e-3
    assert man["count"] == len(imgs["labels"]) == 5 * len(bt)
    assert max(man["per_class"]) - min(man["per_class"]) <= 1
    assert_round_robin(imgs["labels"])
    assert man["images_per_second"] == pytest.approx(man["count"] / man["seconds"])


def test_cap_balance_and_determinism(model):
    a, man = sample.sample(model, cfg(max_per_class=3, batch_size=4), K, "cpu", progress=False)
    b, _ = sample.sample(model, cfg(max_per_class=3, batch_size=4), K, "cpu", progress=False)
    c, _ = sample.sample(model, cfg(max_per_class=3, batch_size=4, seed=1), K, "cpu", progress=False)
    assert man["per_class"] == [3, 3, 3] and man["count"] == 9 and man["stopped_by"] == "cap"
    assert man["num_batches"] == 3 and calls["n"] == 9  # batches of 4, 4, 1 in each of three runs
    assert a["labels"].tolist() == [0, 1, 2] * 3
    assert_round_robin(a["labels"])
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert not np.array_equal(a["images"], c["images"])


def test_cap_with_budget_and_prefix(model):
    small, man = sample.sample(model, cfg(budget_seconds=300, max_per_class=2, batch_size=4), K, "cpu",
                               progress=False)
    big, _ = sample.sample(model, cfg(budget_seconds=300, max_per_class=4, batch_size=4), K, "cpu",
                           progress=False)
    assert man["stopped_by"] == "cap" and man["overrun_seconds"] == 0.0 and man["count"] == 2 * K
    # A smaller cap is a prefix of a larger one: same labels, same noise (at most rounding differences
    # from a different batch shape in the last batch).
    n = len(small["labels"])
    np.testing.assert_array_equal(small["labels"], big["labels"][:n])
    assert np.abs(small["images"].astype(int) - big["images"][:n].astype(int)).max() <= 1


def test_manifest_fields(model, tmp_path):
    ckpt = tmp_path / "ema.pt"
    torch.save(model.state_dict(), ckpt)
    names = ["zero", "one", "two"]
    imgs, man = sample.sample(model, cfg(max_per_class=2, classes=names, seed=7), K, "cpu",
                              checkpoint_path=ckpt, progress=False)
    assert imgs["images"].dtype == np.uint8 and imgs["images"].shape == (6, 8, 8, 1)
    assert imgs["labels"].dtype == np.int64 and imgs["classes"].tolist() == names
    assert imgs["classes"].dtype.kind == "U"
    expected = dict(count=6, per_class=[2, 2, 2], device="cpu", sampler="dpm_solver", variant="fast", steps=3,
                    seed=7, budget_seconds=None, overrun_seconds=0.0, batch_size=4, guidance_scale=0.0,
                    image_shape=[1, 8, 8], max_per_class=2,
                    checkpoint_sha256=hashlib.sha256(ckpt.read_bytes()).hexdigest())
    for key, value in expected.items():
        assert man[key] == value, key
    assert man["seconds"] > 0 and man["images_per_second"] > 0
    json.dumps(man)  # serialisable as is


@pytest.mark.parametrize("bad, match", [
    (dict(budget_seconds=0), "budget_seconds"),
    (dict(budget_seconds=-5), "budget_seconds"),
    (dict(max_per_class=0), "max_per_class"),
    (dict(budget_seconds=None, max_per_class=None), "neither"),
    (dict(variant="ddpm"), "variant"),
])
def test_bad_sample_cfg_raises_before_sampling(model, bad, match):
    with pytest.raises(ValueError, match=match):
        sample.sample(model, cfg(**bad), K, "cpu", progress=False)
    assert calls["n"] == 0


def test_guidance_needs_null_class(model):
    with pytest.raises(ValueError, match="null class"):
        sample.sample(model, cfg(guidance_scale=1.5), K, "cpu", progress=False)


def test_write_atomic(tmp_path, monkeypatch):
    s = made_set()
    man = {"count": len(s["labels"]), "per_class": [5, 4, 6]}
    samples_path, manifest_path = sample.write(tmp_path / "out", s, man)
    back = load_npz(samples_path)
    np.testing.assert_array_equal(back["images"], s["images"])
    np.testing.assert_array_equal(back["labels"], s["labels"])
    assert back["classes"].tolist() == s["classes"].tolist()
    written = json.loads(manifest_path.read_text())
    assert written["samples_sha256"] == hashlib.sha256(samples_path.read_bytes()).hexdigest()

    # A failure while writing leaves the earlier good pair untouched and no stray files.
    good = (samples_path.read_bytes(), manifest_path.read_bytes())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        sample.write(tmp_path / "out", made_set(seed=1), man)
    assert (samples_path.read_bytes(), manifest_path.read_bytes()) == good
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "samples.npz"]
    # and on a fresh folder, a failure leaves neither file
    with pytest.raises(OSError):
        sample.write(tmp_path / "fresh", s, man)
    assert list((tmp_path / "fresh").iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(ValueError, match="count"):
        sample.write(tmp_path / "bad", s, {"count": 3})
    assert not (tmp_path / "bad").exists()


def test_real_dpm_solver_if_present(model, monkeypatch):
    monkeypatch.undo()
    if not hasattr(diffusion, "dpm_solver_sample"):
        pytest.skip("diffusion.dpm_solver_sample not written yet")
    a, man = sample.sample(model, cfg(max_per_class=2, steps=5), K, "cpu", progress=False)
    b, _ = sample.sample(model, cfg(max_per_class=2, steps=5), K, "cpu", progress=False)
    assert man["per_class"] == [2, 2, 2]
    np.testing.assert_array_equal(a["images"], b["images"])
    # classifier-free guidance with the null class at index K (a model with K + 1 label embeddings)
    torch.manual_seed(0)
    guided = UViT(**dict(TINY, num_classes=K + 1)).eval()
    g, gman = sample.sample(guided, cfg(max_per_class=1, steps=3, guidance_scale=1.0), K, "cpu", progress=False)
    assert gman["guidance_scale"] == 1.0 and g["labels"].tolist() == [0, 1, 2]


def test_auto_batch_size_on_cpu_is_fixed_and_recorded(model):
    images, man = sample.sample(model, cfg(max_per_class=3, batch_size="auto"), K, "cpu", progress=False)
    assert man["batch_size"] == sample.choose_batch_size(model, (1, 8, 8), K, torch.device("cpu")) == 256
    assert man["count"] == 9 and man["num_batches"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_batch_size_fills_the_gpu():
    big = UViT(img_size=32, patch_size=2, in_chans=3, embed_dim=256, depth=4, num_heads=4, num_classes=10).cuda()
    b = sample.choose_batch_size(big.eval(), (3, 32, 32), 10, torch.device("cuda"), torch.bfloat16)
    assert 64 <= b <= 4096 and b & (b - 1) == 0
