"""What leaves the project as files other than npz: the challenge's submission and PNG folders.

Challenge export (ECCV 2024 Dataset Distillation Challenge). The challenge's public evaluator does
``data = torch.load(submit_dir / "cifar100.pt")`` (and ``tinyimagenet.pt``), asserts
``data.shape == [10 * num_classes, 3, H, W]`` and labels image ``n`` with class ``n // 10``
(``np.ones(10) * i`` for class ``i``); the images are normalised with the dataset's mean/std
(CIFAR-100 [0.5071,0.4866,0.4409]/[0.2673,0.2564,0.2762], Tiny-ImageNet ImageNet's).
``export_challenge`` writes exactly that: a bare float32 tensor [K·ipc,C,H,W], class-major in label
order (generation order within a class), in a file named ``{ds}.pt``; the int64 labels [K·ipc] go
to a second file beside it (``{ds}_labels.pt``), for other evaluators and for checking.
``load_challenge`` reads such a pair back.

PNGs: ``export_pngs`` writes ``{label}_{index}.png`` per image, ``load_pngs`` reads the folder back.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import imageset
from .io import atomic_dir, atomic_path, torch_bytes

# The challenge's evaluator asserts this many images per class for its datasets.
CHALLENGE_IPC = {"cifar100": 10, "tinyimagenet": 10}


def _mean_std(mean, std, channels):
    """The per-channel normalisation as [1,C,1,1] tensors, checked against the images' channels."""
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"export: mean/std need {channels} values (one per channel), got {mean.numel()}/{std.numel()}; "
                         f"use the dataset's (evaluate.mean/std in params.yaml)")
    if (std <= 0).any():
        raise ValueError("export: std must be positive")
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def labels_path_for(images_path):
    """The labels file beside an exported images file: ``…/{ds}.pt`` -> ``…/{ds}_labels.pt``."""
    images_path = Path(images_path)
    return images_path.with_name(f"{images_path.stem}_labels.pt")


def _export_ipc(image_set, images_per_class):
    """The images per class to export; a clear error when a class has fewer (or none)."""
    labels, classes = np.asarray(image_set["labels"]), image_set["classes"]
    counts = np.bincount(labels, minlength=len(classes))
    if images_per_class is None:
        images_per_class = int(counts.min()) if len(counts) else 0
    elif not (isinstance(images_per_class, (int, np.integer)) and not isinstance(images_per_class, bool)
              and images_per_class > 0):
        raise ValueError(f"export: images per class must be a positive integer, got {images_per_class!r}; "
                         f"fix export.images_per_class in params.yaml (null = the smallest class count)")
    short = [k for k in range(len(classes)) if counts[k] < max(images_per_class, 1)]
    if short:
        k = short[0]
        others = f" (and {len(short) - 1} other classes)" if len(short) > 1 else ""
        raise ValueError(f"export: class {k} ({classes[k]}) has {counts[k]} images{others}, fewer than the "
                         f"{max(images_per_class, 1)} per class to export; sample more (sample.budget_seconds/"
                         f"max_per_class, select.images_per_class) or lower export.images_per_class "
                         f"(or --images-per-class)")
    return int(images_per_class)


def export_challenge(image_set, mean, std, images_per_class, out_path, labels_path=None):
    """Write the challenge's submission (see the module docstring): the normalised images tensor to
    ``out_path`` (name it ``{ds}.pt``) and the int64 labels to ``labels_path`` (default beside it,
    ``labels_path_for``). ``images_per_class`` None: the smallest class count.

    Both files are serialised in memory first and renamed into place only when both are complete,
    so a failure leaves neither. Returns ``(images_path, labels_path)``.
    """
    imageset.check(image_set)
    ipc = _export_ipc(image_set, images_per_class)
    grouped = imageset.class_major(image_set, ipc)
    x = torch.from_numpy(grouped["images"]).permute(0, 3, 1, 2).float().div(255.0)
    m, s = _mean_std(mean, std, x.shape[1])
    blobs = [torch_bytes(t) for t in (((x - m) / s).contiguous(),
                                      torch.from_numpy(grouped["labels"]).to(torch.int64).clone())]
    out_path = Path(out_path)
    labels_path = Path(labels_path) if labels_path else labels_path_for(out_path)
    with atomic_path(out_path) as tmp_images, atomic_path(labels_path) as tmp_labels:
        tmp_images.write_bytes(blobs[0])
        tmp_labels.write_bytes(blobs[1])
    return out_path, labels_path


def load_challenge(path, mean, std, classes=None, labels_path=None):
    """Load an ``export_challenge`` file (and its labels file) back to an image set with uint8 images."""
    path = Path(path)
    x = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(x, torch.Tensor) and x.dim() == 4):
        raise ValueError(f"{path} is not a bare [N,C,H,W] images tensor (got {type(x).__name__}); it was "
                         f"written by an older export (a dict) — rerun the export_challenge step")
    labels_path = Path(labels_path) if labels_path else labels_path_for(path)
    if not labels_path.exists():
        raise FileNotFoundError(f"{labels_path} (the labels of {path}) does not exist; rerun the export_challenge step")
    labels = torch.load(labels_path, map_location="cpu", weights_only=True).numpy().astype(np.int64)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"{labels_path} holds {labels.shape} labels for {x.shape[0]} images in {path}; "
                         f"rerun the export_challenge step")
    m, s = _mean_std(mean, std, x.shape[1])
    images = ((x.float() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if classes is None:
        classes = [str(k) for k in range(int(labels.max()) + 1 if len(labels) else 0)]
    return {"images": images, "labels": labels, "classes": np.array(classes, dtype=str)}


def export_pngs(image_set, out_dir):
    """Write ``{label}_{index}.png`` (index within the class, generation order) into ``out_dir``, atomically."""
    imageset.check(image_set)
    images, labels = image_set["images"], np.asarray(image_set["labels"])
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"export_pngs: need 1 or 3 channels, got {images.shape[-1]}")
    seen = {}
    with atomic_dir(out_dir) as tmp:
        for img, c in zip(images, labels):
            c = int(c)
            idx = seen.get(c, 0)
            seen[c] = idx + 1
            # A 2-D uint8 array becomes an 8-bit grayscale PNG, H×W×3 an RGB one.
            pil = Image.fromarray(np.ascontiguousarray(img[..., 0] if img.shape[-1] == 1 else img))
            pil.save(Path(tmp) / f"{c}_{idx}.png")
    return Path(out_dir)


def load_pngs(png_dir, classes=None):
    """Read an ``export_pngs`` folder back to an image set (class, then index order)."""
    files = []
    for p in Path(png_dir).glob("*.png"):
        label, index = p.stem.split("_")
        files.append((int(label), int(index), p))
    files.sort()
    images = []
    for _, _, p in files:
        a = np.asarray(Image.open(p))
        images.append(a[..., None] if a.ndim == 2 else a)
    labels = np.array([f[0] for f in files], dtype=np.int64)
    if classes is None:
        classes = [str(k) for k in range(int(labels.max()) + 1 if len(labels) else 0)]
    return {"images": np.stack(images).astype(np.uint8), "labels": labels, "classes": np.array(classes, dtype=str)}
