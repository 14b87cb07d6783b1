"""`python -m diffdistill <step>`: one subcommand per pipeline step (each Snakemake rule is one call).

Every step takes `--params` (params.yaml, then override files; later ones win), `--dataset` where it
works on one, explicit input and output paths, and `--log-file` (a copy of its log lines; not `--log`,
which torchrun would take as an abbreviation of its own `--log-dir`), and `--threads`, the CPU threads
the step computes with (Snakemake's rules and the dvc.yaml generated from them pass the same count).
"""
import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("diffdistill")


# ---------------------------------------------------------------- shared plumbing

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class _WithoutTraceback(logging.Formatter):
    """The console's lines when a log file holds the tracebacks: one line per record."""

    def format(self, record):
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


# `log.info(..., extra=HEADLINE)`: the one line of a finished step that also reaches the console
# when a log file takes the rest.
HEADLINE = {"headline": True}


def _console_worthy(record):
    return record.levelno >= logging.WARNING or getattr(record, "headline", False)


def _setup_logging(log_path):
    """Log lines to the console and, with --log-file, to that file; returns the log file's path or None.
    Under torchrun every process but rank 0 writes beside it (``LOG.rank1`` …).

    With a log file (every Snakemake job has one, and several jobs share one terminal) the file gets
    every line and the console only warnings, errors and the step's headline; without one the console
    gets every line. Progress bars only when stderr is a terminal and no log file is named
    (progress.py); otherwise progress is log lines."""
    from . import progress

    console = logging.StreamHandler(sys.stderr)
    handlers, path = [console], None
    if log_path:
        rank = int(os.environ.get("RANK", "0"))
        path = Path(f"{log_path}.rank{rank}" if rank else log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
        console.setFormatter(_WithoutTraceback(FORMAT))  # tracebacks go to the file only
        console.addFilter(_console_worthy)
    logging.basicConfig(level=logging.INFO, format=FORMAT, handlers=handlers, force=True)
    progress.configure(bars=not log_path and progress.stderr_is_terminal())
    return path


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _set_threads(n):
    """Compute with ``n`` CPU threads, before any work. The trained weights depend on the thread count
    (the order of floating-point sums), so the count is part of the command: Snakemake's rules pass
    their `threads:` and dvc.yaml, generated from them, the same. The environment carries it to child
    processes (torchrun's workers, spawned sampling workers)."""
    if n is None:
        return
    for var in THREAD_VARIABLES:
        os.environ[var] = str(n)
    import torch
    torch.set_num_threads(n)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads, 1 or more; got {text!r}")
    return value


def _params(args):
    from .config import load_params
    return load_params(args.params or ["params.yaml"])


def _block(args):
    from .config import dataset_params
    return dataset_params(_params(args), args.dataset)


def _device(args, section, params=None):
    """The step's device (config.step_device): --device, else params' `device:`, else auto; a step
    whose ``section`` asks for a GPU stops here, before reading anything, when there is none."""
    from .config import step_device
    return step_device(params if params is not None else _params(args), args.dataset, section, args.device)


def _weights_path(params, name):
    return Path("weights") / params["weights"][name]["filename"]


# ---------------------------------------------------------------- steps

def _archive_path(args, data_cfg):
    """--archive, else data/downloads/{dataset}/<the kind's archive name>; None for kinds without one."""
    from .data import archive_name
    name = archive_name(data_cfg)
    if getattr(args, "archive", None):
        return Path(args.archive)
    return Path("data/downloads") / args.dataset / name if name else None


def cmd_download(args):
    from .data import download
    data_cfg = _block(args)["data"]
    out = args.out or _archive_path(args, data_cfg)
    download(data_cfg, out)
    return f"{out}"


def cmd_prepare(args):
    from .data import prepare
    data_cfg = _block(args)["data"]
    train, test = prepare(data_cfg, args.out, archive=_archive_path(args, data_cfg))
    return f"{len(train['labels'])} training and {len(test['labels'])} test images, {len(train['classes'])} classes"


def cmd_fetch_weights(args):
    from .weights import fetch
    entry = _params(args)["weights"][args.name]
    fetch(entry["source"], args.out, checksum=entry.get("checksum"))
    return f"{args.name} -> {args.out}"


def cmd_classifier(args):
    from .classifier import train_reference_classifier
    from .io import load_npz
    params = _params(args)
    device = _device(args, "classifier", params)
    history = train_reference_classifier(load_npz(args.train), params[args.dataset]["classifier"], args.out,
                                         seed=0, device=device)
    return f"training accuracy {history['train_acc'][-1]:.4f} after {len(history['train_acc'])} epochs"


def cmd_fid_stats(args):
    from .fid import write_stats
    from .io import load_npz
    params = _params(args)
    device = _device(args, "fid", params)
    block = params[args.dataset]
    inception = _weights_path(params, "fid_inception") if block["fid"]["features"] == "inception" else None
    write_stats(block["fid"], load_npz(args.train), args.out, inception_weights=inception,
                classifier_path=args.classifier, device=device)
    return f"{block['fid']['features']} statistics -> {args.out}"


def cmd_train(args):
    import os

    import torch

    from .data import load_split
    from .train import make_training_fid, train
    params = _params(args)
    block = params[args.dataset]
    device = _device(args, "train", params)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= visible:
            raise ValueError(f"torchrun started process {local_rank} but only {visible} CUDA device(s) are "
                             f"visible; set {args.dataset}.train.gpus to at most {visible} or allocate more GPUs")
        device = torch.device("cuda", local_rank)
    init = None
    if block.get("pretrained"):
        init = _weights_path(params, block["pretrained"])
    eval_fn = make_training_fid(block, args.fid_stats, device) if args.fid_stats else None
    summary = train(block["model"], block["train"], load_split(args.data, "train"), args.out,
                    init_state_dict=init, eval_fn=eval_fn, device=device)
    fid = f", best FID {summary['best_fid']:.4g} at step {summary['best_fid_step']}" if summary.get("best_fid") else ""
    loss = summary.get("final_loss_mean100")
    loss = f", loss {loss:.4f} (mean of the last {min(100, summary['steps'])} steps)" if loss is not None else ""
    return f"{summary['steps']} steps{loss}{fid}"


def cmd_sample(args):
    from .config import step_device
    from .checkpoint import check_checkpoint
    from .parallel import sample_devices, sample_parallel
    from .sample import write
    params = _params(args)
    block = params[args.dataset]
    if args.devices:   # chosen by hand: each as --device would take it (a CUDA one must exist)
        devices = [step_device(params, args.dataset, "sample", d.strip())
                   for d in args.devices.split(",") if d.strip()]
    else:
        devices = sample_devices(block["sample"].get("gpus", 0), _device(args, "sample", params))
        if len(devices) == 1 and int(block["sample"].get("gpus", 0) or 0) > 1:
            log.info("sample.gpus is %s but the device is %s: sampling in one process",
                     block["sample"]["gpus"], devices[0])
    if devices[0].type != "cuda" and block["sample"].get("precision") in ("bf16", "fp16"):
        log.info("sample.precision %s on %s: sampling in fp32 (autocast is used on CUDA only)",
                 block["sample"]["precision"], devices[0])
    cfg = dict(block["sample"])
    cfg["classes"] = _class_names(args)
    check_checkpoint(block["model"], args.checkpoint, block.get("train"))
    if len(devices) > 1:
        log.info("sampling on %d devices: %s", len(devices), ", ".join(str(d) for d in devices))
    image_set, manifest = sample_parallel(block["model"], args.checkpoint, cfg, block["model"]["num_classes"],
                                          devices, train_cfg=block.get("train"))
    write(args.out, image_set, manifest)
    return "sampled %d images in %.1f s (%.1f images/s)%s" % (
        manifest["count"], manifest["seconds"], manifest["images_per_second"],
        f", {manifest['dropped_for_balance']} dropped to keep classes balanced"
        if manifest.get("dropped_for_balance") else "")


def _class_names(args):
    path = Path("data") / args.dataset / "test.npz"
    if path.exists():
        from .io import load_npz
        return [str(c) for c in load_npz(path)["classes"]]
    return None


def cmd_select(args):
    import numpy as np

    from .fid import features, make_extractor
    from .io import load_npz, save_npz
    from .select import select
    params = _params(args)
    device = _device(args, "select", params)
    cfg = params[args.dataset]["select"]
    samples = load_npz(args.samples)
    feats = scores = None
    if cfg["strategy"] in ("kcenter", "confidence"):
        if not args.classifier:
            raise ValueError(f"select.strategy {cfg['strategy']!r} needs the reference classifier: pass --classifier")
        reference = make_extractor("convnet", convnet_path=args.classifier, device=device)
        if cfg["strategy"] == "kcenter":
            feats = features(samples["images"], reference, batch_size=512)
        else:  # the classifier's probability of each image's own label
            scores = reference.probabilities(samples["images"])[np.arange(len(samples["labels"])), samples["labels"]]
    chosen = select(samples, cfg["strategy"], cfg.get("images_per_class"), seed=cfg.get("seed", 0),
                    features=feats, scores=scores)
    counts = np.bincount(chosen["labels"], minlength=len(chosen["classes"]))
    save_npz(args.out, **chosen)
    return "selected %d of %d images (%s, %d-%d per class)" % (
        len(chosen["labels"]), len(samples["labels"]), cfg["strategy"], counts.min(), counts.max())


def cmd_export(args):
    from .evaluate import normalization
    from .io import load_npz
    from .export import CHALLENGE_IPC, export_challenge, export_pngs
    block = _block(args)
    image_set = load_npz(args.samples)
    train = load_npz(Path("data") / args.dataset / "train.npz")
    mean, std = normalization(block["evaluate"], train["images"])
    ipc = args.images_per_class or (block.get("export") or {}).get("images_per_class")
    if args.dataset in CHALLENGE_IPC and ipc != CHALLENGE_IPC[args.dataset]:
        log.warning("export: %s images per class, but the challenge's evaluator asserts %d per class for %s",
                    ipc if ipc else "all (the smallest class count)", CHALLENGE_IPC[args.dataset], args.dataset)
    images_path, labels_path = export_challenge(image_set, mean, std, ipc, args.out, labels_path=args.labels)
    if args.png_dir:
        export_pngs(image_set, args.png_dir)
    return f"{images_path} (images) and {labels_path} (labels)"


def cmd_evaluate(args):
    from .classifier import load_teacher
    from .evaluate import evaluate_run, normalization, protocol_settings, random_real_subset
    from .io import load_npz, save_json
    from .imageset import balanced_prefix
    params = _params(args)
    device = _device(args, "evaluate", params)
    block = params[args.dataset]
    eval_cfg = block["evaluate"]
    train_set, test_set = load_npz(args.train), load_npz(args.test)
    real_train = load_npz(Path(args.test).with_name("train.npz"))
    mean, std = normalization(eval_cfg, real_train["images"])
    like = load_npz(args.like) if args.like else None
    if args.images_per_class:  # a sweep point: the balanced prefix of the generated set
        if like is not None:
            like = balanced_prefix(like, args.images_per_class)
        else:
            train_set = balanced_prefix(train_set, args.images_per_class)
    if like is not None:
        train_set = random_real_subset(train_set, like["labels"], seed=args.seed, cap=True)
    if (args.protocol == "soft") != bool(args.teacher):
        raise ValueError("evaluate: --protocol soft needs --teacher (the reference classifier, classifier.pt), "
                         "and --teacher is only for --protocol soft")
    teacher = load_teacher(args.teacher, mean, std, device) if args.teacher else None
    result = evaluate_run(train_set, test_set, protocol_settings(eval_cfg, args.protocol, block.get("ddranking")),
                          seed=args.seed, device=device, name=args.set, mean=mean, std=std,
                          state_path=args.state, teacher=teacher)
    if args.images_per_class:
        result["images_per_class"] = args.images_per_class
    if args.protocol != "challenge":
        result["protocol"] = args.protocol
    save_json(args.out, result)
    # The state only serves an interrupted run: once the result is written it goes, so a later
    # rerun (e.g. after a code change) trains afresh and evaluate states do not pile up on disk.
    if args.state and Path(args.state).exists():
        Path(args.state).unlink()
    ipc = f" ipc {args.images_per_class}" if args.images_per_class else ""
    protocol = f" ({args.protocol})" if args.protocol != "challenge" else ""
    return (f"{args.set}{ipc}{protocol} seed {args.seed}",
            "accuracy %.4f on %d test images" % (result["accuracy"], len(test_set["labels"])))


def cmd_summarize(args):
    from .ddranking import dd_ranking
    from .evaluate import summarize
    from .io import load_json, save_json
    from .tables import table_summary
    summary = summarize([load_json(p) for p in args.runs])
    for key, paths in (("no_augmentation", args.plain_runs), ("soft_labels", args.soft_runs)):
        if paths:
            summary[key] = summarize([load_json(p) for p in paths])
    summary["dd_ranking"] = dd_ranking(summary)
    save_json(args.out, summary)
    table_summary(args.out, args.table, dataset=args.dataset)
    return ", ".join(f"{name} {summary[name]['mean']:.4f} ± {summary[name]['std']:.4f}"
                     for name in ("synthetic", "random_real", "full_real") if name in summary)


def cmd_fid(args):
    from .fid import fid_against_stats
    from .io import load_npz, save_json
    params = _params(args)
    device = _device(args, "fid", params)
    block = params[args.dataset]
    samples = load_npz(args.samples)
    n = min(len(samples["labels"]), block["fid"]["final_samples"])
    t0 = time.time()
    value = fid_against_stats(samples["images"][:n], args.stats, device)
    key = f"fid_{block['fid']['features']}"
    save_json(args.out, {key: value, "n_samples": n, "seconds": round(time.time() - t0, 2)})
    return "%s = %.3f on %d samples" % (key, value, n)


def cmd_sweep(args):
    from .sweep import summarize_sweep, write_sweep
    from .io import load_json
    block = _block(args)
    result = summarize_sweep(args.runs, load_json(args.manifest), num_classes=block["model"]["num_classes"])
    write_sweep(result, args.out, args.figure)
    return f"{len(args.runs)} runs -> {args.out}, {args.figure}"


def cmd_audit(args):
    from .audit import audit, write_audit
    from .fid import make_extractor
    from .io import load_npz
    device = _device(args, "audit")
    reference = make_extractor("convnet", convnet_path=args.classifier, device=device)

    def reference_features(images):
        import torch
        with torch.no_grad():
            return reference(images).cpu()

    result = audit(load_npz(args.samples), load_npz(args.train), load_npz(args.test),
                   features_fn=reference_features, device=device)
    write_audit(result, args.out, args.hist, args.pairs)
    flagged = {name: len(space.get("flagged", [])) for name, space in result.get("spaces", {}).items()}
    return f"{result.get('n_generated')} generated images; flagged as memorised: " + (
        ", ".join(f"{n} in {name} space" for name, n in flagged.items()) or "none")


def cmd_report(args):
    from .report import build_report
    build_report(_params(args), args.datasets, root=".", out_dir=args.out)
    return f"tables and figures in {args.out}"


def cmd_dvc_yaml(args):
    from .dag import dvc_yaml
    text = dvc_yaml(".")
    if args.check:
        current = Path(args.out).read_text() if Path(args.out).exists() else ""
        if current != text:
            raise SystemExit(f"{args.out} is stale: run `python -m diffdistill dvc-yaml` and commit it")
        print(f"{args.out} matches the Snakemake DAG")
        return
    from .io import atomic_path
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out}")


# ---------------------------------------------------------------- argument parsing

def required(help, **kwargs):
    return dict(required=True, help=help, **kwargs)


def optional(help, **kwargs):
    return dict(help=help, **kwargs)


# Every step's shared arguments; --dataset only for the steps that work on one dataset.
COMMON_ARGUMENTS = {
    "--params": optional("params.yaml, then override files, later ones win (repeatable; default params.yaml)",
                         action="append"),
    "--log-file": optional("also write the log (and any traceback) to this file", dest="log"),
    "--threads": optional("CPU threads to compute with (torch and OpenMP); default: torch's own choice",
                          type=_positive_int),
    "--device": optional("auto | cpu | cuda | cuda:N; beats params' `device:`. auto: CUDA when there is one; "
                         "without one a step whose params ask for a GPU (gpus > 0, bf16/fp16) stops "
                         "unless the CPU is asked for (--device cpu or `device: cpu`)", default="auto"),
}
DATASET_ARGUMENT = required("a dataset block of params.yaml (digits, cifar100, tinyimagenet, or your own)")

# The files several steps read, with one help text each.
REAL_TRAIN = "the real training split, data/DATASET/train.npz"
REAL_TEST = "the real test split, data/DATASET/test.npz"
GENERATED = "the generated images, synthetic/DATASET/samples.npz"


@dataclass(frozen=True)
class Step:
    """A subcommand: ``help`` is the one line `diffdistill --help` lists, ``description`` what
    `STEP --help` says the step reads and writes; it runs ``cmd_<name>`` (dashes as underscores)."""
    name: str
    help: str
    description: str
    arguments: dict
    dataset: bool = True


STEPS = (
    Step("download", "fetch and verify a dataset's archive (data.source, data.checksum)",
         "Reads DATASET's data.source and data.checksum; writes the archive (checksum-verified, never a "
         "partial file) to --out. Only kinds with a public archive (cifar100, tinyimagenet) download.",
         {"--out": optional("where the archive goes; default data/downloads/DATASET/<archive name>")}),
    Step("prepare", "prepare a dataset into data/{ds}/{train,test}.npz",
         "Reads the dataset named by DATASET's data.kind: digits (scikit-learn's bundled digits, no "
         "download), cifar100 / tinyimagenet (the archive of the download step, --archive), or folder (an "
         "ImageFolder tree, data.root, tested on data.test_root or a fixed stratified split). Writes "
         "OUT/train.npz and OUT/test.npz (images uint8 [N,H,W,C], labels, classes).",
         {"--out": required("the folder for train.npz and test.npz (data/DATASET)"),
          "--archive": optional("the downloaded archive (cifar100, tinyimagenet); "
                                "default data/downloads/DATASET/<archive name>; unused by digits and folder")}),
    Step("fetch-weights", "fetch and verify a file of params.yaml's weights:",
         "Reads the entry NAME of params.yaml's weights: (URL or Google Drive id, checksum); writes the "
         "file to --out, checksum-verified (a null checksum records the first download's hash beside it).",
         {"--name": required("a key of params.yaml's weights: block"),
          "--out": required("where the file goes (weights/<filename>)")}, dataset=False),
    Step("classifier", "train the reference classifier (ConvNet) on the real training split",
         "Reads the real training split (--train) and DATASET's classifier section; writes the trained "
         "ConvNet to --out (its features serve fid_convnet, k-center selection and the audit).",
         {"--train": required(REAL_TRAIN),
          "--out": required("the classifier checkpoint, data/DATASET/classifier.pt")}),
    Step("fid-stats", "FID reference statistics of the real training split",
         "Reads the real training split and DATASET's fid section (features: inception or convnet); "
         "writes the mean and covariance of its features to --out.",
         {"--train": required(REAL_TRAIN),
          "--classifier": optional("the reference classifier, for fid.features: convnet"),
          "--out": required("the statistics file, data/DATASET/fid_stats.npz")}),
    Step("train", "finetune/train the U-ViT (resumes from OUT/state.pt)",
         "Reads DATA/train.npz, DATASET's model, pretrained and train sections (and the pretrained "
         "U-ViT they name); writes to OUT: ema.pt (the EMA weights sampling uses), state.pt (resume), "
         "loss.csv, fid_curve.csv, train.json. Resumes from OUT/state.pt when it exists.",
         {"--data": required("the folder with train.npz (data/DATASET)"),
          "--out": required("the checkpoint folder (checkpoints/DATASET)"),
          "--fid-stats": optional("FID reference statistics for the FID curve (data/DATASET/fid_stats.npz); "
                                  "without them no curve is measured")}),
    Step("sample", "timed, class-balanced sampling with the EMA weights",
         "Reads the EMA weights (--checkpoint) and DATASET's model and sample sections (budget, "
         "sampler, steps, batch size); samples class-balanced batches until the time budget is spent; "
         "writes OUT/samples.npz and OUT/manifest.json (count, per-class counts, seconds, images/s, "
         "timeline, device, sampler).",
         {"--checkpoint": required("the EMA weights, checkpoints/DATASET/ema.pt"),
          "--out": required("the folder for samples.npz and manifest.json (synthetic/DATASET)"),
          "--devices": optional("comma-separated devices to sample on at once (e.g. cuda:0,cuda:1); "
                                "default: sample.gpus GPUs, or the one --device")}),
    Step("select", "choose the subset S of the generated images",
         "Reads the generated images (--samples) and DATASET's select section (all, random, kcenter, "
         "confidence; images per class); writes the subset S to --out in the same format.",
         {"--samples": required(GENERATED),
          "--classifier": optional("the reference classifier, for kcenter and confidence"),
          "--out": required("the subset, synthetic/DATASET/selected.npz")}),
    Step("export", "write the challenge's submission tensor",
         "Reads the selected images (--samples); writes what the challenge's evaluator loads: a bare "
         "class-major float tensor normalised with the dataset's mean/std (--out) and its int64 labels "
         "(--labels).",
         {"--samples": required("the selected images, synthetic/DATASET/selected.npz"),
          "--out": required("the images tensor, named as the evaluator loads it: .../{ds}.pt"),
          "--labels": optional("the labels tensor (default: beside --out, {stem}_labels.pt)"),
          "--images-per-class": optional("default: export.images_per_class in params.yaml; null there: the "
                                         "smallest class count", type=int),
          "--png-dir": optional("also write {label}_{index}.png files here")}),
    Step("evaluate", "train the ConvNet on a set, test on the real test split",
         "Reads a training set (--train; with --like, a random real subset with that set's per-class "
         "counts), the real test split and DATASET's evaluate section; trains the challenge's ConvNet "
         "with one seed and writes its test accuracy, per-class accuracy and loss curve to --out (JSON).",
         {"--set": required("which training set this run is (names the result)",
                            choices=["synthetic", "full_real", "random_real"]),
          "--seed": required("the run's seed (initialisation, shuffling, augmentation)", type=int),
          "--train": required("the training images (selected.npz, or the real train.npz)"),
          "--like": optional("random real subset with this set's per-class counts"),
          "--images-per-class": optional("use the balanced prefix of this size (sweep)", type=int),
          "--test": required(REAL_TEST),
          "--out": required("the result JSON, results/DATASET/eval/{set}_seed{seed}.json"),
          "--state": optional("checkpoint file: resume from it, save to it every evaluate.checkpoint_every "
                              "epochs; deleted once --out is written"),
          "--protocol": optional("challenge (default): hard labels, DSA as params say; plain: no augmentation; "
                                 "soft: the --teacher's soft labels (DD-Ranking)", default="challenge",
                                 choices=["challenge", "plain", "soft"]),
          "--teacher": optional("the reference classifier whose soft labels --protocol soft trains on")}),
    Step("summarize", "mean ± std over seeds, baselines, distillation metrics",
         "Reads the evaluate step's result JSONs (--runs); writes summary.json (per set: mean, "
         "population std over the seeds, per-seed runs, per-class accuracy and training counts; gain "
         "over random real, gap to full real; DD-Ranking's scores) to --out and the dataset's markdown "
         "table to --table.",
         {"--runs": required("the evaluation results, results/DATASET/eval/*.json", nargs="+"),
          "--plain-runs": optional("DD-Ranking: the runs without augmentation, results/DATASET/eval_plain/*.json",
                                   nargs="+", default=[]),
          "--soft-runs": optional("DD-Ranking: the soft-label runs, results/DATASET/eval_soft/*.json",
                                  nargs="+", default=[]),
          "--out": required("the summary, results/DATASET/summary.json"),
          "--table": required("the markdown table, results/tables/DATASET_summary.md")}),
    Step("fid", "FID of the generated set against the real statistics",
         "Reads the generated images (--samples, the first fid.final_samples) and the reference "
         "statistics (--stats); writes {fid_inception or fid_convnet, n_samples, seconds} to --out.",
         {"--samples": required(GENERATED),
          "--stats": required("the reference statistics, data/DATASET/fid_stats.npz"),
          "--out": required("the result, results/DATASET/fid.json")}),
    Step("sweep", "accuracy against images per class; sampling cost against images",
         "Reads the sampling manifest (its timeline) and the sweep's evaluation results "
         "({set}_ipc{n}_seed{s}.json); writes the curve, the timeline and the linear fit to --out and the "
         "sweep figure to --figure.",
         {"--manifest": required("the sampling manifest, synthetic/DATASET/manifest.json"),
          "--runs": required("the sweep's results, results/DATASET/sweep/*.json", nargs="+"),
          "--out": required("the summary, results/DATASET/sweep.json"),
          "--figure": required("the figure, results/figures/DATASET_sweep.png")}),
    Step("audit", "memorisation audit: nearest training images of generated ones",
         "Reads the generated images, the real train and test splits and the reference classifier; "
         "writes per-image nearest-training-image distances, thresholds and flagged shares (pixel and "
         "feature space) to --out, a histogram to --hist and the closest pairs to --pairs.",
         {"--samples": required(GENERATED),
          "--train": required(REAL_TRAIN),
          "--test": required(REAL_TEST),
          "--classifier": required("the reference classifier (feature space), data/DATASET/classifier.pt"),
          "--out": required("the audit, results/DATASET/audit.json"),
          "--hist": required("the distance histogram, results/figures/DATASET_audit_distances.png"),
          "--pairs": required("the closest pairs, results/figures/DATASET_audit_pairs.png")}),
    Step("report", "the paper's tables and figures",
         "Reads every dataset's results (summary.json, fid.json, eval/*.json), synthetic/DATASET/ "
         "samples and manifest, checkpoints/DATASET/ loss.csv, fid_curve.csv, train.json and "
         "benchmarks/DATASET/train_diffusion.tsv; writes under --out: tables/ (models, fid, results), "
         "figures/ (fid_curve, leaderboard, class grids, loss), plots/ and DATASET/metrics.json. "
         "Datasets not run show \"not run\".",
         {"--datasets": required("the datasets that were run", nargs="+"),
          "--out": optional("the results folder (default results)", default="results")}, dataset=False),
    Step("dvc-yaml", "regenerate dvc.yaml from the Snakemake DAG",
         "Reads the Snakefile, rules/ and params.yaml; writes dvc.yaml (one stage per Snakemake job).",
         {"--out": optional("the file to write (default dvc.yaml)", default="dvc.yaml"),
          "--check": optional("fail if the file differs instead of writing it", action="store_true")},
         dataset=False),
)


def build_parser():
    parser = argparse.ArgumentParser(prog="diffdistill", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for step in STEPS:
        sub = subparsers.add_parser(step.name, help=step.help, description=step.description)
        arguments = dict(COMMON_ARGUMENTS, **({"--dataset": DATASET_ARGUMENT} if step.dataset else {}))
        for flag, kwargs in {**arguments, **step.arguments}.items():
            sub.add_argument(flag, **kwargs)
        # Looked up now, not when the module loads, so that a replaced cmd_* (a test's) is the one run.
        sub.set_defaults(func=globals()[f"cmd_{step.name.replace('-', '_')}"])
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    log_file = _setup_logging(args.log)
    try:
        _set_threads(args.threads)
        headline = args.func(args)   # what the step found: "text", or ("subject", "text")
        if headline and int(os.environ.get("RANK", "0")) == 0:   # once, not from every torchrun process
            subject, text = headline if isinstance(headline, tuple) else ("", headline)
            label = " ".join(s for s in (args.step, getattr(args, "dataset", None), subject) if s)
            log.info("%s: %s", label, text, extra=HEADLINE)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - every failure is reported with its traceback, none swallowed
        # Our own errors (bad params, a missing file, a failed download) are ValueError/FileNotFoundError
        # with a message that says what to do; anything else also names its type.
        expected = isinstance(err, (ValueError, FileNotFoundError))
        what = str(err) if expected else f"{type(err).__name__}: {err}"
        where = f"\n(the traceback is in {log_file})" if log_file else ""
        # The traceback: in the log file when there is one (the console then gets the line alone);
        # on the console for an unexpected error when there is none.
        log.error("%s failed: %s%s", args.step, what, where, exc_info=bool(log_file) or not expected)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
