"""Training throughput of the evaluation ConvNet (forward + backward + SGD step + DSA), images/s.

    PYTHONPATH=src python benchmarks/evaluate_throughput.py [--device cpu|cuda] [--threads 1 2]
        [--set-size 18000] [--epochs 1000] [--digits-widths 32 64 128]

Settings timed:
- challenge: 32×32×3, 100 classes, depth 3, width 128 (CIFAR-100's evaluation ConvNet);
- digits: 16×16×1, 10 classes, depth/width from params.yaml digits.evaluate, plus --digits-widths.
For each it prints images/s and what that means: seconds for one ``--epochs``-epoch run on a set of
``--set-size`` images (default: what 30 and 50 images/s of sampling make in 10 minutes, and the
given size), and for the digits default run (9 runs × ``--digits-n`` images × digits epochs).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffdistill.augment import dsa  # noqa: E402
from diffdistill.convnet import ConvNet  # noqa: E402


def throughput(channels, size, classes, depth, width, device, batch=256, warmup=3, iters=8, use_dsa=True,
               fast=False):
    """Training images/s. ``fast``: the step as ``evaluate.fast`` runs it on CUDA (channels-last, DSA's
    per-image draws from a CUDA generator, fused SGD, no ``.item()`` per step); else today's step."""
    device = torch.device(device)
    fast_cuda = fast and device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    model = ConvNet(channels, classes, size, depth=depth, width=width)
    model = model.to(device, memory_format=torch.channels_last) if fast_cuda else model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                          **({"fused": True} if fast_cuda else {}))
    x_all = torch.randn(batch, channels, size, size, generator=gen).to(device)
    y_all = torch.randint(classes, (batch,), generator=gen).to(device)
    aug_gen, pick_gen = gen, None
    if fast_cuda:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
        aug_gen, pick_gen = torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def step():
        x = dsa(x_all, aug_gen, pick_generator=pick_gen) if use_dsa else x_all
        loss = F.cross_entropy(model(x), y_all)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if fast:
            loss_sum.add_(loss.detach())               # summed on the device, no sync
        else:
            loss.item()                               # today's path: a sync per step (GPU)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # img/s of wall time, and img per CPU-second of this process: on a shared (busy) machine the
    # second is the better estimate of what one uncontended core does with 1 thread.
    return batch * iters / wall, batch * iters / max(cpu, 1e-9)


def fmt_seconds(s):
    return f"{s:,.0f} s ({s / 3600:.2f} h)" if s >= 3600 else f"{s:,.0f} s ({s / 60:.1f} min)"


def challenge(args):
    ips, per_cpu = throughput(3, 32, 100, 3, 128, args.device, iters=args.iters, fast=args.fast)
    print(f"challenge 32×32×3 d3 w128{' (fast path)' if args.fast else ''}: {ips:,.0f} img/s wall "
          f"({per_cpu:,.0f} img per CPU-second)")
    for n in args.set_size:
        print(f"  {args.epochs}-epoch run on {n:,} images: {fmt_seconds(n * args.epochs / ips)}")
    for rate in (30, 50):
        n = rate * 600
        print(f"  sampling {rate} img/s × 600 s = {n:,} images -> one run {fmt_seconds(n * args.epochs / ips)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--set-size", type=int, nargs="+", default=[18000, 30000],
                    help="synthetic set sizes (images) for the 1000-epoch projection")
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default 8 on CPU, 100 on CUDA)")
    ap.add_argument("--digits-only", action="store_true", help="skip the 32 px challenge setting")
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--digits-widths", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--digits-n", type=int, default=1400, help="images per digits evaluation run")
    ap.add_argument("--digits-runs", type=int, default=9)
    ap.add_argument("--fast", action="store_true", help="the evaluate.fast step (issue 16) for the challenge row")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")

    if args.iters is None:
        args.iters = 100 if args.device.startswith("cuda") else 8
    dig = yaml.safe_load(Path(args.params).read_text())["digits"]["evaluate"]
    dig_widths = sorted(set(args.digits_widths) | {dig.get("width", 128)})
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# device {args.device} ({dev_name}), torch {torch.__version__}, batch 256, DSA on, "
          f"{os.cpu_count()} CPUs, load average {load:.2f} at start")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## threads {threads}")
        if not args.digits_only:
            challenge(args)
        for w in dig_widths:
            ips, per_cpu = throughput(1, 16, 10, dig.get("depth", 3), w, args.device, iters=args.iters)
            total = args.digits_runs * args.digits_n * dig["epochs"]
            print(f"digits 16×16×1 d{dig.get('depth', 3)} w{w}: {ips:,.0f} img/s wall "
                  f"({per_cpu:,.0f} per CPU-s) -> "
                  f"{args.digits_runs} runs × {args.digits_n} img × {dig['epochs']} epochs = "
                  f"{fmt_seconds(total / ips)}")


if __name__ == "__main__":
    main()
