# Shared helpers: validated params, the files each dataset's run produces, the CLI call.
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # run from a checkout without installing

from diffdistill.config import resolve_bases
from diffdistill.config import validate as validate_params
from diffdistill.dag import STEP_PARAMS, STEP_THREADS, param_value
from diffdistill.data import ARCHIVES, archive_name, tree_files

# The CLI reads params.yaml plus any --configfile overrides, in the order Snakemake merged them.
PARAM_FILES = ["params.yaml"] + [str(f) for f in workflow.overwrite_configfiles]

# Dataset blocks with `base: other` inherit the other block (as the CLI's load_params does); then
# invalid params stop here, before any job, with a message naming the key and the file that set it.
config.update(resolve_bases(config))
validate_params(config, files=PARAM_FILES)

DATASETS = list(config["datasets"])
PARAMS_ARGS = " ".join(f"--params {f}" for f in PARAM_FILES)
ENV = "../envs/diffdistill.yaml"

wildcard_constraints:
    ds="|".join(DATASETS),
    seed=r"\d+",
    set="synthetic|full_real|random_real",
    n=r"\d+",
    archive="|".join(re.escape(n) for n in ARCHIVES.values()),


def _sorted(value):
    # Key order must not matter: the same parameters saved with sorted keys are the same parameters.
    return {k: _sorted(value[k]) for k in sorted(value)} if isinstance(value, dict) else value


def cfg(ds, *keys):
    """The dataset block's sections a step reads: Snakemake reruns the step when they change."""
    return {k: _sorted(param_value(config[ds], k)) for k in keys}


def step_values(step):
    """The values of the params a step reads (STEP_PARAMS): a change reruns the step."""
    return lambda w: cfg(w.ds, *STEP_PARAMS[step])


def archive_input(w):
    """The downloaded archive prepare_data converts (download_data); none for digits and folder."""
    name = archive_name(config[w.ds]["data"])
    return [f"data/downloads/{w.ds}/{name}"] if name else []


def image_tree_input(w):
    """A folder dataset's image files (data.root, data.test_root): a changed tree reruns prepare_data."""
    return tree_files(config[w.ds]["data"])


def weights_file(name):
    return f"weights/{config['weights'][name]['filename']}"


def pretrained_input(w):
    name = config[w.ds].get("pretrained")
    return [weights_file(name)] if name else []


def inception_input(w):
    return [weights_file("fid_inception")] if config[w.ds]["fid"]["features"] == "inception" else []


def fid_classifier_input(w):
    return [f"data/{w.ds}/classifier.pt"] if config[w.ds]["fid"]["features"] == "convnet" else []


def select_classifier_input(w):
    return [f"data/{w.ds}/classifier.pt"] if config[w.ds]["select"]["strategy"] in ("kcenter", "confidence") else []


def gpus(ds, step):
    """The GPUs a step's params ask for (`{ds}.{step}.gpus`)."""
    return int(config[ds][step].get("gpus", 0))


def gpu_request(ds, step):
    """The GPUs a step's job asks the scheduler for: none when `device: cpu` runs the GPU configuration
    on CPUs on purpose (the rehearsal), else its params' count."""
    return 0 if config.get("device") == "cpu" else gpus(ds, step)


def seeds(ds):
    return config[ds]["evaluate"]["seeds"]


def sweep_targets(ds):
    sweep = config[ds].get("sweep")
    return [f"results/{ds}/sweep.json"] if sweep else []


def audit_targets(ds):
    return [f"results/{ds}/audit.json"] if config[ds].get("audit", False) else []


def dataset_targets(ds):
    return [
        f"results/{ds}/summary.json",
        f"results/{ds}/fid.json",
        f"synthetic/{ds}/challenge/{ds}.pt",
    ] + sweep_targets(ds) + audit_targets(ds)


def all_targets():
    targets = [t for ds in DATASETS for t in dataset_targets(ds)]
    return targets + ["results/tables/results.md"]


def eval_train_input(w):
    if w.set == "synthetic":
        return f"synthetic/{w.ds}/selected.npz"
    return f"data/{w.ds}/train.npz"


def eval_like_input(w):
    return [f"synthetic/{w.ds}/selected.npz"] if w.set == "random_real" else []


def class_grid_files(ds):
    # Tiny-ImageNet's 200 classes are shown in two grids of 100, as in the paper.
    k = config[ds]["model"]["num_classes"]
    if k > 100:
        return [f"results/figures/{ds}_classes_{i + 1}.png" for i in range((k + 99) // 100)]
    return [f"results/figures/{ds}_classes.png"]


def report_inputs(w):
    files = []
    for ds in DATASETS:
        files += [f"results/{ds}/summary.json", f"results/{ds}/fid.json", f"synthetic/{ds}/manifest.json",
                  f"synthetic/{ds}/samples.npz", f"checkpoints/{ds}/train.json", f"checkpoints/{ds}/loss.csv",
                  f"checkpoints/{ds}/fid_curve.csv"]  # the training benchmark is read when present
    return files


# --------------------------------------------------------------------------------------------------
# Cluster requests (read by snakemake-executor-plugin-slurm; a local run ignores them).
#
# GPU routing: whatever the rule, a job that asks for a GPU goes to the GPU partition with the GPU
# model, and every other job to SBATCH_PARTITION. The partition depends on the job's own GPU count
# (params), which a Snakemake profile cannot see, so it is decided here from the same environment
# variables slurm/config.yaml documents. Empty values leave the choice to the profile / cluster.
import math
import os

_CPU_PARTITION = os.environ.get("SBATCH_PARTITION", "")
_GPU_PARTITION = os.environ.get("DIFFDISTILL_GPU_PARTITION", "") or _CPU_PARTITION
_GPU_MODEL = os.environ.get("DIFFDISTILL_GPU_MODEL", "")

# The params section whose `gpus` a step's job asks for.
GPU_SECTION = {
    "train_diffusion": "train",
    "sample": "sample",
    "evaluate": "evaluate",
    "sweep_evaluate": "evaluate",
    "reference_classifier": "classifier",
    "audit": "classifier",  # the reference classifier's features
    "fid": "fid",
    "fid_stats": "fid",
}


def _cluster():
    return config.get("cluster") or {}


def _throughput(ds):
    return (_cluster().get("throughput") or {}).get(ds)


def _num_classes(ds):
    return int(config[ds]["model"]["num_classes"])


def _train_images(ds):
    return int(_throughput(ds)["train_images"])


def _sample_rate(ds, steps):
    """Images/s of one GPU at `steps` network calls (measured at 50: the cost is linear in calls)."""
    return float(_throughput(ds)["sample_images_per_s"]) * 50.0 / int(steps)


def _convnet_rate(ds, width):
    """ConvNet training images/s at the dataset's size; measured at width 128, where the two w×w convs
    dominate, so other widths scale by (128/width)²."""
    return float(_throughput(ds)["convnet_images_per_s"]) * (128.0 / int(width)) ** 2


def _inception_rate():
    return float(_cluster().get("inception_images_per_s", 500))


def expected_synthetic_images(ds):
    """The selected synthetic set's expected size: what the budget buys on sample.gpus GPUs, capped by
    max_per_class, then by select.images_per_class."""
    s, k = config[ds]["sample"], _num_classes(ds)
    n = math.inf
    if s.get("budget_seconds"):
        n = float(s["budget_seconds"]) * _sample_rate(ds, s["steps"]) * max(1, int(s.get("gpus", 0)))
    if s.get("max_per_class"):
        n = min(n, int(s["max_per_class"]) * k)
    ipc = config[ds]["select"].get("images_per_class")
    if ipc:
        n = min(n, int(ipc) * k)
    return n


def _eval_epochs(section):
    # range(Epoch + 1): the challenge's evaluator runs one epoch more than `epochs` says.
    return (100 if section.get("variant") == "short100" else int(section["epochs"])) + 1


def _convnet_seconds(ds, section, images):
    return _eval_epochs(section) * images / _convnet_rate(ds, section["width"])


def _work_seconds(step, w):
    """The work of one job in GPU-seconds at the measured throughputs (no margin)."""
    ds, p = w.ds, config[w.ds]
    if step == "evaluate":
        # random_real draws the synthetic set's per-class counts from the real split: at most all of it.
        n = {"full_real": _train_images(ds), "synthetic": expected_synthetic_images(ds),
             "random_real": min(expected_synthetic_images(ds), _train_images(ds))}[w.set]
        return _convnet_seconds(ds, p["evaluate"], n)
    if step == "sweep_evaluate":
        return _convnet_seconds(ds, p["evaluate"], int(w.n) * _num_classes(ds))
    if step == "reference_classifier":
        return _convnet_seconds(ds, p["classifier"], _train_images(ds))
    if step == "fid_stats":
        return min(_train_images(ds), p["fid"].get("stats_samples") or math.inf) / _inception_rate()
    if step == "fid":
        return int(p["fid"]["final_samples"]) / _inception_rate()
    if step == "sample":
        s = p["sample"]
        if s.get("budget_seconds"):
            return float(s["budget_seconds"])
        rate = _sample_rate(ds, s["steps"]) * max(1, int(s.get("gpus", 0)))
        return int(s["max_per_class"]) * _num_classes(ds) / rate
    if step == "train_diffusion":
        t = p["train"]
        steps = int(t["steps"])
        # DDP: the global batch is split over the GPUs (linear scaling assumed; not measured).
        seconds = steps * float(_throughput(ds)["train_step_s"]) / max(1, int(t.get("gpus", 0)))
        # The FID curve: rank 0 alone samples fid_samples images and embeds them, every fid_every steps.
        every = int(t.get("fid_every", 0))
        points = (steps // every if every else 0) + 1
        per_point = (int(t["fid_samples"]) / _sample_rate(ds, t.get("fid_steps", 50))
                     + int(t["fid_samples"]) / _inception_rate())
        return seconds + points * per_point
    return None


def needed_minutes(step, w):
    """Estimated minutes of a GPU job at the measured throughputs, or None where there is no estimate
    (a CPU job, or a dataset without a `cluster.throughput` entry)."""
    if step not in GPU_SECTION or gpu_request(w.ds, GPU_SECTION[step]) == 0 or _throughput(w.ds) is None:
        return None
    work = _work_seconds(step, w)
    return None if work is None else work / 60.0


def requested_minutes(step, w, default):
    """Slurm's time limit: margin × estimate + overhead, capped at the partition's limit (training is the
    one step that can exceed it: it resumes from state.pt when retried). CPU jobs: the rule's value."""
    need = needed_minutes(step, w)
    if need is None:
        return default
    c = _cluster()
    want = math.ceil(float(c.get("margin", 2.0)) * need + float(c.get("overhead_minutes", 10)))
    return min(want, int(c.get("max_runtime_minutes", 2880)))


def _warn_without_throughput():
    from snakemake.logging import logger

    for ds in DATASETS:
        if _throughput(ds) is None and any(gpus(ds, section) for section in set(GPU_SECTION.values())):
            logger.warning(f"params: cluster.throughput has no entry for '{ds}', whose steps ask for GPUs: on "
                           f"Slurm they get the rules' fixed time limits. Add one (see cifar100's) for limits "
                           f"derived from the work.")


_warn_without_throughput()


def gpu_job(step, runtime):
    """The resources of a step that may run on GPUs: its GPU count (params), Slurm time limit (derived;
    `runtime` for CPU jobs), and the partition and GPU model that go with its GPU count."""
    count = lambda w: gpu_request(w.ds, GPU_SECTION[step])
    return {
        "gpu": count,
        "runtime": lambda w: requested_minutes(step, w, runtime),
        "slurm_partition": lambda w: (_GPU_PARTITION if count(w) else _CPU_PARTITION) or None,
        "gpu_model": lambda w: (_GPU_MODEL if count(w) else "") or None,
    }
