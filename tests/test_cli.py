"""The CLI as the rules call it: finetuning from a checkpoint in the released U-ViT layout, and what a
failed step leaves in its log file and on the console."""
import logging

import pytest
import torch
import yaml

from diffdistill import cli
from diffdistill.checkpoint import build_model
from workflow import REPO

TINY_MODEL = {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "mlp_ratio": 2, "qkv_bias": False, "mlp_time_embed": False, "num_classes": 10, "conv": True,
              "skip": True}


def released_unconditional(model_cfg, path, seed=123):
    """A checkpoint as the public CIFAR-10 U-ViT is released: unconditional (no label_emb, pos_embed one
    token shorter), a plain state dict, other random weights than the model's own seed gives."""
    torch.manual_seed(seed)
    sd = build_model(dict(model_cfg, num_classes=0)).state_dict()
    torch.save(sd, path)
    return sd


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """A folder with data/digits prepared and an override that finetunes the tiny model from weights/."""
    monkeypatch.chdir(tmp_path)
    override = {
        "weights": {"tiny_released": {"source": str(tmp_path / "src.pth"), "checksum": None,
                                      "filename": "tiny_released.pth"}},
        "digits": {"model": TINY_MODEL, "pretrained": "tiny_released",
                   "train": {"steps": 2, "batch_size": 8, "micro_batch": 8, "warmup_steps": 1,
                             "ema_decay": 0.9999, "checkpoint_every": 1, "fid_every": 0}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    params = ["--params", str(REPO / "params.yaml"), "--params", "override.yaml"]
    assert cli.main(["prepare", *params, "--dataset", "digits", "--out", "data/digits"]) == 0
    return tmp_path, params


def test_train_finetunes_from_a_released_layout_checkpoint(work):
    tmp_path, params = work
    (tmp_path / "weights").mkdir()
    src = released_unconditional(TINY_MODEL, tmp_path / "weights" / "tiny_released.pth")
    rc = cli.main(["train", *params, "--dataset", "digits", "--data", "data/digits", "--out", "ckpt",
                   "--log-file", "logs/train.log", "--device", "cpu"])
    assert rc == 0, (tmp_path / "logs/train.log").read_text()
    ema = torch.load(tmp_path / "ckpt" / "ema.pt", weights_only=True)
    # EMA 0.9999 over two updates moves a weight by ~1e-7: the EMA still shows where training started.
    for key, value in src.items():
        if key == "pos_embed":  # the label token is new, at slot 0; the released tokens move up one
            torch.testing.assert_close(ema[key][:, 1:], value, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(ema[key], value, atol=1e-5, rtol=0)
    assert "label_emb.weight" not in src and ema["label_emb.weight"].shape == (10, 32)
    torch.manual_seed(0)  # train.seed: the fresh label embedding is the seeded model's own
    fresh = build_model(TINY_MODEL).state_dict()["label_emb.weight"]
    torch.testing.assert_close(ema["label_emb.weight"], fresh, atol=1e-5, rtol=0)


def test_a_checkpoint_of_another_architecture_fails_clearly(work, capsys):
    tmp_path, params = work
    (tmp_path / "weights").mkdir()
    released_unconditional(dict(TINY_MODEL, embed_dim=48, num_heads=4), tmp_path / "weights" / "tiny_released.pth")
    rc = cli.main(["train", *params, "--dataset", "digits", "--data", "data/digits", "--out", "ckpt",
                   "--log-file", "logs/train.log", "--device", "cpu"])
    assert rc == 1
    text = (tmp_path / "logs/train.log").read_text()
    assert "Traceback" in text and "cannot initialise this model" in text and "patch_embed.proj.weight" in text
    console = capsys.readouterr().err
    assert "train failed:" in console and "logs/train.log" in console and "Traceback" not in console
    assert not (tmp_path / "ckpt" / "ema.pt").exists() and not (tmp_path / "ckpt" / "state.pt").exists()


def test_an_unexpected_error_keeps_its_traceback(work, capsys, monkeypatch):
    tmp_path, params = work

    def broken(args):
        raise TypeError("'PosixPath' object is not iterable")

    monkeypatch.setattr(cli, "cmd_train", broken)
    args = ["train", *params, "--dataset", "digits", "--data", "data/digits", "--out", "ckpt"]
    assert cli.main(args + ["--log-file", "logs/train.log"]) == 1
    text = (tmp_path / "logs/train.log").read_text()
    assert "Traceback" in text and "TypeError: 'PosixPath' object is not iterable" in text
    console = capsys.readouterr().err
    assert "train failed: TypeError" in console and "Traceback" not in console
    # Without a log file the traceback stays on the console.
    assert cli.main(args) == 1
    assert "Traceback" in capsys.readouterr().err
    logging.getLogger().handlers.clear()
