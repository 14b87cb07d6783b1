"""audit.py: the memorisation audit, on made data."""
import json

import numpy as np
import pytest
import torch

from diffdistill import audit


def _set(n, seed, hw=8, c=1):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).astype(np.int64), "classes": np.array([str(i) for i in range(10)])}


def _features_fn():
    # a fixed random projection + ReLU: a stand-in for a ConvNet's .features
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    return lambda imgs: torch.relu(torch.as_tensor(imgs).reshape(len(imgs), -1).float() / 255.0 @ w)


@pytest.fixture(scope="module")
def made():
    train, test = _set(300, 1), _set(120, 2)
    fresh = _set(3, 3)["images"]
    copy = train["images"][[17]]
    samples = {"images": np.concatenate([copy, fresh]), "labels": np.zeros(4, np.int64), "classes": train["classes"]}
    return samples, train, test


def test_audit_flags_exact_copy_not_fresh(made):
    samples, train, test = made
    r = audit.audit(samples, train, test, features_fn=_features_fn(), batch_size=64)
    for space in ("pixel", "feature"):
        sp = r["spaces"][space]
        assert list(sp["flagged"]) == [0], space  # the copy, and none of the 3 fresh images
        assert sp["gen_nn_index"][0] == 17 and sp["gen_nn_dist"][0] == 0.0
        assert sp["share_flagged"] == pytest.approx(0.25)
        assert sp["gen_exact_copies"] == 1 and sp["closest_pairs"][0]["train_index"] == 17
        assert np.all(sp["gen_nn_dist"][1:] > sp["threshold_min_test"])
    assert (r["n_generated"], r["n_train"], r["n_test"]) == (4, 300, 120)


def test_nearest_neighbours_match_brute_force():
    q, ref = _set(37, 5)["images"], _set(90, 6)["images"]
    d, i = audit.nearest_neighbours(q, ref, batch_size=16)
    full = np.linalg.norm(q.reshape(37, 1, -1) / 255.0 - ref.reshape(1, 90, -1) / 255.0, axis=2)
    np.testing.assert_array_equal(i, full.argmin(1))
    np.testing.assert_allclose(d, full.min(1), rtol=1e-6)


def test_exact_copy_flagged_even_when_test_has_duplicates(made):
    samples, train, test = made
    test = {**test, "images": np.concatenate([test["images"], train["images"][[3]]])}  # min test distance = 0
    sp = audit.audit(samples, train, test)["spaces"]["pixel"]
    assert sp["threshold_min_test"] == 0.0 and sp["test_exact_duplicates"] == 1
    assert list(sp["flagged"]) == [0]


def test_audit_rejects_bad_input(made):
    samples, train, test = made
    with pytest.raises(ValueError, match="uint8"):
        audit.audit({"images": samples["images"].astype(np.float32)}, train, test)
    with pytest.raises(ValueError, match="shapes differ"):
        audit.audit(_set(2, 0, hw=4), train, test)


def test_write_audit(tmp_path, made):
    samples, train, test = made
    r = audit.audit(samples, train, test, features_fn=_features_fn())
    data = audit.write_audit(r, tmp_path / "audit.json", tmp_path / "hist.png", tmp_path / "pairs.png")
    j = json.loads((tmp_path / "audit.json").read_text())
    assert j["spaces"]["pixel"]["flagged"] == [0] and "_images" not in j
    assert len(j["spaces"]["feature"]["gen_nn_dist"]) == 4 and len(j["spaces"]["pixel"]["test_nn_dist"]) == 120
    assert set(data["hist"]) == {"pixel", "feature"} and data["pairs"]["pixel"][0][:2] == (0, 17)
    assert (tmp_path / "hist.png").stat().st_size > 0 and (tmp_path / "pairs.png").stat().st_size > 0
    # the pairs figure: no blank band under the title (it was 0.69 in on a digits audit), headers
    # clear of each other, and each space says what its distance d is measured in
    lay = data["pairs_layout"]
    assert 0 < lay["title_gap_in"] < 0.45 and lay["collisions"] == []
    header = " ".join(lay["header"])
    assert "L2 on [0, 1] pixel values" in header and "feature units" in header
