"""Train-on-S / test-on-real: the ECCV 2024 dataset-distillation challenge's evaluation protocol.

A ConvNet (``convnet.ConvNet``, depth 3, width 128) is trained from scratch only on a training set S
(the synthetic set, a subset of it, the full real training split, or a random real subset of the
same size) and tested on the whole real test split at the last epoch. The loop is the challenge's
``evaluate_synset`` (DC/DSA ``utils.py``), step for step:

- SGD, lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, cross-entropy;
- ``for ep in range(Epoch + 1)``: ``Epoch + 1`` epochs (1,001 for the challenge's Epoch = 1000).
  ``Epoch`` is ``evaluate.epochs`` in params.yaml (``eval_cfg["variant"] == "short100"``: Epoch =
  100, the 100-epoch variant some Track 2 teams used, i.e. 101 epochs);
- after epoch index ``Epoch // 2 + 1`` has been trained, the lr is multiplied by 0.1 by creating a
  NEW SGD optimizer: the momentum buffers restart from zero (a scheduler would keep them);
- DSA ``color_crop_cutout_flip_scale_rotate`` on every batch (``augment.dsa``), after normalisation;
- inputs normalised per channel with the dataset's mean/std (``normalization``).

Determinism: the weights are initialised under ``torch.manual_seed(seed)`` (in a forked RNG, the
caller's global state is untouched), and shuffling and augmentation draw from their own
``torch.Generator``s seeded from ``seed``: same seed, same machine, CPU -> same accuracy.

Checkpoint and resume: with a ``state_path``, ``train_classifier`` saves every
``evaluate.checkpoint_every`` epochs everything the continuation depends on (model, optimizer with
its momentum, epoch, optimizer phase before/after the drop, both generators' states, history) and a
rerun continues from it, bit-identical on CPU to an uninterrupted run. The state carries a hash of
what defines the run (``run_hash``); a state from another run is ignored (logged), never resumed.
"""
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import DEFAULT_STRATEGY, dsa
from .convnet import ConvNet
from .io import save_torch
from .progress import progress as progress_bar

log = logging.getLogger(__name__)

SET_NAMES = ("synthetic", "full_real", "random_real")
VARIANTS = {None: None, "full": None, "short100": 100}


# --- inputs ------------------------------------------------------------------------------------

def normalization(eval_cfg, train_images):
    """Per-channel (mean, std) in [0, 1] pixel units, as two float lists.

    ``eval_cfg["mean"]``/``["std"]`` when given (CIFAR-100 / Tiny-ImageNet use the challenge's fixed
    values); when null, computed from ``train_images`` (uint8 [N,H,W,C]) — pass the REAL training
    split here, so the synthetic set and both baselines are normalised identically.
    """
    mean, std = eval_cfg.get("mean"), eval_cfg.get("std")
    if (mean is None) != (std is None):
        raise ValueError("evaluate: give both evaluate.mean and evaluate.std in params.yaml, or "
                         "set both to null to compute them from the real training images.")
    if mean is not None:
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"evaluate: mean {mean} / std {std} must have one value per channel "
                             f"and std > 0; fix evaluate.mean/std in params.yaml.")
        return mean, std
    images = np.asarray(train_images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"evaluate: cannot compute mean/std from images of shape {images.shape}; "
                         f"expected a non-empty uint8 [N,H,W,C] array.")
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = x.std(axis=0)
    std = np.where(std > 0, std, 1.0)          # a constant channel would divide by zero
    return x.mean(axis=0).tolist(), std.tolist()


def _class_name(image_set, k):
    classes = image_set.get("classes")
    if classes is not None and 0 <= k < len(classes):
        return f"{k} ({classes[k]})"
    return str(k)


def check_compatible(train_set, test_set, num_classes):
    """Raise ValueError, before any training, when ``train_set`` cannot be evaluated on ``test_set``.

    Checks: both non-empty uint8-like [N,H,W,C] with as many labels as images; same image size and
    channel count; every label in [0, num_classes); every class present in the training set.
    """
    for which, s in (("training", train_set), ("test", test_set)):
        images, labels = np.asarray(s["images"]), np.asarray(s["labels"])
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"evaluate: the {which} set is empty or not [N,H,W,C] (images shape "
                             f"{images.shape}); produce at least one image per class first.")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"evaluate: the {which} set has {images.shape[0]} images but labels of "
                             f"shape {labels.shape}; there must be one label per image.")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(f"evaluate: {which} labels out of range [0, {num_classes}): e.g. "
                             f"{sorted(set(bad.tolist()))[:5]}; the label set must match num_classes "
                             f"({num_classes}) of the dataset.")
    tr, te = np.asarray(train_set["images"]).shape, np.asarray(test_set["images"]).shape
    if tr[1:3] != te[1:3]:
        raise ValueError(f"evaluate: training images are {tr[1]}×{tr[2]} but test images are "
                         f"{te[1]}×{te[2]}; generate/resize the training set at the test resolution.")
    if tr[3] != te[3]:
        raise ValueError(f"evaluate: training images have {tr[3]} channel(s) but test images have "
                         f"{te[3]}; generate the training set with the test set's channel count.")
    counts = np.bincount(np.asarray(train_set["labels"]), minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        names = ", ".join(_class_name(train_set, int(k)) for k in empty[:10])
        raise ValueError(f"evaluate: the training set has no image of class {names}"
                         f"{' …' if empty.size > 10 else ''} ({empty.size} empty of {num_classes}); "
                         f"every class needs at least one image — sample/select more per class.")


def _num_classes(train_set, test_set=None):
    classes = train_set.get("classes")
    if classes is not None and len(classes):
        return len(classes)
    labels = [np.asarray(train_set["labels"])] + ([np.asarray(test_set["labels"])] if test_set else [])
    return int(max(int(l.max()) for l in labels if l.size)) + 1


def _epochs(eval_cfg):
    """The challenge's ``Epoch`` (``evaluate.epochs``, or 100 for the short100 variant); the run
    trains ``Epoch + 1`` epochs (``schedule``)."""
    variant = eval_cfg.get("variant")
    if variant not in VARIANTS:
        raise ValueError(f"evaluate: unknown variant {variant!r}; use one of "
                         f"{[v for v in VARIANTS if v]} or leave it unset.")
    epochs = VARIANTS[variant] or eval_cfg.get("epochs", 1000)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"evaluate: epochs must be a positive integer, got {epochs!r}.")
    return epochs


class _Normalize:
    """uint8 NHWC on the device -> normalised float NCHW, one batch at a time (keeps memory small)."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images_u8):
        x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std


# --- training ----------------------------------------------------------------------------------

def build_model(eval_cfg, in_channels, num_classes, image_size):
    return ConvNet(in_channels, num_classes, image_size,
                   depth=eval_cfg.get("depth", 3), width=eval_cfg.get("width", 128))


def schedule(eval_cfg):
    """``(epochs_run, drop_after)``: the challenge's ``Epoch + 1`` and ``Epoch // 2 + 1``.

    Epochs ``0 … drop_after`` run at lr, epochs ``drop_after + 1 … Epoch`` at lr·0.1 with a fresh
    optimizer. For Epoch = 1 the drop falls after the last epoch and never takes effect, as in the
    challenge's code.
    """
    epoch = _epochs(eval_cfg)
    return epoch + 1, epoch // 2 + 1


def _settings(eval_cfg):
    """The resolved training settings (defaults filled in): what, with seed/data/normalisation,
    defines a run. ``checkpoint_every`` and ``seeds`` are not in it: they do not change the result."""
    return {"depth": int(eval_cfg.get("depth", 3)), "width": int(eval_cfg.get("width", 128)),
            "epoch": _epochs(eval_cfg), "batch_size": int(eval_cfg.get("batch_size", 256)),
            "lr": float(eval_cfg.get("lr", 0.01)), "momentum": float(eval_cfg.get("momentum", 0.9)),
            "weight_decay": float(eval_cfg.get("weight_decay", 5e-4)),
            "dsa": bool(eval_cfg.get("dsa", True)), "dsa_strategy": eval_cfg.get("dsa_strategy", DEFAULT_STRATEGY),
            **({"labels": "soft", "temperature": _temperature(eval_cfg)} if _soft(eval_cfg) else {}),
            # The fast path draws other random numbers on CUDA: a run of its own (absent when off).
            **({"fast": True} if _fast(eval_cfg) else {})}


def _fast(eval_cfg):
    """``evaluate.fast`` (issue 16, off by default): on CUDA, channels-last, DSA's per-image parameters
    drawn on the GPU from a CUDA generator (the op group from a CPU one), fused SGD, and the epoch's
    loss and accuracy summed on the device with one host sync per epoch. On the CPU the same random
    numbers in the same order as the default path; only the sums are kept as (float64) tensors."""
    fast = eval_cfg.get("fast", False)
    if not isinstance(fast, bool):
        raise ValueError(f"evaluate: evaluate.fast must be true or false, got {fast!r}.")
    return fast


LABELS = ("hard", "soft")

# How a set is trained. challenge: the challenge's protocol (hard labels, DSA as evaluate.dsa says).
# DD-Ranking's two more (README "DD-Ranking"): plain, hard labels without any augmentation (for the
# augmentation-robust score); soft, the reference classifier's soft labels (the soft-label score).
PROTOCOLS = ("challenge", "plain", "soft")


def protocol_settings(eval_cfg, protocol, ddranking_cfg=None):
    """``eval_cfg`` as ``protocol`` trains: the challenge's settings unchanged (so its runs keep their
    identity), without augmentation, or with soft labels at ``ddranking.temperature``."""
    if protocol == "challenge":
        return dict(eval_cfg)
    if protocol == "plain":
        return dict(eval_cfg, dsa=False)
    if protocol == "soft":
        return dict(eval_cfg, labels="soft", temperature=(ddranking_cfg or {}).get("temperature", 4.0))
    raise ValueError(f"evaluate: unknown protocol {protocol!r}; use one of {list(PROTOCOLS)}.")


def _soft(eval_cfg):
    labels = eval_cfg.get("labels", "hard") or "hard"
    if labels not in LABELS:
        raise ValueError(f"evaluate: labels must be one of {list(LABELS)}, got {labels!r}; fix evaluate.labels "
                         f"in params.yaml (hard: the challenge's protocol; soft: DD-Ranking's soft-label one).")
    return labels == "soft"


def _temperature(eval_cfg):
    t = eval_cfg.get("temperature", 4.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        raise ValueError(f"evaluate: temperature must be a number > 0, got {t!r}; fix evaluate.temperature.")
    return float(t)


def soft_label_loss(student_logits, teacher_logits, temperature):
    """DD-Ranking's soft-label objective: KL(teacher ‖ student) of the temperature-softened
    distributions, averaged over the batch and scaled by T² so its gradient keeps the size of the
    hard-label loss's (Hinton et al.'s distillation)."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits / t, dim=1)
    teacher = F.softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * (t * t)


class Teacher:
    """The reference classifier as a soft-label teacher on the student's batches.

    The student's inputs are normalised with the evaluation's mean/std, the teacher was trained with
    its own: the batch is mapped from one normalisation to the other (an affine map per channel)
    before the teacher sees it, so it labels exactly the (augmented) images the student trains on.
    """

    def __init__(self, convnet, teacher_mean, teacher_std, eval_mean, eval_std, device, identity=""):
        as_t = lambda v: torch.as_tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # noqa: E731
        self.net = convnet.to(device).eval()
        self.scale = as_t(eval_std) / as_t(teacher_std)
        self.shift = (as_t(eval_mean) - as_t(teacher_mean)) / as_t(teacher_std)
        self.identity = identity            # the classifier file's digest: part of the run's identity

    @torch.no_grad()
    def __call__(self, x):
        return self.net(x * self.scale + self.shift)


def _checkpoint_every(eval_cfg):
    every = eval_cfg.get("checkpoint_every")
    if every is None:
        return 0
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"evaluate: checkpoint_every must be a whole number of epochs >= 0 (0 or null: "
                         f"never), got {every!r}; fix evaluate.checkpoint_every in params.yaml.")
    return every


_CODE_MODULES = ("evaluate.py", "augment.py", "convnet.py")


def _code_fingerprint():
    # A state written by other training code would continue a different computation: the source of
    # the modules that make up the loop is part of the run's identity.
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _CODE_MODULES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def run_hash(eval_cfg, seed, images, labels, mean, std, num_classes, teacher=""):
    """Identity of an evaluation run, for resuming: resolved settings (``_settings``), seed, number
    of classes, normalisation, the training images and labels, the training code, and for soft
    labels the teacher (its file's digest)."""
    images = np.ascontiguousarray(images)
    h = hashlib.sha256()
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(images.data)
    h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).data)
    blob = json.dumps({"settings": _settings(eval_cfg), "seed": int(seed), "num_classes": int(num_classes),
                       "mean": [float(m) for m in mean], "std": [float(s) for s in std],
                       "data": h.hexdigest(), "code": _code_fingerprint(),
                       **({"teacher": teacher} if teacher else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_state(path, state):
    # A kill mid-write never leaves a truncated state (io.save_torch: in memory, then renamed).
    save_torch(path, state)


def _load_state(path, want_hash, epochs_run, drop_after):
    """``(state, None)`` when ``path`` holds a state of this run; ``(None, why)`` otherwise
    (``why`` is None when there is no file)."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable state is started over, never trusted
        return None, f"it could not be read ({type(exc).__name__}: {exc})"
    if not isinstance(state, dict) or state.get("run_hash") != want_hash:
        got = state.get("run_hash") if isinstance(state, dict) else None
        return None, (f"it belongs to another run (other evaluate settings, seed, training data, "
                      f"normalisation or code: hash {got} != {want_hash})")
    if not 0 <= int(state.get("epoch", -1)) <= epochs_run:
        return None, f"its epoch {state.get('epoch')} is outside 0..{epochs_run}"
    if state.get("phase") != int(state["epoch"] > drop_after):
        # The optimizer phase follows from the epoch; a mismatch means the file is not what it says.
        return None, f"its optimizer phase {state.get('phase')} does not fit epoch {state['epoch']}"
    return state, None


def train_classifier(train_set, eval_cfg, seed, device="cpu", progress=True, num_classes=None,
                     mean=None, std=None, state_path=None, stop_after=None, teacher=None):
    """Train the evaluation ConvNet on ``train_set`` with the challenge's recipe (module docstring).

    ``state_path``: resume from this file when it holds a state of the same run (``run_hash``), and
    save to it every ``eval_cfg["checkpoint_every"]`` epochs and after the last one (0/None: only
    resume). The caller deletes it once the result is safely written (``cmd_evaluate`` does).
    ``stop_after=n``: return after this call has trained n epochs, with the state saved, as if the
    job had been killed there (for tests).
    ``teacher`` (a ``Teacher``, with ``evaluate.labels: soft``): the loss is ``soft_label_loss``
    against the teacher's logits on the same augmented batch instead of cross-entropy on the labels.

    Returns ``(model, history)``; history has per-epoch ``loss`` (mean over images), ``train_acc``
    (on the augmented batches), ``lr`` (the lr used during that epoch), plus ``epochs`` (epochs
    trained in all: Epoch + 1), ``challenge_epoch`` (Epoch), ``lr_drop_after_epoch``,
    ``resumed_from_epoch`` (0 for a fresh run), ``stopped_early``, ``seconds`` (training wall time,
    summed over resumed parts), ``images_per_second`` (training images processed per second).
    """
    device = torch.device(device)
    num_classes = num_classes or _num_classes(train_set)
    images = np.asarray(train_set["images"])
    labels = np.asarray(train_set["labels"]).astype(np.int64)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"evaluate: the training set is empty or not [N,H,W,C] ({images.shape}).")
    if mean is None or std is None:
        mean, std = normalization(eval_cfg, images)
    if len(mean) != images.shape[3]:
        raise ValueError(f"evaluate: mean/std have {len(mean)} values but the images have "
                         f"{images.shape[3]} channels; fix evaluate.mean/std in params.yaml.")
    s = _settings(eval_cfg)
    if (teacher is not None) != _soft(eval_cfg):
        raise ValueError("evaluate: evaluate.labels is soft but no teacher was given (or a teacher without "
                         "labels: soft); soft labels come from the reference classifier (--teacher).")
    epochs_run, drop_after = schedule(eval_cfg)
    every = _checkpoint_every(eval_cfg)
    fast = _fast(eval_cfg)
    fast_cuda = fast and device.type == "cuda"

    # Weights from the seed without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(eval_cfg, images.shape[3], num_classes, images.shape[1])
    model = model.to(device, memory_format=torch.channels_last) if fast_cuda else model.to(device)
    sgd_extra = {"fused": True} if fast_cuda else {}

    def new_optimizer(lr):
        # A fresh SGD each phase, as the challenge's loop: no momentum carried across the drop.
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=s["momentum"], weight_decay=s["weight_decay"],
                               **sgd_extra)

    lr0 = s["lr"]
    phase = 0                                                  # 0 before the drop, 1 after
    optimizer = new_optimizer(lr0)
    # Separate streams: the same seed gives the same order and the same augmentations.
    shuffle_gen = torch.Generator().manual_seed(2 * seed)
    aug_gen = torch.Generator().manual_seed(2 * seed + 1)
    pick_gen = None                                            # default: the op group from aug_gen too
    if fast_cuda:                                              # per-image draws on the GPU, no host sync
        aug_gen = torch.Generator(device=device).manual_seed(2 * seed + 1)
        pick_gen = torch.Generator().manual_seed(2 * seed + 1)
    history = {"loss": [], "train_acc": [], "lr": []}
    start, seconds_before = 0, 0.0

    want_hash = (run_hash(eval_cfg, seed, images, labels, mean, std, num_classes,
                          teacher=teacher.identity if teacher is not None else "") if state_path else None)
    if state_path:
        state, why = _load_state(state_path, want_hash, epochs_run, drop_after)
        if why:
            log.info("evaluate: not resuming from %s: %s; training from epoch 0", state_path, why)
        if state is not None:
            model.load_state_dict(state["model"])
            phase = int(state["phase"])
            optimizer = new_optimizer(lr0 * 0.1 if phase else lr0)
            optimizer.load_state_dict(state["optimizer"])     # lr and momentum buffers as saved
            shuffle_gen.set_state(state["shuffle_rng"])
            aug_gen.set_state(state["aug_rng"])
            if pick_gen is not None:
                pick_gen.set_state(state["pick_rng"])
            history = {k: list(state["history"][k]) for k in ("loss", "train_acc", "lr")}
            start, seconds_before = int(state["epoch"]), float(state["seconds"])
            log.info("evaluate: resuming from %s at epoch %d of %d", state_path, start, epochs_run)

    x_all = torch.as_tensor(images).to(device)               # uint8 on the device
    y_all = torch.as_tensor(labels).to(device)
    norm = _Normalize(mean, std, device)
    n = x_all.shape[0]
    t0 = time.perf_counter()

    def save(done):
        _save_state(state_path, {
            "run_hash": want_hash, "epoch": done, "phase": phase, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "shuffle_rng": shuffle_gen.get_state(),
            "aug_rng": aug_gen.get_state(), "history": history,
            **({"pick_rng": pick_gen.get_state()} if pick_gen is not None else {}),
            "seconds": seconds_before + time.perf_counter() - t0})

    model.train()
    stopped = False
    bar = progress_bar(total=epochs_run, initial=start, desc="evaluate", unit="epoch", disable=not progress,
                       leave=False)
    for ep in range(start, epochs_run):
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(n, generator=shuffle_gen).to(device)
        loss_sum, correct = 0.0, 0
        if fast:                                               # summed on the device: one sync per epoch
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
        for i in range(0, n, s["batch_size"]):
            idx = order[i:i + s["batch_size"]]
            x, y = norm(x_all[idx]), y_all[idx]
            if fast_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            if s["dsa"]:
                x = dsa(x, aug_gen, strategy=s["dsa_strategy"], pick_generator=pick_gen)
            logits = model(x)
            if teacher is None:
                loss = F.cross_entropy(logits, y)
            else:
                loss = soft_label_loss(logits, teacher(x), s["temperature"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if fast:
                loss_sum += loss.detach().double() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
            else:
                loss_sum += loss.item() * y.shape[0]
                correct += int((logits.argmax(1) == y).sum())
        if fast:
            loss_sum, correct = float(loss_sum), int(correct)
        history["loss"].append(loss_sum / n)
        history["train_acc"].append(correct / n)
        history["lr"].append(lr)
        if ep == drop_after:                                  # the challenge: `if ep in lr_schedule`
            phase = 1
            optimizer = new_optimizer(lr * 0.1)               # `lr *= 0.1`, then a new SGD
        done = ep + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}", lr=f"{lr:.0e}")
        stopped = stop_after is not None and done - start >= stop_after and done < epochs_run
        if state_path and (stopped or (every and (done % every == 0 or done == epochs_run))):
            save(done)
        if stopped:
            break
    bar.close()
    seconds = seconds_before + time.perf_counter() - t0
    trained = len(history["loss"])
    history.update(epochs=epochs_run, challenge_epoch=s["epoch"], lr_drop_after_epoch=drop_after,
                   resumed_from_epoch=start, stopped_early=stopped, seconds=seconds,
                   images_per_second=n * trained / seconds if seconds > 0 else float("inf"))
    return model, history


@torch.no_grad()
def predict(model, images, mean, std, device="cpu", batch_size=1024):
    """Predicted labels (numpy int64) for uint8 [N,H,W,C] images."""
    device = torch.device(device)
    norm = _Normalize(mean, std, device)
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = norm(torch.as_tensor(np.asarray(images[i:i + batch_size])).to(device))
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out).numpy().astype(np.int64)


def evaluate_run(train_set, test_set, eval_cfg, seed, device="cpu", progress=True, name=None,
                 mean=None, std=None, state_path=None, teacher=None):
    """One evaluation run: train on ``train_set`` (seed), test on the whole ``test_set``.

    ``mean``/``std``: the normalisation; when None, ``normalization(eval_cfg, train_set["images"])``
    — for synthetic and random-real runs pass the real training split's values instead.
    ``state_path``: checkpoint/resume file of the training (``train_classifier``); it is left in
    place, the caller deletes it after writing the result. ``teacher``: soft labels (``Teacher``).
    Returns a JSON-ready dict: name, seed, accuracy, per_class_accuracy (None for a class absent
    from the test set), n_train, per_class_train_counts, epochs (trained: Epoch + 1),
    challenge_epoch (Epoch), lr_drop_after_epoch, resumed_from_epoch, loss_curve, train_acc_curve,
    lr_curve, seconds (training), images_per_second (training), test_seconds.
    """
    num_classes = _num_classes(train_set, test_set)
    check_compatible(train_set, test_set, num_classes)
    _epochs(eval_cfg)                                          # bad variant/epochs: fail before training
    _checkpoint_every(eval_cfg)
    if mean is None or std is None:
        mean, std = normalization(eval_cfg, train_set["images"])
    model, history = train_classifier(train_set, eval_cfg, seed, device=device, progress=progress,
                                      num_classes=num_classes, mean=mean, std=std, state_path=state_path,
                                      teacher=teacher)
    t0 = time.perf_counter()
    test_labels = np.asarray(test_set["labels"]).astype(np.int64)
    pred = predict(model, test_set["images"], mean, std, device=device)
    correct = pred == test_labels
    per_class = []
    for k in range(num_classes):
        mask = test_labels == k
        per_class.append(float(correct[mask].mean()) if mask.any() else None)
    result = {
        "seed": int(seed),
        "accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "n_train": int(len(train_set["labels"])),
        "per_class_train_counts": np.bincount(np.asarray(train_set["labels"]),
                                              minlength=num_classes).astype(int).tolist(),
        "epochs": history["epochs"],
        "challenge_epoch": history["challenge_epoch"],
        "lr_drop_after_epoch": history["lr_drop_after_epoch"],
        "resumed_from_epoch": history["resumed_from_epoch"],
        "loss_curve": [float(v) for v in history["loss"]],
        "train_acc_curve": [float(v) for v in history["train_acc"]],
        "lr_curve": [float(v) for v in history["lr"]],
        "seconds": float(history["seconds"]),
        "images_per_second": float(history["images_per_second"]),
        "test_seconds": time.perf_counter() - t0,
        "device": str(device),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }
    if name is not None:
        result = {"name": name, **result}
    return result


# --- baselines and summary ---------------------------------------------------------------------

def random_real_subset(train_set, like_labels, seed, cap=False):
    """A random subset of the real ``train_set`` with exactly the per-class counts of ``like_labels``.

    Images are drawn without replacement within each class (numpy Generator seeded by ``seed``)
    and returned grouped by class; ``classes`` is carried over. A class with fewer real images than
    asked is an error, or with ``cap=True`` contributes all it has: ten minutes of sampling give
    CIFAR-100 ~1,460 images per class against 500 real ones, and the baseline is then the real split.
    """
    labels = np.asarray(train_set["labels"])
    like = np.asarray(like_labels)
    if like.size == 0:
        raise ValueError("random_real_subset: like_labels is empty; there is nothing to match.")
    num_classes = max(int(like.max()) + 1, int(labels.max()) + 1 if labels.size else 0)
    want = np.bincount(like, minlength=num_classes)
    have = np.bincount(labels, minlength=num_classes)
    short = np.flatnonzero(want > have)
    if short.size and cap:
        log.warning("random_real: %d classes ask for more images than the real split has (e.g. class %s: %d "
                    "of %d); those take all their real images", short.size, _class_name(train_set, int(short[0])),
                    want[short[0]], have[short[0]])
        want = np.minimum(want, have)
    elif short.size:
        k = int(short[0])
        raise ValueError(f"random_real_subset: class {_class_name(train_set, k)} needs {want[k]} real "
                         f"images but the training split has {have[k]}; use fewer images per class.")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == k), size=int(want[k]), replace=False)
              for k in range(num_classes) if want[k]]
    idx = np.concatenate(picked)
    out = {"images": np.asarray(train_set["images"])[idx], "labels": labels[idx].astype(np.int64)}
    if train_set.get("classes") is not None:
        out["classes"] = np.asarray(train_set["classes"])
    return out


def _per_class_mean(lists):
    """Element-wise mean over runs, skipping None (a class absent from the test set)."""
    out = []
    for values in zip(*lists):
        vals = [v for v in values if v is not None]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def summarize(runs):
    """Summary of evaluation runs (each with ``name`` in synthetic/full_real/random_real).

    Returns ``{set: {"mean", "std", "n_seeds", "per_class_train_counts", "runs": [{seed, accuracy,
    n_train, epochs, seconds}]}, ..., "n_synthetic", "gain_over_random", "gap_to_full", "per_class":
    {set: [...]}}``. Sets without runs are absent, and so are the metrics that need them.
    ``per_class_train_counts`` is what the ConvNet trained on per class (the selected set for
    ``synthetic``), so tables show that and not the sampled count; absent when the runs lack it.

    - std is the population standard deviation over seeds (``np.std``, ddof=0), as DC-benchmark
      reports mean ± std.
    - gain_over_random = mean(synthetic) − mean(random_real): what the distilled set adds over a
      random real subset of the same size and class counts (DD-Ranking's comparison with random).
    - gap_to_full = mean(full_real) − mean(synthetic): how far the distilled set is from training
      on the whole real training split (DD-Ranking's comparison with the full dataset).
    """
    groups = {}
    for run in runs:
        name = run.get("name")
        if name not in SET_NAMES:
            raise ValueError(f"summarize: run has name {name!r}; expected one of {list(SET_NAMES)}.")
        groups.setdefault(name, []).append(run)
    summary, per_class = {}, {}
    for name in SET_NAMES:
        if name not in groups:
            continue
        rs = sorted(groups[name], key=lambda r: r.get("seed", 0))
        acc = np.array([r["accuracy"] for r in rs], dtype=np.float64)
        counts = [r.get("per_class_train_counts") for r in rs]
        summary[name] = {
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=0)),
            "n_seeds": len(rs),
            # every seed trains on the same per-class counts; the first run's, when all runs have them
            **({"per_class_train_counts": [int(c) for c in counts[0]]} if all(counts) else {}),
            "runs": [{k: r[k] for k in ("seed", "accuracy", "n_train", "epochs", "seconds") if k in r}
                     for r in rs],
        }
        if all("per_class_accuracy" in r for r in rs):
            per_class[name] = _per_class_mean([r["per_class_accuracy"] for r in rs])
    if "synthetic" in summary:
        sizes = {r["n_train"] for r in groups["synthetic"]}
        if len(sizes) != 1:
            raise ValueError(f"summarize: synthetic runs were trained on different set sizes {sorted(sizes)}; "
                             f"summarize one synthetic set at a time.")
        summary["n_synthetic"] = sizes.pop()
        if "random_real" in summary:
            summary["gain_over_random"] = summary["synthetic"]["mean"] - summary["random_real"]["mean"]
        if "full_real" in summary:
            summary["gap_to_full"] = summary["full_real"]["mean"] - summary["synthetic"]["mean"]
    summary["per_class"] = per_class
    return summary
