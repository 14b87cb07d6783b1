"""U-ViT state dicts: the model params.yaml describes, reading checkpoint files, checking that a state
dict fits a model, and loading or adapting it.

- ``build_model`` builds the U-ViT of a ``model:`` block as the trainer does (one extra, null class when
  ``train.label_dropout > 0``); ``null_class_index`` says where that class is.
- ``read_state_dict`` reads a file or a dict, unwrapping ``{'model': ...}``-style wrappers and DDP's
  ``module.`` prefix.
- ``compare`` is the one check of whether a state dict fits a model: the keys whose shapes differ, the
  keys missing from it and the keys the model does not have. Everything below explains its answer:
  ``check_checkpoint`` in params.yaml's words (for the sample step), ``load_state_dict_checked`` in the
  architectures' words, ``init_from_pretrained`` per key.
- ``init_from_pretrained`` loads a released U-ViT checkpoint into a class-conditional model with a new
  class count ("initialise from the pretrained weights excluding the label layer");
  ``load_initial_weights`` chooses between that and a strict load (the trainer's starting weights).
"""
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from .uvit import UViT

UVIT_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
             "qkv_bias", "mlp_time_embed", "num_classes", "conv", "skip")

# Keys a checkpoint file may wrap its state dict in (U-ViT's own files, training states, EMA copies).
_WRAPPERS = ("state_dict", "model", "nnet_ema", "nnet", "ema")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model params.yaml describes; the message names the key."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The checkpoint file is not there (a ValueError for the CLI, a FileNotFoundError for callers)."""


# ----------------------------------------------------------------------------------------------
# the model of params.yaml
# ----------------------------------------------------------------------------------------------
def null_class_index(model_cfg, train_cfg=None):
    """Index of the null (unconditional) class when training with label dropout, else None."""
    if train_cfg is not None and float(train_cfg.get("label_dropout", 0.0)) > 0:
        return int(model_cfg["num_classes"])
    return None


def build_model(model_cfg, train_cfg=None):
    """The U-ViT of ``model_cfg``; with ``train_cfg.label_dropout > 0`` one extra (null) class."""
    kwargs = {k: model_cfg[k] for k in UVIT_ARGS if k in model_cfg}
    unknown = sorted(set(model_cfg) - set(UVIT_ARGS))
    if unknown:
        raise ValueError(f"model config has unknown keys {unknown}; the U-ViT arguments are {list(UVIT_ARGS)}")
    if null_class_index(model_cfg, train_cfg) is not None:
        kwargs["num_classes"] = int(model_cfg["num_classes"]) + 1
    return UViT(**kwargs)


# ----------------------------------------------------------------------------------------------
# reading and describing state dicts
# ----------------------------------------------------------------------------------------------
def read_state_dict(sd_or_path):
    """``(state_dict, source)`` from a dict or a file; unwraps {'model': ...}-style wrappers and DDP's
    'module.'. ``source`` names the file (or says "state dict") for error messages."""
    source = "state dict"
    sd = sd_or_path
    if isinstance(sd_or_path, (str, os.PathLike)):
        source = str(sd_or_path)
        if not Path(sd_or_path).is_file():
            raise FileNotFoundError(f"checkpoint {sd_or_path} does not exist; fetch it first "
                                    f"(snakemake weights/…, or python -m diffdistill fetch-weights)")
        sd = torch.load(sd_or_path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{source} is not a state dict (got {type(sd).__name__})")
    if not any(torch.is_tensor(v) for v in sd.values()):
        for key in _WRAPPERS:
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise ValueError(f"{source} holds no tensors; is it a U-ViT checkpoint?")
    return sd, source


def describe_uvit(sd):
    """What a U-ViT state dict is for: classes, image size, channels, width, depth (best effort)."""
    d = {}
    w = sd.get("patch_embed.proj.weight")
    pos = sd.get("pos_embed")
    if w is not None and w.dim() == 4:
        d["embed_dim"], d["in_chans"], p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
        d["patch_size"] = p
        extras = 2 if "label_emb.weight" in sd else 1
        if pos is not None and pos.dim() == 3:
            side = (pos.shape[1] - extras) ** 0.5
            if side == int(side):
                d["img_size"] = int(side) * p
    d["num_classes"] = int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else 0
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("in_blocks.")}
    d["depth"] = 2 * len(blocks)
    return d


def _fmt(desc):
    classes = f"{desc['num_classes']} classes" if desc.get("num_classes") else "unconditional"
    parts = [classes, f"{desc.get('img_size', '?')} px", f"{desc.get('in_chans', '?')} channels",
             f"patch {desc.get('patch_size', '?')}", f"D {desc.get('embed_dim', '?')}",
             f"depth {desc.get('depth', '?')}"]
    return " / ".join(parts)


# ----------------------------------------------------------------------------------------------
# does a state dict fit a model?
# ----------------------------------------------------------------------------------------------
def shapes(state_dict):
    """``{key: shape tuple}`` of a state dict."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


class Mismatch(NamedTuple):
    """How a state dict differs from a model's, each list sorted; all empty when it fits exactly."""
    differing: list   # keys of both, with other shapes
    missing: list     # keys of the model the state dict lacks
    unexpected: list  # keys of the state dict the model lacks

    def fits(self):
        return not (self.differing or self.missing or self.unexpected)


def compare(expected, got):
    """Compare the shapes ``got`` (a state dict's, ``{key: shape}``) with ``expected`` (the model's)."""
    return Mismatch(differing=sorted(k for k in set(expected) & set(got) if expected[k] != got[k]),
                    missing=sorted(set(expected) - set(got)),
                    unexpected=sorted(set(got) - set(expected)))


def _mismatch_lines(mismatch, expected, got):
    """The mismatch in full, one line per differing key (the architectures' words)."""
    lines = [f"  {k}: checkpoint {got[k]} vs model {expected[k]}" for k in mismatch.differing]
    if mismatch.missing:
        lines.append(f"  missing in checkpoint ({len(mismatch.missing)}): " + ", ".join(mismatch.missing))
    if mismatch.unexpected:
        lines.append(f"  unexpected in checkpoint ({len(mismatch.unexpected)}): " + ", ".join(mismatch.unexpected))
    return lines


def _fit_problems(model_cfg, train_cfg, expected, got):
    """Plain-words reasons why a state dict (shapes ``got``) does not fit the params (shapes ``expected``):
    the params key to fix where one explains it, else the first few mismatched keys."""
    problems = []
    null = train_cfg is not None and float(train_cfg.get("label_dropout", 0.0) or 0.0) > 0
    key = "label_emb.weight"
    if key in expected and key in got and got[key][0] != expected[key][0]:
        problems.append(f"the checkpoint has {got[key][0]} label embeddings but params model.num_classes = "
                        f"{model_cfg.get('num_classes')}" + (" (+1 null class, train.label_dropout > 0)" if null else "")
                        + f" needs {expected[key][0]}")
    elif (key in expected) != (key in got):
        problems.append(f"the checkpoint is {'class-conditional' if key in got else 'unconditional'} but params "
                        f"model.num_classes = {model_cfg.get('num_classes')}")
    if "pos_embed" in expected and "pos_embed" in got and got["pos_embed"][1] != expected["pos_embed"][1]:
        p = int(model_cfg.get("patch_size", 1))
        extras = 2 if key in got else 1
        side = int(round(math.sqrt(max(got["pos_embed"][1] - extras, 0)))) * p
        problems.append(f"the checkpoint's pos_embed has {got['pos_embed'][1]} tokens (image size {side} at "
                        f"patch {p}) but params model.img_size = {model_cfg.get('img_size')}, "
                        f"model.patch_size = {p} need {expected['pos_embed'][1]}")
    pk = "patch_embed.proj.weight"
    if pk in got and pk in expected and got[pk][1] != expected[pk][1]:
        problems.append(f"the checkpoint takes {got[pk][1]} image channels but params "
                        f"model.in_chans = {model_cfg.get('in_chans')}")
    if not problems:  # something else: name the keys
        mismatch = compare(expected, got)
        detail = [f"{k}: checkpoint {got[k]} vs params {expected[k]}" for k in mismatch.differing[:6]]
        if mismatch.missing:
            detail.append(f"missing in checkpoint: {', '.join(mismatch.missing[:6])}"
                          + (" ..." if len(mismatch.missing) > 6 else ""))
        if mismatch.unexpected:
            detail.append(f"unexpected: {', '.join(mismatch.unexpected[:6])}"
                          + (" ..." if len(mismatch.unexpected) > 6 else ""))
        if detail:
            problems.append("; ".join(detail) + " (check model.embed_dim, depth, mlp_ratio, conv, "
                            "mlp_time_embed, qkv_bias against the training run)")
    return problems


# ----------------------------------------------------------------------------------------------
# the sample step's checkpoint: the trained EMA weights for params.yaml's model
# ----------------------------------------------------------------------------------------------
def _checked(model_cfg, checkpoint_path, train_cfg=None):
    """``(model, state_dict)``: the model params.yaml describes and the checkpoint, checked to fit it."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint {path} does not exist; train the model first "
                                     f"(snakemake {path}) or point the sample step at the right file")
    try:
        state = read_state_dict(path)[0]
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} could not be read as a state dict ({exc}); "
                              f"delete it and retrain") from exc
    model = build_model(model_cfg, train_cfg)
    problems = _fit_problems(model_cfg, train_cfg, shapes(model.state_dict()), shapes(state))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit params.yaml's model block: "
                              + "; ".join(problems) + ". Sample with the model params the checkpoint was "
                              "trained with, or retrain for these params.")
    return model, state


def check_checkpoint(model_cfg, checkpoint_path, train_cfg=None):
    """Load ``checkpoint_path`` and check it against the model block of params.yaml (and the train
    block's label_dropout, which adds a null class). Returns the state dict.

    Raises ``MissingCheckpointError`` for a missing file and ``CheckpointError`` naming the params key
    (``model.num_classes``, ``model.img_size``, ...) for one that does not fit. Reads only."""
    return _checked(model_cfg, checkpoint_path, train_cfg)[1]


def load_model(model_cfg, checkpoint_path, device="cpu", train_cfg=None):
    """Build the model params.yaml describes, load the checked checkpoint (strict), eval mode."""
    model, state = _checked(model_cfg, checkpoint_path, train_cfg)
    model.load_state_dict(state, strict=True)  # _checked found every key and shape in place
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# loading a state dict into a model: strictly, or adapted from a released U-ViT
# ----------------------------------------------------------------------------------------------
def load_state_dict_checked(model, sd_or_path):
    """Strict ``load_state_dict`` whose error names the architecture of the file and of the model."""
    sd, source = read_state_dict(sd_or_path)
    model_sd = model.state_dict()
    expected, got = shapes(model_sd), shapes(sd)
    mismatch = compare(expected, got)
    if not mismatch.fits():
        raise ValueError(
            f"checkpoint {source} is for {_fmt(describe_uvit(sd))} but the model built from params.yaml "
            f"is {_fmt(describe_uvit(model_sd))}. Mismatched keys:\n"
            + "\n".join(_mismatch_lines(mismatch, expected, got))
            + "\nFix the 'model:' block in params.yaml, or retrain (delete the checkpoint) for the new model.")
    model.load_state_dict(sd, strict=True)
    return model


def init_from_pretrained(model, state_dict, source=None):
    """Initialise ``model`` from a pretrained U-ViT "excluding the label layer" (DESIGN.md).

    - unconditional checkpoint (no ``label_emb``, ``pos_embed`` one token shorter) into a conditional
      model: ``pos_embed[:, 0:]`` of the checkpoint goes to ``pos_embed[:, 1:]`` (the label token is new,
      at index 0); ``label_emb`` stays as initialised;
    - conditional checkpoint with another class count: everything but ``label_emb`` is copied.
    Any other difference raises ValueError listing every mismatched key with both shapes.
    Returns ``dict(copied=[...], fresh=[...])`` (parameter names; the pos_embed split is spelled out).
    ``source`` names the file in errors when ``state_dict`` was already loaded from one.
    """
    sd, loaded_from = read_state_dict(state_dict)
    source = source or loaded_from
    model_sd = model.state_dict()
    conditional = "label_emb.weight" in model_sd
    copied, fresh, problems = [], [], []
    plan = {}

    for key, target in model_sd.items():
        src = sd.get(key)
        if key == "label_emb.weight" and (src is None or (src.dim() == 2 and src.shape[1] == target.shape[1])):
            fresh.append(key)  # a new class count or a new label layer: never copied
        elif (key == "pos_embed" and conditional and "label_emb.weight" not in sd and src is not None
              and src.dim() == 3 and src.shape[0] == 1 and src.shape[1] == target.shape[1] - 1
              and src.shape[2] == target.shape[2]):
            plan[key] = ("shift", src)
            copied.append("pos_embed[:, 1:]")
            fresh.append("pos_embed[:, 0]")
        elif src is None:
            problems.append(f"  {key}: missing in checkpoint (model {tuple(target.shape)})")
        elif tuple(src.shape) != tuple(target.shape):
            problems.append(f"  {key}: checkpoint {tuple(src.shape)} vs model {tuple(target.shape)}")
        else:
            plan[key] = ("copy", src)
            copied.append(key)
    for key in compare(shapes(model_sd), shapes(sd)).unexpected:
        problems.append(f"  {key}: unexpected in checkpoint {tuple(sd[key].shape)}")
    if problems:
        raise ValueError(
            f"{source} ({_fmt(describe_uvit(sd))}) cannot initialise this model "
            f"({_fmt(describe_uvit(model_sd))}): only the label layer may differ. Mismatches:\n"
            + "\n".join(problems)
            + "\nFix the 'model:' block in params.yaml to the checkpoint's architecture, or choose another "
              "'pretrained:' entry.")

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for key, (how, src) in plan.items():
            if how == "shift":
                params[key][:, 1:].copy_(src)
            else:
                params[key].copy_(src)
    return dict(copied=copied, fresh=fresh)


def load_initial_weights(model, init):
    """Load starting weights from a state dict or a checkpoint file (a released U-ViT ``.pth``):
    strictly when every key and shape matches, else adapt a pretrained U-ViT through
    ``init_from_pretrained`` (which raises listing what does not fit)."""
    state_dict, source = read_state_dict(init)
    own = model.state_dict()
    if compare(shapes(own), shapes(state_dict)).fits():
        model.load_state_dict(state_dict, strict=True)
        return {"copied": sorted(own), "fresh": []}
    return init_from_pretrained(model, state_dict, source=source)
