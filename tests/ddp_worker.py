"""Helper for tests/test_train.py: the tiny model, made data, and a script that trains in a separate
process (under torchrun for the DDP test, or as a process the test SIGKILLs).

    python tests/ddp_worker.py OUT_DIR '{"steps": 4, ...}' [--slow SECONDS] [--fid STATS]

``--fid STATS``: the FID curve of train.make_training_fid against STATS (ConvNet features). Each rank
records the image ranges it sampled and the FID values it got (OUT_DIR/../fid_rank{r}.json), and, after
training, the FID of ``fixed_model()`` computed by all ranks together.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

TINY_MODEL = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                  qkv_bias=False, mlp_time_embed=False, num_classes=4, conv=True, skip=True)
TINY_TRAIN = dict(steps=4, batch_size=32, micro_batch=32, lr=1e-3, weight_decay=0.03, betas=[0.99, 0.999],
                  warmup_steps=2, ema_decay=0.9, precision="fp32", label_dropout=0.0, checkpoint_every=2,
                  fid_every=0, fid_samples=10, seed=0)


def make_data(n=40, size=8, channels=3, num_classes=4, seed=0):
    """Class-dependent blobs with noise, uint8 NHWC, so the loss is not degenerate."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % num_classes
    base = rng.uniform(0, 255, size=(num_classes, size, size, channels))
    images = base[labels] * 0.7 + rng.uniform(0, 255, size=(n, size, size, channels)) * 0.3
    return {"images": images.round().clip(0, 255).astype(np.uint8), "labels": labels,
            "classes": np.array([f"c{i}" for i in range(num_classes)])}


def fixed_model():
    """The tiny U-ViT at a fixed random init (an FID to compare one process with several)."""
    import torch

    from diffdistill.checkpoint import build_model
    torch.manual_seed(123)
    return build_model(TINY_MODEL).eval()


def fid_block(cfg):
    return {"model": TINY_MODEL, "train": cfg, "fid": {"features": "convnet"}}


def _fid_hook(out_dir, cfg, stats):
    """make_training_fid's eval_fn, recording this rank's sampled ranges and the values it returned."""
    import torch.distributed as dist

    from diffdistill import sample
    from diffdistill import train as train_mod
    record = {"ranges": [], "values": []}
    original = sample.sample_range

    def recording_range(model, sample_cfg, num_classes, device, start, stop):
        record["ranges"].append([int(start), int(stop)])
        return original(model, sample_cfg, num_classes, device, start, stop)

    sample.sample_range = recording_range
    eval_fn = train_mod.make_training_fid(fid_block(cfg), stats, device="cpu")

    def hook(model, step):
        value = eval_fn(model, step)
        record["values"].append(value)
        return value

    hook.distributed = eval_fn.distributed

    def save():
        rank = dist.get_rank() if dist.is_initialized() else 0
        (Path(out_dir).parent / f"fid_rank{rank}.json").write_text(json.dumps(record))

    return hook, eval_fn, save


def main(argv):
    out_dir, overrides = argv[0], json.loads(argv[1])
    import torch
    if os.environ.get("DD_THREADS"):
        torch.set_num_threads(int(os.environ["DD_THREADS"]))
    from diffdistill import diffusion
    from diffdistill.train import train

    if "--slow" in argv:
        # Make every micro-batch slow so that the test can kill the process between checkpoints.
        delay = float(argv[argv.index("--slow") + 1])
        original = diffusion.training_loss

        def slow_loss(*args, **kwargs):
            time.sleep(delay)
            return original(*args, **kwargs)

        diffusion.training_loss = slow_loss
    cfg = {**TINY_TRAIN, **overrides}
    if "--fid" not in argv:
        train(TINY_MODEL, cfg, make_data(), out_dir, device="cpu", progress=False)
        return
    import torch.distributed as dist
    dist.init_process_group("gloo")        # ours, so that it outlives train() for the fixed model's FID
    try:
        hook, eval_fn, save = _fid_hook(out_dir, cfg, argv[argv.index("--fid") + 1])
        train(TINY_MODEL, cfg, make_data(), out_dir, eval_fn=hook, device="cpu", progress=False)
        fixed = eval_fn(fixed_model(), 0)
        if dist.get_rank() == 0:
            (Path(out_dir) / "fixed_fid.json").write_text(json.dumps(fixed))
        save()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
