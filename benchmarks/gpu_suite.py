"""Issue 16's measurements, today's path and the opt-in fast path side by side, in one run.

    python benchmarks/gpu_suite.py [--quick] [--out DIR]      # DIR: $OUT, else benchmarks/out/

Parts (each row: old path, then fast path, same process, same card):
1. sampling: the pipeline's ``sample.sample`` (benchmarks/sampling.py --step) for U-ViT-S/2 (32 px,
   100 classes, batch 500 as the paper blocks) and U-ViT-M/4 (64 px, 200 classes, batch 1000), 50 calls
   of DPM-Solver-fast, random weights. Old: bf16 autocast (today's step). Fast: bf16 weights +
   torch.compile (--compile-mode, default reduce-overhead = CUDA graphs).
2. fidelity, same noise: (a) S/2 with random weights, mean |Δpixel| (0–255) of the fast path and of
   today's bf16 step against the fp32 path (no TF32); no classifier (random weights make no classes).
   (b) the digits U-ViT trained here for --digits-steps steps, the same |Δpixel| and the share of
   images a reference ConvNet (trained here on the real digits split) labels the same; its accuracy on
   the real test split and on the fp32 samples is reported so the agreement can be judged.
3. ConvNet training images/s, 32 px, width 128, batch 256, DSA (evaluate_throughput.throughput),
   today's step against evaluate.fast's.
4. the finetuning step, U-ViT-S/2 bf16 batch 256 (benchmarks/uvit_step.py), today's code only.
5. accuracy parity: evaluate_run on 100 real digits per class, seeds 0 1 2, evaluate.fast off and on,
   the digits evaluate block of params.yaml (width 32, Epoch 50); mean ± std per path.

Writes suite.json and suite.md under the output folder and prints the markdown.

Device-time estimate on one H100 (from benchmarks/RESULTS.md's rates; compile times are guesses,
to be replaced by the measured ones the JSON records per part): sampling S/2 3 × 500 images per path
at 181–400 images/s ≈ 15 s + ≈ 60 s compiling; M/4 3 × 1000 at 105–140 ≈ 50 s + ≈ 60 s; fidelity
≈ 30 s sampling + ≈ 60 s compiling + digits training (2,000 steps of a 0.6M-parameter model) ≈ 30 s;
ConvNet 2 × 300 steps at ≥ 50,000 images/s ≈ 5 s; finetuning step ≈ 20 s; parity 6 runs of 51 epochs
× 1,000 images ≈ 30 s. About 6 min in all, under the 8 the issue allows; --quick runs every part at
toy size (tiny U-ViT for the sampling rows) in about 3 min on a 2-core CPU.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate_throughput  # noqa: E402
import sampling  # noqa: E402
import uvit_step  # noqa: E402
from diffdistill import data, diffusion, evaluate  # noqa: E402
from diffdistill import sample as sample_step  # noqa: E402
from diffdistill.uvit import UViT  # noqa: E402
from timing import device_name  # noqa: E402


def _sample(model, classes, per_class, batch, steps, device, **settings):
    block = dict(budget_seconds=None, max_per_class=per_class, batch_size=batch, steps=steps, variant="fast",
                 seed=0, **settings)
    image_set, _ = sample_step.sample(model, block, classes, device, progress=False)
    return image_set


def _compare(ref, other, name, classify=None):
    a, b = ref["images"].astype(np.int16), other["images"].astype(np.int16)
    row = dict(path=name, images=len(a), mean_abs_pixel_diff=float(np.abs(a - b).mean()),
               max_abs_pixel_diff=int(np.abs(a - b).max()))
    if classify is not None:
        row["label_agreement"] = float((classify(ref["images"]) == classify(other["images"])).mean())
    return row


def fidelity(args, device):
    """Part 2: same noise, the fast path and today's step against the fp32 path."""
    rows, fp32 = [], dict(precision="fp32")
    paths = {"step (bf16 autocast)": dict(precision="bf16"),
             "fast": dict(precision="bf16", cast_weights=True, compile=args.fidelity_compile)}
    # (a) S/2 (tiny in --quick), random weights: pixels only.
    key = "tiny" if args.quick else "s2"
    cfg = sampling.MODELS[key][1]
    torch.manual_seed(0)
    model = UViT(**cfg).eval()
    n_per = args.fidelity_images // cfg["num_classes"]
    ref = _sample(model, cfg["num_classes"], n_per, args.fidelity_batch, args.steps, device, **fp32)
    for name, settings in paths.items():
        other = _sample(model, cfg["num_classes"], n_per, args.fidelity_batch, args.steps, device, **settings)
        rows.append(dict(model=f"{key}, random weights", **_compare(ref, other, name)))
    # (b) the digits U-ViT, trained here, and a reference ConvNet on the real split.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["digits"]
    train_set, test_set = data.build(params["data"])
    digits = _train_digits_uvit(params["model"], train_set, args.digits_steps, device)
    ccfg = dict(params["classifier"], epochs=args.classifier_epochs, seeds=[0])
    mean, std = evaluate.normalization(ccfg, train_set["images"])
    clf, _ = evaluate.train_classifier(train_set, ccfg, 0, device=device, progress=False, mean=mean, std=std)

    def classify(images):
        return evaluate.predict(clf, images, mean, std, device=device)

    ref = _sample(digits, 10, args.digits_per_class, args.digits_batch, args.digits_calls, device, **fp32)
    info = dict(classifier_test_accuracy=float((classify(test_set["images"]) == test_set["labels"]).mean()),
                classifier_accuracy_on_fp32_samples=float((classify(ref["images"]) == ref["labels"]).mean()))
    for name, settings in paths.items():
        other = _sample(digits, 10, args.digits_per_class, args.digits_batch, args.digits_calls, device, **settings)
        rows.append(dict(model=f"digits, {args.digits_steps} steps", **_compare(ref, other, name, classify), **info))
    return rows


def _train_digits_uvit(model_cfg, train_set, steps, device):
    """The digits U-ViT, trained for ``steps`` AdamW steps (batch 128, lr 2e-3, fp32): a model with
    classes in it, for the label agreement. Not the pipeline's training (no EMA, no warm-up)."""
    torch.manual_seed(0)
    model = UViT(**model_cfg).to(device).train()
    x_all = data.to_model_space(train_set["images"]).to(device)
    y_all = torch.as_tensor(train_set["labels"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.03, betas=(0.99, 0.999))
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(y_all), (128,), device=device, generator=gen)
        loss = diffusion.training_loss(model, x_all[idx], y_all[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def convnet(args, device):
    """Part 3: the challenge ConvNet's training images/s, today's step and the fast one."""
    rows = []
    for fast in (False, True):
        ips, _ = evaluate_throughput.throughput(3, 32, 100, 3, args.convnet_width, device, batch=256,
                                                iters=args.convnet_iters, fast=fast)
        rows.append(dict(path="fast" if fast else "today", width=args.convnet_width, batch=256, images_per_s=ips))
    return rows


def parity(args, device):
    """Part 5: evaluation accuracy, evaluate.fast off and on, 3 seeds, on real digits (100 per class)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["digits"]
    train_set, test_set = data.build(params["data"])
    subset = evaluate.random_real_subset(train_set, np.repeat(np.arange(10), args.parity_per_class), seed=0)
    mean, std = evaluate.normalization(params["evaluate"], train_set["images"])
    rows = []
    for fast in (False, True):
        cfg = dict(params["evaluate"], epochs=args.parity_epochs, fast=fast)
        accs, seconds = [], 0.0
        for seed in (0, 1, 2):
            r = evaluate.evaluate_run(subset, test_set, cfg, seed, device=device, progress=False, mean=mean, std=std)
            accs.append(r["accuracy"])
            seconds += r["seconds"]
        rows.append(dict(path="fast" if fast else "today", epochs=cfg["epochs"] + 1, accuracies=accs,
                         mean=float(np.mean(accs)), std=float(np.std(accs)), train_seconds=seconds))
    return rows


def markdown(result):
    out = [f"# Issue 16 suite on {result['device']}, torch {result['torch']}{' (--quick)' if result['quick'] else ''}", ""]
    out += ["## Sampling: the sample step, today's path and the fast path", ""]
    out += [sampling.step_markdown(result["sampling"]), ""]
    out += ["## Fidelity: same noise, against the fp32 path", "",
            "| model | path | images | mean abs pixel diff (0-255) | max | label agreement |", "|---|---|---|---|---|---|"]
    for r in result["fidelity"]:
        agree = f"{r['label_agreement']:.4f}" if "label_agreement" in r else "n/a (random weights)"
        out.append(f"| {r['model']} | {r['path']} | {r['images']} | {r['mean_abs_pixel_diff']:.3f} | "
                   f"{r['max_abs_pixel_diff']} | {agree} |")
    digits = [r for r in result["fidelity"] if "classifier_test_accuracy" in r]
    if digits:
        out += ["", f"Reference ConvNet: {digits[0]['classifier_test_accuracy']:.4f} on the real digits test split, "
                    f"{digits[0]['classifier_accuracy_on_fp32_samples']:.4f} on the fp32 samples' labels."]
    out += ["", "## ConvNet training, 32 px, batch 256, DSA", "", "| path | width | images/s |", "|---|---|---|"]
    out += [f"| {r['path']} | {r['width']} | {r['images_per_s']:,.0f} |" for r in result["convnet"]]
    out += ["", "## Finetuning step (benchmarks/uvit_step.py)", "",
            uvit_step.markdown(result["uvit_step"]["rows"], ""), ""]
    out += ["## Accuracy parity, digits (real subset), evaluate.fast off and on", "",
            "| path | epochs | seeds 0 1 2 | mean | std |", "|---|---|---|---|---|"]
    out += [f"| {r['path']} | {r['epochs']} | {' '.join(f'{a:.4f}' for a in r['accuracies'])} | {r['mean']:.4f} | "
            f"{r['std']:.4f} |" for r in result["parity"]]
    out += ["", "Part wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes: every part in a few minutes on a CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "out"))
    p.add_argument("--compile-mode", default=None, help="sample.compile of the fast path (reduce-overhead)")
    p.add_argument("--parts", nargs="+", default=["sampling", "fidelity", "convnet", "uvit_step", "parity"])
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    q = args.quick
    args.steps = 2 if q else 50
    mode = args.compile_mode or ("default" if device.type == "cpu" else "reduce-overhead")
    args.fidelity_compile = False if q else mode               # --quick: the tiny sampling rows compile
    args.fidelity_images, args.fidelity_batch = (8, 8) if q else (300, 300)
    args.digits_steps, args.digits_per_class, args.digits_batch, args.digits_calls = \
        (20, 2, 20, 2) if q else (2000, 30, 300, 25)
    args.classifier_epochs = 2 if q else 30
    args.convnet_width, args.convnet_iters = (16, 3) if q else (128, 300)
    args.parity_per_class, args.parity_epochs = (10, 1) if q else (100, 50)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(device=device_name(device), torch=torch.__version__, quick=q, compile_mode=mode, seconds={})

    def part(name, fn):
        if name not in args.parts:
            result[name] = [] if name != "uvit_step" else {"rows": []}
            return
        t0 = time.perf_counter()
        result[name] = fn()
        result["seconds"][name] = time.perf_counter() - t0
        print(f"[gpu_suite] {name}: {result['seconds'][name]:.0f} s", file=sys.stderr, flush=True)

    def sampling_rows():
        rows = []
        for key, batch in ((("tiny", 4),) if q else (("s2", 500), ("m4", 1000))):
            r = sampling.main(["--device", str(device), "--models", key, "--batch-sizes", str(batch), "--steps",
                               str(args.steps), "--step", "step", "fast", "--step-precision", "bf16",
                               "--step-batches", "2" if q else "3", "--compile-mode", mode])
            rows += r["rows"]
        return rows

    part("sampling", sampling_rows)
    part("fidelity", lambda: fidelity(args, device))
    part("convnet", lambda: convnet(args, device))
    part("uvit_step", lambda: uvit_step.main(
        ["--device", str(device), "--batch-sizes", "2" if q else "256", "--precisions", "fp32" if q else "bf16",
         "--steps", str(args.steps), "--repeats", "1" if q else "5", "--warmup", "0" if q else "2",
         "--sample-repeats", "1", "--sample-warmup", "0" if q else "1"]))
    part("parity", lambda: parity(args, device))
    (out / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "suite.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
