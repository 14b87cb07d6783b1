"""What each pipeline job asks a cluster for: its GPU count, its Slurm time limit and the partition
and GPU model that go with its GPU count.

Plain functions of the params (Snakemake's `config`: the dataset blocks and the `cluster:` block)
and of one job (its step and wildcards, any mapping with "ds", "set", "n"); rules/common.smk's
`gpu_job` hands them to Snakemake, and snakemake-executor-plugin-slurm reads them (a local run
ignores them). Time limits follow from the work: margin × (the job's images or steps over the
throughputs measured in `cluster.throughput`) + overhead, capped at the partition's limit;
slurm/config.yaml spells the formula out per rule. Nothing here runs a step, so no step's DVC
stage depends on this file.
"""
import math
from dataclasses import dataclass

# The params section whose `gpus` a step's job asks for.
GPU_SECTION = {
    "train_diffusion": "train",
    "sample": "sample",
    "evaluate": "evaluate",
    "evaluate_ddranking": "evaluate",
    "sweep_evaluate": "evaluate",
    "reference_classifier": "classifier",
    "audit": "classifier",  # the reference classifier's features
    "fid": "fid",
    "fid_stats": "fid",
}


# --------------------------------------------------------------------------------------------------
# GPUs and partitions

def section_gpus(params, ds, section):
    """The GPUs a params section asks for (`{ds}.{section}.gpus`)."""
    return int(params[ds][section].get("gpus", 0))


def gpu_request(params, ds, section):
    """The GPUs a job asks the scheduler for: none when `device: cpu` runs the GPU configuration on
    CPUs on purpose (the rehearsal), else its params' count."""
    return 0 if params.get("device") == "cpu" else section_gpus(params, ds, section)


def step_gpus(params, step, ds):
    """The GPUs the job of ``step`` (a key of GPU_SECTION) for dataset ``ds`` asks for."""
    return gpu_request(params, ds, GPU_SECTION[step])


@dataclass(frozen=True)
class SlurmTargets:
    """Where jobs go: a job that asks for a GPU to the GPU partition with the GPU model, every other
    job to the CPU partition, whatever the rule. The partition follows the job's GPU count (params),
    which a Snakemake profile cannot see, hence here, from the environment variables that
    slurm/config.yaml documents. An empty value leaves the choice to the profile / cluster (None)."""

    cpu_partition: str = ""
    gpu_partition: str = ""
    gpu_model: str = ""

    @classmethod
    def from_environ(cls, environ):
        cpu = environ.get("SBATCH_PARTITION", "")
        return cls(cpu_partition=cpu,
                   gpu_partition=environ.get("DIFFDISTILL_GPU_PARTITION", "") or cpu,
                   gpu_model=environ.get("DIFFDISTILL_GPU_MODEL", ""))

    def partition(self, gpus):
        return (self.gpu_partition if gpus else self.cpu_partition) or None

    def model(self, gpus):
        return (self.gpu_model if gpus else "") or None


# --------------------------------------------------------------------------------------------------
# Throughputs (params' `cluster:` block, measured on one GPU)

def _cluster(params):
    return params.get("cluster") or {}


def throughput(params, ds):
    """The dataset's measured throughputs (`cluster.throughput.{ds}`), or None."""
    return (_cluster(params).get("throughput") or {}).get(ds)


def _num_classes(params, ds):
    return int(params[ds]["model"]["num_classes"])


def _train_images(params, ds):
    return int(throughput(params, ds)["train_images"])


def _sample_rate(params, ds, steps):
    """Images/s of one GPU at `steps` network calls (measured at 50: the cost is linear in calls)."""
    return float(throughput(params, ds)["sample_images_per_s"]) * 50.0 / int(steps)


def _convnet_rate(params, ds, width):
    """ConvNet training images/s at the dataset's size; measured at width 128, where the two w×w convs
    dominate, so other widths scale by (128/width)²."""
    return float(throughput(params, ds)["convnet_images_per_s"]) * (128.0 / int(width)) ** 2


def _inception_rate(params):
    return float(_cluster(params).get("inception_images_per_s", 500))


def expected_synthetic_images(params, ds):
    """The selected synthetic set's expected size: what the budget buys on sample.gpus GPUs, capped by
    max_per_class, then by select.images_per_class."""
    s, k = params[ds]["sample"], _num_classes(params, ds)
    n = math.inf
    if s.get("budget_seconds"):
        n = float(s["budget_seconds"]) * _sample_rate(params, ds, s["steps"]) * max(1, int(s.get("gpus", 0)))
    if s.get("max_per_class"):
        n = min(n, int(s["max_per_class"]) * k)
    ipc = params[ds]["select"].get("images_per_class")
    if ipc:
        n = min(n, int(ipc) * k)
    return n


# --------------------------------------------------------------------------------------------------
# The work of one job, in GPU-seconds at the measured throughputs (no margin), per step

def _convnet_seconds(params, ds, section, images):
    # range(Epoch + 1): the challenge's evaluator runs one epoch more than `epochs` says.
    epochs = (100 if section.get("variant") == "short100" else int(section["epochs"])) + 1
    return epochs * images / _convnet_rate(params, ds, section["width"])


def _evaluate_seconds(params, w):
    ds = w["ds"]
    # random_real draws the synthetic set's per-class counts from the real split: at most all of it.
    images = {"full_real": _train_images(params, ds), "synthetic": expected_synthetic_images(params, ds),
              "random_real": min(expected_synthetic_images(params, ds), _train_images(params, ds))}[w["set"]]
    return _convnet_seconds(params, ds, params[ds]["evaluate"], images)


def _sweep_evaluate_seconds(params, w):
    ds = w["ds"]
    return _convnet_seconds(params, ds, params[ds]["evaluate"], int(w["n"]) * _num_classes(params, ds))


def _reference_classifier_seconds(params, w):
    ds = w["ds"]
    return _convnet_seconds(params, ds, params[ds]["classifier"], _train_images(params, ds))


def _fid_stats_seconds(params, w):
    ds = w["ds"]
    return min(_train_images(params, ds), params[ds]["fid"].get("stats_samples") or math.inf) / _inception_rate(params)


def _fid_seconds(params, w):
    return int(params[w["ds"]]["fid"]["final_samples"]) / _inception_rate(params)


def _sample_seconds(params, w):
    ds = w["ds"]
    s = params[ds]["sample"]
    if s.get("budget_seconds"):
        return float(s["budget_seconds"])
    rate = _sample_rate(params, ds, s["steps"]) * max(1, int(s.get("gpus", 0)))
    return int(s["max_per_class"]) * _num_classes(params, ds) / rate


def _train_diffusion_seconds(params, w):
    ds = w["ds"]
    t = params[ds]["train"]
    steps = int(t["steps"])
    # DDP: the global batch is split over the GPUs (linear scaling assumed; not measured).
    seconds = steps * float(throughput(params, ds)["train_step_s"]) / max(1, int(t.get("gpus", 0)))
    # The FID curve: rank 0 alone samples fid_samples images and embeds them, every fid_every steps.
    every = int(t.get("fid_every", 0))
    points = (steps // every if every else 0) + 1
    per_point = (int(t["fid_samples"]) / _sample_rate(params, ds, t.get("fid_steps", 50))
                 + int(t["fid_samples"]) / _inception_rate(params))
    return seconds + points * per_point


# The steps with an estimate; a GPU step not named here (audit) keeps its rule's fixed limit.
WORK_SECONDS = {
    "evaluate": _evaluate_seconds,
    "evaluate_ddranking": _evaluate_seconds,   # the same sets (synthetic, random real), other labels/augmentation
    "sweep_evaluate": _sweep_evaluate_seconds,
    "reference_classifier": _reference_classifier_seconds,
    "fid_stats": _fid_stats_seconds,
    "fid": _fid_seconds,
    "sample": _sample_seconds,
    "train_diffusion": _train_diffusion_seconds,
}


# --------------------------------------------------------------------------------------------------
# Time limits

def needed_minutes(params, step, wildcards):
    """Estimated minutes of a GPU job at the measured throughputs, or None where there is no estimate
    (a CPU job, a step without one, or a dataset without a `cluster.throughput` entry)."""
    ds = wildcards["ds"]
    if step not in GPU_SECTION or step_gpus(params, step, ds) == 0 or throughput(params, ds) is None:
        return None
    work = WORK_SECONDS.get(step)
    return None if work is None else work(params, wildcards) / 60.0


def requested_minutes(params, step, wildcards, default):
    """Slurm's time limit: margin × estimate + overhead, capped at the partition's limit (training is the
    one step that can exceed it: it resumes from state.pt when retried). CPU jobs: ``default``, the
    rule's value."""
    need = needed_minutes(params, step, wildcards)
    if need is None:
        return default
    c = _cluster(params)
    want = math.ceil(float(c.get("margin", 2.0)) * need + float(c.get("overhead_minutes", 10)))
    return min(want, int(c.get("max_runtime_minutes", 2880)))


def throughput_warnings(params, datasets):
    """One message per dataset whose steps ask for GPUs but that has no `cluster.throughput` entry."""
    return [f"params: cluster.throughput has no entry for '{ds}', whose steps ask for GPUs: on "
            f"Slurm they get the rules' fixed time limits. Add one (see cifar100's) for limits "
            f"derived from the work."
            for ds in datasets
            if throughput(params, ds) is None
            and any(section_gpus(params, ds, section) for section in set(GPU_SECTION.values()))]
