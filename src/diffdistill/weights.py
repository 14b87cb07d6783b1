"""Remote files: fetch and verify.

``fetch`` brings a file (Google Drive id, http(s) URL or local path) to a fixed place and verifies it
against a checksum (or records one: trust on first use). What is in a weights file, and how it is
loaded into a model, is checkpoint.py's job.
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
