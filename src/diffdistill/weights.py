"""Remote files and pretrained weights.

``fetch`` brings a file (Google Drive id, http(s) URL or local path) to a fixed place and verifies it;
``init_from_pretrained`` loads a released U-ViT checkpoint into a class-conditional model with a new
class count ("initialise from the pretrained weights excluding the label layer");
``load_state_dict_checked`` is a strict load whose error says which architecture the file is for.
"""
from .io import file_digest
import http.client
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# gdown resolves Drive's download page (virus-scan confirmation for big files) from this URL.
# A module constant so a test can point it at a loopback server and run the real gdown code.
GDRIVE_URL = "https://drive.google.com/uc?id={id}"
CHUNK = 1 << 20
TIMEOUT_S = 60
ALGORITHMS = ("sha256", "md5")


class FetchError(ValueError):
    """A remote file could not be fetched or verified; the message names the file and the fix."""


class ChecksumError(FetchError):
    """A file's digest differs from the expected one."""


# --------------------------------------------------------------------------------------------------
# checksums


def parse_checksum(checksum):
    """'sha256:<hex>' or 'md5:<hex>' (a prefix of the hex is accepted) -> (algorithm, hex)."""
    m = re.fullmatch(r"\s*(sha256|md5):([0-9a-fA-F]+)\s*", str(checksum))
    if not m:
        raise FetchError(f"checksum {checksum!r} is not of the form 'sha256:<hex>' or 'md5:<hex>' "
                         f"(a prefix of the hex is fine); fix it in params.yaml or set it to null")
    return m.group(1), m.group(2).lower()


def verify(path, checksum):
    """Check ``path`` against ``checksum``; return the full hex digest, raise ChecksumError if it differs."""
    algorithm, expected = parse_checksum(checksum)
    actual = file_digest(path, algorithm)
    if not actual.startswith(expected):
        raise ChecksumError(f"{path}: {algorithm} mismatch: expected {expected}…, got {actual}. The file is "
                            f"corrupt, truncated or a different version; delete it and fetch again, or fix "
                            f"the checksum in params.yaml if the new file is the right one.")
    return actual


def _record_path(dest):
    return Path(str(dest) + ".sha256")


def _read_record(dest):
    rec = _record_path(dest)
    if rec.exists():
        text = rec.read_text().split()
        if text and re.fullmatch(r"[0-9a-f]{64}", text[0]):
            return "sha256:" + text[0]
    return None


def _trust_on_first_use(dest):
    """No checksum configured: record the file's sha256 beside it; later runs verify against it."""
    from .io import atomic_path

    digest = file_digest(dest)
    with atomic_path(_record_path(dest)) as tmp:
        tmp.write_text(f"{digest}  {Path(dest).name}\n")
    log.warning("%s: no checksum configured; recorded its sha256 %s in %s (trust on first use: later runs "
                "verify against it). Pin it with 'checksum: sha256:%s' in params.yaml.",
                dest, digest, _record_path(dest), digest)


# --------------------------------------------------------------------------------------------------
# fetch


def _by_hand(source, dest, checksum):
    where = source
    if str(source).startswith("gdrive:"):
        where = GDRIVE_URL.format(id=str(source)[len("gdrive:"):]) + " (open it in a browser)"
    want = f" (expected {checksum})" if checksum else ""
    return f"Download {where} by hand and place it at {dest}{want}, then rerun."


def _download_url(url, out, progress):
    """Stream ``url`` into ``out`` with a progress bar; fail on a short body."""
    from .progress import progress as progress_bar

    req = urllib.request.Request(url, headers={"User-Agent": "diffdistill"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp, open(out, "wb") as f:
        total = resp.length
        done = 0
        with progress_bar(total=total, unit="B", unit_scale=True, desc=Path(out).name.split(".part")[0],
                          disable=not progress) as bar:
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                f.write(block)
                done += len(block)
                bar.update(len(block))
    if total is not None and done < total:
        raise FetchError(f"download of {url} ended after {done} of {total} bytes")


def _download_gdrive(file_id, out, progress):
    """Drive files go through gdown, which handles the large-file confirmation page."""
    try:
        import gdown
    except ImportError as e:  # pragma: no cover - gdown is in the environment
        raise FetchError("the 'gdown' package is needed for gdrive: sources; pip install gdown") from e
    # gdown keeps partial files beside its output on failure; give it a private folder we delete.
    tmpdir = Path(tempfile.mkdtemp(prefix=".gdown.", dir=Path(out).parent))
    try:
        from .progress import bars_enabled   # gdown draws a bar or nothing: nothing off a terminal
        got = gdown.download(url=GDRIVE_URL.format(id=file_id), output=str(tmpdir / "file"),
                             quiet=not (progress and bars_enabled()))
        if not got or not Path(got).exists():
            raise FetchError(f"gdown returned no file for Drive id {file_id}")
        os.replace(got, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _fetch_to(source, tmp, progress):
    source = str(source)
    if source.startswith("gdrive:"):
        _download_gdrive(source[len("gdrive:"):], tmp, progress)
    elif re.match(r"https?://", source):
        _download_url(source, tmp, progress)
    else:
        src = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
        if not src.is_file():
            raise FileNotFoundError(f"local source {src} does not exist")
        shutil.copyfile(src, tmp)


def _reject_html(path, source, dest):
    """Drive answers a quota or sign-in problem with an HTML page; never take that for the file
    (with no checksum pinned, trust on first use would otherwise record it)."""
    if Path(dest).suffix.lower() in (".html", ".htm"):
        return
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise FetchError("the server sent an HTML page, not the file (a Drive quota, permission or "
                         "sign-in page?)")


def fetch(source, dest, checksum=None, progress=True):
    """Bring ``source`` to ``dest`` and verify it; return ``Path(dest)``.

    ``source``: ``gdrive:<id>`` (through gdown), an http(s) URL, or a local path (copied).
    ``checksum``: ``sha256:<hex>`` / ``md5:<hex>``, a hex prefix allowed; ``None`` records the sha256 of
    the first download in ``<dest>.sha256`` and checks against it afterwards (trust on first use).
    A file already at ``dest`` that verifies is not downloaded again. Nothing is left at ``dest`` unless
    it verified; a failed download leaves no temporary file.
    """
    dest = Path(dest)
    if checksum is not None:
        parse_checksum(checksum)  # a malformed checksum is an error before any download
    expected = checksum or _read_record(dest)

    if dest.exists():
        if expected is None:
            _trust_on_first_use(dest)
            return dest
        try:
            verify(dest, expected)
            return dest
        except ChecksumError as e:
            log.warning("%s exists but does not verify (%s); fetching it again", dest, e)

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            _fetch_to(source, tmp, progress)
            _reject_html(tmp, source, dest)
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as e:
            reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
            raise FetchError(f"could not fetch {source} -> {dest}: {reason}. "
                             f"{_by_hand(source, dest, expected)}") from e
        except FetchError as e:
            raise FetchError(f"could not fetch {source} -> {dest}: {e}. {_by_hand(source, dest, expected)}") from e
        except Exception as e:  # gdown's own errors (quota, permissions, no network)
            if type(e).__module__.startswith("gdown") or "requests" in type(e).__module__:
                raise FetchError(f"could not fetch {source} -> {dest}: {e}. "
                                 f"{_by_hand(source, dest, expected)}") from e
            raise
        if expected is not None:
            algorithm, want = parse_checksum(expected)
            actual = file_digest(tmp, algorithm)
            if not actual.startswith(want):
                raise ChecksumError(
                    f"{source} -> {dest}: {algorithm} mismatch: expected {want}…, got {actual}. The download "
                    f"is corrupt, truncated or a different version; it was deleted. Fetch again, or fix the "
                    f"checksum ({'params.yaml' if checksum else _record_path(dest)}) if the new file is "
                    f"the right one. {_by_hand(source, dest, expected)}")
            os.replace(tmp, dest)
        else:
            os.replace(tmp, dest)
            _trust_on_first_use(dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


# --------------------------------------------------------------------------------------------------
# U-ViT state dicts

_WRAPPERS = ("state_dict", "model", "nnet_ema", "nnet", "ema")


def load_checkpoint(sd_or_path):
    """A state dict from a dict or a file; unwraps {'model': ...}-style wrappers and DDP's 'module.'."""
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


def _mismatch_report(model_sd, sd):
    lines = []
    for k in sorted(set(model_sd) & set(sd)):
        if tuple(model_sd[k].shape) != tuple(sd[k].shape):
            lines.append(f"  {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}")
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    if missing:
        lines.append(f"  missing in checkpoint ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected in checkpoint ({len(unexpected)}): " + ", ".join(unexpected))
    return lines


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
    sd, loaded_from = load_checkpoint(state_dict)
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
    for key in sorted(set(sd) - set(model_sd)):
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


def load_state_dict_checked(model, sd_or_path):
    """Strict ``load_state_dict`` whose error names the architecture of the file and of the model."""
    sd, source = load_checkpoint(sd_or_path)
    model_sd = model.state_dict()
    lines = _mismatch_report(model_sd, sd)
    if lines:
        raise ValueError(
            f"checkpoint {source} is for {_fmt(describe_uvit(sd))} but the model built from params.yaml "
            f"is {_fmt(describe_uvit(model_sd))}. Mismatched keys:\n" + "\n".join(lines)
            + "\nFix the 'model:' block in params.yaml, or retrain (delete the checkpoint) for the new model.")
    model.load_state_dict(sd, strict=True)
    return model
