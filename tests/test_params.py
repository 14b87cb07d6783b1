"""params.yaml is validated before any job runs: a bad value stops the run with a message naming the key."""
import argparse
import copy

import pytest
import yaml

from diffdistill.cli import main as cli_main
from diffdistill.config import ParamsError, load_params, validate
from workflow import REPO, copy_workflow, snakemake


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


def test_committed_params_are_valid(params):
    assert params["datasets"] == ["digits"]
    for ds in ("digits", "cifar100", "tinyimagenet"):
        assert params[ds]["model"]["num_classes"] >= 10


@pytest.mark.parametrize("mutate, key", [
    (lambda p: p["digits"]["train"].__setitem__("steps", "many"), "digits.train.steps"),
    (lambda p: p["digits"]["sample"].__setitem__("budget_seconds", -5), "digits.sample.budget_seconds"),
    (lambda p: p["digits"]["sample"].__setitem__("max_per_class", 0), "digits.sample.max_per_class"),
    (lambda p: p["digits"]["data"].__setitem__("kind", "mnist"), "digits.data.kind"),
    (lambda p: p["digits"]["evaluate"].__setitem__("seeds", []), "digits.evaluate.seeds"),
    (lambda p: p["digits"]["model"].__setitem__("depht", 4), "digits.model"),
])
def test_invalid_values_name_the_key(params, mutate, key):
    bad = copy.deepcopy(params)
    mutate(bad)
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        validate(bad)


def test_unknown_dataset_is_named(params):
    bad = copy.deepcopy(params)
    bad["datasets"] = ["digits", "imagenet"]
    with pytest.raises(ParamsError, match="'imagenet'"):
        validate(bad)


def test_snakemake_stops_before_any_job(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"digits": {"sample": {"budget_seconds": -1}}}))
    out = snakemake(work, "--cores", "1", "--configfile", str(bad), check=False)
    assert out.returncode != 0
    assert "digits.sample.budget_seconds" in out.stdout + out.stderr
    for produced in ("data", "checkpoints", "synthetic", "results", "logs"):
        assert not (work / produced).exists()
    out = snakemake(work, "--cores", "1", "--config", "datasets=[digits,nope]", check=False)
    assert out.returncode != 0 and "'nope'" in out.stdout + out.stderr


def test_cli_rejects_bad_params_with_exit_code_1(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"digits": {"train": {"steps": "many"}}}))
    code = cli_main(["prepare", "--params", str(REPO / "params.yaml"), "--params", str(bad),
                     "--dataset", "digits", "--out", str(tmp_path / "data")])
    assert code == 1
    assert not (tmp_path / "data").exists()
    assert "digits.train.steps" in capsys.readouterr().err


def test_device_key(params):
    assert params["device"] == "auto"                            # the committed default
    for value in ("auto", "cpu", "cuda"):
        validate({**params, "device": value})
    with pytest.raises(ParamsError, match="'device'"):
        validate({**params, "device": "gpu"})


def test_paper_training_lengths(params):
    """The paper trained 80,000 steps on CIFAR-100 and 117,000 on Tiny-ImageNet (4 A100s)."""
    assert params["cifar100"]["train"]["steps"] == 80000 and params["tinyimagenet"]["train"]["steps"] == 117000
    assert params["cifar100"]["train"]["warmup_steps"] == 2500   # U-ViT's CIFAR-10 config


def test_error_names_the_override_file_that_set_the_bad_value(tmp_path):
    bad = tmp_path / "my_override.yaml"
    bad.write_text(yaml.safe_dump({"digits": {"sample": {"budget_seconds": -1}}}))
    with pytest.raises(ParamsError, match=r"Fix it in .*my_override\.yaml") as err:
        load_params([REPO / "params.yaml", bad])
    assert "digits.sample.budget_seconds" in str(err.value)
    # a bad value in params.yaml itself, with an override that does not touch it, names params.yaml
    good = tmp_path / "other.yaml"
    good.write_text(yaml.safe_dump({"digits": {"train": {"steps": 5}}}))
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["digits"]["sample"]["max_per_class"] = 0
    edited = tmp_path / "params.yaml"
    edited.write_text(yaml.safe_dump(base))
    with pytest.raises(ParamsError, match=r"Fix it in .*tmp.*params\.yaml"):
        load_params([edited, good])
    # a value no file set (Snakemake's --config) is named as such
    merged = load_params([REPO / "params.yaml"])
    merged["digits"]["sample"]["budget_seconds"] = -3
    with pytest.raises(ParamsError, match="--config"):
        validate(merged, files=[REPO / "params.yaml"])


def test_every_step_and_flag_has_help():
    from diffdistill.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {a.dest: a.help for a in subs._choices_actions}
    assert len(subs.choices) >= 15
    for name, sub in subs.choices.items():
        assert listed.get(name), f"{name}: no one-line help in `diffdistill --help`"
        assert sub.description and len(sub.description) > 40, f"{name}: no description in `{name} --help`"
        assert "reads" in sub.description.lower() and "writes" in sub.description.lower(), name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings}: no help"
    assert "folder" in subs.choices["prepare"].description  # the folder kind is documented
