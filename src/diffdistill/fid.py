"""Fréchet distance between the feature statistics of generated and real images.

Two feature extractors, reported under their own names and never mixed:
- ``inception`` (``fid_inception``): pytorch-fid's InceptionV3, 2048-d pool3 features, with the FID
  weights (pt_inception-2015-12-05) loaded from a local file we fetched and verified; pytorch-fid is
  never allowed to download anything. Inputs go through pytorch-fid's own resize to 299 (bilinear) and
  [0,1] -> [-1,1] scaling, so numbers are comparable with ``python -m pytorch_fid``.
- ``convnet`` (``fid_convnet``): the penultimate features of the reference classifier, the challenge
  ConvNet trained on the real training data (``classifier.py``; for tiny images such as ``digits``,
  where Inception features mean little). ``ConvNetFeatures`` is that classifier as saved and loaded.
"""
import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import io as dio

log = logging.getLogger(__name__)

KINDS = ("inception", "convnet")


def metric_name(kind):
    """The name a FID is reported under: ``fid_inception`` or ``fid_convnet``."""
    if kind not in KINDS:
        raise ValueError(f"fid.features must be one of {KINDS}, got {kind!r}")
    return f"fid_{kind}"


def _to_unit(images_uint8):
    """uint8 [N,H,W,C] (numpy or tensor) -> float32 [N,C,H,W] in [0,1], as torchvision's ToTensor."""
    x = torch.as_tensor(np.asarray(images_uint8)) if not torch.is_tensor(images_uint8) else images_uint8
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 images [N,H,W,C], got {tuple(x.shape)} {x.dtype}")
    return x.permute(0, 3, 1, 2).float().div(255.0)


# --------------------------------------------------------------------------------------------------
# extractors: nn.Modules mapping uint8 [N,H,W,C] -> float [N,D]


@contextmanager
def _local_fid_weights(weights_path):
    """Make pytorch-fid's ``fid_inception_v3`` read its state dict from our file instead of the web."""
    import pytorch_fid.inception as pi

    def load_local(url, *args, **kwargs):
        return torch.load(weights_path, map_location="cpu", weights_only=True)

    original = pi.load_state_dict_from_url
    pi.load_state_dict_from_url = load_local
    try:
        yield
    finally:
        pi.load_state_dict_from_url = original


class InceptionFeatures(nn.Module):
    """pytorch-fid's InceptionV3 (FID variant): 2048-d pool3 features (``dims`` picks another of
    pytorch-fid's blocks, 64/192/768, spatially averaged as pytorch-fid does; FID uses 2048)."""

    kind = "inception"

    def __init__(self, weights_path, dims=2048):
        super().__init__()
        from pytorch_fid.inception import InceptionV3

        if weights_path is None or not Path(weights_path).is_file():
            raise ValueError(
                f"Inception FID needs the FID Inception weights file (pt_inception-2015-12-05-6726825d.pth); "
                f"{weights_path} does not exist. Fetch it first (snakemake weights/pt_inception-2015-12-05-"
                f"6726825d.pth, or download it from pytorch_fid.inception.FID_WEIGHTS_URL and place it there).")
        self.weights_path = str(weights_path)
        with _local_fid_weights(weights_path):
            # resize_input/normalize_input: pytorch-fid's bilinear resize to 299 and 2x-1 scaling.
            self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]], resize_input=True,
                                   normalize_input=True)
        self.net.eval()

    def forward(self, images_uint8):
        x = _to_unit(images_uint8)
        if x.shape[1] == 1:  # grayscale -> RGB, as PIL's convert("RGB") does for pytorch-fid
            x = x.repeat(1, 3, 1, 1)
        f = self.net(x)[0]
        if f.shape[2:] != (1, 1):
            f = nn.functional.adaptive_avg_pool2d(f, 1)
        return f.flatten(1)


class ConvNetFeatures(nn.Module):
    """A trained ConvNet's penultimate features, inputs normalised as the classifier saw them."""

    kind = "convnet"

    def __init__(self, convnet, mean, std):
        super().__init__()
        self.convnet = convnet.eval()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images_uint8):
        x = (_to_unit(images_uint8).to(self.mean.device) - self.mean) / self.std
        return self.convnet.features(x).flatten(1)

    @classmethod
    def load(cls, path):
        from .convnet import ConvNet

        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = ConvNet(**blob["args"])
        net.load_state_dict(blob["state_dict"])
        return cls(net, blob["mean"], blob["std"])

    @torch.no_grad()
    def probabilities(self, images_uint8, batch_size=512):
        """Softmax of the classifier over its classes, float [N, K]."""
        out = []
        for i in range(0, len(images_uint8), batch_size):
            x = (_to_unit(images_uint8[i:i + batch_size]).to(self.mean.device) - self.mean) / self.std
            out.append(torch.softmax(self.convnet(x).float(), dim=1).cpu())
        return torch.cat(out).numpy()

    def save(self, path, args):
        blob = {"args": dict(args), "state_dict": self.convnet.state_dict(),
                "mean": self.mean.flatten().cpu(), "std": self.std.flatten().cpu()}
        dio.save_torch(path, blob)


def make_extractor(kind, inception_weights=None, convnet_path=None, device="cpu"):
    """Build the feature extractor ``kind`` (``inception`` or ``convnet``) on ``device``."""
    metric_name(kind)
    if kind == "inception":
        ext = InceptionFeatures(inception_weights)
    else:
        if convnet_path is None or not Path(convnet_path).is_file():
            raise ValueError(f"ConvNet features need the reference classifier {convnet_path}, which does not "
                             f"exist; run the reference_classifier step first.")
        ext = ConvNetFeatures.load(convnet_path)
    return ext.to(device).eval()


# --------------------------------------------------------------------------------------------------
# statistics and distance


@torch.no_grad()
def features(images_uint8, extractor, batch_size=50, device=None, progress=False):
    """Features of all images, float64 [N, D] (pytorch-fid keeps them in float64 too)."""
    from .progress import progress as progress_bar

    if device is not None:
        extractor = extractor.to(device)
    extractor.eval()
    dev = next(extractor.parameters()).device
    n = len(images_uint8)
    out = None
    for start in progress_bar(range(0, n, batch_size), disable=not progress, desc="fid features", unit="batch"):
        batch = torch.as_tensor(np.asarray(images_uint8[start:start + batch_size])).to(dev)
        f = extractor(batch).double().cpu().numpy()
        if out is None:
            out = np.empty((n, f.shape[1]), dtype=np.float64)
        out[start:start + len(f)] = f
    return out


def stats_of(feats):
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def compute_stats(images_uint8, extractor, batch_size=50, device=None, progress=False):
    """(mu, sigma) of the extractor's features over ``images_uint8`` (uint8 [N,H,W,C])."""
    return stats_of(features(images_uint8, extractor, batch_size, device, progress))


def _psd_sqrt(sigma):
    """Symmetric square root of a covariance matrix (tiny negative eigenvalues are rounding: clipped)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d² = |mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^½).

    Tr (S1 S2)^½ is the sum of the square roots of the eigenvalues of S1 S2, which equal those of the
    symmetric PSD matrix S1^½ S2 S1^½; taking them from ``eigh`` of that matrix stays real and stable
    even when the covariances are rank-deficient (fewer images than feature dimensions)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature statistics differ in size: {mu1.shape} vs {mu2.shape}; were they made with "
                         f"the same feature extractor?")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(feats, mu2, sigma2):
    """FID of a feature matrix [n, D] against (mu2, sigma2).

    With fewer images than dimensions (n - 1 < D), S1 = AᵀA / (n-1) for the centred features A, and
    the non-zero eigenvalues of S1 S2 are those of the small n×n PSD matrix A S2 Aᵀ / (n-1): the same
    distance as ``frechet_distance`` at a fraction of the cost (the usual case for FID during
    training, with a few hundred samples against 2048-d features)."""
    feats = np.asarray(feats, np.float64)
    mu1, sigma1 = stats_of(feats)
    n, d = feats.shape
    if n - 1 >= d:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if mu2.shape != (d,) or s2.shape != (d, d):
        raise ValueError(f"features have {d} dimensions but the statistics {mu2.shape}; were they made with "
                         f"the same feature extractor?")
    a = feats - mu1
    m = a @ s2 @ a.T / (n - 1)
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


# --------------------------------------------------------------------------------------------------
# cached statistics of the real training set


def _stats_subset(train_set, fid_cfg):
    """All training images, or a fixed random subset of ``stats_samples`` of them."""
    n = fid_cfg.get("stats_samples")
    images = train_set["images"]
    if n is not None and n < len(images):
        idx = np.sort(np.random.default_rng(fid_cfg.get("seed", 0)).permutation(len(images))[:n])
        images = images[idx]
    return images


def write_stats(fid_cfg, train_set, out_path, inception_weights=None, classifier_path=None, device="cpu",
                progress=True):
    """Compute and save the real training set's feature statistics to ``out_path`` (npz).

    npz keys: ``mu``, ``sigma``, ``features`` (kind), ``metric`` (fid_inception | fid_convnet), ``n``,
    ``extractor_path`` (the Inception weights or the reference classifier) and ``extractor_sha256``, so
    that a swapped extractor is caught when the statistics are used.
    """
    kind = fid_cfg.get("features", "inception")
    metric = metric_name(kind)
    device = torch.device(device)
    batch_size = int(fid_cfg.get("batch_size", 50))
    if kind == "inception":
        extractor_path = inception_weights
        extractor = make_extractor("inception", inception_weights=inception_weights, device=device)
    else:
        extractor_path = classifier_path
        extractor = make_extractor("convnet", convnet_path=classifier_path, device=device)
    images = _stats_subset(train_set, fid_cfg)
    mu, sigma = compute_stats(images, extractor, batch_size, device, progress)
    dio.save_npz(out_path, mu=mu, sigma=sigma, features=np.array(kind), metric=np.array(metric),
                 n=np.array(len(images)), extractor_sha256=np.array(dio.file_digest(extractor_path)),
                 extractor_path=np.array(str(extractor_path)))
    log.info("%s statistics of %d training images -> %s", metric, len(images), out_path)
    return mu, sigma


def load_stats(stats_path):
    stats_path = Path(stats_path)
    if not stats_path.is_file():
        raise FileNotFoundError(f"FID statistics {stats_path} do not exist; run the fid_stats step first")
    with np.load(stats_path, allow_pickle=False) as z:
        return {k: z[k] if z[k].ndim else z[k].item() for k in z.files}


class FID:
    """FID against cached statistics, the extractor built once; call it with uint8 images.

    ``fid = FID("data/cifar100/fid_stats.npz", device)``; ``fid.name`` is ``fid_inception`` or
    ``fid_convnet``; ``fid(images)`` -> float. ``fid.eval_fn(sample_images, n)`` gives the trainer's
    ``eval_fn(ema_model, step)``, where ``sample_images(model, n) -> uint8 [n,H,W,C]``.
    """

    def __init__(self, stats_path, device="cpu", batch_size=50, inception_weights=None):
        self.stats_path = Path(stats_path)
        self.stats = load_stats(stats_path)
        self.kind = str(self.stats["features"])
        self.name = metric_name(self.kind)
        self.batch_size = batch_size
        self.device = torch.device(device)
        if self.kind == "inception":
            weights_path = inception_weights or self.stats["extractor_path"]
            self.extractor = make_extractor("inception", inception_weights=weights_path, device=self.device)
        else:
            weights_path = self.stats["extractor_path"]
            self.extractor = make_extractor("convnet", convnet_path=weights_path, device=self.device)
        actual = dio.file_digest(weights_path)
        if actual != self.stats["extractor_sha256"]:
            raise ValueError(f"{stats_path} was computed with a different {self.kind} extractor (sha256 "
                             f"{self.stats['extractor_sha256'][:12]}… vs {actual[:12]}…); rerun the fid_stats step")

    def __call__(self, images_uint8):
        feats = features(images_uint8, self.extractor, self.batch_size, self.device)
        return fid_from_features(feats, self.stats["mu"], self.stats["sigma"])

    def eval_fn(self, sample_images, num_samples):
        def evaluate(ema_model, step):
            return self(sample_images(ema_model, num_samples))

        return evaluate


def fid_against_stats(images_uint8, stats_path, device="cpu", batch_size=50, inception_weights=None):
    """FID of ``images_uint8`` (uint8 [N,H,W,C]) against the statistics in ``stats_path``."""
    return FID(stats_path, device, batch_size, inception_weights)(images_uint8)
