"""params.yaml: loading, merging overrides (and `base:` inheritance), schema validation; which device
and precision a step runs with."""
import copy
import os
from pathlib import Path

import torch
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "params.schema.yaml"


class ParamsError(ValueError):
    """params.yaml is invalid; the message names the key and the fix."""


def deep_update(base, override):
    """Recursively merge ``override`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _has_path(tree, path):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def source_of(path, files, params=None):
    """The last of ``files`` (params.yaml, then overrides, in merge order) that sets the key at
    ``path`` (a tuple of keys), i.e. the file whose value won the merge. A key none sets exactly
    (an unexpected key is reported at its parent) falls back to the longest prefix that one sets.
    None when no file sets any of it, or when ``params`` (the merged result) holds another value
    than the winning file: then the value came from the command line (Snakemake's --config)."""
    docs = []
    for f in files:
        try:
            docs.append((str(f), yaml.safe_load(Path(f).read_text()) or {}))
        except (OSError, yaml.YAMLError):
            continue
    for n in range(len(path), 0, -1):
        for name, doc in reversed(docs):
            if _has_path(doc, path[:n]):
                if n == len(path) and params is not None and _has_path(params, path):
                    if _get(doc, path) != _get(params, path) and not isinstance(_get(params, path), dict):
                        return None
                return name
    return None


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def validate(params, schema_path=SCHEMA_PATH, files=None):
    """Raise ParamsError naming the first invalid key, as Snakemake's validate() would, and the
    file to fix: the last of ``files`` (merge order) that set the key, or params.yaml when unknown."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = list(validator.iter_errors(params))
    if errors:
        # best_match descends into oneOf/anyOf to the most specific failure, e.g. "-1 is less than 0".
        err = jsonschema.exceptions.best_match(errors)
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        where = source_of(tuple(err.absolute_path), files, params) if files else None
        if where is None and files:
            where = "the command line's --config (no params file sets it)"
        raise ParamsError(f"params: invalid value at '{key}': {err.message}. Fix it in {where or 'params.yaml'} "
                          f"(the schema is {schema_path}).")
    for ds in params["datasets"]:
        if ds not in params:
            raise ParamsError(f"params: 'datasets' names '{ds}' but params.yaml has no '{ds}:' block; "
                              f"add one or remove it from 'datasets'.")
    return params


def base_chain(params, dataset):
    """``[dataset, its base, the base's base, …]``: the blocks a dataset block inherits from, nearest
    first. ParamsError for a base that names no block, or a cycle."""
    chain = [dataset]
    while isinstance(params.get(chain[-1]), dict) and params[chain[-1]].get("base") is not None:
        base = params[chain[-1]]["base"]
        if not isinstance(params.get(base), dict) or "data" not in params[base]:
            known = [k for k, v in params.items() if isinstance(v, dict) and "data" in v]
            raise ParamsError(f"params: '{chain[-1]}.base' names '{base}', which is no dataset block; "
                              f"choose one of {known}.")
        if base in chain:
            raise ParamsError(f"params: the dataset blocks inherit in a circle ({' -> '.join(chain + [base])}); "
                              f"remove one of these 'base:' keys.")
        chain.append(base)
    return chain


def resolve_bases(params):
    """Every dataset block with ``base: NAME`` becomes block NAME with its own keys merged over it
    (dicts key by key, as override files merge), so a block of ten lines can reuse a whole recipe:

        mine: {base: digits, data: {kind: folder, root: my_images, image_size: 16, channels: 3},
               model: {in_chans: 3, num_classes: 5}}

    The ``base`` key stays in the block (what it inherits from); other blocks are returned as they are."""
    out = dict(params)
    for name, block in params.items():
        if isinstance(block, dict) and block.get("base") is not None:
            chain = base_chain(params, name)
            merged = {}
            for ancestor in reversed(chain):
                merged = deep_update(merged, {k: v for k, v in params[ancestor].items() if k != "base"})
            merged["base"] = block["base"]
            out[name] = merged
    return out


def load_params(paths=("params.yaml",), check=True):
    """Read params.yaml and any override files (later files win, dicts merge recursively), then
    resolve the dataset blocks' ``base:`` inheritance."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    params = resolve_bases(merge_files(paths))
    return validate(params, files=paths) if check else params


def merge_files(paths):
    """params.yaml and the override files merged as written (``base:`` not resolved)."""
    params = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ParamsError(f"params file {p} does not exist")
        params = deep_update(params, yaml.safe_load(p.read_text()) or {})
    return params


def dataset_params(params, dataset):
    if dataset not in params:
        raise ParamsError(f"params.yaml has no block for dataset '{dataset}'; known: "
                          f"{[k for k in params if isinstance(params[k], dict) and 'data' in params[k]]}")
    return params[dataset]


def resolve_device(name="auto"):
    """``auto`` -> CUDA when there is one, else the CPU; anything else as torch.device reads it.
    Steps pick their device with ``step_device``, which refuses to fall back to the CPU silently."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DEVICES = ("auto", "cpu", "cuda")     # the top-level `device:` key of params.yaml
# Numeric precision of the U-ViT steps -> autocast dtype (None: no autocast). fp32: plain float32;
# tf32: float32 with TensorFloat-32 matrix products (sampling only); bf16/fp16: autocast, CUDA only.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")
GPU_PRECISIONS = ("bf16", "fp16")     # autocast precisions: only a GPU runs them


class DeviceError(ValueError):
    """A step that params put on a GPU found none; the message names the key and the fix."""


def gpu_requests(block, section):
    """The settings of ``block[section]`` that ask for a GPU, as 'section.key is value' strings:
    ``gpus > 0`` (every step's section), and for train/sample an autocast precision (bf16, fp16)."""
    cfg = block.get(section) if section else None
    if not isinstance(cfg, dict):           # select, audit: no section of their own with gpus
        return []
    reasons = []
    if int(cfg.get("gpus", 0) or 0) > 0:
        reasons.append(f"{section}.gpus is {cfg['gpus']}")
    if section in ("train", "sample") and cfg.get("precision") in GPU_PRECISIONS:
        reasons.append(f"{section}.precision is {cfg['precision']}")
    return reasons


def _checked_cuda(device, source):
    """``device`` (CUDA) if it exists, else DeviceError naming where it was asked for."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise DeviceError(f"{source} asks for CUDA but no CUDA device is visible (torch.cuda.is_available() is "
                          f"False, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run "
                          f"where a GPU is allocated, or ask for the CPU (--device cpu, or device: cpu in params)")
    if device.index is not None and device.index >= visible:
        raise DeviceError(f"{source} asks for {device} but only {visible} CUDA device(s) are visible; "
                          f"use cuda:0 … cuda:{visible - 1}")
    return device


def step_device(params, dataset, section, cli_device="auto"):
    """The torch.device a step runs on; every step of the CLI picks its device here.

    Precedence: ``--device`` (anything but ``auto``), then the top-level ``device:`` of params.yaml
    (``auto`` | ``cpu`` | ``cuda``), then ``auto``. An explicit device is used as asked (CUDA must be
    there). ``auto`` takes CUDA when there is one; without CUDA it takes the CPU only when nothing in
    ``{dataset}.{section}`` asks for a GPU (``gpus > 0``; bf16/fp16 for train and sample), and
    otherwise stops at once with DeviceError: a multi-day job must not crawl along on the CPU because
    a node came up without its GPUs. A CPU run of a GPU configuration is asked for with ``device: cpu``
    in an override file or ``--device cpu``; bf16/fp16 then run as fp32 (the steps log it)."""
    cli = str(cli_device or "auto").strip()
    wanted = params.get("device", "auto") or "auto"
    if wanted not in DEVICES:
        raise ParamsError(f"params: device is {wanted!r}; choose one of {list(DEVICES)}")
    if cli != "auto":
        source = f"--device {cli}"
        try:
            device = torch.device(cli)
        except RuntimeError as exc:
            raise DeviceError(f"--device {cli!r} is not a device ({exc}); give auto, cpu, cuda or cuda:N") from exc
    elif wanted != "auto":
        source, device = f"params' device: {wanted}", torch.device(wanted)
    else:
        source = device = None
    if device is not None:
        return _checked_cuda(device, source) if device.type == "cuda" else device
    if torch.cuda.is_available():
        return torch.device("cuda")
    reasons = gpu_requests(dataset_params(params, dataset), section)
    if reasons:
        keys = " and ".join(f"{dataset}.{r}" for r in reasons)
        raise DeviceError(
            f"{keys} put this step on a GPU, but no CUDA device is visible (torch.cuda.is_available() "
            f"is False, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run it where a GPU "
            f"is allocated (a Slurm job with --gres=gpu), or, to run it on the CPU on purpose, set `device: cpu` "
            f"in params.yaml or an override file (snakemake --configfile cpu.yaml) or pass --device cpu "
            f"(bf16/fp16 then run as fp32).")
    return torch.device("cpu")
