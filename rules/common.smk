# Shared glue: validated params, the wildcards-to-inputs helpers and targets of each dataset's run, the
# CLI call, and the cluster requests of src/diffdistill/cluster.py bound to this run's config.
import os
import re
import sys
from pathlib import Path

from snakemake.logging import logger

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # run from a checkout without installing

from diffdistill import cluster
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


def gpus(ds, section):
    """The GPUs a params section asks for (`{ds}.{section}.gpus`): torchrun's process count."""
    return cluster.section_gpus(config, ds, section)


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


def ddranking_runs(ds, protocol):
    """DD-Ranking's extra runs of a dataset (params `ddranking:`): plain (no augmentation) for the
    augmentation-robust score, soft (soft labels) for the soft-label score; none unless asked."""
    asked = config[ds].get("ddranking") or {}
    if not asked.get({"plain": "augmentation_robust", "soft": "soft_labels"}[protocol]):
        return []
    return expand("results/{ds}/eval_{protocol}/{set}_seed{seed}.json", ds=ds, protocol=protocol,
                  set=["synthetic", "random_real"], seed=seeds(ds))


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
# Cluster requests (read by snakemake-executor-plugin-slurm; a local run ignores them). What each job
# asks for is derived in src/diffdistill/cluster.py; here it is bound to this run's config and jobs.

# Partitions and GPU model from the environment variables slurm/config.yaml documents.
SLURM_TARGETS = cluster.SlurmTargets.from_environ(os.environ)

for message in cluster.throughput_warnings(config, DATASETS):
    logger.warning(message)


def gpu_job(step, runtime):
    """The resources of a step that may run on GPUs: its GPU count (params), Slurm time limit (derived;
    `runtime` for CPU jobs), and the partition and GPU model that go with its GPU count."""
    count = lambda w: cluster.step_gpus(config, step, w.ds)
    return {
        "gpu": count,
        "runtime": lambda w: cluster.requested_minutes(config, step, w, runtime),
        "slurm_partition": lambda w: SLURM_TARGETS.partition(count(w)),
        "gpu_model": lambda w: SLURM_TARGETS.model(count(w)),
    }
