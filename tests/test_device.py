"""How every step picks its device (config.step_device): no silent CPU fallback for a step that params
put on a GPU, an explicit CPU (`device: cpu` or --device cpu) honoured, digits on whatever is there."""
import json

import pytest
import torch
import yaml

from diffdistill import cli
from diffdistill.config import DeviceError, ParamsError, load_params, step_device, validate
from workflow import REPO


@pytest.fixture()
def no_cuda(monkeypatch):
    """A machine without CUDA, also where the tests run on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


def with_(params, **sections):
    """params with digits' sections updated: with_(p, train={"gpus": 2})."""
    out = json.loads(json.dumps(params))
    for section, values in sections.items():
        if section == "device":
            out["device"] = values
        else:
            out["digits"][section].update(values)
    return out


@pytest.mark.parametrize("section, change, key", [
    ("train", {"gpus": 2}, "digits.train.gpus is 2"),
    ("train", {"precision": "bf16"}, "digits.train.precision is bf16"),
    ("sample", {"gpus": 1}, "digits.sample.gpus is 1"),
    ("sample", {"precision": "fp16"}, "digits.sample.precision is fp16"),
    ("evaluate", {"gpus": 1}, "digits.evaluate.gpus is 1"),
    ("classifier", {"gpus": 1}, "digits.classifier.gpus is 1"),
    ("fid", {"gpus": 1}, "digits.fid.gpus is 1"),
])
def test_a_gpu_step_without_cuda_stops_naming_the_key_and_the_fix(params, no_cuda, section, change, key):
    p = with_(params, **{section: change})
    with pytest.raises(DeviceError, match=key) as err:
        step_device(p, "digits", section)
    assert "device: cpu" in str(err.value) and "--device cpu" in str(err.value)
    assert step_device(with_(p, device="cpu"), "digits", section) == torch.device("cpu")   # asked for
    assert step_device(p, "digits", section, "cpu") == torch.device("cpu")
    # another step's section does not count (evaluate.precision is not a thing: only train/sample)
    other = "select" if section != "select" else "audit"
    assert step_device(p, "digits", other) == torch.device("cpu")


def test_digits_runs_on_whatever_is_there(params, no_cuda, monkeypatch):
    for section in ("train", "sample", "evaluate", "classifier", "fid", "select", "audit"):
        assert step_device(params, "digits", section) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert step_device(params, "digits", "train") == torch.device("cuda")
    assert step_device(with_(params, device="cpu"), "digits", "train") == torch.device("cpu")
    assert step_device(params, "digits", "train", "cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="cuda:2 but only 2 CUDA"):
        step_device(params, "digits", "train", "cuda:2")


def test_explicit_cuda_without_cuda_and_bad_values(params, no_cuda):
    with pytest.raises(DeviceError, match="device: cuda asks for CUDA"):
        step_device(with_(params, device="cuda"), "digits", "train")
    with pytest.raises(DeviceError, match="--device cuda:0 asks for CUDA"):
        step_device(with_(params, device="cpu"), "digits", "train", "cuda:0")    # the flag wins
    with pytest.raises(DeviceError, match="'gpu0' is not a device"):
        step_device(params, "digits", "train", "gpu0")
    with pytest.raises(ParamsError, match="'device'.*'auto', 'cpu', 'cuda'"):
        validate(with_(params, device="tpu"))


# ---------------------------------------------------------------------------------------------- the CLI

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2}


@pytest.fixture()
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = ["--params", str(REPO / "params.yaml")]
    assert cli.main(["prepare", *params, "--dataset", "digits", "--out", "data/digits"]) == 0
    return tmp_path, params


def override(tmp_path, name, block, **top):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**top, "digits": block}))
    return ["--params", str(path)]


def test_cli_train_on_gpu_params_without_cuda_fails_before_writing(work, no_cuda, capsys):
    tmp_path, params = work
    gpu = override(tmp_path, "gpu.yaml", {"model": TINY, "train": {"gpus": 2, "precision": "bf16"}})
    rc = cli.main(["train", *params, *gpu, "--dataset", "digits", "--data", "data/digits", "--out", "ckpt"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "digits.train.gpus is 2" in err and "digits.train.precision is bf16" in err and "device: cpu" in err
    assert not (tmp_path / "ckpt").exists()
    for step, extra in (("evaluate", ["--set", "full_real", "--seed", "0", "--train", "data/digits/train.npz",
                                      "--test", "data/digits/test.npz", "--out", "res/eval.json"]),
                        ("classifier", ["--train", "data/digits/train.npz", "--out", "res/classifier.pt"])):
        on_gpu = override(tmp_path, f"{step}.yaml", {step: {"gpus": 1}})
        assert cli.main([step, *params, *on_gpu, "--dataset", "digits", *extra]) == 1
        assert f"digits.{step}.gpus is 1" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_cli_train_with_device_cpu_runs_a_gpu_configuration(work, no_cuda, capsys):
    """The rehearsal of a paper-like configuration on a CPU machine: `device: cpu` in an override."""
    tmp_path, params = work
    rehearsal = override(tmp_path, "cpu.yaml", {"model": TINY, "train": {
        "gpus": 2, "precision": "bf16", "steps": 2, "batch_size": 8, "micro_batch": 8, "fid_every": 0}},
        device="cpu")
    rc = cli.main(["train", *params, *rehearsal, "--dataset", "digits", "--data", "data/digits", "--out", "ckpt"])
    assert rc == 0
    summary = json.loads((tmp_path / "ckpt" / "train.json").read_text())
    assert summary["device"] == "cpu" and summary["precision"] == "fp32" and summary["steps"] == 2
    assert capsys.readouterr().err.count("precision bf16 requested on cpu: running fp32") == 1   # one info line
    # the same with --device cpu instead of the params key
    gpu = override(tmp_path, "gpu.yaml", {"model": TINY, "train": {
        "gpus": 2, "steps": 2, "batch_size": 8, "micro_batch": 8, "fid_every": 0}})
    assert cli.main(["train", *params, *gpu, "--dataset", "digits", "--data", "data/digits", "--out", "ckpt2",
                     "--device", "cpu"]) == 0
