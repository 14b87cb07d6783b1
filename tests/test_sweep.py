"""sweep.py: the budget sweep's points, line fit, summary and figure, on made data."""
import json

import numpy as np
import pytest

from diffdistill import sweep
from diffdistill.io import save_json


MANIFEST = {"count": 1000, "per_class": {str(k): 100 for k in range(10)}, "seconds": 10.0,
            "timeline": [[250 * (i + 1), 0.5 + 2.5 * (i + 1)] for i in range(4)]}


def test_sweep_points_from_timeline():
    pts = sweep.sweep_points(MANIFEST, [10, 25, 50, 100])
    # 100 images lie in the first batch (done at 3.0 s); 250 exactly at its end; 500 after batch 2
    assert [p["n_images"] for p in pts] == [100, 250, 500, 1000]
    assert [p["seconds"] for p in pts] == [3.0, 3.0, 5.5, 10.5]
    with pytest.raises(ValueError, match="only 100 per class"):
        sweep.sweep_points(MANIFEST, [200])


def test_linear_fit():
    x = np.arange(10.0)
    fit = sweep.linear_fit(x, 0.02 * x + 1.5)
    assert fit["slope"] == pytest.approx(0.02) and fit["intercept"] == pytest.approx(1.5) and fit["r2"] == pytest.approx(1.0)
    noisy = sweep.linear_fit(x, 0.02 * x + np.random.default_rng(0).normal(0, 0.05, 10))
    assert 0.0 < noisy["r2"] < 1.0


def test_summarize_and_fig_sweep(tmp_path):
    accs = {("synthetic", 10): [0.5, 0.6, 0.7], ("synthetic", 50): [0.8, 0.82, 0.84],
            ("random_real", 10): [0.4, 0.45, 0.5], ("random_real", 50): [0.7, 0.7, 0.7]}
    paths = []
    for (name, ipc), runs in accs.items():
        for seed, a in enumerate(runs):
            p = tmp_path / "sweep" / f"{name}_ipc{ipc}_seed{seed}.json"
            save_json(p, {"accuracy": a, "per_class_accuracy": [a] * 10, "n_train": ipc * 10,
                          "loss_curve": [1.0], "seed": seed, "name": p.stem})
            paths.append(p)
    res = sweep.summarize_sweep(paths, manifest=MANIFEST)
    rows = {(r["set"], r["images_per_class"]): r for r in res["curve"]}
    assert set(rows) == set(accs)
    for key, runs in accs.items():
        assert rows[key]["runs"] == runs and rows[key]["mean"] == pytest.approx(np.mean(runs))
        assert rows[key]["seeds"] == [0, 1, 2] and rows[key]["n_images"] == key[1] * 10
    assert rows[("synthetic", 50)]["sampling_seconds"] == 5.5
    assert res["linear_fit"]["r2"] == pytest.approx(1.0) and res["linear_fit"]["slope"] == pytest.approx(0.01)
    data = sweep.write_sweep(res, tmp_path / "sweep.json", tmp_path / "sweep.png")
    assert data["accuracy_vs_ipc"]["synthetic"]["x"] == [10, 50]
    assert data["accuracy_vs_ipc"]["random_real"]["y"] == pytest.approx([0.45, 0.7])
    assert data["accuracy_vs_seconds"]["synthetic"]["x"] == [3.0, 5.5]
    assert data["seconds_vs_images"]["x"] == [250, 500, 750, 1000]
    # the error bars are defined, with the seed count, and the generated sets are said to be unselected
    assert data["legend"]["title"] == "mean ± population std over 3 seeds"
    assert "unselected" in data["legend"]["labels"][0]
    assert json.loads((tmp_path / "sweep.json").read_text())["curve"][0]["set"] == "random_real"
    assert (tmp_path / "sweep.png").exists()
    with pytest.raises(ValueError, match="sweep result name"):
        sweep.summarize_sweep([tmp_path / "other.json"])
    # A small dataset sampled in one batch has one timeline point: the figure shows it, fits no line.
    one_batch = dict(MANIFEST, timeline=[[1000, 10.0]])
    single = sweep.summarize_sweep(paths, manifest=one_batch)
    assert single["linear_fit"] is None
    data = sweep.write_sweep(single, tmp_path / "single.json", tmp_path / "single.png")
    assert data["seconds_vs_images"]["x"] == [1000] and data["seconds_vs_images"]["fit"] is None
    assert (tmp_path / "single.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
