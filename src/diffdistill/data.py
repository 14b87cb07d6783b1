"""Datasets: prepare each source into one format, and load it.

Format: ``data/{ds}/train.npz`` and ``test.npz`` with ``images`` uint8 [N,H,W,C], ``labels`` int64 [N],
``classes`` str [K].
"""
import numpy as np
import torch


def to_model_space(images):
    """uint8 [N,H,W,C] (numpy or tensor) -> float32 tensor [N,C,H,W] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def from_model_space(x):
    """float tensor [N,C,H,W] in [-1, 1] -> uint8 numpy [N,H,W,C] (clipped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------------------------------
# preparing datasets
#
# Every kind returns two image sets {images, labels, classes}; ``prepare`` writes both files or neither.
# cifar100 and tinyimagenet are read from their downloaded archive (``download``), the others need none.

import io as _io
import logging
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path

from . import imageset
from . import io as dio
from . import weights

log = logging.getLogger(__name__)

KINDS = ("digits", "cifar100", "tinyimagenet", "folder")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TINY_ZIP = "tiny-imagenet-200.zip"


class DataError(ValueError):
    """A dataset source is missing or bad; the message names the file and the fix."""


def _stratified_split(labels, test_fraction, split_seed):
    """Fixed stratified split -> (train_idx, test_idx), each sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels,
                                               random_state=split_seed, shuffle=True)
    except ValueError as e:
        raise DataError(f"cannot make a stratified split with test_fraction={test_fraction}: {e}. Give every "
                        f"class at least 2 images, change test_fraction, or give a test folder") from e
    return np.sort(train_idx), np.sort(test_idx)


def _to_size(img, size, channels=3):
    """PIL image -> uint8 [size,size,C]: RGB (or L), centre-crop to a square, bilinear resize.

    PIL's bilinear filter widens its support when shrinking, so downscaling is antialiased."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def _decode(data_or_path, name, size, channels=3):
    """Decode one image file; an unreadable one is an error that names it."""
    from PIL import Image, UnidentifiedImageError

    try:
        src = _io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
        with Image.open(src) as img:
            img.load()
            return _to_size(img, size, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {name}: {e}. Replace or delete this file and rerun.") from e


def _progress(iterable, total, desc, progress):
    from .progress import progress as progress_bar

    return progress_bar(iterable, total=total, desc=desc, unit="img", disable=not progress)


# --- digits --------------------------------------------------------------------------------------


def _digits(cfg):
    """scikit-learn's bundled 8×8 digits (values 0..16), bilinearly upscaled; no download."""
    from sklearn.datasets import load_digits

    size = int(cfg.get("image_size", 16))
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N,1,8,8] in [0,1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    full = imageset.from_arrays(images, d.target, [str(c) for c in range(10)])
    tr, te = _stratified_split(full["labels"], cfg.get("test_fraction", 0.2), cfg.get("split_seed", 0))
    return imageset.subset(full, tr), imageset.subset(full, te)


# --- downloads -----------------------------------------------------------------------------------
#
# A dataset with a public archive is fetched by its own step (`download`, Snakemake's download_data,
# a local rule: it runs where Snakemake runs, which has internet) into data/downloads/{ds}/<name>;
# `prepare` then only converts that archive. The name is fixed per kind so that the archive a user
# downloads by hand has an obvious place.

ARCHIVES = {"cifar100": "cifar-100-python.tar.gz", "tinyimagenet": TINY_ZIP}
_LABEL = {"cifar100": "CIFAR-100", "tinyimagenet": "Tiny-ImageNet"}


def archive_name(data_cfg):
    """The archive file a dataset kind is prepared from, or None (digits, folder: nothing to download)."""
    return ARCHIVES.get(data_cfg.get("kind"))


def download(data_cfg, dest, progress=True):
    """Fetch ``data.source`` to ``dest`` and verify it against ``data.checksum`` (weights.fetch: atomic,
    no partial file; offline, the message names the URL and where to place the file by hand)."""
    kind, name = data_cfg.get("kind"), archive_name(data_cfg)
    if name is None:
        raise DataError(f"data.kind {kind!r} has nothing to download (only {', '.join(ARCHIVES)} do); "
                        f"run the prepare step directly")
    source = data_cfg.get("source")
    if not source:
        raise DataError(f"{_LABEL[kind]}: data.source is not set; set it in params.yaml to the URL or local path "
                        f"of {name}")
    try:
        return weights.fetch(source, dest, checksum=data_cfg.get("checksum"), progress=progress)
    except weights.FetchError as e:
        raise DataError(f"{_LABEL[kind]}: {e}") from e


def _need_archive(data_cfg, archive):
    kind = data_cfg.get("kind")
    if archive is None:
        raise DataError(f"{_LABEL[kind]} is prepared from its archive {archive_name(data_cfg)}; give its path "
                        f"(prepare --archive)")
    archive = Path(archive)
    if not archive.is_file():
        where = f"download {data_cfg['source']} by hand and place it" if data_cfg.get("source") else \
            f"place {archive_name(data_cfg)}"
        raise DataError(f"{archive} does not exist. Run the download step first (Snakemake's download_data rule, "
                        f"or python -m diffdistill download), or {where} at {archive}, then rerun.")
    return archive


def _discard_bad_archive(archive, what, data_cfg):
    """An archive that cannot be read is deleted (with its trust-on-first-use record, if any), so the next
    run downloads it again instead of failing on the same file."""
    archive.unlink(missing_ok=True)
    Path(str(archive) + ".sha256").unlink(missing_ok=True)
    source = data_cfg.get("source") or archive_name(data_cfg)
    return (f"{archive} is not a complete {what}; a truncated download? It was deleted. Rerun to download "
            f"{source} again, or download it by hand and place it at {archive}.")


# --- cifar100 ------------------------------------------------------------------------------------

CIFAR_TOP = "cifar-100-python/"


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold dicts, lists, strings and numpy arrays; nothing else may be built from them
    (a pickle can name any callable, and a file under trust on first use is not vouched for)."""

    # _codecs.encode: how Python 3 writes bytes at protocol 2 (a re-packed archive's array buffers).
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR pickle never holds")


def _cifar_pickle(tar, archive, member):
    """One pickle of the archive, as torchvision reads it (latin1: the files were written by Python 2)."""
    try:
        info = tar.getmember(CIFAR_TOP + member)
    except KeyError:
        info = None
    if info is None or not info.isfile():
        raise DataError(f"{archive} has no {CIFAR_TOP}{member}; it is not the cifar-100-python layout. Download "
                        f"the original cifar-100-python.tar.gz and place it at {archive}.")
    try:
        obj = _ArrayUnpickler(tar.extractfile(info), encoding="latin1").load()
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:  # EOFError: a short archive
        raise DataError(f"{archive}: {CIFAR_TOP}{member} is not a CIFAR pickle ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{archive}: {CIFAR_TOP}{member} holds a {type(obj).__name__}, not a CIFAR dict")
    return obj


def _cifar_split(obj, archive, member, n_classes):
    images, labels = obj.get("data"), obj.get("fine_labels")
    if not isinstance(images, np.ndarray) or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{archive}: {CIFAR_TOP}{member} has no 'data' array of shape [N, 3072] "
                        f"(got {getattr(images, 'shape', type(images).__name__)})")
    if labels is None or len(labels) != len(images):
        raise DataError(f"{archive}: {CIFAR_TOP}{member} has {len(images)} images but "
                        f"{'no' if labels is None else len(labels)} fine_labels")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{archive}: {CIFAR_TOP}{member} has labels outside 0..{n_classes - 1} "
                        f"(meta lists {n_classes} fine_label_names)")
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values, each row by row.
    hwc = images.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return hwc, labels


def _read_cifar_tgz(archive, size, progress):
    """cifar-100-python.tar.gz read in place: members train, test, meta (the python-pickle version)."""
    with tarfile.open(archive, "r:gz") as tar:
        meta = _cifar_pickle(tar, archive, "meta")
        classes = meta.get("fine_label_names")
        if not classes:
            raise DataError(f"{archive}: {CIFAR_TOP}meta has no fine_label_names")
        out = []
        for member in ("train", "test"):
            images, labels = _cifar_split(_cifar_pickle(tar, archive, member), archive, member, len(classes))
            if size != 32:
                from PIL import Image

                images = np.stack([_to_size(Image.fromarray(im), size)
                                   for im in _progress(images, len(images), f"cifar100 {member}", progress)])
            out.append(imageset.from_arrays(images, labels, classes))
    return out[0], out[1]


def _cifar100(cfg, archive, progress):
    archive = _need_archive(cfg, archive)
    try:
        return _read_cifar_tgz(archive, int(cfg.get("image_size", 32)), progress)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(_discard_bad_archive(archive, f"tar.gz archive ({type(e).__name__}: {e})", cfg)) from e


# --- tinyimagenet --------------------------------------------------------------------------------


def _tinyimagenet(cfg, archive, progress):
    """The public tiny-imagenet-200.zip, read in place: train/<wnid>/images, val/ as the test split."""
    archive = _need_archive(cfg, archive)
    size = int(cfg.get("image_size", 64))
    try:
        return _read_tiny_zip(archive, size, progress)
    except zipfile.BadZipFile as e:
        raise DataError(_discard_bad_archive(archive, f"zip archive ({e})", cfg)) from e


def _read_tiny_zip(archive, size, progress):
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        top = "tiny-imagenet-200/"

        def text(member):
            if top + member not in names:
                raise DataError(f"{archive} has no {top}{member}; it is not the Tiny-ImageNet layout. Download "
                                f"the original tiny-imagenet-200.zip and place it at {archive}.")
            return zf.read(top + member).decode("utf-8")

        wnids = sorted({w.strip() for w in text("wnids.txt").splitlines() if w.strip()})
        words = {}
        for line in text("words.txt").splitlines():
            if "\t" in line:
                wnid, desc = line.split("\t", 1)
                words[wnid.strip()] = desc.split(",")[0].strip()
        # Sorted wnids give the class order, as an ImageFolder over train/ would.
        classes = [words.get(w, w) for w in wnids]
        index = {w: i for i, w in enumerate(wnids)}

        train_files = []
        for name in sorted(names):
            parts = name.split("/")
            if (len(parts) == 5 and parts[1] == "train" and parts[3] == "images"
                    and parts[4].lower().endswith(IMG_EXTENSIONS)):
                if parts[2] not in index:
                    raise DataError(f"{archive}: {name} is in class {parts[2]}, which wnids.txt does not list")
                train_files.append((name, index[parts[2]]))
        val_files = []
        for line in text("val/val_annotations.txt").splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            name = f"{top}val/images/{fields[0].strip()}"
            if name not in names:
                raise DataError(f"{archive}: val_annotations.txt lists {fields[0]}, but {name} is missing")
            if fields[1].strip() not in index:
                raise DataError(f"{archive}: val_annotations.txt labels {fields[0]} with {fields[1]}, which "
                                f"wnids.txt does not list")
            val_files.append((name, index[fields[1].strip()]))
        if not train_files or not val_files:
            raise DataError(f"{archive} has no training or no validation images; it is not the Tiny-ImageNet "
                            f"layout")

        def read(files, split):
            images = np.empty((len(files), size, size, 3), dtype=np.uint8)
            for i, (name, _) in enumerate(_progress(files, len(files), f"tinyimagenet {split}", progress)):
                images[i] = _decode(zf.read(name), f"{name} in {archive}", size)
            return imageset.from_arrays(images, [y for _, y in files], classes)

        return read(train_files, "train"), read(val_files, "val")


# --- folder --------------------------------------------------------------------------------------


def tree_files(data_cfg):
    """The image files a folder dataset reads (``root`` and ``test_root``), as sorted path strings:
    prepare_data's inputs, so that changed, added or removed images rerun it. [] for other kinds."""
    if data_cfg.get("kind") != "folder":
        return []
    roots = [data_cfg.get("root")] + ([data_cfg["test_root"]] if data_cfg.get("test_root") else [])
    if not roots[0]:
        raise DataError("folder dataset: data.root is not set; name the ImageFolder tree in params.yaml")
    return sorted(str(path) for root in roots for path, _ in _scan_tree(root)[1])


def _scan_tree(root):
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder dataset: {root} is not a folder; set data.root to an ImageFolder tree "
                        f"(one sub-folder of images per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = []
    for i, c in enumerate(classes):
        found = sorted(p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise DataError(f"folder dataset: class folder {root / c} has no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"add images or remove the folder")
        files += [(p, i) for p in found]
    if not classes:
        raise DataError(f"folder dataset: {root} has no class sub-folders; expected {root}/<class>/<image>")
    return classes, files


def _read_tree(root, classes_files, size, channels, progress):
    classes, files = classes_files
    images = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, (path, _) in enumerate(_progress(files, len(files), f"folder {Path(root).name}", progress)):
        images[i] = _decode(path, str(path), size, channels)
    return imageset.from_arrays(images, [y for _, y in files], classes)


def _folder(cfg, progress):
    root = cfg.get("root")
    if not root:
        raise DataError("folder dataset: data.root is not set; name the ImageFolder tree in params.yaml")
    size, channels = int(cfg["image_size"]), int(cfg.get("channels", 3))
    if channels not in (1, 3):
        raise DataError(f"folder dataset: channels must be 1 or 3, got {channels}")
    tree = _scan_tree(root)
    if cfg.get("test_root"):
        test_tree = _scan_tree(cfg["test_root"])
        if test_tree[0] != tree[0]:
            raise DataError(f"folder dataset: test_root {cfg['test_root']} has classes {test_tree[0]} but root "
                            f"{root} has {tree[0]}; both trees need the same class folders")
        return (_read_tree(root, tree, size, channels, progress),
                _read_tree(cfg["test_root"], test_tree, size, channels, progress))
    labels = np.array([y for _, y in tree[1]])
    tr, te = _stratified_split(labels, cfg.get("test_fraction", 0.2), cfg.get("split_seed", 0))
    full = _read_tree(root, tree, size, channels, progress)
    return imageset.subset(full, tr), imageset.subset(full, te)


# --- entry points --------------------------------------------------------------------------------


def build(data_cfg, archive=None, progress=True):
    """Return (train_set, test_set) for ``data_cfg`` without writing them; ``archive`` is the downloaded
    file of the kinds that have one (``archive_name``)."""
    kind = data_cfg.get("kind")
    if kind == "digits":
        return _digits(data_cfg)
    if kind == "cifar100":
        return _cifar100(data_cfg, archive, progress)
    if kind == "tinyimagenet":
        return _tinyimagenet(data_cfg, archive, progress)
    if kind == "folder":
        return _folder(data_cfg, progress)
    raise DataError(f"unknown data.kind {kind!r}; use one of {', '.join(KINDS)}")


def prepare(data_cfg, out_dir, archive=None, progress=True):
    """Write ``out_dir/train.npz`` and ``out_dir/test.npz``: both, or (on any error) neither."""
    train, test = build(data_cfg, archive, progress)
    out_dir = Path(out_dir)
    # Both files are written under temporary names; the renames happen only after both are complete.
    with dio.atomic_path(out_dir / "train.npz") as t_train, dio.atomic_path(out_dir / "test.npz") as t_test:
        for tmp, split in ((t_train, train), (t_test, test)):
            with open(tmp, "wb") as f:
                np.savez(f, **split)
    log.info("prepared %s: train %s, test %s, %d classes", data_cfg.get("kind"), train["images"].shape,
             test["images"].shape, len(train["classes"]))
    return train, test


def load_split(data_dir, split):
    """Load ``data_dir/{split}.npz`` (split: train | test) as an image set."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    s = dio.load_npz(Path(data_dir) / f"{split}.npz")
    missing = {"images", "labels", "classes"} - set(s)
    if missing:
        raise ValueError(f"{Path(data_dir) / (split + '.npz')} lacks {sorted(missing)}; rerun the prepare step")
    return s
