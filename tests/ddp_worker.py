"""Helper for tests/test_train.py: the tiny model, made data, and a script that trains in a separate
process (under torchrun for the DDP test, or as a process the test SIGKILLs).

    python tests/ddp_worker.py OUT_DIR '{"steps": 4, ...}' [--slow SECONDS]
"""
import json
import os
import sys
import time

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
    train(TINY_MODEL, {**TINY_TRAIN, **overrides}, make_data(), out_dir, device="cpu", progress=False)


if __name__ == "__main__":
    main(sys.argv[1:])
