"""Tests for diffdistill.sample: timed, class-balanced sampling; checkpoint checks; output; export."""
import hashlib
import json

import numpy as np
import pytest
import torch

from diffdistill import diffusion, sample
from diffdistill.io import load_npz
from diffdistill.uvit import UViT

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


def test_check_checkpoint(model, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    state = sample.check_checkpoint(TINY, good)
    assert set(state) == set(model.state_dict())
    loaded = sample.load_model(TINY, good)
    assert not loaded.training
    assert torch.equal(loaded.pos_embed, model.pos_embed)

    other_classes = tmp_path / "classes.pt"
    torch.save(UViT(**dict(TINY, num_classes=5)).state_dict(), other_classes)
    other_size = tmp_path / "size.pt"
    torch.save(UViT(**dict(TINY, img_size=16)).state_dict(), other_size)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"model\.num_classes = 3"):
        sample.check_checkpoint(TINY, other_classes)
    with pytest.raises(ValueError, match=r"image size 16 .*model\.img_size = 8"):
        sample.check_checkpoint(TINY, other_size)
    with pytest.raises(ValueError, match="does not exist") as err:
        sample.check_checkpoint(TINY, tmp_path / "missing.pt")
    assert isinstance(err.value, FileNotFoundError)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_check_checkpoint_with_null_class(tmp_path):
    # train.label_dropout > 0 adds one (null) class to label_emb; the check follows the trainer's rule.
    ckpt = tmp_path / "ema.pt"
    torch.save(UViT(**dict(TINY, num_classes=K + 1)).state_dict(), ckpt)
    sample.check_checkpoint(TINY, ckpt, train_cfg={"label_dropout": 0.1})
    with pytest.raises(ValueError, match="model.num_classes = 3 needs 3"):
        sample.check_checkpoint(TINY, ckpt)


def made_set(n_per_class=(5, 4, 6), shape=(8, 8, 3), seed=0):
    """An image set in round-robin-ish generation order with uneven class counts."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(n_per_class)])
    labels = labels[rng.permutation(len(labels))].astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels),) + shape, dtype=np.uint8)
    return {"images": images, "labels": labels, "classes": np.array([f"c{k}" for k in range(len(n_per_class))])}


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


def test_balanced_prefix_nested_and_balanced():
    s = made_set()
    p2, p4 = sample.balanced_prefix(s, 2), sample.balanced_prefix(s, 4)
    assert np.bincount(p2["labels"]).tolist() == [2, 2, 2]
    assert np.bincount(p4["labels"]).tolist() == [4, 4, 4]
    for k in range(3):  # the first n of each class in generation order, nested
        first = s["images"][s["labels"] == k]
        np.testing.assert_array_equal(p2["images"][p2["labels"] == k], first[:2])
        np.testing.assert_array_equal(p4["images"][p4["labels"] == k], first[:4])
    with pytest.raises(ValueError, match="fewer than 5"):
        sample.balanced_prefix(s, 5)


@pytest.mark.parametrize("shape", [(8, 8, 3), (6, 6, 1)])
def test_export_round_trip(tmp_path, shape):
    # The file is now a bare images tensor with the labels in a second file (was a dict
    # {"images", "labels"}); the assertions on both are the same as before.
    s = made_set(shape=shape)
    c = shape[-1]
    mean, std = [0.5071, 0.4866, 0.4409][:c], [0.2673, 0.2564, 0.2762][:c]
    out, labels_out = sample.export_challenge(s, mean, std, 4, tmp_path / "sub.pt")
    assert labels_out == tmp_path / "sub_labels.pt"
    images, labels = torch.load(out, weights_only=True), torch.load(labels_out, weights_only=True)
    assert images.dtype == torch.float32 and images.shape == (12, c) + shape[:2]
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    expected = {k: s["images"][s["labels"] == k][:4] for k in range(3)}
    x0 = torch.from_numpy(expected[0][0]).permute(2, 0, 1).float() / 255
    want = (x0 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    assert torch.allclose(images[0], want, atol=1e-6)
    back = sample.load_challenge(out, mean, std)
    np.testing.assert_array_equal(back["images"], np.concatenate([expected[k] for k in range(3)]))
    np.testing.assert_array_equal(back["labels"], labels.numpy())
    with pytest.raises(ValueError, match="class 1 \\(c1\\) has 4 images, fewer than the 5 per class"):
        sample.export_challenge(s, mean, std, 5, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad_labels.pt").exists()

    pngs = sample.export_pngs(s, tmp_path / "png")
    names = sorted(p.name for p in pngs.iterdir())
    assert len(names) == len(s["labels"]) and "0_0.png" in names and "2_5.png" in names
    back = sample.load_pngs(pngs)
    order = np.argsort(s["labels"], kind="stable")
    np.testing.assert_array_equal(back["images"], s["images"][order])
    np.testing.assert_array_equal(back["labels"], s["labels"][order])


def test_export_loads_as_the_challenge_evaluator_does(tmp_path):
    """The evaluator: ``data = torch.load(dir/"cifar100.pt")``, ``data.shape == [10*K, 3, H, W]``,
    labels ``np.ones(10) * i`` for block i. Each block of 10 must really be class i."""
    counts = (12, 10, 15, 11)
    s = made_set(n_per_class=counts, shape=(6, 6, 3), seed=4)
    K = len(counts)
    mean, std = [0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762]
    sample.export_challenge(s, mean, std, 10, tmp_path / "challenge" / "cifar100.pt")

    data = torch.load(tmp_path / "challenge" / "cifar100.pt")            # exactly as the evaluator loads it
    assert isinstance(data, torch.Tensor) and list(data.shape) == [10 * K, 3, 6, 6]
    labels = np.concatenate([np.ones(10) * i for i in range(K)])          # the evaluator's labels
    ours = torch.load(tmp_path / "challenge" / "cifar100_labels.pt")
    assert ours.dtype == torch.int64 and ours.tolist() == labels.astype(np.int64).tolist()
    # De-normalised, block i is the first 10 images of class i of the selected set, in generation order.
    pixels = ((data * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)) * 255)
    pixels = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(K):
        block = pixels[i * 10:(i + 1) * 10]
        np.testing.assert_array_equal(block, s["images"][s["labels"] == i][:10])
        assert (labels[i * 10:(i + 1) * 10] == i).all()

    # null images per class: the smallest class count (10 here); an empty class is named, nothing written
    out, _ = sample.export_challenge(s, mean, std, None, tmp_path / "all" / "x.pt")
    assert torch.load(out).shape[0] == 10 * K
    empty = dict(s, classes=np.array(["a", "b", "c", "d", "e"]))
    with pytest.raises(ValueError, match="class 4 \\(e\\) has 0 images.*export.images_per_class"):
        sample.export_challenge(empty, mean, std, None, tmp_path / "none" / "x.pt")
    assert not list((tmp_path / "none").glob("*.pt"))


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


def test_cli_export_uses_export_images_per_class(tmp_path, monkeypatch, capsys):
    from diffdistill.cli import main as cli_main
    from diffdistill.io import save_npz
    from workflow import REPO

    monkeypatch.chdir(tmp_path)
    s = made_set(n_per_class=(3, 5, 4), shape=(16, 16, 1), seed=2)
    save_npz(tmp_path / "data/digits/train.npz", **s)                 # the real split: mean/std from it
    save_npz(tmp_path / "selected.npz", **s)
    base = ["export", "--params", str(REPO / "params.yaml"), "--dataset", "digits", "--samples", "selected.npz"]
    assert cli_main(base + ["--out", "challenge/digits.pt"]) == 0          # digits: null = smallest class (3)
    assert torch.load(tmp_path / "challenge/digits.pt").shape == (9, 1, 16, 16)
    assert torch.load(tmp_path / "challenge/digits_labels.pt").tolist() == [0] * 3 + [1] * 3 + [2] * 3
    (tmp_path / "four.yaml").write_text("digits: {export: {images_per_class: 4}}\n")
    assert cli_main(base + ["--params", "four.yaml", "--out", "four/digits.pt"]) == 1   # class 0 has 3
    assert "class 0 (c0) has 3 images, fewer than the 4 per class" in capsys.readouterr().err
    assert not (tmp_path / "four").exists() or not list((tmp_path / "four").iterdir())
