"""FID: the in-memory computation equals pytorch-fid's own on PNG files, with test-made Inception
weights that both load from one local file (pytorch-fid is never allowed to download)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import pytorch_fid.inception as pfi
from pytorch_fid import fid_score

from diffdistill import fid
from diffdistill import train as train_mod
from diffdistill.classifier import train_reference_classifier

N = 6  # images per set: Inception at 299 px on a shared CPU costs ~0.5 s per image


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised FID Inception saved as a state dict, like pt_inception-…pth."""
    with pytest.MonkeyPatch.context() as mp:
        # Build pytorch-fid's exact FID architecture, skipping its weight download and loading.
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = pfi.fid_inception_v3()
    # He init keeps activations O(1) through the ~90 layers, so the features are not all ~0.
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("w") / "pt_inception-test.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 32)[None, :, None, None] * rng.uniform(0.3, 1, (N, 1, 1, 3))
    ramps = np.broadcast_to(ramp, (N, 32, 32, 3)).round().astype(np.uint8)
    dirs = []
    for name, images in (("noise", noise), ("ramps", ramps)):
        d = tmp_path_factory.mktemp(name)
        for i, im in enumerate(images):
            Image.fromarray(im).save(d / f"{i:03d}.png")
        dirs.append(d)
    return noise, ramps, dirs


@pytest.fixture
def pytorch_fid_reads(monkeypatch, inception_file):
    """pytorch-fid's own code, reading the same weights file instead of FID_WEIGHTS_URL."""
    def load(url, *a, **k):
        assert url == pfi.FID_WEIGHTS_URL
        return torch.load(inception_file, map_location="cpu", weights_only=True)

    monkeypatch.setattr(pfi, "load_state_dict_from_url", load)


def test_features_2048_equal_pytorch_fid_activations(inception_file, image_sets, pytorch_fid_reads):
    noise, ramps, (noise_dir, ramps_dir) = image_sets
    ext = fid.make_extractor("inception", inception_weights=inception_file)
    ours = fid.features(noise, ext, batch_size=N)
    assert ours.shape == (N, 2048) and ours.dtype == np.float64
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    files = sorted(noise_dir.glob("*.png"))
    theirs = fid_score.get_activations(files, model, batch_size=N, dims=2048, num_workers=0)
    assert ours.std() > 1e-3  # the features carry signal
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Matrix is singular")
def test_fid_equals_calculate_fid_given_paths(inception_file, image_sets, pytorch_fid_reads, monkeypatch):
    """End to end against pytorch-fid at 768-d (block 2): the same code path as 2048-d, but scipy's
    sqrtm of a 2048² matrix alone takes ~20-50 s on a shared CPU. 2048-d: run with DIFFDISTILL_SLOW=1."""
    import os

    dims = 2048 if os.environ.get("DIFFDISTILL_SLOW") else 768
    noise, ramps, dirs = image_sets
    ext = fid.InceptionFeatures(inception_file, dims=dims)
    mu1, s1 = fid.compute_stats(noise, ext, batch_size=N)
    f2 = fid.features(ramps, ext, batch_size=N)
    mu2, s2 = fid.stats_of(f2)
    theirs = fid_score.calculate_fid_given_paths([str(d) for d in dirs], N, "cpu", dims, num_workers=0)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert theirs > 1.0
    assert abs(ours - theirs) < 1e-3, (ours, theirs)
    # The small-sample path (n×n eigenproblem) gives the same number.
    assert abs(fid.fid_from_features(f2, mu1, s1) - theirs) < 1e-3
    # A set against itself: ~0.
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-4
    assert abs(fid.fid_from_features(f2, mu2, s2)) < 1e-4


def test_frechet_distance_closed_form():
    """Diagonal Gaussians: d² = |Δmu|² + Σ (√a - √b)²."""
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert abs(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) - want) < 1e-9
    with pytest.raises(ValueError, match="same feature extractor"):
        fid.frechet_distance(mu1, np.diag(a), np.zeros(2), np.eye(2))


def test_inception_stats_file_and_fid_against_stats(inception_file, image_sets, tmp_path, monkeypatch):
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    noise, ramps, _ = image_sets
    train = {"images": noise, "labels": np.zeros(N, np.int64), "classes": np.array(["a"])}
    out = tmp_path / "fid_stats.npz"
    mu, sigma = fid.write_stats({"features": "inception", "batch_size": N}, train, out,
                                inception_weights=inception_file, progress=False)
    st = fid.load_stats(out)
    assert st["features"] == "inception" and st["metric"] == "fid_inception" and st["n"] == N
    np.testing.assert_array_equal(st["mu"], mu)
    assert abs(fid.fid_against_stats(noise, out, batch_size=N)) < 1e-4
    with pytest.raises(ValueError, match="pt_inception"):
        fid.write_stats({"features": "inception"}, train, tmp_path / "x.npz", inception_weights=tmp_path / "no.pth")
    assert not (tmp_path / "x.npz").exists()


def _reference_classifier(tmp_path, images, width=8, epochs=1):
    from diffdistill.convnet import ConvNet  # noqa: F401  (the real ConvNet)

    train = {"images": images, "labels": np.arange(len(images)) % 2, "classes": np.array(["0", "1"])}
    eval_cfg = {"depth": 3, "width": width, "epochs": epochs, "batch_size": 10, "lr": 0.01, "momentum": 0.9,
                "weight_decay": 5e-4, "dsa": False, "mean": None, "std": None}
    path = tmp_path / "classifier.pt"
    train_reference_classifier(train, eval_cfg, path, progress=False)
    return train, path


def test_convnet_stats_from_the_reference_classifier(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (20, 16, 16, 1), dtype=np.uint8)
    train, classifier = _reference_classifier(tmp_path, images)
    out = tmp_path / "fid_stats.npz"
    fid.write_stats({"features": "convnet"}, train, out, classifier_path=classifier, progress=False)
    assert fid.load_stats(out)["sigma"].shape == (8 * 2 * 2, 8 * 2 * 2)
    evaluator = fid.FID(out)
    assert evaluator.name == "fid_convnet"
    assert abs(evaluator(images)) < 1e-6
    other = rng.integers(0, 128, (20, 16, 16, 1), dtype=np.uint8)
    assert evaluator(other) > 1e-3
    # The trainer's hook: eval_fn(ema_model, step) -> float, samples drawn by the caller's function.
    fn = evaluator.eval_fn(lambda model, n: other[:n], 20)
    assert fn(None, 500) == pytest.approx(evaluator(other))
    # Class probabilities for confidence selection: rows sum to one.
    probs = fid.make_extractor("convnet", convnet_path=classifier).probabilities(images)
    assert probs.shape == (20, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # A classifier swapped under the statistics is caught.
    _reference_classifier(tmp_path, other)
    with pytest.raises(ValueError, match="different convnet extractor"):
        fid.FID(out)


def test_missing_reference_classifier_names_the_step(tmp_path):
    with pytest.raises(ValueError, match="reference_classifier step"):
        fid.make_extractor("convnet", convnet_path=tmp_path / "nope.pt")


def test_metric_names_are_separate():
    assert fid.metric_name("inception") == "fid_inception"
    assert fid.metric_name("convnet") == "fid_convnet"
    with pytest.raises(ValueError):
        fid.metric_name("clip")


def test_make_training_fid_samples_and_scores(tmp_path):
    """The trainer's hook end to end: a tiny U-ViT sampled by sample.py, scored with the ConvNet FID."""
    evaluate = pytest.importorskip("diffdistill.evaluate")
    sample = pytest.importorskip("diffdistill.sample")
    if not hasattr(evaluate, "train_classifier") or not hasattr(sample, "sample"):
        pytest.skip("evaluate/sample not written yet")
    from diffdistill.uvit import UViT

    rng = np.random.default_rng(3)
    train, classifier = _reference_classifier(tmp_path, rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), width=4)
    stats = tmp_path / "fid_stats.npz"
    fid.write_stats({"features": "convnet"}, train, stats, classifier_path=classifier, progress=False)
    model_cfg = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2,
                     qkv_bias=False, mlp_time_embed=False, num_classes=2, conv=True, skip=True)
    block = {"model": model_cfg, "train": {"fid_samples": 6}, "fid": {"features": "convnet"},
             "sample": {"budget_seconds": 60, "max_per_class": None, "batch_size": 4, "steps": 4,
                        "variant": "multistep", "seed": 0}}
    torch.manual_seed(0)
    net = UViT(**model_cfg)
    eval_fn = train_mod.make_training_fid(block, stats)
    assert eval_fn.name == "fid_convnet"
    first, again = eval_fn(net, 0), eval_fn(net, 500)
    assert np.isfinite(first) and first > 0 and first == again  # same samples for the same weights
