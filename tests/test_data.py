"""data.download and data.prepare for every kind, from archives made here in the real layouts and
served on 127.0.0.1; every bad input fails with a message naming the file and leaves no output."""
import hashlib
import io
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from diffdistill import data
from servers import closed_port_url, serve
from workflow import REPO as ROOT


def md5(b):
    return hashlib.md5(b).hexdigest()


def outputs(out_dir):
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_split_shapes_and_classes(tmp_path):
    cfg = {"kind": "digits", "image_size": 16, "test_fraction": 0.2, "split_seed": 0}
    data.prepare(cfg, tmp_path / "d", progress=False)
    tr, te = data.load_split(tmp_path / "d", "train"), data.load_split(tmp_path / "d", "test")
    assert tr["images"].shape == (1437, 16, 16, 1) and te["images"].shape == (360, 16, 16, 1)
    assert tr["images"].dtype == np.uint8 and tr["labels"].dtype == np.int64
    assert list(tr["classes"]) == [str(i) for i in range(10)] and tr["classes"].dtype.kind == "U"
    assert tr["images"].max() == 255 and tr["images"].min() == 0
    # Stratified: every class keeps ~20% of its images in the test split.
    counts = np.bincount(te["labels"], minlength=10) / (np.bincount(te["labels"], minlength=10)
                                                        + np.bincount(tr["labels"], minlength=10))
    assert np.all(np.abs(counts - 0.2) < 0.01)
    # Fixed: the same config gives the same files; another split_seed another split.
    again, _ = data.build(cfg, progress=False)
    np.testing.assert_array_equal(again["images"], tr["images"])
    other, _ = data.build({**cfg, "split_seed": 1}, progress=False)
    assert not np.array_equal(other["labels"], tr["labels"])
    # Each image is its 8×8 original upscaled (bilinear, so 2×2 means come back close) with its label.
    from scipy.spatial.distance import cdist
    from sklearn.datasets import load_digits

    d = load_digits()
    small = tr["images"][..., 0].reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4)) / 255 * 16
    nearest = cdist(small.reshape(-1, 64), d.images.reshape(-1, 64), "cityblock").argmin(axis=1)
    assert (d.target[nearest] == tr["labels"]).mean() > 0.99


def test_unknown_kind_and_bad_split(tmp_path):
    with pytest.raises(data.DataError, match="unknown data.kind 'mnist'.*digits, cifar100, tinyimagenet, folder"):
        data.prepare({"kind": "mnist", "image_size": 28}, tmp_path / "o", progress=False)
    assert outputs(tmp_path / "o") == []
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_split(tmp_path, "val")


# --------------------------------------------------------------------------------------------------
# CIFAR-100, in the real cifar-100-python layout


class Py2Str(bytes):
    """A Python 2 ``str``: the real CIFAR pickles were written by Python 2, so their keys and names are
    BINSTRING opcodes that Python 3 decodes with ``encoding=`` (torchvision passes latin1)."""


class _Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + bytes(obj))

    dispatch[Py2Str] = _save_py2str


def py2_pickle(obj):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_batch(n, seed, name):
    """Images whose red channel is the label and green the index: checks labels and CHW -> HWC."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 100).tolist()
    rng.shuffle(labels)
    chw = np.zeros((n, 3, 32, 32), np.uint8)
    chw[:, 0] = np.array(labels)[:, None, None]
    chw[:, 1] = (np.arange(n) % 256)[:, None, None]
    chw[:, 2, :, :16] = 255  # left half blue: a transposition bug would move it
    return {Py2Str(b"batch_label"): Py2Str(f"{name} batch 1 of 1".encode()),
            Py2Str(b"filenames"): [Py2Str(f"img_{i}.png".encode()) for i in range(n)],
            Py2Str(b"fine_labels"): labels, Py2Str(b"coarse_labels"): [l // 5 for l in labels],
            Py2Str(b"data"): chw.reshape(n, 3072)}, labels


FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver"] + [f"class_{i:02d}" for i in range(5, 100)]
CIFAR_TGZ = "cifar-100-python.tar.gz"


def cifar_tgz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def cifar_members(n_train=300, n_test=100):
    train, train_labels = cifar_batch(n_train, 0, "training")
    test, test_labels = cifar_batch(n_test, 1, "testing")
    files = {"train": py2_pickle(train), "test": py2_pickle(test),
             "meta": py2_pickle({Py2Str(b"fine_label_names"): [Py2Str(s.encode()) for s in FINE],
                                 Py2Str(b"coarse_label_names"): [Py2Str(f"super_{i}".encode()) for i in range(20)]})}
    # Read back as the real files are: bytes keys with encoding='bytes', str keys with latin1.
    assert set(pickle.loads(files["train"], encoding="bytes")) >= {b"data", b"fine_labels"}
    assert pickle.loads(files["meta"], encoding="latin1")["fine_label_names"][1] == "aquarium_fish"
    return files, train_labels, test_labels


@pytest.fixture
def cifar_archive():
    """A cifar-100-python.tar.gz in the real layout (members train, test, meta; Python 2 pickles)."""
    files, train_labels, test_labels = cifar_members()
    return cifar_tgz(files), train_labels, test_labels


def cifar_cfg(source, checksum):
    return {"kind": "cifar100", "image_size": 32, "source": source, "checksum": checksum}


def test_cifar100_download_then_prepare_from_loopback(tmp_path, cifar_archive):
    tgz, train_labels, test_labels = cifar_archive
    archive = tmp_path / "dl" / "cifar100" / CIFAR_TGZ
    assert data.archive_name(cifar_cfg(None, None)) == CIFAR_TGZ
    with serve({"/" + CIFAR_TGZ: tgz}) as srv:
        cfg = cifar_cfg(srv.url("/" + CIFAR_TGZ), f"md5:{md5(tgz)}")
        data.download(cfg, archive, progress=False)
        data.download(cfg, archive, progress=False)  # there and verified: not fetched again
        assert srv.hits["/" + CIFAR_TGZ] == 1
    assert archive.read_bytes() == tgz and outputs(archive.parent) == [CIFAR_TGZ]
    # Conversion needs the archive only: the server is gone.
    data.prepare(cfg, tmp_path / "out", archive=archive, progress=False)
    tr, te = data.load_split(tmp_path / "out", "train"), data.load_split(tmp_path / "out", "test")
    assert tr["images"].shape == (300, 32, 32, 3) and te["images"].shape == (100, 32, 32, 3)
    assert list(tr["labels"]) == train_labels and list(te["labels"]) == test_labels
    assert list(tr["classes"]) == FINE and list(te["classes"]) == FINE
    np.testing.assert_array_equal(tr["images"][:, 5, 7, 0], tr["labels"])  # red = label
    np.testing.assert_array_equal(tr["images"][:, 0, 0, 1], np.arange(300) % 256)  # order kept
    assert (tr["images"][:, :, :16, 2] == 255).all() and (tr["images"][:, :, 16:, 2] == 0).all()
    # A smaller image size resizes; the labels stay.
    small, _ = data.build({**cfg, "image_size": 16}, archive=archive, progress=False)
    assert small["images"].shape == (300, 16, 16, 3) and list(small["labels"]) == train_labels


def test_cifar100_download_and_prepare_through_the_cli(tmp_path, cifar_archive, monkeypatch):
    """`download` and `prepare` as the rules call them: params.yaml plus an override naming the source."""
    from diffdistill import cli

    tgz, train_labels, _ = cifar_archive
    monkeypatch.chdir(tmp_path)
    with serve({"/c.tgz": tgz}) as srv:
        (tmp_path / "over.yaml").write_text(
            f"cifar100:\n  data:\n    source: {srv.url('/c.tgz')}\n    checksum: md5:{md5(tgz)}\n")
        params = ["--params", str(ROOT / "params.yaml"), "--params", "over.yaml"]
        assert cli.main(["download", *params, "--dataset", "cifar100"]) == 0
    archive = tmp_path / "data" / "downloads" / "cifar100" / CIFAR_TGZ  # the default place
    assert archive.read_bytes() == tgz
    assert cli.main(["prepare", *params, "--dataset", "cifar100", "--out", "data/cifar100"]) == 0
    assert list(data.load_split(tmp_path / "data" / "cifar100", "train")["labels"]) == train_labels
    # digits has nothing to download: a clear failure, nothing written.
    assert cli.main(["download", *params, "--dataset", "digits", "--out", "x.tgz"]) == 1
    assert not (tmp_path / "x.tgz").exists()


def test_cifar100_missing_url_checksum_and_offline(tmp_path, cifar_archive, caplog):
    tgz, _, _ = cifar_archive
    dl = tmp_path / "dl"
    archive = dl / CIFAR_TGZ
    with serve({"/" + CIFAR_TGZ: tgz}) as srv:
        # A URL the server does not have: the message names the URL, the path to place the file at, and
        # the checksum it must have; nothing is left behind.
        url = srv.url("/mirror/" + CIFAR_TGZ)
        with pytest.raises(data.DataError) as e:
            data.download(cifar_cfg(url, f"md5:{md5(tgz)}"), archive, progress=False)
        msg = str(e.value)
        assert "404" in msg and url in msg and str(archive) in msg and "by hand" in msg and md5(tgz) in msg
        assert outputs(dl) == []
        # An archive other than the checksum expects is deleted.
        with pytest.raises(data.DataError, match=f"md5 mismatch: expected {'0' * 32}"):
            data.download(cifar_cfg(srv.url("/" + CIFAR_TGZ), "md5:" + "0" * 32), archive, progress=False)
        assert outputs(dl) == []
    # Offline (nothing listens).
    url = closed_port_url("/" + CIFAR_TGZ)
    with pytest.raises(data.DataError, match="by hand and place it at") as e:
        data.download(cifar_cfg(url, None), archive, progress=False)
    assert url in str(e.value) and outputs(dl) == []
    # No source configured, and prepare before any download: each says what to do.
    with pytest.raises(data.DataError, match="data.source is not set"):
        data.download(cifar_cfg(None, None), archive, progress=False)
    with pytest.raises(data.DataError, match=r"does not exist\. Run the download step first .* by hand and place it"):
        data.prepare(cifar_cfg(url, None), tmp_path / "out", archive=archive, progress=False)
    assert outputs(tmp_path / "out") == []


def evil_pickle():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    return pickle.dumps(Evil(), protocol=2)


@pytest.mark.parametrize("case", ["no_meta", "short_rows", "bad_label", "not_gzip", "truncated", "evil"])
def test_cifar100_bad_archive(tmp_path, case, capsys):
    files, _, _ = cifar_members(n_train=20, n_test=10)
    if case == "no_meta":
        del files["meta"]
    if case in ("short_rows", "bad_label"):
        batch, labels = cifar_batch(20, 0, "training")
        if case == "short_rows":
            batch[Py2Str(b"data")] = batch[Py2Str(b"data")][:, :1024]
        else:
            batch[Py2Str(b"fine_labels")] = labels[:-1] + [100]
        files["train"] = py2_pickle(batch)
    if case == "evil":
        files["test"] = evil_pickle()
    blob = cifar_tgz(files)
    if case == "not_gzip":
        blob = b"<html>not an archive</html>"
    if case == "truncated":
        blob = blob[: len(blob) // 2]
    archive = tmp_path / "dl" / CIFAR_TGZ
    archive.parent.mkdir()
    archive.write_bytes(blob)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.npz").write_bytes(b"a previous good result")  # must survive a failed run
    expect = {"no_meta": r"has no cifar-100-python/meta; it is not the cifar-100-python layout",
              "short_rows": r"cifar-100-python/train has no 'data' array of shape \[N, 3072\]",
              "bad_label": r"cifar-100-python/train has labels outside 0..99",
              "not_gzip": r"cifar-100-python.tar.gz is not a complete tar.gz archive .*It was deleted",
              "truncated": r"cifar-100-python.tar.gz is not a complete tar.gz archive .*It was deleted",
              "evil": r"cifar-100-python/test is not a CIFAR pickle .*\.print, which a CIFAR pickle never holds"}[case]
    with pytest.raises(data.DataError, match=expect):
        data.prepare(cifar_cfg("https://example.org/c.tgz", None), out, archive=archive, progress=False)
    assert outputs(out) == ["train.npz"] and (out / "train.npz").read_bytes() == b"a previous good result"
    assert "pwned" not in capsys.readouterr().out
    # A broken archive is removed so the next run downloads it again; a readable one is kept.
    assert archive.exists() == (case not in ("not_gzip", "truncated"))


# --------------------------------------------------------------------------------------------------
# Tiny-ImageNet, in the real tiny-imagenet-200.zip layout

WNIDS = ["n01443537", "n01629819", "n02124075"]  # wnids.txt order is not sorted in the real file
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra salamandra",
         "n02124075": "Egyptian cat", "n00001740": "entity"}


def jpeg(value, mode="RGB", size=64):
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, 255 - value, 128)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def tiny_zip(n_train=4, val_per_class=2, drop=(), corrupt=None):
    """Class k's images have red = 60k + 20; the zip also holds the bbox/test files the real one has."""
    buf = io.BytesIO()
    order = [WNIDS[2], WNIDS[0], WNIDS[1]]
    color = {w: 60 * i + 20 for i, w in enumerate(sorted(WNIDS))}
    with zipfile.ZipFile(buf, "w") as zf:
        def put(name, blob):
            if name not in drop:
                zf.writestr("tiny-imagenet-200/" + name, blob)

        put("wnids.txt", "\n".join(order) + "\n")
        put("words.txt", "".join(f"{w}\t{d}\n" for w, d in WORDS.items()))
        for w in order:
            put(f"train/{w}/{w}_boxes.txt", "")
            for i in range(n_train):
                mode = "L" if (w == WNIDS[1] and i == 0) else "RGB"  # the real set has grayscale JPEGs
                put(f"train/{w}/images/{w}_{i}.JPEG", jpeg(color[w], mode))
        lines, k = [], 0
        for w in order:
            for _ in range(val_per_class):
                put(f"val/images/val_{k}.JPEG", jpeg(color[w]))
                lines.append(f"val_{k}.JPEG\t{w}\t0\t3\t60\t61")
                k += 1
        put("val/val_annotations.txt", "\n".join(lines) + "\n")
        put("test/images/test_0.JPEG", jpeg(7))
        if corrupt:
            zf.writestr("tiny-imagenet-200/" + corrupt, b"\xff\xd8\xff\xe0 not really a jpeg")
    return buf.getvalue()


def tiny_cfg(source, checksum):
    return {"kind": "tinyimagenet", "image_size": 64, "source": source, "checksum": checksum}


def test_tinyimagenet_from_loopback(tmp_path):
    blob = tiny_zip()
    archive = tmp_path / "dl" / "tiny-imagenet-200.zip"
    with serve({"/tiny-imagenet-200.zip": blob}) as srv:
        cfg = tiny_cfg(srv.url("/tiny-imagenet-200.zip"), f"md5:{md5(blob)}")
        data.download(cfg, archive, progress=False)
    data.prepare(cfg, tmp_path / "out", archive=archive, progress=False)
    tr, te = data.load_split(tmp_path / "out", "train"), data.load_split(tmp_path / "out", "test")
    assert tr["images"].shape == (12, 64, 64, 3) and te["images"].shape == (6, 64, 64, 3)
    assert list(tr["classes"]) == ["goldfish", "European fire salamander", "Egyptian cat"]
    assert np.bincount(tr["labels"]).tolist() == [4, 4, 4] and np.bincount(te["labels"]).tolist() == [2, 2, 2]
    for s in (tr, te):
        rgb = s["images"][s["images"][..., 0] != s["images"][..., 1]].reshape(-1, 3)
        assert len(rgb)
        red = s["images"][..., 0].reshape(len(s["labels"]), -1).mean(axis=1)
        gray = (s["images"][..., 0] == s["images"][..., 1]).all(axis=(1, 2))
        np.testing.assert_allclose(red[~gray], 60 * s["labels"][~gray] + 20, atol=3)
    assert (tmp_path / "dl" / "tiny-imagenet-200.zip").read_bytes() == blob


@pytest.mark.parametrize("case", ["checksum", "truncated", "no_annotations", "bad_image", "offline"])
def test_tinyimagenet_bad_input(tmp_path, case):
    out, dl = tmp_path / "out", tmp_path / "dl"
    out.mkdir()
    (out / "train.npz").write_bytes(b"a previous good result")  # must survive a failed run
    blob = tiny_zip(drop={"val/val_annotations.txt"} if case == "no_annotations" else (),
                    corrupt="train/n01629819/images/n01629819_9.JPEG" if case == "bad_image" else None)
    checksum = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    expect = {"checksum": r"sha256 mismatch: expected 0000",
              "truncated": r"tiny-imagenet-200.zip is not a complete zip archive",
              "no_annotations": r"has no tiny-imagenet-200/val/val_annotations.txt",
              "bad_image": r"cannot read image tiny-imagenet-200/train/n01629819/images/n01629819_9.JPEG",
              "offline": r"by hand and place it at .*dl/tiny-imagenet-200.zip"}[case]
    if case == "checksum":
        checksum = "sha256:0000"
    if case == "truncated":
        blob, checksum = blob[: len(blob) // 2], None  # a short file on the server; no checksum pinned
    with serve({"/t.zip": blob}) as srv:
        url = closed_port_url("/t.zip") if case == "offline" else srv.url("/t.zip")
        cfg = tiny_cfg(url, checksum)
        with pytest.raises(data.DataError, match=expect) as e:
            # The two steps as the rules run them: download_data, then prepare_data on its archive.
            archive = data.download(cfg, dl / "tiny-imagenet-200.zip", progress=False)
            data.prepare(cfg, out, archive=archive, progress=False)
    assert "tiny-imagenet-200.zip" in str(e.value)
    assert outputs(out) == ["train.npz"] and (out / "train.npz").read_bytes() == b"a previous good result"
    left = outputs(dl)
    assert not any(".part" in n or n.startswith(".") for n in left)
    if case in ("checksum", "truncated", "offline"):
        assert left == []  # no bad archive (and no trust-on-first-use record of one) kept


# --------------------------------------------------------------------------------------------------
# folder


def make_tree(root, classes, per_class, size=(20, 12)):
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * k + 10, 100, 200)).save(root / c / f"{i}.png")
        Image.new("L", (9, 9), 40 * k + 10).save(root / c / "gray.jpg", quality=100)
    (root / "notes.txt").write_text("not an image folder")


def test_folder_split_and_test_root(tmp_path):
    make_tree(tmp_path / "tree", ["cat", "ant", "bee"], per_class=4)
    cfg = {"kind": "folder", "root": str(tmp_path / "tree"), "image_size": 8, "test_fraction": 0.4, "split_seed": 3}
    data.prepare(cfg, tmp_path / "out", progress=False)
    tr, te = data.load_split(tmp_path / "out", "train"), data.load_split(tmp_path / "out", "test")
    assert list(tr["classes"]) == ["ant", "bee", "cat"]
    assert len(tr["labels"]) + len(te["labels"]) == 15 and np.bincount(te["labels"]).tolist() == [2, 2, 2]
    assert tr["images"].shape[1:] == (8, 8, 3)
    red = tr["images"][..., 0].mean(axis=(1, 2))
    np.testing.assert_allclose(red, 40 * np.array([1, 2, 0])[tr["labels"]] + 10, atol=2)  # ant=1, bee=2, cat=0
    make_tree(tmp_path / "given_test", ["cat", "ant", "bee"], per_class=1, size=(8, 8))
    gray = data.build({**cfg, "test_root": str(tmp_path / "given_test"), "channels": 1}, progress=False)
    assert gray[0]["images"].shape == (15, 8, 8, 1) and gray[1]["images"].shape == (6, 8, 8, 1)


def test_folder_bad_input(tmp_path):
    make_tree(tmp_path / "tree", ["a", "b"], per_class=3)
    (tmp_path / "tree" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = {"kind": "folder", "root": str(tmp_path / "tree"), "image_size": 8}
    with pytest.raises(data.DataError, match=r"cannot read image .*tree/b/broken.png"):
        data.prepare(cfg, tmp_path / "out", progress=False)
    assert outputs(tmp_path / "out") == []
    (tmp_path / "tree" / "b" / "broken.png").unlink()
    (tmp_path / "tree" / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"class folder .*tree/empty has no images"):
        data.prepare(cfg, tmp_path / "out", progress=False)
    with pytest.raises(data.DataError, match="is not a folder"):
        data.prepare({**cfg, "root": str(tmp_path / "nope")}, tmp_path / "out", progress=False)
    assert outputs(tmp_path / "out") == []
