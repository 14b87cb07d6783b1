import numpy as np
import pytest

from diffdistill import evaluate as E

CFG = {"depth": 2, "width": 16, "epochs": 8, "batch_size": 32, "lr": 0.01, "momentum": 0.9,
       "weight_decay": 5e-4, "dsa": True, "mean": None, "std": None}


def squares(n_per_class=48, size=16, seed=0, classes=4):
    """Class k: a square of colour k in quadrant k, random jitter and noise, on a dark background."""
    rng = np.random.default_rng(seed)
    colours = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40]])
    images, labels = [], []
    for k in range(classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 40, (size, size, 3))
            top = (k // 2) * size // 2 + rng.integers(0, 3)
            left = (k % 2) * size // 2 + rng.integers(0, 3)
            img[top:top + 5, left:left + 5] = colours[k]
            images.append(img)
            labels.append(k)
    return {"images": np.array(images, dtype=np.uint8), "labels": np.array(labels, dtype=np.int64),
            "classes": np.array(["red", "green", "blue", "yellow"][:classes])}


def tiny(n=16, size=8, channels=3, seed=0, classes=2):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
            "labels": np.arange(n) % classes, "classes": np.array([f"c{k}" for k in range(classes)])}


def test_separable_data_beats_chance_by_a_wide_margin():
    train, test = squares(seed=0), squares(n_per_class=25, seed=1)
    r = E.evaluate_run(train, test, CFG, seed=0, progress=False, name="synthetic")
    assert r["accuracy"] >= 0.85                              # chance is 0.25
    assert r["name"] == "synthetic" and r["n_train"] == 192 and r["epochs"] == 8
    assert r["per_class_train_counts"] == [48] * 4 and len(r["per_class_accuracy"]) == 4
    assert len(r["loss_curve"]) == 8 and r["loss_curve"][-1] < r["loss_curve"][0]
    assert r["images_per_second"] > 0


def test_same_seed_same_result_and_lr_drops_once_at_the_half():
    cfg = dict(CFG, epochs=6, width=8)
    a = E.evaluate_run(tiny(), tiny(seed=1), cfg, seed=3, progress=False)
    b = E.evaluate_run(tiny(), tiny(seed=1), cfg, seed=3, progress=False)
    assert a["accuracy"] == b["accuracy"] and a["loss_curve"] == b["loss_curve"]
    c = E.evaluate_run(tiny(), tiny(seed=1), cfg, seed=4, progress=False)
    assert c["loss_curve"] != a["loss_curve"]
    assert a["lr_curve"] == pytest.approx([0.01] * 3 + [0.001] * 3)


def test_lr_schedule_in_history_for_odd_epochs():
    _, hist = E.train_classifier(tiny(), dict(CFG, epochs=5, width=4, dsa=False), seed=0, progress=False)
    lrs = np.array(hist["lr"])
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.001])
    assert (np.diff(lrs) != 0).sum() == 1


def test_short100_variant_and_bad_variant():
    assert E._epochs({"epochs": 1000, "variant": "short100"}) == 100
    assert E._epochs({"epochs": 1000}) == 1000
    with pytest.raises(ValueError, match="unknown variant"):
        E._epochs({"epochs": 10, "variant": "short"})


def test_normalization_fixed_or_computed():
    assert E.normalization({"mean": [0.5], "std": [0.25]}, None) == ([0.5], [0.25])
    imgs = np.zeros((4, 2, 2, 2), np.uint8)
    imgs[..., 0] = 255
    imgs[:2, :, :, 1] = 255
    mean, std = E.normalization({"mean": None, "std": None}, imgs)
    assert mean == pytest.approx([1.0, 0.5]) and std == pytest.approx([1.0, 0.5])  # constant channel: std 1
    with pytest.raises(ValueError, match="both"):
        E.normalization({"mean": [0.5], "std": None}, imgs)


def _bad(**change):
    s = tiny()
    s.update(change)
    return s


@pytest.mark.parametrize("train,match", [
    (tiny(size=16), "training images are 16×16 but test images are 8×8"),
    (tiny(channels=1), "1 channel"),
    (_bad(labels=np.array([0, 1] * 7 + [0, 5])), "out of range"),
    (_bad(labels=np.zeros(16, dtype=np.int64)), "no image of class 1 \\(c1\\)"),
    ({"images": np.zeros((0, 8, 8, 3), np.uint8), "labels": np.zeros(0, np.int64)}, "empty"),
])
def test_bad_inputs_fail_before_training(monkeypatch, train, match):
    def boom(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(E, "train_classifier", boom)
    with pytest.raises(ValueError, match=match):
        E.evaluate_run(train, tiny(seed=1), CFG, seed=0, progress=False)


def test_random_real_subset_matches_per_class_counts():
    real = squares(n_per_class=20)
    like = np.array([0] * 3 + [1] * 5 + [2] * 1 + [3] * 7)
    sub = E.random_real_subset(real, like, seed=0)
    assert np.bincount(sub["labels"], minlength=4).tolist() == [3, 5, 1, 7]
    assert sub["images"].shape == (16, 16, 16, 3) and list(sub["classes"]) == list(real["classes"])
    again = E.random_real_subset(real, like, seed=0)
    other = E.random_real_subset(real, like, seed=1)
    assert np.array_equal(sub["images"], again["images"]) and not np.array_equal(sub["images"], other["images"])
    # Each picked image is a real image of the class it is labelled with.
    flat = real["images"].reshape(len(real["images"]), -1)
    for img, lab in zip(sub["images"], sub["labels"]):
        idx = np.flatnonzero((flat == img.reshape(-1)).all(1))
        assert lab in real["labels"][idx]
    with pytest.raises(ValueError, match="needs 30 real images"):
        E.random_real_subset(real, np.array([2] * 30), seed=0)


def test_summarize_arithmetic():
    def run(name, seed, acc, n, pc):
        return {"name": name, "seed": seed, "accuracy": acc, "n_train": n, "epochs": 10,
                "seconds": 1.0, "per_class_accuracy": pc}
    runs = [run("synthetic", 0, 0.80, 100, [0.7, 0.9]), run("synthetic", 1, 0.90, 100, [0.8, 1.0]),
            run("synthetic", 2, 0.70, 100, [0.6, None]),
            run("full_real", 0, 0.95, 1000, [1.0, 0.9]), run("full_real", 1, 0.97, 1000, [1.0, 0.94]),
            run("random_real", 0, 0.60, 100, [0.5, 0.7])]
    s = E.summarize(runs)
    assert s["synthetic"]["mean"] == pytest.approx(0.80)
    assert s["synthetic"]["std"] == pytest.approx(np.sqrt(2 / 3) * 0.1)   # population std
    assert s["full_real"]["mean"] == pytest.approx(0.96) and s["full_real"]["std"] == pytest.approx(0.01)
    assert s["random_real"]["std"] == 0.0
    assert s["n_synthetic"] == 100
    assert s["gain_over_random"] == pytest.approx(0.20)
    assert s["gap_to_full"] == pytest.approx(0.16)
    assert s["per_class"]["synthetic"] == pytest.approx([0.7, 0.95])
    assert [r["seed"] for r in s["synthetic"]["runs"]] == [0, 1, 2]
    only = E.summarize(runs[:3])
    assert "full_real" not in only and "gap_to_full" not in only and "gain_over_random" not in only
    with pytest.raises(ValueError, match="expected one of"):
        E.summarize([run("real", 0, 0.5, 10, [0.5])])
