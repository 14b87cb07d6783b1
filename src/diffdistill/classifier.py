"""The reference classifier: the challenge ConvNet trained on the REAL training split, saved with the
normalisation it was trained with (as ``fid.ConvNetFeatures``, which loads it).

Its penultimate features give ``fid_convnet`` (for tiny images such as digits, where Inception
features mean little), the feature space of k-center selection and of the memorisation audit; its
softmax gives the scores of ``confidence`` selection, and its logits the soft labels of DD-Ranking's
soft-label evaluation (``load_teacher``).
"""
import logging

from . import evaluate
from .fid import ConvNetFeatures
from .io import file_digest

log = logging.getLogger(__name__)


def train_reference_classifier(train_set, eval_cfg, out_path, epochs=None, seed=0, device="cpu", progress=True):
    """Train the reference classifier on ``train_set`` with ``eval_cfg`` (the dataset's ``classifier:``
    block; ``epochs`` overrides its epochs) and save it to ``out_path``. Returns the training history."""
    cfg = dict(eval_cfg)
    if epochs is not None:
        cfg["epochs"] = int(epochs)
    mean, std = evaluate.normalization(cfg, train_set["images"])
    model, history = evaluate.train_classifier(train_set, cfg, int(seed), device, progress, mean=mean, std=std)
    n, h, w, c = train_set["images"].shape
    args = dict(in_channels=c, num_classes=len(train_set["classes"]), image_size=h,
                depth=int(cfg.get("depth", 3)), width=int(cfg.get("width", 128)))
    ConvNetFeatures(model.cpu(), mean, std).save(out_path, args)
    log.info("reference classifier (%d epochs, final train accuracy %.3f) -> %s", cfg["epochs"],
             history["train_acc"][-1] if history.get("train_acc") else float("nan"), out_path)
    return history


def load_teacher(path, eval_mean, eval_std, device="cpu"):
    """The reference classifier at ``path`` as a soft-label teacher (``evaluate.Teacher``) for a student
    whose inputs are normalised with ``eval_mean``/``eval_std``; the file's digest is its identity."""
    ref = ConvNetFeatures.load(path)
    return evaluate.Teacher(ref.convnet, ref.mean.flatten().tolist(), ref.std.flatten().tolist(), eval_mean,
                            eval_std, device, identity=file_digest(path))
