"""Tests for diffdistill.checkpoint: the checkpoint the sample step loads, checked against params.yaml;
pretrained U-ViT loading with checkpoints in the released layouts (small, and at full size for the real
shapes); strict loads that name both architectures."""
import pytest
import torch

from diffdistill import checkpoint
from diffdistill.uvit import UViT

K = 3
TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
            qkv_bias=False, mlp_time_embed=False, num_classes=K, conv=True, skip=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UViT(**TINY).eval()


def test_check_checkpoint(model, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    state = checkpoint.check_checkpoint(TINY, good)
    assert set(state) == set(model.state_dict())
    loaded = checkpoint.load_model(TINY, good)
    assert not loaded.training
    assert torch.equal(loaded.pos_embed, model.pos_embed)

    other_classes = tmp_path / "classes.pt"
    torch.save(UViT(**dict(TINY, num_classes=5)).state_dict(), other_classes)
    other_size = tmp_path / "size.pt"
    torch.save(UViT(**dict(TINY, img_size=16)).state_dict(), other_size)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"model\.num_classes = 3"):
        checkpoint.check_checkpoint(TINY, other_classes)
    with pytest.raises(ValueError, match=r"image size 16 .*model\.img_size = 8"):
        checkpoint.check_checkpoint(TINY, other_size)
    with pytest.raises(ValueError, match="does not exist") as err:
        checkpoint.check_checkpoint(TINY, tmp_path / "missing.pt")
    assert isinstance(err.value, FileNotFoundError)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_check_checkpoint_with_null_class(tmp_path):
    # train.label_dropout > 0 adds one (null) class to label_emb; the check follows the trainer's rule.
    ckpt = tmp_path / "ema.pt"
    torch.save(UViT(**dict(TINY, num_classes=K + 1)).state_dict(), ckpt)
    checkpoint.check_checkpoint(TINY, ckpt, train_cfg={"label_dropout": 0.1})
    with pytest.raises(ValueError, match="model.num_classes = 3 needs 3"):
        checkpoint.check_checkpoint(TINY, ckpt)


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
    report = checkpoint.init_from_pretrained(model, ckpt if source is None else source)
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
        checkpoint.init_from_pretrained(model, path)
    msg = str(e.value)
    assert str(path) in msg and "D 48" in msg and "D 32" in msg
    assert "patch_embed.proj.weight: checkpoint (48, 3, 2, 2) vs model (32, 3, 2, 2)" in msg
    assert "out_blocks.1.skip_linear.weight: checkpoint (48, 96) vs model (32, 64)" in msg
    assert msg.count(" vs model ") == len(differing) > 60  # every one listed, not just the first
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    deeper = released(lambda: small(4, depth=6))
    with pytest.raises(ValueError, match=r"in_blocks\.2\.norm1\.weight: unexpected"):
        checkpoint.init_from_pretrained(small(4), deeper)
    shallower = released(lambda: small(4, depth=2))
    with pytest.raises(ValueError, match=r"in_blocks\.1\.attn\.qkv\.weight: missing in checkpoint"):
        checkpoint.init_from_pretrained(small(4), shallower)


def test_load_state_dict_checked(tmp_path):
    model = small(10)
    sd = {k: v + 1 for k, v in small(10).state_dict().items()}
    checkpoint.load_state_dict_checked(model, sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    path = tmp_path / "ema.pt"
    torch.save(released(lambda: small(100, img_size=16, in_chans=3)), path)
    with pytest.raises(ValueError) as e:
        checkpoint.load_state_dict_checked(small(10, in_chans=1), path)
    msg = str(e.value)
    assert "is for 100 classes / 16 px / 3 channels" in msg and "is 10 classes / 8 px / 1 channels" in msg
    assert "label_emb.weight: checkpoint (100, 32) vs model (10, 32)" in msg
    with pytest.raises(FileNotFoundError, match="fetch it first"):
        checkpoint.load_state_dict_checked(model, tmp_path / "none.pt")


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
