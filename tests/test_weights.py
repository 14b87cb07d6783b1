"""weights.fetch against a loopback server; pretrained U-ViT loading with checkpoints in the released
layouts (small, and at full size for the real shapes)."""
import hashlib
import logging

import pytest
import torch

from diffdistill import weights
from diffdistill.uvit import UViT
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


# --------------------------------------------------------------------------------------------------
# pretrained U-ViT


def small(num_classes, **kw):
    cfg = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2,
               qkv_bias=False, mlp_time_embed=False, conv=True, skip=True)
    cfg.update(kw)
    return UViT(**cfg, num_classes=num_classes)


def released(model_factory):
    """A checkpoint in the released layout: the key names and shapes of that U-ViT, random values."""
    with torch.device("meta"):
        skeleton = model_factory()
    g = torch.Generator().manual_seed(123)
    return {k: torch.randn(v.shape, generator=g) for k, v in skeleton.state_dict().items()}


def check_init(model, ckpt, unconditional, source=None):
    """Load ``source`` (default: ``ckpt``) and compare with the tensors of ``ckpt``."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = weights.init_from_pretrained(model, ckpt if source is None else source)
    after = model.state_dict()
    for k, v in after.items():
        if k == "label_emb.weight":
            assert torch.equal(v, before[k])  # fresh: left as initialised
        elif k == "pos_embed" and unconditional:
            assert torch.equal(v[:, 1:], ckpt[k]) and torch.equal(v[:, 0], before[k][:, 0])
        else:
            assert torch.equal(v, ckpt[k]), k
    assert "label_emb.weight" in report["fresh"]
    assert len(report["copied"]) == len(after) - 1
    return report


def test_unconditional_into_conditional_small(tmp_path):
    ckpt = released(lambda: small(-1))
    assert "label_emb.weight" not in ckpt and ckpt["pos_embed"].shape == (1, 17, 32)
    path = tmp_path / "uncond.pth"
    torch.save(ckpt, path)
    model = small(5)
    report = check_init(model, torch.load(path, weights_only=True), unconditional=True)
    assert "pos_embed[:, 1:]" in report["copied"] and "pos_embed[:, 0]" in report["fresh"]
    # The same from the file path, and from a {'model': ...} wrapper with DDP's 'module.' prefix.
    check_init(small(5), ckpt, unconditional=True, source=path)
    check_init(small(5), ckpt, unconditional=True,
               source={"model": {f"module.{k}": v for k, v in ckpt.items()}})


def test_class_count_change_small():
    ckpt = released(lambda: small(10))
    check_init(small(4), ckpt, unconditional=False)


def test_wrong_architecture_lists_every_mismatch(tmp_path):
    path = tmp_path / "wide.pth"
    wide = released(lambda: small(10, embed_dim=48))
    torch.save(wide, path)
    model = small(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    differing = [k for k in before if wide[k].shape != before[k].shape]
    with pytest.raises(ValueError) as e:
        weights.init_from_pretrained(model, path)
    msg = str(e.value)
    assert str(path) in msg and "D 48" in msg and "D 32" in msg
    assert "patch_embed.proj.weight: checkpoint (48, 3, 2, 2) vs model (32, 3, 2, 2)" in msg
    assert "out_blocks.1.skip_linear.weight: checkpoint (48, 96) vs model (32, 64)" in msg
    assert msg.count(" vs model ") == len(differing) > 60  # every one listed, not just the first
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    deeper = released(lambda: small(4, depth=6))
    with pytest.raises(ValueError, match=r"in_blocks\.2\.norm1\.weight: unexpected"):
        weights.init_from_pretrained(small(4), deeper)
    shallower = released(lambda: small(4, depth=2))
    with pytest.raises(ValueError, match=r"in_blocks\.1\.attn\.qkv\.weight: missing in checkpoint"):
        weights.init_from_pretrained(small(4), shallower)


def test_load_state_dict_checked(tmp_path):
    model = small(10)
    sd = {k: v + 1 for k, v in small(10).state_dict().items()}
    weights.load_state_dict_checked(model, sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    path = tmp_path / "ema.pt"
    torch.save(released(lambda: small(100, img_size=16, in_chans=3)), path)
    with pytest.raises(ValueError) as e:
        weights.load_state_dict_checked(small(10, in_chans=1), path)
    msg = str(e.value)
    assert "is for 100 classes / 16 px / 3 channels" in msg and "is 10 classes / 8 px / 1 channels" in msg
    assert "label_emb.weight: checkpoint (100, 32) vs model (10, 32)" in msg
    with pytest.raises(FileNotFoundError, match="fetch it first"):
        weights.load_state_dict_checked(model, tmp_path / "none.pt")


S2 = dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
          qkv_bias=False, mlp_time_embed=False, conv=True, skip=True)
M4 = dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
          qkv_bias=False, mlp_time_embed=False, conv=True, skip=True)


def test_full_size_cifar10_s2_into_100_classes(tmp_path):
    ckpt = released(lambda: UViT(**S2, num_classes=-1))
    assert ckpt["pos_embed"].shape == (1, 257, 512) and sum(v.numel() for v in ckpt.values()) == 44_255_328
    path = tmp_path / "cifar10_uvit_small.pth"
    torch.save(ckpt, path)
    model = UViT(**S2, num_classes=100)
    check_init(model, torch.load(path, weights_only=True), unconditional=True)
    assert model.label_emb.weight.shape == (100, 512)


def test_full_size_imagenet64_m4_into_200_classes():
    ckpt = released(lambda: UViT(**M4, num_classes=1000))
    assert sum(v.numel() for v in ckpt.values()) == 130_940_292
    model = UViT(**M4, num_classes=200)
    check_init(model, ckpt, unconditional=False)
    del ckpt
