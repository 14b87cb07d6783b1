"""Time one training step and one sampling call of U-ViT-S/2 at 32 px (100 classes).

A training step is forward + backward + AdamW (the paper's lr 2e-4, weight decay 0.03, betas
(0.99, 0.999)) on the ε-prediction loss; a sampling call is one ``dpm_solver_sample`` (DPM-Solver-fast,
50 network calls by default). Weights are random: timing does not depend on them.

    python benchmarks/uvit_step.py --device cuda --batch-sizes 128 256 512 --precisions fp32 bf16 \
        --out benchmarks/uvit_step_h100.json

Prints a markdown table; writes JSON only where ``--out`` says. It records nothing by itself.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffdistill.diffusion import dpm_solver_sample, network_calls, training_loss  # noqa: E402
from diffdistill.io import save_json  # noqa: E402
from diffdistill.uvit import UViT, count_parameters  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py beside this script
from timing import device_name, sync, timed  # noqa: E402

S2_CIFAR100 = dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
                   qkv_bias=False, mlp_time_embed=False, num_classes=100, conv=True, skip=True)
PRECISIONS = ("fp32", "tf32", "bf16")


def precision_context(precision, device):
    """fp32: plain float32; tf32: float32 with TF32 matmuls (CUDA); bf16: autocast to bfloat16."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    elif precision == "tf32":
        raise ValueError("tf32 exists on CUDA only; use --precisions fp32 (or bf16) on CPU")
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_one(model, batch, precision, device, args):
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, 3, 32, 32, generator=gen, device=device) * 2 - 1
    y = torch.randint(0, 100, (batch,), generator=gen, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999))
    step_fn = torch.compile(model) if args.compile else model

    def train_step():
        with precision_context(precision, device):
            loss = training_loss(step_fn, x0, y, generator=gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    x_T = torch.randn(batch, 3, 32, 32, generator=gen, device=device)

    def sample_call():
        with precision_context(precision, device):
            dpm_solver_sample(step_fn, x_T, y, steps=args.steps, variant="fast")

    row = dict(batch_size=batch, precision=precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    row["train_step_s"] = timed(train_step, device, args.repeats, args.warmup)
    row["train_images_per_s"] = batch / row["train_step_s"]
    if device.type == "cuda":
        row["train_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del opt
    model.eval()
    row["sample_s"] = timed(sample_call, device, args.sample_repeats, args.sample_warmup)
    row["sample_images_per_s"] = batch / row["sample_s"]
    row["network_calls"] = network_calls(args.steps)
    return row


def markdown(rows, header):
    cols = ["batch_size", "precision", "train_step_s", "train_images_per_s", "sample_s", "sample_images_per_s"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch_size']} | {r['precision']} | {r['error']} |")
            continue
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default: 2 on CPU, 128 256 on CUDA")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="default: fp32 on CPU, fp32 bf16 on CUDA")
    p.add_argument("--steps", type=int, default=50, help="network calls of the sampling call (50)")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--sample-warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    batch_sizes = args.batch_sizes or ([128, 256] if cuda else [2])
    precisions = args.precisions or (["fp32", "bf16"] if cuda else ["fp32"])

    torch.manual_seed(0)
    model = UViT(**S2_CIFAR100).to(device)
    rows = []
    for precision in precisions:
        for batch in batch_sizes:
            try:
                rows.append(bench_one(model, batch, precision, device, args))
            except torch.OutOfMemoryError:
                rows.append(dict(batch_size=batch, precision=precision, error="out of memory"))
                torch.cuda.empty_cache()
            print(markdown(rows[-1:], ""), file=sys.stderr)
    result = dict(benchmark="uvit_step", model="U-ViT-S/2 32px 100 classes", parameters=count_parameters(model),
                  device=device_name(device), torch=torch.__version__, compile=args.compile,
                  sampler="dpm_solver fast", steps=args.steps, rows=rows)
    print(markdown(rows, f"U-ViT-S/2 (32 px, 100 classes) on {result['device']}, torch {torch.__version__}"
                         f"{', compiled' if args.compile else ''}; sampling: DPM-Solver-fast, {args.steps} calls"))
    if args.out:
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
