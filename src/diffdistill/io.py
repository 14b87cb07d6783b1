"""Output files: atomic, reproducible, readable by others.

- Atomic: every result is written under a temporary name beside its final one and renamed when
  complete, so a killed job never leaves a file that looks finished.
- Reproducible: the same content gives the same bytes, run after run, so DVC and Snakemake record one
  hash for one result. torch.save to a file records the file's (random, temporary) name inside its
  zip; ``save_torch`` saves through memory, where the name is fixed. (np.savez is reproducible: its
  zip members carry the zip format's fixed earliest date.)
- Readable: outputs get the mode any new file gets under the user's umask (0644 under umask 022), not
  the 0600 of ``tempfile.mkstemp``.
"""
import contextlib
import ctypes
import errno
import hashlib
import io as _io
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

def file_digest(path, algorithm="sha256"):
    """Hex digest of a file's bytes, read in 1 MiB blocks (checkpoints are hundreds of MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sibling(path, tag):
    """A fresh hidden name beside ``path`` (``.NAME.TAG<random>.tmp<suffixes>``; .gitignore'd)."""
    return path.with_name(f".{path.name}.{tag}{secrets.token_hex(4)}.tmp{''.join(path.suffixes)}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary file is created empty with mode 0666 less the umask, i.e. the mode any new file
    gets; writing to it by name (open(tmp, "w"), np.save, savefig …) keeps that mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling(path, "")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # another writer drew the same random name: draw again
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _exchange(a, b):
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where the
    platform or file system cannot; then nothing has changed."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _replace_dir(new, path):
    """Put folder ``new`` at ``path``, where a folder may already be. At every moment ``path`` holds the
    old folder or the new one (an atomic swap where the OS has one); the old one is deleted last."""
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):         # path is now the new folder, ``new`` holds the old one
        shutil.rmtree(new)
        return
    # No atomic swap: move the old folder aside, move the new one in, put the old back if that fails.
    aside = _sibling(path, "old")
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds.
    A failure (or a kill) at any point leaves ``path`` holding either the old folder or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling(path, "")
        try:
            os.mkdir(tmp, 0o777)     # 0777 less the umask: the mode any new folder gets
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def torch_bytes(obj):
    """``torch.save(obj)`` as bytes. Saved to memory, torch names the zip's root folder "archive"
    (to a file it uses the file's name, which for a temporary name changes every run)."""
    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch(path, obj):
    """The one way an output is saved with torch: serialised in memory first (a failure while
    pickling leaves nothing on disk), then written under a temporary name and renamed."""
    save_bytes(path, torch_bytes(obj))


def save_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path):
    return json.loads(Path(path).read_text())


def save_npz(path, **arrays):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_npz(path):
    """Load an image set {images uint8 [N,H,W,C], labels int64 [N], classes str [K]}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the step that makes it first")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
