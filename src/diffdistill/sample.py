"""Timed, class-balanced sampling from a class-conditional U-ViT, and export of the result.

The paper's distilled set is "as many images as the model can sample in 10 minutes". ``sample``
draws batches with DPM-Solver until a wall-clock budget (or a per-class cap) is reached and records
how long it took in a manifest; ``write`` stores the image set and the manifest atomically.

Determinism: the noise of batch ``b`` comes from a generator seeded by ``(seed, b)`` and the labels of
image ``i`` (counted over the whole run) are ``i mod K``, so image ``i`` depends only on the seed, its
position and the batch size. The wall clock decides only *how many* batches run; with a cap and no
budget the output is exactly reproducible, and a smaller cap gives a prefix of a larger one.

Challenge export (ECCV 2024 Dataset Distillation Challenge). The challenge's public evaluator does
``data = torch.load(submit_dir / "cifar100.pt")`` (and ``tinyimagenet.pt``), asserts
``data.shape == [10 * num_classes, 3, H, W]`` and labels image ``n`` with class ``n // 10``
(``np.ones(10) * i`` for class ``i``); the images are normalised with the dataset's mean/std
(CIFAR-100 [0.5071,0.4866,0.4409]/[0.2673,0.2564,0.2762], Tiny-ImageNet ImageNet's).
``export_challenge`` writes exactly that: a bare float32 tensor [K·ipc,C,H,W], class-major in label
order (generation order within a class), in a file named ``{ds}.pt``; the int64 labels [K·ipc] go
to a second file beside it (``{ds}_labels.pt``), for other evaluators and for checking.
"""
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import diffusion
from .config import PRECISIONS
from .io import atomic_dir, atomic_path, file_digest, torch_bytes

VARIANTS = ("fast", "multistep")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model params.yaml describes; the message names the key."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The checkpoint file is not there (a ValueError for the CLI, a FileNotFoundError for callers)."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def batch_generator(seed, batch_index):
    """A CPU generator seeded by (seed, batch_index): batch b's noise never depends on timing or device."""
    state = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _class_names(sample_cfg, num_classes):
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
    if variant not in VARIANTS:
        raise ValueError(f"sample: sample.variant must be one of {VARIANTS}, got {variant!r}")
    seed = sample_cfg.get("seed", 0)
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"sample: sample.seed must be a non-negative integer, got {seed!r}")
    guidance = float(sample_cfg.get("guidance_scale", 0.0) or 0.0)
    precision = sample_cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"sample: sample.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if not (isinstance(num_classes, int) and num_classes > 0):
        raise ValueError(f"sample: num_classes must be a positive integer, got {num_classes!r}")
    return dict(budget=None if budget is None else float(budget), cap=cap, batch_size=batch_size,
                steps=steps, variant=variant, seed=seed, guidance=guidance, precision=precision)


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------
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
    ``sample_parallel``); batch ``b`` is the same images whichever worker runs it.
    """
    cfg = validate_sample_cfg(sample_cfg, num_classes)
    worker, num_workers = (int(v) for v in shard)
    if not (num_workers >= 1 and 0 <= worker < num_workers):
        raise ValueError(f"sample: shard must be (worker, workers) with 0 <= worker < workers, got {shard!r}")
    classes = _class_names(sample_cfg, num_classes)
    model_classes = getattr(model, "num_classes", None)
    if isinstance(model_classes, int) and model_classes < num_classes:
        raise ValueError(f"sample: the model has {model_classes} label embeddings but num_classes is "
                         f"{num_classes}; use the checkpoint trained for this dataset (model.num_classes)")
    null_class = None
    if cfg["guidance"] > 0:
        # Classifier-free guidance needs the null label the model was trained with (label_dropout > 0),
        # by convention the index right after the real classes.
        null_class = int(sample_cfg.get("null_class", num_classes))
        if isinstance(model_classes, int) and model_classes <= null_class:
            raise ValueError(f"sample: guidance_scale {cfg['guidance']} needs a null class (index {null_class}) "
                             f"but the model has only {model_classes} label embeddings; train with "
                             f"train.label_dropout > 0 or set sample.guidance_scale: 0")
    if image_shape is None:
        if not (hasattr(model, "in_chans") and hasattr(model, "img_size")):
            raise ValueError("sample: the model has no in_chans/img_size; pass image_shape=(C, H, W)")
        image_shape = (model.in_chans, model.img_size, model.img_size)
    image_shape = tuple(int(s) for s in image_shape)
    if not hasattr(diffusion, "dpm_solver_sample"):
        raise RuntimeError("sample: diffusion.dpm_solver_sample is missing; the sampler module is incomplete")

    device = torch.device(device)
    checkpoint_sha = file_digest(checkpoint_path) if checkpoint_path is not None else None
    was_training = model.training
    model.eval()
    model.to(device)
    amp_dtype = PRECISIONS[cfg["precision"]] if device.type == "cuda" else None  # CPU runs fp32
    use_tf32 = device.type == "cuda" and cfg["precision"] == "tf32"
    precision = cfg["precision"] if device.type == "cuda" else "fp32"
    tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if use_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg["batch_size"] == "auto":
        cfg["batch_size"] = choose_batch_size(model, image_shape, num_classes, device, amp_dtype)

    K, bs, budget = num_classes, cfg["batch_size"], cfg["budget"]
    total_cap = cfg["cap"] * K if cfg["cap"] is not None else None
    images, labels, batch_seconds, timeline, batches = [], [], [], [], []
    generated = 0
    stopped_by = None
    bar = _progress_bar(None if total_cap is None else _shard_share(total_cap, bs, worker, num_workers),
                        progress, desc="sample" if num_workers == 1 else f"sample {worker + 1}/{num_workers}",
                        position=worker if num_workers > 1 else None)
    b = worker  # the run's batch index: batch b holds the run's images b·bs … b·bs + bs − 1
    start = time.perf_counter()
    try:
        while True:
            first = b * bs
            if total_cap is not None and first >= total_cap:
                stopped_by = "cap"
                break
            elapsed = time.perf_counter() - start
            if budget is not None and batch_seconds and elapsed + float(np.mean(batch_seconds)) > budget:
                stopped_by = "budget"
                break
            n = bs if total_cap is None else min(bs, total_cap - first)
            t0 = time.perf_counter()
            # Round-robin labels over the run's image index: per-class counts of a run never differ by
            # more than one, whenever it stops.
            y = torch.arange(first, first + n, dtype=torch.int64) % K
            # Draw the full batch's noise even for a short last batch, so image i's noise depends only on
            # (seed, i // batch_size, i % batch_size), never on the cap.
            x_T = torch.randn((bs,) + image_shape, generator=batch_generator(cfg["seed"], b))[:n]
            amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                   else contextlib.nullcontext())
            with torch.no_grad(), amp:
                x0 = diffusion.dpm_solver_sample(model, x_T.to(device), y=y.to(device), steps=cfg["steps"],
                                                 variant=cfg["variant"], guidance_scale=cfg["guidance"],
                                                 null_class=null_class)
            images.append(data_mod.from_model_space(x0))  # copies to the CPU, so the batch is finished
            labels.append(y.numpy())
            batch_seconds.append(time.perf_counter() - t0)
            batches.append(b)
            generated += n
            # [images so far, seconds since the start] after each batch: the cost curve of the sweep.
            timeline.append([generated, time.perf_counter() - start])
            bar.update(n)
            bar.set_postfix(img_per_s=f"{generated / (time.perf_counter() - start):.1f}")
            b += num_workers
    finally:
        bar.close()
        model.train(was_training)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
    seconds = time.perf_counter() - start

    image_set = {
        "images": np.concatenate(images, axis=0),
        "labels": np.concatenate(labels, axis=0).astype(np.int64),
        "classes": classes,
    }
    per_class = np.bincount(image_set["labels"], minlength=K).tolist()
    manifest = {
        "count": int(generated),
        "per_class": per_class,
        "seconds": seconds,
        "images_per_second": generated / seconds if seconds > 0 else None,
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
        "stopped_by": stopped_by,
        "batch_size": bs,
        "num_batches": len(batch_seconds),
        "batch_seconds": batch_seconds,
        "timeline": timeline,
        "guidance_scale": cfg["guidance"],
        "precision": precision,
        "image_shape": list(image_shape),
        "num_classes": K,
        "torch": torch.__version__,
    }
    if num_workers > 1:
        manifest["batch_indices"] = batches
    return image_set, manifest


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
    amp_dtype = PRECISIONS[cfg["precision"]] if device.type == "cuda" else None  # CPU runs fp32
    null_class = int(sample_cfg.get("null_class", num_classes)) if cfg["guidance"] > 0 else None
    was_training = model.training
    model.eval()
    model.to(device)
    images, labels = [], []
    try:
        lo = start
        while lo < stop:
            b = lo // bs
            hi = min(stop, (b + 1) * bs)
            y = torch.arange(lo, hi, dtype=torch.int64) % num_classes
            x_T = torch.randn((bs,) + image_shape, generator=batch_generator(cfg["seed"], b))[lo - b * bs:hi - b * bs]
            amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                   else contextlib.nullcontext())
            with amp:
                x0 = diffusion.dpm_solver_sample(model, x_T.to(device), y=y.to(device), steps=cfg["steps"],
                                                 variant=cfg["variant"], guidance_scale=cfg["guidance"],
                                                 null_class=null_class)
            images.append(data_mod.from_model_space(x0))
            labels.append(y.numpy())
            lo = hi
    finally:
        model.train(was_training)
    if not images:
        return np.zeros((0, image_shape[1], image_shape[2], image_shape[0]), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


def _shard_share(total_cap, bs, worker, num_workers):
    """Images that worker ``worker`` of ``num_workers`` draws in a cap run (for its progress bar)."""
    return sum(min(bs, total_cap - b * bs) for b in range(worker, -(-total_cap // bs), num_workers))


def _progress_bar(total, progress, desc="sample", position=None):
    from .progress import progress as progress_bar

    return progress_bar(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True,
                        position=position)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def _build(model_cfg, train_cfg=None):
    """The model params.yaml describes, built as the trainer builds it (with its null class, if any)."""
    try:
        from .train import build_model
    except ImportError:  # the trainer is optional for sampling
        from .uvit import UViT

        return UViT(**model_cfg)
    return build_model(model_cfg, train_cfg)


def _read_state_dict(path):
    try:
        from .weights import load_checkpoint
    except ImportError:
        load_checkpoint = None
    try:
        if load_checkpoint is not None:
            return load_checkpoint(path)[0]  # unwraps {'model': ...} wrappers and DDP's 'module.'
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} could not be read as a state dict ({exc}); "
                              f"delete it and retrain") from exc


def _fit_problems(model_cfg, train_cfg, expected, got):
    """Plain-words reasons why a state dict (shapes ``got``) does not fit the params (shapes ``expected``)."""
    problems = []
    null = train_cfg is not None and float(train_cfg.get("label_dropout", 0.0) or 0.0) > 0
    key = "label_emb.weight"
    if key in expected and key in got and got[key][0] != expected[key][0]:
        problems.append(f"the checkpoint has {got[key][0]} label embeddings but params model.num_classes = "
                        f"{model_cfg.get('num_classes')}" + (" (+1 null class, train.label_dropout > 0)" if null else "")
                        + f" needs {expected[key][0]}")
    elif (key in expected) != (key in got):
        problems.append(f"the checkpoint is {'class-conditional' if key in got else 'unconditional'} but params "
                        f"model.num_classes = {model_cfg.get('num_classes')}")
    if "pos_embed" in expected and "pos_embed" in got and got["pos_embed"][1] != expected["pos_embed"][1]:
        p = int(model_cfg.get("patch_size", 1))
        extras = 2 if key in got else 1
        side = int(round(math.sqrt(max(got["pos_embed"][1] - extras, 0)))) * p
        problems.append(f"the checkpoint's pos_embed has {got['pos_embed'][1]} tokens (image size {side} at "
                        f"patch {p}) but params model.img_size = {model_cfg.get('img_size')}, "
                        f"model.patch_size = {p} need {expected['pos_embed'][1]}")
    pk = "patch_embed.proj.weight"
    if pk in got and pk in expected and got[pk][1] != expected[pk][1]:
        problems.append(f"the checkpoint takes {got[pk][1]} image channels but params "
                        f"model.in_chans = {model_cfg.get('in_chans')}")
    if not problems:  # something else: name the keys
        shape_diff = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        detail = [f"{k}: checkpoint {got[k]} vs params {expected[k]}" for k in shape_diff[:6]]
        if missing:
            detail.append(f"missing in checkpoint: {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            detail.append(f"unexpected: {', '.join(unexpected[:6])}" + (" ..." if len(unexpected) > 6 else ""))
        if detail:
            problems.append("; ".join(detail) + " (check model.embed_dim, depth, mlp_ratio, conv, "
                            "mlp_time_embed, qkv_bias against the training run)")
    return problems


def _checked(model_cfg, checkpoint_path, train_cfg=None):
    path = Path(checkpoint_path)
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint {path} does not exist; train the model first "
                                     f"(snakemake {path}) or point the sample step at the right file")
    state = _read_state_dict(path)
    model = _build(model_cfg, train_cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = _fit_problems(model_cfg, train_cfg, expected, got)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit params.yaml's model block: "
                              + "; ".join(problems) + ". Sample with the model params the checkpoint was "
                              "trained with, or retrain for these params.")
    return model, state


def check_checkpoint(model_cfg, checkpoint_path, train_cfg=None):
    """Load ``checkpoint_path`` and check it against the model block of params.yaml (and the train
    block's label_dropout, which adds a null class). Returns the state dict.

    Raises ``MissingCheckpointError`` for a missing file and ``CheckpointError`` naming the params key
    (``model.num_classes``, ``model.img_size``, ...) for one that does not fit. Reads only."""
    return _checked(model_cfg, checkpoint_path, train_cfg)[1]


def load_model(model_cfg, checkpoint_path, device="cpu", train_cfg=None):
    """Build the model params.yaml describes, load the checked checkpoint (strict), eval mode."""
    model, state = _checked(model_cfg, checkpoint_path, train_cfg)
    try:
        from .weights import load_state_dict_checked
    except ImportError:
        model.load_state_dict(state, strict=True)
    else:
        load_state_dict_checked(model, state)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# several devices
# ----------------------------------------------------------------------------------------------
def sample_devices(gpus, device):
    """The devices one sampling run uses: ``gpus`` CUDA devices when ``device`` is CUDA and ``gpus`` > 1,
    otherwise ``[device]`` alone (on the CPU, more processes would only share the same cores)."""
    device = torch.device(device)
    gpus = int(gpus or 0)
    if device.type != "cuda" or gpus <= 1:
        return [device]
    visible = torch.cuda.device_count()
    if gpus > visible:
        raise ValueError(f"sample: sample.gpus is {gpus} but only {visible} CUDA devices are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); set "
                         f"sample.gpus to at most {visible}, or run the job where {gpus} GPUs are allocated")
    return [torch.device("cuda", i) for i in range(gpus)]


STOPPED_BY_OTHER = 3  # a worker's exit code when it stopped because another one failed


def _worker(rank, devices, model_cfg, train_cfg, checkpoint_path, sample_cfg, num_classes, progress,
            shared_batch_size, barrier, errors, part_dir):
    """One process of ``sample_parallel``: load the model on its device, wait for the others, sample its shard."""
    try:
        device = torch.device(devices[rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # CPU workers share the step's threads (--threads, passed on as OMP_NUM_THREADS; else
            # torch's default, the cores) instead of each taking all of them
            torch.set_num_threads(max(1, torch.get_num_threads() // len(devices)))
        model = load_model(model_cfg, checkpoint_path, device, train_cfg)
        cfg = dict(sample_cfg)
        auto = cfg.get("batch_size", 500) == "auto"
        if auto and rank == 0:
            # One batch size for all: batch b must be the same images whichever worker draws it.
            amp_dtype = PRECISIONS[cfg.get("precision", "fp32")] if device.type == "cuda" else None
            shared_batch_size.value = choose_batch_size(model, (model.in_chans, model.img_size, model.img_size),
                                                        num_classes, device, amp_dtype)
        barrier.wait()  # the budget's clock starts on every device at the same moment
        if auto:
            cfg["batch_size"] = int(shared_batch_size.value)
        image_set, manifest = sample(model, cfg, num_classes, device, progress=progress,
                                     shard=(rank, len(devices)))
        np.savez(Path(part_dir) / f"part{rank}.npz", images=image_set["images"], labels=image_set["labels"])
        (Path(part_dir) / f"part{rank}.json").write_text(json.dumps(manifest))
    except threading.BrokenBarrierError:
        sys.exit(STOPPED_BY_OTHER)  # another worker failed before sampling began; it reports why
    except BaseException:
        import traceback

        errors.put((rank, traceback.format_exc()))
        barrier.abort()  # the others stop waiting for this one
        sys.exit(1)


def sample_parallel(model_cfg, checkpoint_path, sample_cfg, num_classes, devices, train_cfg=None,
                    progress=True):
    """Sample one run's budget on several devices at once and merge the result.

    One process per device, each with its own copy of the model. Every process samples for the whole
    budget; process ``w`` of ``N`` draws the run's batches ``w, w+N, w+2N, …`` (same labels and noise as
    in a one-device run), so a cap run gives exactly the one-device images and a budget run about N
    times as many. ``merge_shards`` then keeps per-class counts within one of each other. Everything is
    checked before any process starts; a failing process stops the others and nothing is returned."""
    devices = [torch.device(d) for d in devices]
    if len(devices) == 1:
        model = load_model(model_cfg, checkpoint_path, devices[0], train_cfg)
        return sample(model, sample_cfg, num_classes, devices[0], checkpoint_path=checkpoint_path,
                      progress=progress)
    validate_sample_cfg(sample_cfg, num_classes)
    classes = _class_names(sample_cfg, num_classes)
    check_checkpoint(model_cfg, checkpoint_path, train_cfg)
    checkpoint_sha = file_digest(checkpoint_path)
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier, errors = ctx.Barrier(len(devices)), ctx.SimpleQueue()
    shared_batch_size = ctx.Value("i", 0)
    with tempfile.TemporaryDirectory(prefix="diffdistill-sample-") as part_dir:
        procs = [ctx.Process(target=_worker, args=(rank, [str(d) for d in devices], model_cfg, train_cfg,
                                                   str(checkpoint_path), dict(sample_cfg), num_classes,
                                                   progress, shared_batch_size, barrier, errors, part_dir))
                 for rank in range(len(devices))]
        for proc in procs:
            proc.start()
        try:
            # Wait for all; a worker that fails stops the others (waiting ones at once, sampling ones here).
            while any(proc.is_alive() for proc in procs):
                if any(proc.exitcode not in (None, 0, STOPPED_BY_OTHER) for proc in procs):
                    break
                for proc in procs:
                    proc.join(timeout=0.2)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join()
        # The cause is a worker that failed by itself; the others stopped because of it or were stopped here.
        bad = [rank for rank, proc in enumerate(procs) if proc.exitcode != 0]
        failed = [rank for rank in bad if procs[rank].exitcode not in (STOPPED_BY_OTHER, -signal.SIGTERM)] or bad
        if failed:
            reports = []
            while not errors.empty():
                rank, tb = errors.get()
                reports.append(f"--- worker {rank} on {devices[rank]} ---\n{tb}")
            rank = failed[0]
            raise RuntimeError(f"sample: the process on {devices[rank]} (worker {rank} of {len(devices)}) failed "
                               f"with exit code {procs[rank].exitcode}; nothing was written.\n" + "\n".join(reports))
        parts = []
        for rank in range(len(devices)):
            with np.load(Path(part_dir) / f"part{rank}.npz") as z:
                part = {"images": z["images"], "labels": z["labels"], "classes": classes}
            parts.append((part, json.loads((Path(part_dir) / f"part{rank}.json").read_text())))
    image_set, manifest = merge_shards(parts, num_classes)
    manifest.update(checkpoint=str(checkpoint_path), checkpoint_sha256=checkpoint_sha)
    return image_set, manifest


def merge_shards(parts, num_classes):
    """Merge the ``(image_set, manifest)`` of each worker of one run into one image set and manifest.

    Batches are put back in the run's order. Workers stop independently, so the batches done can have
    gaps and per-class counts can drift apart; each class then keeps its first ``m + 1`` images (``m``
    the smallest class count), so counts differ by at most one as in a one-device run. What that drops
    is ``dropped_for_balance`` in the manifest."""
    K = int(num_classes)
    pieces = []
    for part, manifest in parts:
        offset = 0
        for b, n in zip(manifest["batch_indices"], _batch_counts(manifest)):
            pieces.append((b, part["images"][offset:offset + n], part["labels"][offset:offset + n]))
            offset += n
        if offset != len(part["labels"]):
            raise ValueError(f"merge_shards: a worker's manifest lists {offset} images, its samples {len(part['labels'])}")
    pieces.sort(key=lambda piece: piece[0])
    indices = [piece[0] for piece in pieces]
    if len(set(indices)) != len(indices):
        raise ValueError("merge_shards: two workers drew the same batch; each needs its own shard")
    merged = {"images": np.concatenate([p[1] for p in pieces]), "labels": np.concatenate([p[2] for p in pieces]),
              "classes": parts[0][0]["classes"]}
    counts = np.bincount(merged["labels"], minlength=K)
    keep = np.flatnonzero(rank_in_class(merged["labels"], K) <= counts.min())
    dropped = len(merged["labels"]) - len(keep)
    merged = subset(merged, keep)

    manifests = [m for _, m in parts]
    seconds = max(m["seconds"] for m in manifests)  # the workers ran side by side
    # One cost curve: every batch's images at the time it finished, over all workers.
    events = sorted((t, n) for m in manifests
                    for (done, t), n in zip(m["timeline"], _batch_counts(m)))
    timeline, total = [], 0
    for t, n in events:
        total += n
        timeline.append([total, t])
    names = [m["device"] for m in manifests]
    budget = manifests[0]["budget_seconds"]
    count = len(merged["labels"])
    manifest = dict(manifests[0])
    manifest.pop("batch_indices", None)
    manifest.update({
        "count": count,
        "per_class": np.bincount(merged["labels"], minlength=K).tolist(),
        "seconds": seconds,
        "images_per_second": count / seconds if seconds > 0 else None,
        "device": f"{len(names)} × {names[0]}" if len(set(names)) == 1 else " + ".join(names),
        "overrun_seconds": max(0.0, seconds - budget) if budget is not None else 0.0,
        "stopped_by": "budget" if any(m["stopped_by"] == "budget" for m in manifests) else "cap",
        "num_batches": len(indices),
        "batch_seconds": [s for m in manifests for s in m["batch_seconds"]],
        "timeline": timeline,
        "dropped_for_balance": int(dropped),
        "workers": [{"device": m["device"], "count": m["count"], "num_batches": m["num_batches"],
                     "seconds": m["seconds"]} for m in manifests],
    })
    return merged, manifest


def _batch_counts(manifest):
    """Images in each batch a worker drew, from its timeline of running totals."""
    done = [0] + [int(n) for n, _ in manifest["timeline"]]
    return [b - a for a, b in zip(done, done[1:])]


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _check_image_set(image_set):
    images, labels, classes = image_set["images"], image_set["labels"], image_set["classes"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"image set: images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"image set: labels shape {labels.shape} does not match {images.shape[0]} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"image set: labels must lie in [0, {len(classes)}), the classes array's length")


def write(out_dir, image_set, manifest):
    """Write ``samples.npz`` then ``manifest.json`` into ``out_dir``, both under temporary names.

    Both files are complete on disk before either is renamed; samples are renamed first, the manifest
    last, so a finished-looking manifest always describes finished samples. The manifest records the
    samples file's sha256 so a reader can check the pair belongs together."""
    _check_image_set(image_set)
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


def balanced_prefix(image_set, n_per_class):
    """The first ``n_per_class`` images of every class, in generation order.

    Nested by construction: prefix(n) is a subset of prefix(m) for n < m. Raises if a class has fewer."""
    if not (isinstance(n_per_class, (int, np.integer)) and n_per_class > 0):
        raise ValueError(f"balanced_prefix: n_per_class must be a positive integer, got {n_per_class!r}")
    labels = np.asarray(image_set["labels"])
    K = len(image_set["classes"])
    counts = np.bincount(labels, minlength=K)
    rank = rank_in_class(labels, K)
    short = [(str(image_set["classes"][k]), int(counts[k])) for k in range(K) if counts[k] < n_per_class]
    if short:
        raise ValueError(f"balanced_prefix: {len(short)} classes have fewer than {n_per_class} images "
                         f"(e.g. {short[:5]}); sample more (raise sample.budget_seconds/max_per_class) "
                         f"or ask for fewer per class")
    keep = np.flatnonzero(rank < n_per_class)
    return subset(image_set, keep)


def rank_in_class(labels, num_classes):
    """Each image's position within its own class, in generation order (0 for a class's first image)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # stable: generation order within a class
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


def subset(image_set, idx):
    """The images at ``idx`` (order kept); every other key is carried over unchanged."""
    idx = np.asarray(idx, dtype=np.int64)
    out = dict(image_set)
    out["images"] = image_set["images"][idx]
    out["labels"] = np.asarray(image_set["labels"])[idx].astype(np.int64)
    return out


def _by_class(image_set, images_per_class):
    """Indices grouped by class in label order, the first ``images_per_class`` of each (generation order)."""
    pre = balanced_prefix(image_set, images_per_class)
    order = np.argsort(pre["labels"], kind="stable")  # stable: keeps generation order within a class
    return subset(pre, order)


def _mean_std(mean, std, channels):
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"export: mean/std need {channels} values (one per channel), got {mean.numel()}/{std.numel()}; "
                         f"use the dataset's (evaluate.mean/std in params.yaml)")
    if (std <= 0).any():
        raise ValueError("export: std must be positive")
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


# The challenge's evaluator asserts this many images per class for its datasets.
CHALLENGE_IPC = {"cifar100": 10, "tinyimagenet": 10}


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
    _check_image_set(image_set)
    ipc = _export_ipc(image_set, images_per_class)
    grouped = _by_class(image_set, ipc)
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
    from PIL import Image

    _check_image_set(image_set)
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
    from PIL import Image

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
