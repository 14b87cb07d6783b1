"""Your own images (README, "Your own images"): an RGB ImageFolder tree and the README's few lines of
YAML, run end to end through Snakemake on the tiny settings; a changed tree reruns prepare_data and
what follows; the `base:` inheritance itself."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from diffdistill.config import ParamsError, load_params
from workflow import REPO, TINY, copy_workflow, snakemake

CLASSES = ["cat", "dog", "fox"]


def readme_override():
    """The YAML block of the README's "Your own images" section, as a user copies it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own images"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def make_tree(root, per_class=12, seed=0):
    """RGB photographs of three kinds: a class colour plus noise, at a size prepare_data resizes."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][k], dtype=float)
        for i in range(per_class):
            img = np.clip(colour + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")


def test_the_readme_block_is_short_and_inherits_digits(tmp_path):
    override = readme_override()
    assert len([line for line in override.splitlines() if line.strip()]) <= 10
    (tmp_path / "mine.yaml").write_text(override)
    params = load_params([REPO / "params.yaml", tmp_path / "mine.yaml"])
    mine, digits = params["mine"], params["digits"]
    assert mine["data"]["kind"] == "folder" and mine["model"]["in_chans"] == 3
    assert mine["train"] == digits["train"] and mine["evaluate"] == digits["evaluate"]
    assert {k: v for k, v in mine["model"].items() if k not in ("in_chans", "num_classes")} == \
        {k: v for k, v in digits["model"].items() if k not in ("in_chans", "num_classes")}


def test_bad_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("mine: {base: digitz, data: {kind: folder, root: x, image_size: 16}}\n")
    with pytest.raises(ParamsError, match="'mine.base' names 'digitz'"):
        load_params([REPO / "params.yaml", tmp_path / "a.yaml"])
    (tmp_path / "b.yaml").write_text("a: {base: b, data: {kind: digits, image_size: 16}}\n"
                                     "b: {base: a, data: {kind: digits, image_size: 16}}\n")
    with pytest.raises(ParamsError, match="circle"):
        load_params([REPO / "params.yaml", tmp_path / "b.yaml"])


@pytest.mark.slow
def test_own_rgb_images_end_to_end(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    make_tree(work / "my_images")
    (work / "tiny_params.yaml").write_text(TINY.read_text())   # CI's scale knobs, on the digits block
    (work / "mine.yaml").write_text(readme_override())
    files = ["--configfile", "tiny_params.yaml", "mine.yaml"]
    snakemake(work, "--cores", "2", *files)

    with np.load(work / "data/mine/train.npz") as z:
        assert z["images"].shape[1:] == (16, 16, 3) and [str(c) for c in z["classes"]] == CLASSES
    summary = json.loads((work / "results/mine/summary.json").read_text())
    assert 0.0 <= summary["synthetic"]["mean"] <= 1.0 and summary["full_real"]["mean"] > 1 / 3
    with np.load(work / "synthetic/mine/samples.npz") as z:
        assert z["images"].shape[1:] == (16, 16, 3) and set(z["labels"].tolist()) == {0, 1, 2}

    # A new image, and a changed one: prepare_data and everything after it run again.
    for change in ("add", "edit"):
        if change == "add":
            Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(work / "my_images/cat/new.png")
        else:
            Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(work / "my_images/dog/0.png")
        out = snakemake(work, "-n", "--cores", "2", *files)
        text = out.stdout + out.stderr
        table = text[text.index("Job stats"):]
        for rule in ("prepare_data", "train_diffusion", "sample", "evaluate"):
            assert re.search(rf"\n{rule}\s+\d+", table), (change, rule, table)
        snakemake(work, "--cores", "2", *files, "--until", "prepare_data")


def test_photo_folder_is_an_imagefolder_of_real_photographs(tmp_path):
    """benchmarks/photo_folder.py (issue 17's own-images check): three classes of crops of the installed
    colour photographs, read by prepare_data like any user's tree; crops differ within a class, and the
    classes differ in colour as the photographs do."""
    import importlib.util

    from diffdistill import data
    spec = importlib.util.spec_from_file_location("photo_folder", REPO / "benchmarks/photo_folder.py")
    photo_folder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(photo_folder)
    photo_folder.write_tree(tmp_path / "photos", per_class=10, seed=0)
    train, test = data.build({"kind": "folder", "root": str(tmp_path / "photos"), "image_size": 16,
                              "channels": 3, "test_fraction": 0.2, "split_seed": 0}, None, progress=False)
    assert [str(c) for c in train["classes"]] == ["china", "flower", "hopper"]
    assert train["images"].shape == (24, 16, 16, 3) and test["images"].shape == (6, 16, 16, 3)
    images = np.concatenate([train["images"], test["images"]]).astype(float)
    labels = np.concatenate([train["labels"], test["labels"]])
    for k in range(3):
        own = images[labels == k]
        assert len({im.tobytes() for im in own}) == len(own)          # no two crops alike
        assert own.std(axis=0).mean() > 10                            # crops of different places
    means = np.stack([images[labels == k].mean(axis=(0, 1, 2)) for k in range(3)])
    assert np.abs(means[:, None] - means[None]).max() > 20            # the photographs' colours differ
