"""Tests for diffdistill.export: the challenge's submission files and PNG folders, and the export step."""
import numpy as np
import pytest
import torch

from diffdistill import export
from test_imageset import made_set


@pytest.mark.parametrize("shape", [(8, 8, 3), (6, 6, 1)])
def test_export_round_trip(tmp_path, shape):
    # The file is now a bare images tensor with the labels in a second file (was a dict
    # {"images", "labels"}); the assertions on both are the same as before.
    s = made_set(shape=shape)
    c = shape[-1]
    mean, std = [0.5071, 0.4866, 0.4409][:c], [0.2673, 0.2564, 0.2762][:c]
    out, labels_out = export.export_challenge(s, mean, std, 4, tmp_path / "sub.pt")
    assert labels_out == tmp_path / "sub_labels.pt"
    images, labels = torch.load(out, weights_only=True), torch.load(labels_out, weights_only=True)
    assert images.dtype == torch.float32 and images.shape == (12, c) + shape[:2]
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    expected = {k: s["images"][s["labels"] == k][:4] for k in range(3)}
    x0 = torch.from_numpy(expected[0][0]).permute(2, 0, 1).float() / 255
    want = (x0 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    assert torch.allclose(images[0], want, atol=1e-6)
    back = export.load_challenge(out, mean, std)
    np.testing.assert_array_equal(back["images"], np.concatenate([expected[k] for k in range(3)]))
    np.testing.assert_array_equal(back["labels"], labels.numpy())
    with pytest.raises(ValueError, match="class 1 \\(c1\\) has 4 images, fewer than the 5 per class"):
        export.export_challenge(s, mean, std, 5, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad_labels.pt").exists()

    pngs = export.export_pngs(s, tmp_path / "png")
    names = sorted(p.name for p in pngs.iterdir())
    assert len(names) == len(s["labels"]) and "0_0.png" in names and "2_5.png" in names
    back = export.load_pngs(pngs)
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
    export.export_challenge(s, mean, std, 10, tmp_path / "challenge" / "cifar100.pt")

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
    out, _ = export.export_challenge(s, mean, std, None, tmp_path / "all" / "x.pt")
    assert torch.load(out).shape[0] == 10 * K
    empty = dict(s, classes=np.array(["a", "b", "c", "d", "e"]))
    with pytest.raises(ValueError, match="class 4 \\(e\\) has 0 images.*export.images_per_class"):
        export.export_challenge(empty, mean, std, None, tmp_path / "none" / "x.pt")
    assert not list((tmp_path / "none").glob("*.pt"))


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
