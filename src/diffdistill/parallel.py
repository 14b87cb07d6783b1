"""One sampling run on several devices at once.

One process per device, each with its own copy of the model, samples its shard of the run (the batches
``w, w+N, w+2N, …`` of a one-device run: ``sample.sample(..., shard=(w, N))``) for the whole budget;
``merge_shards`` puts the batches back in the run's order and keeps the classes balanced.
"""
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import numpy as np
import torch

from . import imageset
from .checkpoint import check_checkpoint, load_model
from .io import file_digest
from .sample import autocast_dtype, choose_batch_size, class_names, sample, validate_sample_cfg


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
            amp_dtype = autocast_dtype(cfg.get("precision", "fp32"), device)
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
    classes = class_names(sample_cfg, num_classes)
    check_checkpoint(model_cfg, checkpoint_path, train_cfg)
    checkpoint_sha = file_digest(checkpoint_path)
    with tempfile.TemporaryDirectory(prefix="diffdistill-sample-") as part_dir:
        job = (model_cfg, train_cfg, str(checkpoint_path), dict(sample_cfg), num_classes, progress)
        _run_workers(devices, job, part_dir)
        parts = [_read_part(part_dir, rank, classes) for rank in range(len(devices))]
    image_set, manifest = merge_shards(parts, num_classes)
    manifest.update(checkpoint=str(checkpoint_path), checkpoint_sha256=checkpoint_sha)
    return image_set, manifest


def _run_workers(devices, job, part_dir):
    """Run one ``_worker`` per device until all are done; raise naming the first to fail by itself.

    ``job``: ``_worker``'s arguments that are the same for all, ``(model_cfg, train_cfg, checkpoint_path,
    sample_cfg, num_classes, progress)``."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier, errors = ctx.Barrier(len(devices)), ctx.SimpleQueue()
    shared_batch_size = ctx.Value("i", 0)
    procs = [ctx.Process(target=_worker, args=(rank, [str(d) for d in devices], *job,
                                               shared_batch_size, barrier, errors, part_dir))
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


def _read_part(part_dir, rank, classes):
    """Worker ``rank``'s ``(image_set, manifest)`` from the files it wrote."""
    with np.load(Path(part_dir) / f"part{rank}.npz") as z:
        part = {"images": z["images"], "labels": z["labels"], "classes": classes}
    return part, json.loads((Path(part_dir) / f"part{rank}.json").read_text())


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
    keep = np.flatnonzero(imageset.rank_in_class(merged["labels"], K) <= counts.min())
    dropped = len(merged["labels"]) - len(keep)
    merged = imageset.subset(merged, keep)

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
