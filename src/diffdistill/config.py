"""params.yaml: loading, merging overrides, schema validation; device and seeding helpers."""
import copy
import random
from pathlib import Path

import numpy as np
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


def validate(params, schema_path=SCHEMA_PATH):
    """Raise ParamsError naming the first invalid key, as Snakemake's validate() would."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = list(validator.iter_errors(params))
    if errors:
        # best_match descends into oneOf/anyOf to the most specific failure, e.g. "-1 is less than 0".
        err = jsonschema.exceptions.best_match(errors)
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ParamsError(f"params: invalid value at '{key}': {err.message}. Fix it in params.yaml "
                          f"(the schema is {schema_path}).")
    for ds in params["datasets"]:
        if ds not in params:
            raise ParamsError(f"params: 'datasets' names '{ds}' but params.yaml has no '{ds}:' block; "
                              f"add one or remove it from 'datasets'.")
    return params


def load_params(paths=("params.yaml",), check=True):
    """Read params.yaml and any override files (later files win, dicts merge recursively)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    params = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ParamsError(f"params file {p} does not exist")
        params = deep_update(params, yaml.safe_load(p.read_text()) or {})
    return validate(params) if check else params


def dataset_params(params, dataset):
    if dataset not in params:
        raise ParamsError(f"params.yaml has no block for dataset '{dataset}'; known: "
                          f"{[k for k in params if isinstance(params[k], dict) and 'data' in params[k]]}")
    return params[dataset]


def resolve_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
