"""Timed, class-balanced sampling from a class-conditional U-ViT.

The paper's distilled set is "as many images as the model can sample in 10 minutes". ``sample``
draws batches with DPM-Solver until a wall-clock budget (or a per-class cap) is reached and records
how long it took in a manifest; ``write`` stores the image set and the manifest atomically.

Determinism: the noise of batch ``b`` comes from a generator seeded by ``(seed, b)`` and the labels of
image ``i`` (counted over the whole run) are ``i mod K``, so image ``i`` depends only on the seed, its
position and the batch size. The wall clock decides only *how many* batches run; with a cap and no
budget the output is exactly reproducible, and a smaller cap gives a prefix of a larger one.

Sampling one run on several devices is parallel.py's job (``sample`` draws one shard of it); the
checkpoint the sampler loads is checked in checkpoint.py; the challenge export is export.py.
"""
import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import diffusion, imageset
from .config import PRECISIONS
from .data import from_model_space
from .io import atomic_path, file_digest
from .progress import progress as progress_bar

log = logging.getLogger(__name__)

# The opt-in fast path of ``sample`` (issue 16; all off by default, so a default run is unchanged):
# ``sample.cast_weights``: bf16/fp16 weights (a converted copy) instead of autocast;
# ``sample.compile``: torch.compile the network call in this mode ("reduce-overhead" and the
# "max-autotune" modes capture CUDA graphs); every batch then runs at the full batch shape;
# ``sample.attention``: the SDPA backend (None: PyTorch's choice).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("flash", "efficient", "cudnn", "math")

# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
def class_names(sample_cfg, num_classes):
    """The class names of the images: ``sample_cfg["classes"]``, else "0" … "K−1"."""
    names = sample_cfg.get("classes")
    if names is None:
        names = [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"sample: 'classes' lists {len(names)} names but num_classes is {num_classes}; "
                         f"pass one name per class or leave 'classes' out")
    return np.array([str(n) for n in names])


def validate_sample_cfg(sample_cfg, num_classes):
    """Check the sample block before anything runs; returns the normalised settings."""
    budget = sample_cfg.get("budget_seconds")
    cap = sample_cfg.get("max_per_class")
    if budget is None and cap is None:
        raise ValueError("sample: neither sample.budget_seconds nor sample.max_per_class is set, so "
                         "sampling would never stop; set a budget in seconds, a cap per class, or both")
    if budget is not None and not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"sample: sample.budget_seconds must be a positive number of seconds, got {budget!r}; "
                         f"set e.g. 600 (the challenge's 10 minutes) or null to sample up to the cap")
    if cap is not None and not (isinstance(cap, int) and not isinstance(cap, bool) and cap > 0):
        raise ValueError(f"sample: sample.max_per_class must be a positive integer, got {cap!r}; "
                         f"set it to the images per class you want, or null for as many as the budget allows")
    batch_size = sample_cfg.get("batch_size", 500)
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size > 0)):
        raise ValueError(f"sample: sample.batch_size must be a positive integer or 'auto', got {batch_size!r}")
    steps = sample_cfg.get("steps", 50)
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"sample: sample.steps must be a positive integer (network calls), got {steps!r}")
    variant = sample_cfg.get("variant", "fast")
    if variant not in diffusion.VARIANTS:
        raise ValueError(f"sample: sample.variant must be one of {diffusion.VARIANTS}, got {variant!r}")
    seed = sample_cfg.get("seed", 0)
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"sample: sample.seed must be a non-negative integer, got {seed!r}")
    guidance = float(sample_cfg.get("guidance_scale", 0.0) or 0.0)
    precision = sample_cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"sample: sample.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if not (isinstance(num_classes, int) and num_classes > 0):
        raise ValueError(f"sample: num_classes must be a positive integer, got {num_classes!r}")
    cast_weights = sample_cfg.get("cast_weights", False)
    if not isinstance(cast_weights, bool):
        raise ValueError(f"sample: sample.cast_weights must be true or false, got {cast_weights!r}")
    compile_mode = sample_cfg.get("compile", False)
    compile_mode = "default" if compile_mode is True else compile_mode
    if compile_mode not in (False, None) + COMPILE_MODES:
        raise ValueError(f"sample: sample.compile must be false, true or one of {COMPILE_MODES}, got {compile_mode!r}")
    attention = sample_cfg.get("attention")
    if attention not in (None,) + ATTENTION_BACKENDS:
        raise ValueError(f"sample: sample.attention must be null or one of {ATTENTION_BACKENDS}, got {attention!r}")
    return dict(budget=None if budget is None else float(budget), cap=cap, batch_size=batch_size,
                steps=steps, variant=variant, seed=seed, guidance=guidance, precision=precision,
                cast_weights=cast_weights, compile=compile_mode or False, attention=attention)


def autocast_dtype(precision, device):
    """The autocast dtype of ``precision`` on ``device``; None (plain fp32) off CUDA."""
    return PRECISIONS[precision] if device.type == "cuda" else None


def _null_class(sample_cfg, guidance, num_classes):
    """The null label classifier-free guidance contrasts with, or None without guidance.

    The model learnt it with label_dropout > 0, by convention the index right after the real classes."""
    return int(sample_cfg.get("null_class", num_classes)) if guidance > 0 else None


def _check_label_embeddings(model, num_classes, null_class, guidance):
    """The model must have a label embedding for every class (and for the null class, with guidance)."""
    model_classes = getattr(model, "num_classes", None)
    if not isinstance(model_classes, int):
        return
    if model_classes < num_classes:
        raise ValueError(f"sample: the model has {model_classes} label embeddings but num_classes is "
                         f"{num_classes}; use the checkpoint trained for this dataset (model.num_classes)")
    if null_class is not None and model_classes <= null_class:
        raise ValueError(f"sample: guidance_scale {guidance} needs a null class (index {null_class}) "
                         f"but the model has only {model_classes} label embeddings; train with "
                         f"train.label_dropout > 0 or set sample.guidance_scale: 0")


def _check_shard(shard):
    worker, num_workers = (int(v) for v in shard)
    if not (num_workers >= 1 and 0 <= worker < num_workers):
        raise ValueError(f"sample: shard must be (worker, workers) with 0 <= worker < workers, got {shard!r}")
    return worker, num_workers


def _image_shape(model, image_shape):
    """(C, H, W) of the images: as given, else the model's ``in_chans``/``img_size``."""
    if image_shape is None:
        if not (hasattr(model, "in_chans") and hasattr(model, "img_size")):
            raise ValueError("sample: the model has no in_chans/img_size; pass image_shape=(C, H, W)")
        image_shape = (model.in_chans, model.img_size, model.img_size)
    return tuple(int(s) for s in image_shape)


# ----------------------------------------------------------------------------------------------
# one batch
# ----------------------------------------------------------------------------------------------
def batch_generator(seed, batch_index):
    """A CPU generator seeded by (seed, batch_index): batch b's noise never depends on timing or device."""
    state = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def _batch_inputs(seed, batch_index, batch_size, image_shape, num_classes, lo, hi):
    """Noise and labels of the run's images ``lo`` … ``hi − 1``, all in batch ``batch_index``.

    Labels go round-robin over the run's image index, so per-class counts of a run never differ by
    more than one, whenever it stops. The batch's full noise is drawn even for part of it, so image
    i's noise depends only on (seed, i // batch_size, i % batch_size), never on a cap or a range."""
    first = batch_index * batch_size
    y = torch.arange(lo, hi, dtype=torch.int64) % num_classes
    x_T = torch.randn((batch_size,) + image_shape, generator=batch_generator(seed, batch_index))[lo - first:hi - first]
    return x_T, y


def _denoise(model, x_T, y, cfg, device, amp_dtype, null_class):
    """DPM-Solver from the noise ``x_T`` to uint8 images [n,H,W,C] on the CPU."""
    amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    with torch.no_grad(), amp, _attention_backend(cfg.get("attention"), device):
        x0 = diffusion.dpm_solver_sample(model, x_T.to(device), y=y.to(device), steps=cfg["steps"],
                                         variant=cfg["variant"], guidance_scale=cfg["guidance"],
                                         null_class=null_class)
    return from_model_space(x0)  # copies to the CPU, so the batch is finished


# ----------------------------------------------------------------------------------------------
# the opt-in fast path (issue 16)
# ----------------------------------------------------------------------------------------------
def _attention_backend(name, device):
    """The SDPA backend ``name`` for the block (CUDA only); a null context for None or off CUDA."""
    if name is None or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


class CompiledNetwork:
    """``torch.compile(net, mode=mode)`` that falls back to the eager network, with one log line, if
    compiling fails (no C compiler, an unsupported op, …): a run never dies of the compiler.

    Outputs are cloned in the CUDA-graph modes: a graph replay reuses its output buffer, and the
    solver keeps earlier network outputs (ε at the segment's start) across calls."""

    def __init__(self, net, mode, device):
        self.eager, self.mode = net, mode
        self.cudagraphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        self.compiled = torch.compile(net, mode=mode, dynamic=False)
        self.failed = None

    def parameters(self):                    # the solver reads the network's dtype from here
        return self.eager.parameters()

    def __call__(self, *args):
        if self.failed is None:
            try:
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.compiled(*args)
                return out.clone() if self.cudagraphs else out
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler failure: run eager instead
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("sample: torch.compile(mode=%r) failed (%s); running the network eagerly",
                            self.mode, self.failed)
        return self.eager(*args)


def fast_network(model, cfg, device, amp_dtype):
    """The network ``sample`` calls and the autocast dtype it runs under, for the fast-path settings.

    ``cast_weights`` with bf16/fp16 on CUDA: a copy of the model converted to that dtype, no autocast
    (the solver's state stays float32). ``compile``: wrapped in ``CompiledNetwork``. With neither,
    ``(model, amp_dtype)`` unchanged: the default path."""
    net = model
    if cfg.get("cast_weights") and amp_dtype in (torch.bfloat16, torch.float16):
        net = copy.deepcopy(model).to(device=device, dtype=amp_dtype).eval()
        amp_dtype = None
    elif cfg.get("cast_weights"):
        log.info("sample: cast_weights has no effect at precision %s on %s (the weights stay float32)",
                 cfg["precision"], device.type)
    if cfg.get("compile"):
        log.info("sample: torch.compile(mode=%r) of the network on %s; every batch runs at the full batch "
                 "shape", cfg["compile"], device.type)
        net = CompiledNetwork(net, cfg["compile"], device)
    return net, amp_dtype


@contextlib.contextmanager
def _evaluating_on(model, device):
    """The model in eval mode on ``device``; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    model.to(device)
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _tf32(enabled):
    """TF32 matmuls and convolutions on (if ``enabled``); the previous flags are restored afterwards."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@torch.no_grad()
def choose_batch_size(model, image_shape, num_classes, device, amp_dtype=None, largest=4096, cpu_batch=256):
    """``batch_size: auto``: the smallest power of two that reaches 95% of the best forward throughput
    before memory runs out (the device is full); on the CPU a fixed ``cpu_batch``.

    Bigger than needed only coarsens the budget (the last batch that fits), so the smallest batch with
    near-peak images/s wins."""
    if device.type != "cuda":
        return cpu_batch
    best, rates, b = 0.0, {}, 64
    while b <= largest:
        try:
            x = torch.randn((b,) + tuple(image_shape), device=device)
            y = torch.arange(b, device=device) % num_classes
            t = torch.full((b,), 500.0, device=device)
            amp = (torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype is not None
                   else contextlib.nullcontext())
            with amp:
                model(x, t, y)  # warm-up at this size
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model(x, t, y)
                torch.cuda.synchronize(device)
            rates[b] = b / (time.perf_counter() - t0)
            best = max(best, rates[b])
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        b *= 2
    if not rates:
        raise ValueError("sample: not even a batch of 64 fits on the GPU; set sample.batch_size by hand")
    return min(k for k, r in rates.items() if r >= 0.95 * best)


# ----------------------------------------------------------------------------------------------
# the timed run
# ----------------------------------------------------------------------------------------------
@dataclass
class _Drawn:
    """What the batch loop of ``sample`` produced, batch by batch."""
    start: float                                      # perf_counter at the start of the clock
    images: list = field(default_factory=list)        # uint8 [n,H,W,C] per batch
    labels: list = field(default_factory=list)        # int64 [n] per batch
    batch_seconds: list = field(default_factory=list)
    timeline: list = field(default_factory=list)      # [images so far, seconds since the start] per batch
    batches: list = field(default_factory=list)       # the run's index of each batch
    generated: int = 0
    stopped_by: str = None


def sample(model, sample_cfg, num_classes, device, checkpoint_path=None, progress=True, image_shape=None,
           shard=(0, 1)):
    """Sample class-balanced images until the budget or the cap is reached.

    ``model`` is the class-conditional ε-network (the caller loads the EMA weights). ``image_shape`` is
    (C, H, W); by default the model's ``in_chans``/``img_size``. Returns ``(image_set, manifest)``.

    Stop rule: a batch is started only if the time so far plus the estimated time of one batch fits the
    budget. The estimate is the mean time of the batches run so far. The first batch has no estimate and
    always runs (a zero-image result is of no use; if it alone overruns, ``overrun_seconds`` says so).
    The first batch also pays for warm-up, so the mean errs on the side of stopping early.

    ``shard=(w, N)`` runs only the batches ``b ≡ w (mod N)`` of the run (worker ``w`` of
    ``parallel.sample_parallel``); batch ``b`` is the same images whichever worker runs it.
    """
    cfg = validate_sample_cfg(sample_cfg, num_classes)
    worker, num_workers = _check_shard(shard)
    classes = class_names(sample_cfg, num_classes)
    null_class = _null_class(sample_cfg, cfg["guidance"], num_classes)
    _check_label_embeddings(model, num_classes, null_class, cfg["guidance"])
    image_shape = _image_shape(model, image_shape)
    device = torch.device(device)
    checkpoint_sha = file_digest(checkpoint_path) if checkpoint_path is not None else None
    amp_dtype = autocast_dtype(cfg["precision"], device)  # CPU runs fp32

    with _evaluating_on(model, device), _tf32(device.type == "cuda" and cfg["precision"] == "tf32"):
        if cfg["batch_size"] == "auto":
            cfg["batch_size"] = choose_batch_size(model, image_shape, num_classes, device, amp_dtype)
        net, amp_dtype = fast_network(model, cfg, device, amp_dtype)
        with _shard_progress_bar(cfg, num_classes, worker, num_workers, progress) as bar:
            drawn = _draw_until_stopped(net, cfg, num_classes, image_shape, device, amp_dtype, null_class,
                                        worker, num_workers, bar)
    seconds = time.perf_counter() - drawn.start

    image_set = {
        "images": np.concatenate(drawn.images, axis=0),
        "labels": np.concatenate(drawn.labels, axis=0).astype(np.int64),
        "classes": classes,
    }
    manifest = _manifest(cfg, num_classes, image_set, drawn, seconds, device, image_shape, checkpoint_path,
                         checkpoint_sha)
    if num_workers > 1:
        manifest["batch_indices"] = drawn.batches
    return image_set, manifest


def _draw_until_stopped(model, cfg, num_classes, image_shape, device, amp_dtype, null_class, worker, num_workers,
                        bar):
    """Draw the shard's batches until the cap is reached or the next batch would overrun the budget."""
    bs, budget = cfg["batch_size"], cfg["budget"]
    total_cap = cfg["cap"] * num_classes if cfg["cap"] is not None else None
    b = worker  # the run's batch index: batch b holds the run's images b·bs … b·bs + bs − 1
    drawn = _Drawn(start=time.perf_counter())
    while True:
        first = b * bs
        if total_cap is not None and first >= total_cap:
            drawn.stopped_by = "cap"
            break
        elapsed = time.perf_counter() - drawn.start
        if budget is not None and drawn.batch_seconds and elapsed + float(np.mean(drawn.batch_seconds)) > budget:
            drawn.stopped_by = "budget"
            break
        n = bs if total_cap is None else min(bs, total_cap - first)
        t0 = time.perf_counter()
        # A compiled network keeps one shape: a short last batch is drawn in full and cut.
        full = first + (bs if cfg["compile"] else n)
        x_T, y = _batch_inputs(cfg["seed"], b, bs, image_shape, num_classes, first, full)
        drawn.images.append(_denoise(model, x_T, y, cfg, device, amp_dtype, null_class)[:n])
        drawn.labels.append(y[:n].numpy())
        drawn.batch_seconds.append(time.perf_counter() - t0)
        drawn.batches.append(b)
        drawn.generated += n
        # The cost curve of the sweep.
        drawn.timeline.append([drawn.generated, time.perf_counter() - drawn.start])
        bar.update(n)
        bar.set_postfix(img_per_s=f"{drawn.generated / (time.perf_counter() - drawn.start):.1f}")
        b += num_workers
    return drawn


def _manifest(cfg, num_classes, image_set, drawn, seconds, device, image_shape, checkpoint_path, checkpoint_sha):
    """What the run did and with which settings: manifest.json."""
    budget = cfg["budget"]
    return {
        "count": int(drawn.generated),
        "per_class": np.bincount(image_set["labels"], minlength=num_classes).tolist(),
        "seconds": seconds,
        "images_per_second": drawn.generated / seconds if seconds > 0 else None,
        "device": device_name(device),
        "sampler": "dpm_solver",
        "variant": cfg["variant"],
        "steps": cfg["steps"],
        "seed": cfg["seed"],
        "checkpoint": None if checkpoint_path is None else str(checkpoint_path),
        "checkpoint_sha256": checkpoint_sha,
        "budget_seconds": budget,
        "overrun_seconds": max(0.0, seconds - budget) if budget is not None else 0.0,
        "max_per_class": cfg["cap"],
        "stopped_by": drawn.stopped_by,
        "batch_size": cfg["batch_size"],
        "num_batches": len(drawn.batch_seconds),
        "batch_seconds": drawn.batch_seconds,
        "timeline": drawn.timeline,
        "guidance_scale": cfg["guidance"],
        "precision": cfg["precision"] if device.type == "cuda" else "fp32",
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        "torch": torch.__version__,
        # The fast path's settings, only where one is on (a default manifest keeps its keys).
        **{k: cfg[k] for k in ("cast_weights", "compile", "attention") if cfg[k]},
    }


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _shard_share(total_cap, bs, worker, num_workers):
    """Images that worker ``worker`` of ``num_workers`` draws in a cap run (for its progress bar)."""
    return sum(min(bs, total_cap - b * bs) for b in range(worker, -(-total_cap // bs), num_workers))


def _shard_progress_bar(cfg, num_classes, worker, num_workers, progress):
    """A bar over the images this worker draws (a count only, in a budget run)."""
    total = None if cfg["cap"] is None else _shard_share(cfg["cap"] * num_classes, cfg["batch_size"], worker,
                                                         num_workers)
    desc = "sample" if num_workers == 1 else f"sample {worker + 1}/{num_workers}"
    return progress_bar(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True,
                        position=worker if num_workers > 1 else None)


# ----------------------------------------------------------------------------------------------
# a range of the run, without a clock (the training FID)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_range(model, sample_cfg, num_classes, device, start, stop):
    """Images ``start`` … ``stop − 1`` of the run ``sample`` draws for ``sample_cfg`` (no clock, no cap):
    image ``i`` has label ``i mod K`` and row ``i mod bs`` of batch ``i // bs``'s noise, exactly as in
    ``sample``, drawn in pieces that never cross one of the run's batches. Splitting ``0 … n`` into
    consecutive ranges among processes (the training FID on several GPUs) gives each the same images
    a one-process run has there, up to float rounding in a smaller batch. Returns uint8 [n,H,W,C] and
    the int64 labels."""
    # No clock and no cap here (the range says which images): only the other settings are checked.
    cfg = validate_sample_cfg(dict(sample_cfg, budget_seconds=None, max_per_class=1), num_classes)
    bs = cfg["batch_size"]
    if bs == "auto":
        raise ValueError("sample_range needs a fixed batch size (the noise of image i depends on it), not 'auto'")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop:
        raise ValueError(f"sample_range: need 0 <= start <= stop, got {start}, {stop}")
    image_shape = (model.in_chans, model.img_size, model.img_size)
    device = torch.device(device)
    amp_dtype = autocast_dtype(cfg["precision"], device)  # CPU runs fp32
    null_class = _null_class(sample_cfg, cfg["guidance"], num_classes)
    images, labels = [], []
    with _evaluating_on(model, device):
        lo = start
        while lo < stop:
            b = lo // bs
            hi = min(stop, (b + 1) * bs)
            x_T, y = _batch_inputs(cfg["seed"], b, bs, image_shape, num_classes, lo, hi)
            images.append(_denoise(model, x_T, y, cfg, device, amp_dtype, null_class))
            labels.append(y.numpy())
            lo = hi
    if not images:
        return np.zeros((0, image_shape[1], image_shape[2], image_shape[0]), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def write(out_dir, image_set, manifest):
    """Write ``samples.npz`` then ``manifest.json`` into ``out_dir``, both under temporary names.

    Both files are complete on disk before either is renamed; samples are renamed first, the manifest
    last, so a finished-looking manifest always describes finished samples. The manifest records the
    samples file's sha256 so a reader can check the pair belongs together."""
    imageset.check(image_set)
    if manifest.get("count") != len(image_set["labels"]):
        raise ValueError(f"write: manifest count {manifest.get('count')} != {len(image_set['labels'])} images")
    out_dir = Path(out_dir)
    samples_path, manifest_path = out_dir / "samples.npz", out_dir / "manifest.json"

    # Exit order of the nested blocks renames samples.npz first, manifest.json second.
    with atomic_path(manifest_path) as tmp_manifest:
        with atomic_path(samples_path) as tmp_samples:
            with open(tmp_samples, "wb") as f:
                np.savez(f, images=image_set["images"], labels=image_set["labels"].astype(np.int64),
                         classes=np.asarray(image_set["classes"]).astype(str))
            full = dict(manifest, samples_sha256=file_digest(tmp_samples))
            tmp_manifest.write_text(json.dumps(full, indent=2) + "\n")
    return samples_path, manifest_path
