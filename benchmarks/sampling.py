"""Sampling throughput of U-ViT-S/2 (32 px, 100 classes) and U-ViT-M/4 (64 px, 200 classes).

For each model, precision and batch size it measures:
- images/s of one ``dpm_solver_sample`` call (DPM-Solver-fast, 50 network calls by default);
- the FLOPs per image that implies: the forward pass's FLOPs (matmuls and convolutions, counted
  analytically and cross-checked with ``torch.utils.flop_counter.FlopCounterMode``) × network calls,
  and the share of the device's peak it reaches (``--peak-tflops``, default 989 = H100 SXM bf16 dense;
  pass the right peak for fp32/fp16 rows or another device);
- the sampler's overhead: its wall time against (network calls × one forward pass at the same batch
  and precision), in percent. Everything the solver adds beyond the network shows up here.

Precisions: ``fp32`` (``tf32``: fp32 with TF32 matmuls on CUDA), ``bf16`` and ``fp16``, by converting the
weights (``.to(dtype)``, the solver's state stays float32) or, with ``--autocast``, under autocast.
Weights are random; timing does not depend on them.

    python benchmarks/sampling.py --device cuda --out benchmarks/sampling_h100.json
    python benchmarks/sampling.py --device cpu --batch-sizes 1 2 --steps 3   # < 2 min on a laptop

With ``--step PATH …`` it times the pipeline's own ``sample.sample`` instead (issue 16), once per path:
``step`` is today's step (autocast at ``--step-precision``), ``cast`` adds ``sample.cast_weights``,
``fast`` adds ``sample.compile: --compile-mode`` too. images/s is the median over the batches after
the first (steady state); the first batch's seconds (warm-up, compiling) are reported beside it.

    python benchmarks/sampling.py --device cuda --models s2 --batch-sizes 500 --step step fast

Prints a markdown table; writes JSON only where ``--out`` says. It records nothing by itself.
"""
import argparse
import contextlib
import math
import statistics
import sys
from pathlib import Path

import torch

try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffdistill.diffusion import TIME_SCALE, dpm_solver_sample, network_calls  # noqa: E402
from diffdistill import sample as sample_step  # noqa: E402
from diffdistill.io import save_json  # noqa: E402
from diffdistill.uvit import UViT, count_parameters  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py beside this script
from timing import device_name, timed  # noqa: E402

COMMON = dict(in_chans=3, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, conv=True, skip=True)
MODELS = {
    "s2": ("U-ViT-S/2 32px, 100 classes",
           dict(img_size=32, patch_size=2, embed_dim=512, depth=12, num_heads=8, num_classes=100, **COMMON)),
    "m4": ("U-ViT-M/4 64px, 200 classes",
           dict(img_size=64, patch_size=4, embed_dim=768, depth=16, num_heads=12, num_classes=200, **COMMON)),
    # Toy size for the CPU runs of benchmarks/gpu_suite.py --quick (exercises every path, compile too).
    "tiny": ("U-ViT tiny 8px, 4 classes (CPU test size)",
             dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=4,
                  **dict(COMMON, mlp_ratio=2, in_chans=1))),
}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def analytic_forward_flops(cfg):
    """FLOPs (2 per multiply-add) of one U-ViT forward pass for one image: every Linear and
    convolution, and the two attention matmuls; norms, softmax and element-wise ops left out (<1%)."""
    D, p, C, S = cfg["embed_dim"], cfg["patch_size"], cfg["in_chans"], cfg["img_size"]
    n = (S // p) ** 2
    L = n + (2 if cfg["num_classes"] > 0 else 1)
    hidden = int(D * cfg["mlp_ratio"])
    blocks = 2 * (cfg["depth"] // 2) + 1
    per_block = (2 * L * D * 3 * D          # qkv
                 + 2 * 2 * L * L * D        # q·kᵀ and attention·v
                 + 2 * L * D * D            # proj
                 + 2 * 2 * L * D * hidden)  # fc1, fc2
    flops = blocks * per_block
    flops += (cfg["depth"] // 2) * 2 * L * 2 * D * D if cfg["skip"] else 0  # skip_linear
    flops += 2 * n * (p * p * C) * D        # patch embedding
    flops += 2 * L * D * (p * p * C)        # decoder_pred (on every token, extras dropped after)
    flops += 2 * S * S * C * C * 9 if cfg["conv"] else 0  # final 3×3 conv
    if cfg["mlp_time_embed"]:
        flops += 2 * 2 * D * 4 * D
    return flops


def counted_forward_flops(cfg):
    """FlopCounterMode on the meta device (no memory, no compute; attention decomposes into bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UViT(**cfg).eval()
        x = torch.zeros(1, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
        y = torch.zeros(1, dtype=torch.long) if cfg["num_classes"] > 0 else None
        t = torch.ones(1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    return counter.get_total_flops()


def bench_one(net, cfg, batch, precision, device, args):
    gen = torch.Generator(device=device).manual_seed(0)
    S = cfg["img_size"]
    x_T = torch.randn(batch, cfg["in_chans"], S, S, generator=gen, device=device)
    y = torch.randint(0, cfg["num_classes"], (batch,), generator=gen, device=device)
    in_dtype = torch.float32 if args.autocast else DTYPES[precision]
    x_in = x_T.to(in_dtype)
    t_in = torch.full((batch,), 0.5 * TIME_SCALE, device=device)
    amp = (torch.autocast(device.type, dtype=DTYPES[precision]) if args.autocast and precision in ("bf16", "fp16")
           else contextlib.nullcontext())
    calls = network_calls(args.steps)

    def forward():
        with torch.no_grad(), amp:
            net(x_in, t_in, y)

    def sample():
        with amp:
            dpm_solver_sample(net, x_T, y, steps=args.steps, variant=args.variant)

    forward_s = timed(forward, device, args.repeats * 3, args.warmup + 1)
    sample_s = timed(sample, device, args.repeats, args.warmup)
    images_per_s = batch / sample_s
    flops_per_image = args.forward_flops * calls
    achieved_tflops = flops_per_image * images_per_s / 1e12
    return dict(batch_size=batch, precision=precision, images_per_s=images_per_s, sample_s=sample_s,
                forward_ms=1e3 * forward_s, network_calls=calls,
                overhead_pct=100.0 * (sample_s / (calls * forward_s) - 1.0),
                gflop_per_image=flops_per_image / 1e9, achieved_tflops=achieved_tflops,
                peak_share_pct=100.0 * achieved_tflops / args.peak_tflops)


def step_paths(compile_mode, attention=None):
    """The sample-block settings of each ``--step`` path (issue 16's levers, added one at a time)."""
    extra = {"attention": attention} if attention else {}
    return {"step": {}, "cast": dict(cast_weights=True, **extra),
            "fast": dict(cast_weights=True, compile=compile_mode, **extra)}


def bench_step(key, path, batch, device, args):
    """Time ``sample.sample`` (the pipeline's step) on ``args.step_batches`` full batches of random weights."""
    name, cfg = MODELS[key]
    # Labels over gcd(batch, classes) of the model's classes, so the run is exactly step_batches full
    # batches (timing does not depend on the labels).
    classes = math.gcd(batch, cfg["num_classes"])
    torch.manual_seed(0)
    model = UViT(**cfg).eval()
    block = dict(budget_seconds=None, max_per_class=-(-batch * args.step_batches // classes), batch_size=batch,
                 steps=args.steps, variant=args.variant, precision=args.step_precision, seed=0,
                 **step_paths(args.compile_mode, args.attention)[path])
    _, manifest = sample_step.sample(model, block, classes, device, progress=False)
    seconds = manifest["batch_seconds"]
    steady = seconds[1:] if len(seconds) > 1 else seconds
    return dict(model=key, path=path, precision=args.step_precision, batch_size=batch, batches=len(seconds),
                images=manifest["count"], images_per_s=batch / statistics.median(steady),
                first_batch_s=seconds[0], step_images_per_s=manifest["images_per_second"],
                settings={k: v for k, v in block.items() if k in ("cast_weights", "compile", "attention")})


def step_markdown(rows):
    lines = ["| model | path | precision | batch | batches | images/s (steady) | first batch (s) | images/s (whole run) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['path']} | | {r['batch_size']} | | {r['error']} | | |")
        else:
            lines.append(f"| {r['model']} | {r['path']} | {r['precision']} | {r['batch_size']} | {r['batches']} | "
                         f"{r['images_per_s']:.4g} | {r['first_batch_s']:.3g} | {r['step_images_per_s']:.4g} |")
    return "\n".join(lines)


def run_steps(args, device):
    """``--step``: the pipeline's sampling step per model, batch size and path."""
    rows = []
    for key in args.models:
        for batch in args.batch_sizes:
            for path in args.step:
                try:
                    rows.append(bench_step(key, path, batch, device, args))
                except torch.OutOfMemoryError:
                    rows.append(dict(model=key, path=path, batch_size=batch, error="out of memory"))
                    torch.cuda.empty_cache()
                print(step_markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    result = dict(benchmark="sampling_step", device=device_name(device), torch=torch.__version__,
                  sampler=f"dpm_solver {args.variant}", steps=args.steps, rows=rows)
    print(f"The sample step (sample.sample) on {result['device']}, torch {torch.__version__}, "
          f"DPM-Solver-{args.variant}, {args.steps} network calls\n")
    print(step_markdown(rows))
    if args.out:
        save_json(args.out, result)
    return result


def markdown(rows):
    cols = [("model", "{}"), ("precision", "{}"), ("batch_size", "{}"), ("images_per_s", "{:.4g}"),
            ("sample_s", "{:.4g}"), ("forward_ms", "{:.4g}"), ("overhead_pct", "{:+.2f}"),
            ("gflop_per_image", "{:.1f}"), ("achieved_tflops", "{:.3g}"), ("peak_share_pct", "{:.2f}")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['batch_size']} | {r['error']} |")
        else:
            lines.append("| " + " | ".join(f.format(r[c]) for c, f in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["s2", "m4"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default: 1 2 on CPU; 64 128 256 512 1024 on CUDA")
    p.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), default=None,
                   help="default: fp32 on CPU; fp32 bf16 fp16 on CUDA")
    p.add_argument("--steps", type=int, default=50, help="network calls per sampling call (50; fewer on CPU)")
    p.add_argument("--variant", choices=("fast", "multistep"), default="fast")
    p.add_argument("--autocast", action="store_true", help="autocast instead of converting the weights")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's peak TFLOP/s for the share column (989: H100 SXM bf16 dense)")
    p.add_argument("--repeats", type=int, default=None, help="timed sampling calls (median); default 3, CPU 1")
    p.add_argument("--warmup", type=int, default=None, help="untimed sampling calls first; default 1, CPU 0")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    p.add_argument("--step", nargs="+", choices=("step", "cast", "fast"), default=None,
                   help="time the pipeline's sample.sample on these paths instead (issue 16)")
    p.add_argument("--step-precision", choices=("fp32", "tf32", "bf16", "fp16"), default="bf16",
                   help="sample.precision of the --step runs (CPU runs fp32 whatever it says)")
    p.add_argument("--step-batches", type=int, default=3, help="batches per --step run (first = warm-up)")
    p.add_argument("--compile-mode", default="reduce-overhead", help="sample.compile of the 'fast' path")
    p.add_argument("--attention", default=None, help="sample.attention of the cast/fast paths (CUDA)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if args.steps < 1 or args.peak_tflops <= 0:
        p.error("--steps and --peak-tflops must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = args.batch_sizes or ([64, 128, 256, 512, 1024] if cuda else [1, 2])
    precisions = args.precisions or (["fp32", "bf16", "fp16"] if cuda else ["fp32"])
    if "tf32" in precisions and not cuda:
        p.error("tf32 exists on CUDA only")
    args.repeats = args.repeats if args.repeats is not None else (3 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
    if args.step:
        args.batch_sizes = batch_sizes
        return run_steps(args, device)

    result = dict(benchmark="sampling", device=device_name(device), torch=torch.__version__, compile=args.compile,
                  weights="autocast" if args.autocast else "converted", sampler=f"dpm_solver {args.variant}",
                  steps=args.steps, peak_tflops=args.peak_tflops, models={}, rows=[])
    for key in args.models:
        name, cfg = MODELS[key]
        analytic, counted = analytic_forward_flops(cfg), counted_forward_flops(cfg)
        args.forward_flops = analytic
        result["models"][key] = dict(name=name, config=cfg, forward_gflop_analytic=analytic / 1e9,
                                     forward_gflop_counted=counted / 1e9)
        for precision in precisions:
            if cuda:
                torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
                torch.backends.cudnn.allow_tf32 = precision == "tf32"
            torch.manual_seed(0)
            model = UViT(**cfg).eval()
            result["models"][key]["parameters"] = count_parameters(model)
            model = model.to(device, torch.float32 if args.autocast else DTYPES[precision])
            net = torch.compile(model) if args.compile else model
            for batch in batch_sizes:
                try:
                    row = dict(model=key, **bench_one(net, cfg, batch, precision, device, args))
                except torch.OutOfMemoryError:
                    row = dict(model=key, batch_size=batch, precision=precision, error="out of memory")
                    torch.cuda.empty_cache()
                result["rows"].append(row)
                print(markdown([row]).splitlines()[-1], file=sys.stderr, flush=True)
            del model, net
            if cuda:
                torch.cuda.empty_cache()

    print(f"Sampling throughput on {result['device']}, torch {torch.__version__}, DPM-Solver-{args.variant}, "
          f"{args.steps} network calls, weights {result['weights']}{', compiled' if args.compile else ''}; "
          f"peak for the share column {args.peak_tflops:g} TFLOP/s\n")
    for key, m in result["models"].items():
        print(f"- {m['name']}: {m['parameters']:,} parameters, forward {m['forward_gflop_analytic']:.2f} GFLOP/image "
              f"(FlopCounterMode {m['forward_gflop_counted']:.2f})")
    print()
    print(markdown(result["rows"]))
    if args.out:
        save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
