"""Finetune loop for the class-conditional U-ViT: AdamW, linear warm-up, EMA, mixed precision,
gradient accumulation, DDP under ``torchrun``, atomic checkpoints with resume, and an FID curve.

Determinism by construction. Everything random in optimizer step ``k`` (which images, their flips and
label drops, the diffusion times t and the noises) is drawn for the whole GLOBAL batch from
generators seeded by ``(seed, k)``; each DDP rank then takes its slice and each micro-batch a
sub-slice of it. So the update of step k does not depend on how many processes or micro-batches
computed it, nor on whether the run was killed and resumed before it:

* 2N steps in one go == N steps, kill, N more steps (bit-exact on CPU);
* micro-batches 4×256 == one batch of 1024 (up to float summation order);
* ``torchrun --nproc_per_node 2`` == one process with the same global batch (same tolerance).

Conventions:

* Warm-up: update number ``k`` (1-based) uses ``lr · min(1, k / warmup_steps)``. U-ViT's LambdaLR
  gives ``lr · min(1, (k-1) / warmup_steps)``, i.e. its first update runs at lr 0; we shift by one
  step so that no update is wasted. ``warmup_steps: 0`` means constant lr.
* Weight decay: U-ViT's training script hands every parameter to AdamW with the same weight decay
  (its ``no_weight_decay()`` is never used), so we do the same. ``train.no_decay_pos_embed: true``
  (default false) exempts the names in ``model.no_weight_decay()`` instead, the timm convention.
* EMA: a float32 copy of the model, initialised to the starting weights and updated after every
  optimizer step with ``ema = d·ema + (1-d)·param`` (as U-ViT: no decay warm-up).
* Label dropout (classifier-free guidance): when ``train.label_dropout > 0`` the model gets ONE EXTRA
  class: ``label_emb`` has ``num_classes + 1`` rows and the null class is index ``num_classes``
  (``model_cfg["num_classes"]`` stays the number of real classes). ``build_model(model_cfg,
  train_cfg)`` and ``null_class_index(model_cfg, train_cfg)`` apply this rule, so code that loads
  ``ema.pt`` builds the same shape; the sampler gets ``null_class=null_class_index(...)``.
* Initial weights: ``build_model`` under ``torch.manual_seed(train.seed)``; then, if given,
  ``init_state_dict`` (a state dict or the path of a checkpoint file; one of exactly that model's
  shapes is loaded strictly, anything else goes through ``checkpoint.init_from_pretrained``, e.g. a released U-ViT checkpoint).
"""
import contextlib
import copy
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from diffdistill import diffusion
from diffdistill import sample as sampler
from diffdistill.checkpoint import build_model, load_initial_weights, null_class_index
from diffdistill.config import PRECISIONS, TRAIN_PRECISIONS, resolve_device
from diffdistill.data import to_model_space
from diffdistill.fid import FID, features, fid_from_features
from diffdistill.io import atomic_path, save_json, save_torch
from diffdistill.progress import progress as progress_bar
from diffdistill.uvit import count_parameters

log = logging.getLogger(__name__)

# Optional train_cfg keys and their defaults (required: steps, batch_size, lr).
TRAIN_DEFAULTS = {
    "micro_batch": None,          # None = the per-process batch in one piece
    "weight_decay": 0.03,
    "betas": [0.99, 0.999],
    "warmup_steps": 0,
    "ema_decay": 0.9999,
    "precision": "fp32",
    "label_dropout": 0.0,
    "hflip": False,
    "no_decay_pos_embed": False,
    "checkpoint_every": 1000,
    "fid_every": 0,
    "fid_samples": 5000,
    "seed": 0,
}
# How the FID curve is measured (defaults as make_training_fid reads them). They change what the
# curve's points measure, never the weights.
FID_DEFAULTS = {"fid_samples": 5000, "fid_steps": 25, "fid_batch_size": 500}
# Keys that change when or how a run executes but not what it computes: a checkpoint made under
# other values of these is still resumed. (micro_batch and gpus only change float summation order;
# the FID settings only what the curve measures, so a multi-day run whose fid_samples or fid_steps is
# changed resumes instead of starting over. See _train for what happens to the points it has.)
NOT_HASHED = ("steps", "checkpoint_every", "fid_every", "micro_batch", "gpus") + tuple(FID_DEFAULTS)
# What NOT_HASHED was before the FID settings joined it: states written then are resumed too.
_LEGACY_NOT_HASHED = ("steps", "checkpoint_every", "fid_every", "micro_batch", "gpus")

# The process group's timeout: how long a rank waits in a collective for the others before the run is
# aborted. torch's defaults are 10 min for NCCL and 30 min for gloo (torch 2.14); we pass one value for
# both. What a rank can wait for: rank 0 alone writes state.pt (M/4: model, EMA and AdamW's two moments
# in fp32, ~2.1 GB; S/2 ~0.7 GB) and computes the Fréchet distance of each FID point (two eigh of
# 2048×2048, seconds); the FID sampling itself is shared by all ranks (make_training_fid), ~5-12 s
# per rank per point with 4 H100s at fid_samples 5000, fid_steps 50 (see its docstring). All far
# under 10 minutes; 30 minutes leaves room for a slow shared filesystem or a user's own eval_fn that
# runs on rank 0 only, and still stops a run with a hung rank within the hour.
DDP_TIMEOUT_MINUTES = 30


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

def settings(train_cfg):
    """train_cfg with the defaults filled in (what the run actually uses, and what is hashed)."""
    missing = [k for k in ("steps", "batch_size", "lr") if k not in train_cfg]
    if missing:
        raise ValueError(f"train config lacks {missing}; add them to the dataset's train: block in params.yaml")
    cfg = dict(TRAIN_DEFAULTS)
    cfg.update(train_cfg)
    if cfg["micro_batch"] is None:
        cfg["micro_batch"] = cfg["batch_size"]
    cfg["betas"] = [float(b) for b in cfg["betas"]]
    return cfg


def data_fingerprint(images, labels):
    h = hashlib.sha256()
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels.astype(np.int64)).data)
    return h.hexdigest()


def config_hash(model_cfg, train_cfg, data_sha="", not_hashed=NOT_HASHED):
    """Identity of a run for resuming: the model config, the train config without the keys that do
    not change the result (NOT_HASHED), and the training data."""
    cfg = {k: v for k, v in settings(train_cfg).items() if k not in not_hashed}
    blob = json.dumps({"model": model_cfg, "train": cfg, "data": data_sha}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fid_settings(train_cfg):
    """The settings an FID point is measured with: two points are comparable when these agree."""
    return {k: train_cfg.get(k, default) for k, default in FID_DEFAULTS.items()}


def lr_at(step, lr, warmup_steps):
    """Learning rate of update number ``step`` (1-based): linear warm-up, then constant."""
    if warmup_steps <= 0:
        return float(lr)
    return float(lr) * min(1.0, step / warmup_steps)


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema = decay·ema + (1 − decay)·model, parameter by parameter (buffers are copied)."""
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)
    for e, b in zip(ema_model.buffers(), model.buffers()):
        e.copy_(b)


# ----------------------------------------------------------------------------------------------
# Randomness of one optimizer step, as a pure function of (seed, step)
# ----------------------------------------------------------------------------------------------

def _seed(*keys):
    """A 63-bit seed mixed from non-negative integers (NumPy's SeedSequence hashes them well)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


_DATA, _STEP, _NOISE = 0, 1, 2  # stream tags, so the generators of one step never coincide


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed, epoch, n):
    g = torch.Generator().manual_seed(_seed(seed, _DATA, epoch))
    return torch.randperm(n, generator=g)


def batch_indices(step, batch_size, n, seed):
    """Dataset indices of the global batch of update ``step`` (0-based): the stream of samples is a
    new random permutation of the data every epoch, cut into consecutive batches (each image once per
    epoch, as a shuffling DataLoader), but computable for any step without replaying earlier ones."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // n
    out = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = _epoch_permutation(seed, e, n)[pos[sel] % n]
    return out


def draw_step(step, cfg, n, image_shape, device):
    """Everything random in update ``step`` (0-based), for the whole global batch."""
    B = cfg["batch_size"]
    g = torch.Generator().manual_seed(_seed(cfg["seed"], _STEP, step))
    flip = torch.rand(B, generator=g) < 0.5
    drop = torch.rand(B, generator=g) < cfg["label_dropout"]
    # t and noise are made on the training device (fast on GPU); CPU and CUDA draws differ, the
    # same device always gives the same numbers.
    gd = torch.Generator(device=device).manual_seed(_seed(cfg["seed"], _NOISE, step))
    t = torch.rand(B, generator=gd, device=device)
    noise = torch.randn((B,) + tuple(image_shape), generator=gd, device=device)
    return {"idx": batch_indices(step, B, n, cfg["seed"]), "flip": flip, "drop": drop, "t": t, "noise": noise}


# ----------------------------------------------------------------------------------------------
# Checks and small helpers
# ----------------------------------------------------------------------------------------------

def _validate(model_cfg, cfg, images, labels, classes, world_size, stop_after):
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"training data has images of shape {tuple(images.shape)}; expected a non-empty "
                         f"uint8 array [N,H,W,C] (run the data step first, or check the dataset)")
    if images.dtype != np.uint8:
        raise ValueError(f"training images are {images.dtype}; expected uint8 [N,H,W,C] in 0..255")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but there are {images.shape[0]} images; "
                         f"give one int label per image")
    n_img, H, W, C = images.shape
    size, chans = model_cfg["img_size"], model_cfg["in_chans"]
    if (H, W, C) != (size, size, chans):
        raise ValueError(f"images are {H}x{W} with {C} channels but the model expects {size}x{size} with "
                         f"{chans}; set model.img_size/in_chans to match data.image_size, or re-prepare the data")
    num_classes = int(model_cfg["num_classes"])
    if num_classes > 0:
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels range over {int(labels.min())}..{int(labels.max())} but model.num_classes="
                             f"{num_classes}; labels must lie in 0..{num_classes - 1} (raise model.num_classes)")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"the data names {len(classes)} classes but model.num_classes={num_classes}; "
                             f"set model.num_classes to {len(classes)}")
    elif cfg["label_dropout"] > 0:
        raise ValueError("label_dropout > 0 needs a class-conditional model (model.num_classes > 0)")
    B, mb = int(cfg["batch_size"]), int(cfg["micro_batch"])
    if B <= 0 or mb <= 0 or B % (mb * world_size):
        raise ValueError(f"train.batch_size={B} is not divisible by micro_batch × processes = {mb} × {world_size}; "
                         f"choose a batch_size that is a multiple of {mb * world_size} or change micro_batch")
    if int(cfg["steps"]) < 1:
        raise ValueError(f"train.steps={cfg['steps']}; it must be at least 1")
    if cfg["precision"] not in TRAIN_PRECISIONS:
        raise ValueError(f"train.precision={cfg['precision']!r}; choose one of {TRAIN_PRECISIONS}")
    if not 0.0 <= float(cfg["ema_decay"]) <= 1.0:
        raise ValueError(f"train.ema_decay={cfg['ema_decay']}; it must lie in [0, 1]")
    if not 0.0 <= float(cfg["label_dropout"]) < 1.0:
        raise ValueError(f"train.label_dropout={cfg['label_dropout']}; it must lie in [0, 1)")
    if int(cfg["checkpoint_every"]) < 1 or int(cfg["fid_every"]) < 0 or int(cfg["warmup_steps"]) < 0:
        raise ValueError("train.checkpoint_every must be >= 1, fid_every and warmup_steps >= 0")
    if stop_after is not None and int(stop_after) < 1:
        raise ValueError(f"stop_after={stop_after}; give a positive number of steps or None")


def _resolve_precision(requested, device):
    """(precision actually used, autocast dtype or None). Autocast only on CUDA; CPU runs fp32."""
    if requested == "fp32":
        return "fp32", None
    if device.type != "cuda":
        log.info("precision %s requested on %s: running fp32 (autocast is used on CUDA only)", requested, device)
        return "fp32", None
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16: running fp32 (set precision: fp16 to use fp16 autocast)")
        return "fp32", None
    return requested, PRECISIONS[requested]


def _all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _write_curve_csv(path, header, rows):
    """A curve (loss.csv, fid_curve.csv): the int step, then floats as Python's repr writes them (a
    non-finite FID as nan/inf); CRLF line ends, the csv module's, which the committed curves have."""

    table = pd.DataFrame([[int(r[0])] + [float(v) for v in r[1:]] for r in rows], columns=header)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\r\n", na_rep="nan")


def _try_load_state(path, device, want_hash, steps, legacy_hash=None):
    """The resume state in ``path`` if it belongs to this run, else None (and the reason is logged).
    ``legacy_hash``: the run's hash as it was computed before the FID settings left it; a state
    saved under it is this run too (its FID settings equal the current ones, which it hashed)."""
    if not path.exists():
        return None, "no checkpoint"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # an unreadable file: start over rather than crash (it is rewritten atomically)
        return None, f"{path} could not be read ({exc})"
    if state.get("config_hash") not in (want_hash, legacy_hash):
        return None, (f"{path} was made with another model/train config or data (hash "
                      f"{state.get('config_hash')} != {want_hash})")
    if state["step"] > steps:
        return None, f"{path} is at step {state['step']}, past train.steps={steps}"
    return state, None


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(model_cfg, train_cfg, data, out_dir, init_state_dict=None, eval_fn=None, device="auto",
          progress=True, stop_after=None):
    """Train (or finetune) a U-ViT on ``data`` and write checkpoints/{ds}/-style outputs to ``out_dir``.

    ``data``: image set {images uint8 [N,H,W,C], labels int64 [N], classes [K]}.
    ``eval_fn(ema_model, step) -> fid`` is called every ``fid_every`` steps (if > 0) and at the end:
    on rank 0 only, or on every rank when it has ``eval_fn.distributed = True`` (it then shares the
    work among the ranks itself, with collectives, and returns the same value on each).
    ``stop_after=n``: return after this call has made n optimizer steps, with a checkpoint written
    (as if killed there). Resumes from ``out_dir/state.pt`` when it belongs to the same run.
    Returns the train.json summary (plus ``stopped_early``)."""
    cfg = settings(train_cfg)
    out_dir = Path(out_dir)
    images = np.asarray(data["images"])
    labels = np.asarray(data["labels"]).astype(np.int64)
    classes = data.get("classes")

    # --- processes: under torchrun WORLD_SIZE > 1 and every process runs this same function
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _validate(model_cfg, cfg, images, labels, classes, world_size, stop_after)

    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    own_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=DDP_TIMEOUT_MINUTES))
        own_group = True
    try:
        return _train(model_cfg, cfg, images, labels, out_dir, init_state_dict, eval_fn, device, progress,
                      stop_after, world_size, rank)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(model_cfg, cfg, images, labels, out_dir, init_state_dict, eval_fn, device, progress, stop_after,
           world_size, rank):
    """Set up (or resume), then per update: one optimisation step, an FID point and a checkpoint when
    due; finish with ema.pt and train.json."""
    run = _Run(model_cfg, cfg, images, labels, out_dir, eval_fn, device, world_size, rank)
    run.set_up(init_state_dict)
    steps = run.steps
    bar = progress_bar(total=steps, initial=run.start, desc="train", unit="step", dynamic_ncols=True,
                       disable=not (progress and run.is_main))
    for step in range(run.start, steps):          # this iteration makes update number step + 1
        loss = run.optimisation_step(step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{run.images_per_second():.1f}")
        done = step + 1
        if run.fid_due(done):
            run.measure_fid(done)
        stopping = stop_after is not None and run.done_here >= stop_after and done < steps
        if done % cfg["checkpoint_every"] == 0 or done == steps or stopping:
            run.write_checkpoint(done)
        if stopping:
            bar.close()
            return run.summary(done, stopped_early=True)
    bar.close()
    return run.finish()


class _Run:
    """One call of ``train`` on one process: the model, its EMA and optimizer, and the record of what
    the run has done (loss history, FID points, best FID, seconds), which state.pt saves and restores.
    Its methods are the phases of the loop in ``_train``."""

    def __init__(self, model_cfg, cfg, images, labels, out_dir, eval_fn, device, world_size, rank):
        self.model_cfg, self.cfg, self.out_dir, self.eval_fn, self.device = model_cfg, cfg, out_dir, eval_fn, device
        self.images, self.labels = images, labels
        self.world_size, self.rank, self.is_main = world_size, rank, rank == 0
        self.steps, self.batch_size, self.micro_batch = int(cfg["steps"]), int(cfg["batch_size"]), int(cfg["micro_batch"])
        self.local_batch = self.batch_size // world_size
        self.n_micro = self.local_batch // self.micro_batch
        self.null_class = null_class_index(model_cfg, cfg)
        self.conditional = int(model_cfg["num_classes"]) > 0
        self.precision, self.amp_dtype = _resolve_precision(cfg["precision"], device)
        self.data_sha = data_fingerprint(images, labels)
        self.run_hash = config_hash(model_cfg, cfg, self.data_sha)
        self.state_path = out_dir / "state.pt"
        self.fid_now = fid_settings(cfg)
        # An eval_fn marked ``distributed`` (make_training_fid's) is called on every rank, which all
        # sample a share of the FID images, and returns the same value on each; any other runs on rank 0
        # alone while the others wait at the next collective (see DDP_TIMEOUT_MINUTES).
        self.distributed_eval = bool(getattr(eval_fn, "distributed", False))
        # The record of the run, as a fresh run starts it; _resume replaces it with the saved one.
        self.history, self.fid_rows = [], []      # (step, loss, lr), (step, fid)
        self.fid_earlier = []                     # curves measured under earlier FID settings: [{settings, points}]
        self.best = {"fid": None, "step": None}
        self.start, self.seconds_before, self.train_seconds_before, self.resumed_from = 0, 0.0, 0.0, None

    # ------------------------------------------------------------------ set-up

    def set_up(self, init_state_dict):
        """Model, EMA, optimizer and data on the device: from state.pt when it belongs to this run, else
        from the seed (and ``init_state_dict``); then the clock starts."""
        cfg = self.cfg
        # The initial weights depend on the seed only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            self.model = build_model(self.model_cfg, cfg)
            state, why_fresh = _try_load_state(self.state_path, "cpu", self.run_hash, self.steps,
                                               config_hash(self.model_cfg, cfg, self.data_sha, _LEGACY_NOT_HASHED))
            self.init_info = None
            if state is None and init_state_dict is not None:
                self.init_info = load_initial_weights(self.model, init_state_dict)
        self.model.to(self.device).train()
        self.ema = copy.deepcopy(self.model).float().eval().requires_grad_(False)
        self.optimizer = _adamw(self.model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        if state is not None:
            self._resume(state)
        elif self.is_main and why_fresh != "no checkpoint":
            log.warning("starting fresh: %s", why_fresh)
        del state

        self.net = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.images_dev = torch.as_tensor(self.images).to(self.device)  # uint8: 4× smaller than floats; converted per micro-batch
        self.labels_dev = torch.as_tensor(self.labels).to(self.device)
        self.image_shape = (self.images.shape[3], self.images.shape[1], self.images.shape[2])
        self.t_start, self.train_seconds, self.done_here = time.time(), 0.0, 0

    def _resume(self, state):
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start = self.resumed_from = int(state["step"])
        self.history, self.fid_rows = [tuple(r) for r in state["history"]], [tuple(r) for r in state["fid"]]
        self.best = dict(state["best"])
        self.seconds_before, self.train_seconds_before = float(state["seconds"]), float(state["train_seconds"])
        if self.is_main:
            log.info("resuming from %s at step %d", self.state_path, self.start)
        # Changed FID settings (fid_samples, fid_steps, fid_batch_size) resume the run: Snakemake and DVC
        # rerun train_diffusion when any train: value changes, and the rerun lands here instead of at
        # step 0. They change what a point measures (FID is biased by the sample count), so the points
        # measured so far are not comparable with the new ones: they leave fid_curve.csv and the
        # best-FID bookkeeping (kept in state.pt under fid_earlier, counted in train.json as
        # fid_points_superseded), and the curve continues at the next fid_every step under the new
        # settings; best_ema.pt is replaced at the first new point. A run that had finished (a rerun at
        # step == train.steps) re-measures its final point, so its curve is that one point.
        # A state from before fid_settings were saved hashed its FID settings: they equal fid_now.
        self.fid_earlier = list(state.get("fid_earlier", []))
        fid_before = dict(state.get("fid_settings", self.fid_now))
        if fid_before != self.fid_now and self.fid_rows:
            self.fid_earlier.append({"settings": fid_before, "points": [list(r) for r in self.fid_rows]})
            if self.is_main:
                log.warning("the FID settings changed (%s -> %s): the %d FID points measured so far leave "
                            "fid_curve.csv (kept in state.pt under fid_earlier); the curve restarts at the "
                            "next point", fid_before, self.fid_now, len(self.fid_rows))
            self.fid_rows, self.best = [], {"fid": None, "step": None}

    # ------------------------------------------------------------------ one optimisation step

    def optimisation_step(self, step):
        """Update number ``step + 1``: the gradient of the global batch drawn for it, AdamW, the EMA.
        Returns the batch's loss."""
        cfg = self.cfg
        t0 = time.time()
        lr = lr_at(step + 1, cfg["lr"], cfg["warmup_steps"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        draws = draw_step(step, cfg, len(self.images), self.image_shape, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._accumulate_gradients(draws)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss} at step {step + 1} (lr {lr:.3g}, precision {self.precision}); "
                f"the last good checkpoint {self.state_path} is kept. Lower train.lr (or raise warmup_steps), "
                f"or use precision: fp32.")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update(self.ema, self.model, cfg["ema_decay"])
        self.done_here += 1
        self.history.append((step + 1, loss, lr))
        self.train_seconds += time.time() - t0
        return loss

    def _accumulate_gradients(self, draws):
        """Backward through this process's slice of the global batch, one micro-batch at a time; returns
        the global batch's mean loss (the same on every process)."""
        mb, n_micro = self.micro_batch, self.n_micro
        autocast = ((lambda: torch.autocast(self.device.type, dtype=self.amp_dtype)) if self.amp_dtype
                    else contextlib.nullcontext)
        loss_sum = torch.zeros((), device=self.device)
        for m in range(n_micro):
            sl = slice(self.rank * self.local_batch + m * mb, self.rank * self.local_batch + (m + 1) * mb)
            x0, y = self._micro_batch(draws, sl)
            # Gradients are all-reduced (averaged over processes) only on the last micro-batch.
            sync = contextlib.nullcontext() if (self.world_size == 1 or m == n_micro - 1) else self.net.no_sync()
            with sync:
                with autocast():
                    loss = diffusion.training_loss(self.net, x0, y, t=draws["t"][sl], noise=draws["noise"][sl])
                # Each micro-batch loss is a mean over mb samples; dividing by n_micro makes the summed
                # gradient the mean over this process's slice, and DDP's average over processes makes
                # it the mean over the global batch.
                scaled = loss / n_micro
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float() / n_micro
        if self.world_size > 1:
            dist.all_reduce(loss_sum)            # every process sees the same loss and stops together
            loss_sum /= self.world_size
        return float(loss_sum)

    def _micro_batch(self, draws, sl):
        """Images in model space (flipped as drawn) and labels (dropped to the null class as drawn)."""
        device = self.device
        idx = draws["idx"][sl].to(device)
        x0 = to_model_space(self.images_dev[idx])
        if self.cfg["hflip"]:
            x0 = torch.where(draws["flip"][sl].to(device).view(-1, 1, 1, 1), x0.flip(-1), x0)
        y = None
        if self.conditional:
            y = self.labels_dev[idx]
            if self.null_class is not None:
                y = torch.where(draws["drop"][sl].to(device), torch.full_like(y, self.null_class), y)
        return x0, y

    def images_per_second(self):
        return self.done_here * self.batch_size / max(self.train_seconds, 1e-9)

    # ------------------------------------------------------------------ FID curve

    def fid_due(self, done):
        every = self.cfg["fid_every"]
        return self.eval_fn is not None and ((every > 0 and done % every == 0) or done == self.steps)

    def measure_fid(self, step):
        """One point of the FID curve, of the EMA weights; a new best also saves best_ema.pt."""
        if not (self.is_main or self.distributed_eval):
            return
        fid = float(self.eval_fn(self.ema, step))
        self.fid_rows.append((step, fid))
        if math.isfinite(fid) and (self.best["fid"] is None or fid < self.best["fid"]):
            self.best.update(fid=fid, step=step)
            if self.is_main:
                save_torch(self.out_dir / "best_ema.pt", self.ema.state_dict())
        if self.is_main:
            log.info("step %d: FID %.4g", step, fid)

    # ------------------------------------------------------------------ checkpoints

    def write_checkpoint(self, step):
        """state.pt (everything a resume needs) and the curves; never over a good one with non-finite weights."""
        if not (_all_finite(self.model) and _all_finite(self.ema)):
            raise TrainingDiverged(f"the weights became NaN/inf by step {step}; the last checkpoint "
                                   f"({self.state_path}) is kept. Lower train.lr or use precision: fp32.")
        if not self.is_main:
            return
        save_torch(self.state_path, {
            "step": step, "config_hash": self.run_hash, "model": self.model.state_dict(),
            "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "history": [list(r) for r in self.history], "fid": [list(r) for r in self.fid_rows], "best": self.best,
            "fid_settings": self.fid_now, "fid_earlier": self.fid_earlier,
            "seconds": self.seconds(), "train_seconds": self.train_seconds_before + self.train_seconds,
            "model_cfg": self.model_cfg, "train_cfg": self.cfg,
        })
        self._write_curves()

    def _write_curves(self):
        _write_curve_csv(self.out_dir / "loss.csv", ["step", "loss", "lr"], self.history)
        if self.eval_fn is not None:
            _write_curve_csv(self.out_dir / "fid_curve.csv", ["step", "fid"], self.fid_rows)

    def seconds(self):
        """Wall-clock seconds of the run, over every call that resumed it."""
        return self.seconds_before + time.time() - self.t_start

    # ------------------------------------------------------------------ finish

    def finish(self):
        """ema.pt and train.json once every step is done; returns the summary."""
        steps = self.steps
        if self.start == steps and self.eval_fn is not None and not any(s == steps for s, _ in self.fid_rows):
            self.measure_fid(steps)   # resumed a finished state whose final FID was never recorded
            self.write_checkpoint(steps)
        summary = self.summary(steps, stopped_early=False)
        if self.is_main:
            if self.start == steps:   # nothing trained in this call: make sure the state's files are all there
                self._write_curves()
            save_torch(self.out_dir / "ema.pt", self.ema.state_dict())
            save_json(self.out_dir / "train.json", summary)
        if self.world_size > 1:
            dist.barrier()    # every process returns once the outputs exist
        return summary

    def summary(self, step, stopped_early):
        """train.json: what was trained, how fast, to what loss and best FID."""
        B, history = self.batch_size, self.history
        seconds, train_seconds = self.seconds(), self.train_seconds_before + self.train_seconds
        last = [r[1] for r in history[-100:]]
        return {
            "steps": step,
            "seconds": round(seconds, 3),
            "images_per_second": round(step * B / train_seconds, 3) if train_seconds > 0 else None,
            "final_loss": history[-1][1] if history else None,
            "final_loss_mean100": float(np.mean(last)) if last else None,
            "device": str(self.device),
            "precision": self.precision,
            "world_size": self.world_size,
            "resumed_from": self.resumed_from,
            "batch_size": B,
            "micro_batch": self.micro_batch,
            "null_class": self.null_class,
            "parameters": count_parameters(self.model),
            "best_fid": self.best["fid"],
            "best_fid_step": self.best["step"],
            "init": None if self.init_info is None else {k: len(v) for k, v in self.init_info.items()},
            "config_hash": self.run_hash,
            "stopped_early": stopped_early,
            # FID points measured under earlier FID settings and left out of fid_curve.csv
            "fid_points_superseded": sum(len(e["points"]) for e in self.fid_earlier),
        }


def _adamw(model, cfg):
    """AdamW over every parameter with train.weight_decay; with no_decay_pos_embed, the model's
    no_weight_decay() names get none."""
    no_decay = set(model.no_weight_decay()) if cfg["no_decay_pos_embed"] else set()
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": cfg["weight_decay"]},
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg["lr"], betas=tuple(cfg["betas"]))


# ----------------------------------------------------------------------------------------------
# The FID curve: the trainer's eval_fn
# ----------------------------------------------------------------------------------------------

def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_training_fid(block, stats_path, device="cpu", inception_weights=None):
    """The trainer's ``eval_fn(ema_model, step) -> float`` for a dataset block of params.yaml.

    Scores the first ``train.fid_samples`` images of a class-balanced DPM-Solver-fast run at
    ``train.fid_steps`` network calls in batches of ``train.fid_batch_size`` (no time budget, the
    training seed) against ``stats_path``. The same seed at every evaluation: the curve's points
    differ by the weights only. Only ``train:`` settings are read, so changing the sampling step's
    settings never retrains.

    Under DDP (a process group is up) every rank scores a share: rank ``r`` of ``N`` samples the
    run's images ``r·n/N … (r+1)·n/N − 1`` (``sample.sample_range``: the same labels and noise as the
    one-process run), takes their features on its own GPU, and rank 0 gathers the features in rank
    order and computes the distance, which every rank returns. So a point costs ~1/N of the sampling
    time and gives the one-process value (up to float rounding). Per rank with 4 GPUs at the paper's
    ``fid_samples: 5000``, ``fid_steps: 50`` (benchmarks/RESULTS.md, one H100, bf16, 50 calls):
    U-ViT-S/2 (CIFAR-100) 1,250 images at 181-240 images/s = 5.2-6.9 s (27.6 s on one GPU);
    U-ViT-M/4 (Tiny-ImageNet) at ~105 images/s = 11.9 s (47.6 s on one GPU); plus the Inception
    features of 1,250 images and, on rank 0, the Fréchet distance of 2048-d statistics (seconds).
    Well inside the process group's timeout (DDP_TIMEOUT_MINUTES; NCCL's default is 10 min).
    At fid_every 500: 160 points over 80,000 steps cost ~14-18 min instead of ~55-74 min, and 234
    points over 117,000 steps ~46 min instead of ~3.1 h."""
    fid = FID(stats_path, device, int(block.get("fid", {}).get("batch_size", 50)), inception_weights)
    train_cfg = block["train"]
    settings = fid_settings(train_cfg)
    n = int(settings["fid_samples"])
    num_classes = int(block["model"]["num_classes"])
    cfg = {"budget_seconds": None, "max_per_class": -(-n // num_classes),
           "batch_size": int(settings["fid_batch_size"]), "steps": int(settings["fid_steps"]),
           "variant": "fast", "guidance_scale": 0.0, "seed": int(train_cfg.get("seed", 0)),
           "precision": train_cfg.get("precision", "fp32")}

    def evaluate(ema_model, step):
        rank, world = _rank_and_world()
        lo, hi = n * rank // world, n * (rank + 1) // world
        images, _ = sampler.sample_range(ema_model, cfg, num_classes, fid.device, lo, hi)
        feats = features(images, fid.extractor, fid.batch_size, fid.device) if len(images) else None
        if world == 1:
            return fid_from_features(feats, fid.stats["mu"], fid.stats["sigma"])
        # Features, not images, travel (uint8 images would be smaller, but then rank 0 would run the
        # extractor on all n alone). float64 as features() gives them: 5000 × 2048 × 8 B = 82 MB in all.
        parts = [None] * world if rank == 0 else None
        dist.gather_object(feats, parts, dst=0)
        value = [None]
        if rank == 0:
            value[0] = fid_from_features(np.concatenate([f for f in parts if f is not None]),
                                         fid.stats["mu"], fid.stats["sigma"])
        dist.broadcast_object_list(value, src=0)
        return float(value[0])

    evaluate.name = fid.name  # fid_inception | fid_convnet, for the curve's column name
    evaluate.distributed = True  # train() calls it on every rank
    return evaluate
