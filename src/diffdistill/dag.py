"""The DAG shared by the two orchestrators: which params each step reads, and dvc.yaml generated
from Snakemake's own job graph so that `dvc repro` and `snakemake` cannot drift apart.

`python -m diffdistill dvc-yaml` rewrites dvc.yaml; a test fails when the committed file differs.
"""
import ast
import functools
import re
from pathlib import Path

import yaml

# The sections of a dataset block each step reads (Snakemake `params:`, DVC `params:`).
# A dotted key names one key of a section (a download depends on where from, not on the image size).
STEP_PARAMS = {
    "download_data": ["data.source", "data.checksum"],
    "prepare_data": ["data"],
    "reference_classifier": ["classifier"],
    "fid_stats": ["fid"],
    "train_diffusion": ["model", "pretrained", "train"],
    "sample": ["model", "sample"],
    "select": ["select"],
    "export_challenge": ["select", "evaluate", "export"],
    "evaluate": ["evaluate"],
    "evaluate_ddranking": ["evaluate", "ddranking"],
    "fid": ["fid"],
    "sweep_evaluate": ["evaluate", "sweep"],
}

# The CPU threads each step computes with: the rule's `threads:` (what Snakemake reserves for the job)
# and the command's `--threads` (what torch uses), hence dvc.yaml's too. Results depend on it (the
# order of floating-point sums in a thread pool), so it is a fixed part of the command and not
# Snakemake's `{threads}`, which --cores or --set-threads would scale: `snakemake --cores 1` and
# `dvc repro` compute with the same counts as `snakemake --cores all`. The default run's reference
# numbers were made with these counts.
STEP_THREADS = {
    "download_data": 1,
    "fetch_weights": 1,
    "prepare_data": 1,
    "reference_classifier": 1,
    "fid_stats": 2,
    "train_diffusion": 2,
    "sample": 2,
    "select": 2,
    "export_challenge": 1,
    "evaluate": 1,
    "evaluate_ddranking": 1,
    "summarize": 1,
    "fid": 2,
    "sweep_evaluate": 1,
    "sweep_summary": 1,
    "audit": 2,
    "report": 1,
}

# The package modules each step runs (DVC `deps:`), so a code change reruns what it affects: the
# modules its CLI command imports, followed through every import of the package (``step_modules``).
# cluster.py is among none of them: only Snakemake reads it (jobs' Slurm requests), no step runs it.
PACKAGE = Path(__file__).resolve().parent


def _imported_modules(tree):
    """The package modules an AST imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:                       # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:                                     # from . import x, y
                found.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("diffdistill."):
                found.add(node.module.split(".")[1])
            elif node.level == 0 and node.module == "diffdistill":    # from diffdistill import x
                found.update(a.name for a in node.names)
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


@functools.lru_cache(maxsize=None)
def _module_imports(name):
    return frozenset(_imported_modules(ast.parse((PACKAGE / f"{name}.py").read_text())))


@functools.lru_cache(maxsize=None)
def step_modules(command):
    """The package files the CLI subcommand ``command`` (e.g. ``sweep``) runs, sorted: cli.py; the
    modules imported by ``main``, by ``cmd_<command>`` and by the cli.py functions they call; and,
    followed to the end, every package module those import."""
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    functions = {n.name: n for n in cli.body if isinstance(n, ast.FunctionDef)}
    name = "cmd_" + command.replace("-", "_")
    if name not in functions:
        raise ValueError(f"dag: the CLI has no command {command!r} (no cli.{name})")
    todo = _imported_modules(ast.Module([n for n in cli.body if not isinstance(n, ast.FunctionDef)], []))
    calls, stack = set(), ["main", name]
    while stack:                                     # the cli.py functions the command runs
        f = stack.pop()
        if f in functions and f not in calls:
            calls.add(f)
            todo |= _imported_modules(functions[f])
            stack += [n.func.id for n in ast.walk(functions[f])
                      if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    seen = {"cli"}
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo |= _module_imports(m) - seen
    return tuple(sorted(f"{m}.py" for m in seen))


# DVC metrics and plots among the outputs. `dvc metrics show` prints one table whose columns are the
# union of every metrics file's keys, so only results/{ds}/metrics.json (a few numbers, the same keys
# for every dataset: one row each) is a metrics file; summary.json, fid.json, sweep.json and
# audit.json hold the details (per-seed runs, text, distances) as plain outputs.
METRICS_SUFFIXES = ("metrics.json",)
PLOTS = {"_diffusion_loss.csv": {"x": "step", "y": "loss"}, "_fid_curve.csv": {"x": "step", "y": "fid"}}


def snakemake_jobs(workdir=".", configfiles=()):
    """Every job of the full DAG (forceall) as dicts: rule, wildcards, shell, input, output, log, local."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, Quietness,
                                          ResourceSettings)

    workdir = Path(workdir).resolve()
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[Path(f) for f in configfiles]),
            snakefile=workdir / "Snakefile",
            workdir=workdir,
        )
        dag_api = workflow_api.dag(dag_settings=DAGSettings(forceall=True))
        # Snakemake has no public call that returns the job graph; this is what printdag() does.
        workflow = dag_api.workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        jobs = []
        for job in workflow.dag.jobs:
            if job.rule.name == "all":
                continue
            jobs.append({
                "rule": job.rule.name,
                "wildcards": dict(job.wildcards_dict),
                "shell": job.shellcmd,
                "input": [str(f) for f in job.input],
                "output": [str(f) for f in job.output],
                "log": [str(f) for f in job.log],
                # A local rule runs where Snakemake runs, never as a cluster job (the downloads).
                "local": job.rule.name in workflow._localrules,
            })
    return sorted(jobs, key=lambda j: (j["rule"], sorted(j["wildcards"].items())))


def stage_name(job):
    parts = [job["rule"]] + [str(v) for _, v in sorted(job["wildcards"].items())]
    return "_".join(p.replace(".", "_") for p in parts)


def _dvc_command(shell):
    # Logs are Snakemake's business; DVC stages print to the terminal.
    return " ".join(re.sub(r"\s--log-file\s+\S+", "", shell).split())


def param_value(block, key):
    """A dataset block's value for a STEP_PARAMS key: a section, or one key of it ("data.source")."""
    for part in key.split("."):
        block = (block or {}).get(part)
    return block


def _param_keys(raw, ds, keys):
    """DVC's params keys for a step's STEP_PARAMS ``keys`` of dataset ``ds``: ``ds.key`` where the
    file sets it, and for a block with ``base:`` also the inherited block's key (DVC reads the files
    as written, so an inherited section is tracked where it is written)."""
    from .config import base_chain

    out = []
    for k in keys:
        found = [f"{b}.{k}" for b in base_chain(raw, ds) if param_value(raw[b], k) is not None]
        out += found or ([f"{ds}.{k}"] if k == "pretrained" and k in raw[ds] else [])
    return out


def _stage_deps(job, params):
    """The job's inputs, then the package modules its step runs (``step_modules``)."""
    rule, ds = job["rule"], job["wildcards"].get("ds")
    deps = list(dict.fromkeys(job["input"]))
    if rule == "prepare_data" and params[ds]["data"].get("kind") == "folder":
        # A folder dataset's images: DVC hashes the trees themselves rather than listing every file.
        data = params[ds]["data"]
        trees = [data["root"]] + ([data["test_root"]] if data.get("test_root") else [])
        deps = [d for d in deps if not any(Path(d).is_relative_to(t) for t in trees)] + trees
    command = re.search(r"diffdistill (\S+)", job["shell"])
    return deps + ([f"src/diffdistill/{m}" for m in step_modules(command.group(1))] if command else [])


def _stage_params(job, params, raw):
    """DVC's params keys of the job: its STEP_PARAMS sections, or the weights entry it fetches."""
    rule, ds = job["rule"], job["wildcards"].get("ds")
    if rule == "fetch_weights":
        name = next(k for k, v in params["weights"].items() if v["filename"] == job["wildcards"]["filename"])
        return [f"weights.{name}"]
    if ds is not None and rule in STEP_PARAMS:
        return _param_keys(raw, ds, STEP_PARAMS[rule])
    return []


def _stage_outputs(job):
    """The job's outputs as DVC's outs, metrics and plots (results/ files are small and go to git)."""
    outs, metrics, plots = [], [], []
    for out in job["output"]:
        name = Path(out).name
        if out.startswith("results/") and name.endswith(METRICS_SUFFIXES):
            metrics.append({out: {"cache": False}})
        elif out.startswith("results/plots/") and name.endswith(tuple(PLOTS)):
            plots.append({out: {"cache": False, **next(v for k, v in PLOTS.items() if name.endswith(k))}})
        elif out.startswith("results/"):
            outs.append({out: {"cache": False}})  # small, committed to git
        else:
            outs.append(out)
    return {"outs": outs, "metrics": metrics, "plots": plots}


def dvc_stage(job, params, raw=None):
    """One dvc.yaml stage for a Snakemake job; ``raw``: the params as the files write them (for
    ``base:`` blocks), else ``params``."""
    raw = params if raw is None else raw
    stage = {"cmd": _dvc_command(job["shell"]), "deps": _stage_deps(job, params)}
    keys = _stage_params(job, params, raw)
    if keys:
        stage["params"] = keys
    stage.update((key, value) for key, value in _stage_outputs(job).items() if value)
    return stage


def dvc_yaml(workdir=".", configfiles=()):
    from .config import load_params, merge_files

    workdir = Path(workdir)
    files = [workdir / "params.yaml"] + [Path(f) for f in configfiles]
    params, raw = load_params(files), merge_files(files)
    stages = {stage_name(job): dvc_stage(job, params, raw) for job in snakemake_jobs(workdir, configfiles)}
    header = ("# GENERATED by `python -m diffdistill dvc-yaml` from the Snakemake DAG; do not edit.\n"
              "# The Snakefile and rules/ are the source; a test fails when this file is stale.\n")
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
