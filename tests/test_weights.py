"""weights.fetch against a loopback server (checksums, trust on first use, offline, Google Drive)."""
import hashlib
import logging

import pytest

from diffdistill import weights
from servers import closed_port_url, serve

PAYLOAD = b"pretrained weights \x00\x01" * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def leftovers(folder, keep):
    """Files in ``folder`` other than ``keep``: temporary or partial files must never remain."""
    return sorted(p.name for p in folder.rglob("*") if p.name not in keep)


# --------------------------------------------------------------------------------------------------
# fetch


def test_fetch_url_verifies_and_skips_when_present(tmp_path):
    dest = tmp_path / "w" / "model.pth"
    with serve({"/model.pth": PAYLOAD}) as srv:
        assert weights.fetch(srv.url("/model.pth"), dest, checksum=f"sha256:{SHA}", progress=False) == dest
        assert dest.read_bytes() == PAYLOAD and srv.hits["/model.pth"] == 1
        # Present and valid: no second download; a hex prefix (torch.hub style) and md5 work too.
        weights.fetch(srv.url("/model.pth"), dest, checksum=f"sha256:{SHA[:8]}", progress=False)
        weights.fetch(srv.url("/model.pth"), dest, checksum=f"md5:{MD5.upper()[:10]}", progress=False)
        assert srv.hits["/model.pth"] == 1
        # A damaged local copy is fetched again.
        dest.write_bytes(b"garbage")
        weights.fetch(srv.url("/model.pth"), dest, checksum=f"sha256:{SHA}", progress=False)
        assert dest.read_bytes() == PAYLOAD and srv.hits["/model.pth"] == 2
    assert leftovers(tmp_path / "w", {"model.pth"}) == []


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path):
    dest = tmp_path / "model.pth"
    with serve({"/m": PAYLOAD}) as srv:
        with pytest.raises(weights.ChecksumError) as e:
            weights.fetch(srv.url("/m"), dest, checksum="sha256:deadbeef", progress=False)
    msg = str(e.value)
    assert "expected deadbeef" in msg and SHA in msg and str(dest) in msg
    assert leftovers(tmp_path, set()) == []


def test_fetch_bad_checksum_string(tmp_path):
    with pytest.raises(weights.FetchError, match="sha256:<hex>"):
        weights.fetch(closed_port_url(), tmp_path / "x", checksum="crc32:1234")


def test_fetch_offline_names_url_and_destination(tmp_path):
    url = closed_port_url("/tiny-imagenet-200.zip")
    dest = tmp_path / "downloads" / "tiny-imagenet-200.zip"
    with pytest.raises(weights.FetchError) as e:
        weights.fetch(url, dest, checksum=f"md5:{MD5}", progress=False)
    msg = str(e.value)
    assert url in msg and str(dest) in msg and "by hand" in msg and MD5 in msg
    assert leftovers(tmp_path, {"downloads"}) == []


def test_fetch_truncated_and_missing(tmp_path):
    dest = tmp_path / "model.pth"
    with serve({"/m": PAYLOAD}, truncate={"/m": 100}) as srv:
        with pytest.raises(weights.FetchError, match="by hand"):
            weights.fetch(srv.url("/m"), dest, progress=False)
        with pytest.raises(weights.FetchError, match="404"):
            weights.fetch(srv.url("/nothing"), dest, progress=False)
        with pytest.raises(weights.FetchError, match="HTML page"):
            srv.files["/quota"] = b"<!DOCTYPE html><html>Google Drive - Quota exceeded</html>"
            weights.fetch(srv.url("/quota"), dest, progress=False)
    assert leftovers(tmp_path, set()) == []  # no file, no trust-on-first-use record of a bad file


def test_fetch_local_path_and_tofu(tmp_path, caplog):
    src = tmp_path / "src.pth"
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "model.pth"
    with caplog.at_level(logging.WARNING, logger="diffdistill.weights"):
        weights.fetch(str(src), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    record = dest.parent / "model.pth.sha256"
    assert record.read_text().split()[0] == SHA
    assert "trust on first use" in caplog.text and SHA in caplog.text
    # Later runs verify against the record: a changed source no longer passes.
    dest.unlink()
    src.write_bytes(PAYLOAD + b"tampered")
    with pytest.raises(weights.ChecksumError, match="model.pth.sha256"):
        weights.fetch(str(src), dest, progress=False)
    assert not dest.exists()
    with pytest.raises(weights.FetchError, match="does not exist"):
        weights.fetch(str(tmp_path / "missing.pth"), dest, progress=False)
    assert leftovers(tmp_path / "out", {"model.pth.sha256"}) == []


def test_fetch_gdrive_goes_through_gdown(tmp_path, monkeypatch):
    import gdown

    calls = []
    real = gdown.download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("url"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gdown, "download", spy)
    dest = tmp_path / "cifar10_uvit_small.pth"
    with serve({"/uc/1yoYyuzR": PAYLOAD}) as srv:
        # The real gdown code downloads, from a loopback stand-in for drive.google.com/uc?id=<id>.
        monkeypatch.setattr(weights, "GDRIVE_URL", srv.url("/uc/{id}"))
        weights.fetch("gdrive:1yoYyuzR", dest, checksum=f"sha256:{SHA[:12]}", progress=False)
    assert calls == [srv.url("/uc/1yoYyuzR")] and dest.read_bytes() == PAYLOAD
    monkeypatch.setattr(weights, "GDRIVE_URL", closed_port_url("/uc/{id}"))
    with pytest.raises(weights.FetchError, match="by hand"):
        weights.fetch("gdrive:other", tmp_path / "other.pth", progress=False)
    assert leftovers(tmp_path, {"cifar10_uvit_small.pth"}) == []
