"""The rehearsal of the paper's path: run the cifar100 and tinyimagenet blocks end to end on a CPU
machine in minutes, with every architecture and code path of the real run, before a cluster spends
GPU days on it.

    python tests/rehearsal.py DIR [snakemake arguments …]     e.g.  --profile slurm
    python tests/rehearsal.py DIR --dvc [dvc repro arguments …]

DIR gets a copy of the workflow, the made files in ``DIR/rehearsal_files`` and the two overrides
(``rehearsal.yaml``: the scale knobs, ``rehearsal_sources.yaml``: where the files are served). The
made files are in the layouts of the real ones: ``cifar-100-python.tar.gz`` (python pickles),
``tiny-imagenet-200.zip`` (train/<wnid>/images, val/val_annotations.txt), an unconditional CIFAR-10
U-ViT-S/2 and a 1000-class ImageNet-64 U-ViT-M/4 as the released plain state dicts (random weights),
and the FID Inception weights in pytorch-fid's layout (random weights, batch-norm statistics set on
noise so its features are finite). While Snakemake (or DVC) runs, an HTTP server on 127.0.0.1 serves
them, and the download and weight rules fetch them from there, checksums verified. On a cluster,
give a DIR on the shared file system and run it on the login node: the download rules are local rules.
"""
import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
OVERRIDE = REPO / "tests" / "rehearsal.yaml"
WORKFLOW_FILES = ["Snakefile", "rules", "params.yaml", "schemas", "profiles", "envs", "report", "slurm", "src"]
FILES = "rehearsal_files"
SOURCES = "rehearsal_sources.yaml"
CONFIGFILES = ["rehearsal.yaml", SOURCES]

# The released checkpoints' architectures (shared/DESIGN.md, "U-ViT facts").
S2 = dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
          qkv_bias=False, mlp_time_embed=False, num_classes=0, conv=True, skip=True)   # CIFAR-10, unconditional
M4 = dict(img_size=64, patch_size=4, in_chans=3, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
          qkv_bias=False, mlp_time_embed=False, num_classes=1000, conv=True, skip=True)  # ImageNet-64
CIFAR_NAMES = ["apple", "aquarium_fish", "baby", "bear", "beaver"]
TINY_WNIDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander",
              "n01641577": "bullfrog, Rana catesbeiana", "n01644900": "tailed frog, bell toad"}
TRAIN_PER_CLASS, TEST_PER_CLASS = 20, 10


def _digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _class_images(rng, label, n, size):
    """Images a ConvNet can tell apart: a class colour and a class stripe direction, plus noise."""
    hue = np.array([(37 * label) % 256, (91 * label + 60) % 256, (151 * label + 120) % 256], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx if label % 2 else yy) * (0.4 + 0.15 * label))[..., None] * 60
    base = hue[None, None, :] * 0.7 + stripes
    noise = rng.normal(0, 30, (n, size, size, 3))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def _atomic_write(path, data):
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- the made files ---------------------------------------------------------------------------------

def make_cifar100(path, seed=0):
    """``cifar-100-python.tar.gz`` as the real one: members cifar-100-python/{train,test,meta}, each a
    pickled dict; ``data`` uint8 [N, 3072] (the R, G, B planes of a 32×32 image), ``fine_labels``."""
    rng = np.random.default_rng(seed)

    def split(per_class, name):
        images, labels = [], []
        for k in range(len(CIFAR_NAMES)):
            images.append(_class_images(rng, k, per_class, 32))
            labels += [k] * per_class
        x = np.concatenate(images).transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        return {"batch_label": f"{name} batch", "filenames": [f"img_{i}.png" for i in range(len(labels))],
                "fine_labels": labels, "coarse_labels": [0] * len(labels), "data": x}

    members = {"train": split(TRAIN_PER_CLASS, "training"), "test": split(TEST_PER_CLASS, "testing"),
               "meta": {"fine_label_names": CIFAR_NAMES, "coarse_label_names": ["rehearsal"]}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _atomic_write(path, buf.getvalue())


def make_tinyimagenet(path, seed=0):
    """``tiny-imagenet-200.zip`` as the real one: wnids.txt, words.txt, train/<wnid>/images/*.JPEG with
    <wnid>_boxes.txt, val/images/*.JPEG with val/val_annotations.txt, test/images/*.JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    top = "tiny-imagenet-200/"

    def jpeg(img):
        out = io.BytesIO()
        Image.fromarray(img).save(out, format="JPEG", quality=95)
        return out.getvalue()

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        wnids = sorted(TINY_WNIDS)
        zf.writestr(top + "wnids.txt", "\n".join(wnids) + "\n")
        zf.writestr(top + "words.txt", "".join(f"{w}\t{d}\n" for w, d in TINY_WNIDS.items()))
        annotations, v = [], 0
        for k, wnid in enumerate(wnids):
            boxes = []
            for i, img in enumerate(_class_images(rng, k, TRAIN_PER_CLASS, 64)):
                zf.writestr(f"{top}train/{wnid}/images/{wnid}_{i}.JPEG", jpeg(img))
                boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
            zf.writestr(f"{top}train/{wnid}/{wnid}_boxes.txt", "".join(boxes))
            for img in _class_images(rng, k, TEST_PER_CLASS, 64):
                zf.writestr(f"{top}val/images/val_{v}.JPEG", jpeg(img))
                annotations.append(f"val_{v}.JPEG\t{wnid}\t0\t0\t63\t63\n")
                v += 1
        zf.writestr(top + "val/val_annotations.txt", "".join(annotations))
        for i, img in enumerate(_class_images(rng, 0, 2, 64)):
            zf.writestr(f"{top}test/images/test_{i}.JPEG", jpeg(img))
    _atomic_write(path, buf.getvalue())


def make_uvit_checkpoint(path, model_cfg, seed):
    """A plain state dict in the released U-ViT layout (random weights)."""
    import torch

    from diffdistill.uvit import UViT

    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save(UViT(**model_cfg).state_dict(), buf)
    _atomic_write(path, buf.getvalue())


def make_inception(path, seed=0):
    """pytorch-fid's FID Inception state dict (what pt_inception-2015-12-05-6726825d.pth holds), with
    random weights. Batch-norm statistics come from one pass over noise, so features stay finite."""
    import torch

    torch.manual_seed(seed)
    model = fid_inception_structure()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 299, 299) * 2 - 1)
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    _atomic_write(path, buf.getvalue())


def fid_inception_structure():
    """pytorch-fid's own ``fid_inception_v3`` network, with the random weights it was built with instead
    of the file it would download (it asks for the state dict after swapping in its FID blocks)."""
    from unittest import mock

    import pytorch_fid.inception as pi

    built = {}

    def build(*args, **kwargs):
        built["net"] = make_v3(*args, **kwargs)
        return built["net"]

    make_v3 = pi._inception_v3
    with mock.patch.object(pi, "_inception_v3", build), \
            mock.patch.object(pi, "load_state_dict_from_url", lambda *a, **k: built["net"].state_dict()):
        return pi.fid_inception_v3()


def make_files(folder):
    """Every made file in ``folder`` (kept between runs: same seed, same bytes); returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    makers = {
        "cifar-100-python.tar.gz": make_cifar100,
        "tiny-imagenet-200.zip": make_tinyimagenet,
        "cifar10_uvit_small.pth": functools.partial(make_uvit_checkpoint, model_cfg=S2, seed=10),
        "imagenet64_uvit_mid.pth": functools.partial(make_uvit_checkpoint, model_cfg=M4, seed=64),
        "pt_inception-2015-12-05-6726825d.pth": make_inception,
    }
    for name, make in makers.items():
        if not (folder / name).exists():
            make(folder / name)
    return {name: folder / name for name in makers}


def sources(files, base_url):
    """The override that points the paper blocks' downloads at ``base_url``, checksums pinned."""
    def sha(name):
        return "sha256:" + _digest(files[name], "sha256")

    weights = {"cifar10_uvit_s2": "cifar10_uvit_small.pth", "imagenet64_uvit_m4": "imagenet64_uvit_mid.pth",
               "fid_inception": "pt_inception-2015-12-05-6726825d.pth"}
    return {
        "weights": {key: {"source": f"{base_url}/{name}", "checksum": sha(name)} for key, name in weights.items()},
        "cifar100": {"data": {"source": f"{base_url}/cifar-100-python.tar.gz",
                              "checksum": "md5:" + _digest(files["cifar-100-python.tar.gz"], "md5")}},
        "tinyimagenet": {"data": {"source": f"{base_url}/tiny-imagenet-200.zip",
                                  "checksum": "md5:" + _digest(files["tiny-imagenet-200.zip"], "md5")}},
    }


# --- serving ----------------------------------------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def serve(folder, port=0):
    """Serve ``folder`` on 127.0.0.1 (``port``, or one the OS picks); yields the base URL."""
    handler = functools.partial(_Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the run folder ---------------------------------------------------------------------------------

def prepare(workdir, files_from=None):
    """The workflow, the overrides and the made files in ``workdir`` (hard links to those in
    ``files_from`` when given: several rehearsals share one set); returns the made files."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src, dst = REPO / name, workdir / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    shutil.copy2(OVERRIDE, workdir / "rehearsal.yaml")
    if files_from is None:
        return make_files(workdir / FILES)
    (workdir / FILES).mkdir(exist_ok=True)
    for name, path in make_files(files_from).items():
        if not (workdir / FILES / name).exists():
            os.link(path, workdir / FILES / name)
    return make_files(workdir / FILES)


def previous_port(workdir):
    """The port of the last run, so an unchanged rerun has unchanged params (nothing to redo)."""
    path = Path(workdir) / SOURCES
    if path.exists():
        url = yaml.safe_load(path.read_text())["weights"]["fid_inception"]["source"]
        port = int(url.split(":")[2].split("/")[0])
        if _port_free(port):
            return port
    return 0


def write_sources(workdir, files, base_url):
    text = ("# Written by tests/rehearsal.py: the made files, served on 127.0.0.1 while the rehearsal runs.\n"
            + yaml.safe_dump(sources(files, base_url), sort_keys=False))
    path = Path(workdir) / SOURCES
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def dvc_params(workdir):
    """DVC reads params.yaml only: the rehearsal's values go into the copy's params.yaml."""
    sys.path.insert(0, str(REPO / "src"))
    from diffdistill.config import deep_update

    workdir = Path(workdir)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in CONFIGFILES:
        params = deep_update(params, yaml.safe_load((workdir / name).read_text()))
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def command(args, dvc=False, configfiles=()):
    bindir = Path(sys.executable).parent
    if dvc:
        return [str(bindir / "dvc"), "repro", *args]
    # --configfile takes every word after it: targets and other options go first.
    return [str(bindir / "snakemake"), "--cores", "all", *args, "--configfile", *CONFIGFILES, *configfiles]


def _served_folder(workdir, withhold):
    """The made files, less the ``withhold`` ones (the server answers 404 for those)."""
    if not withhold:
        return workdir / FILES
    folder = workdir / "rehearsal_served"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for path in (workdir / FILES).iterdir():
        if path.name not in withhold:
            os.link(path, folder / path.name)
    return folder


def run(workdir, args=(), dvc=False, env=None, timeout=None, capture=True, withhold=(), configfiles=(),
        files_from=None):
    """Prepare ``workdir``, serve the made files (less ``withhold``) and run the rehearsal there, with
    ``configfiles`` (in ``workdir``) after the rehearsal's own; returns the finished process, with
    ``seconds`` its wall time."""
    workdir = Path(workdir).resolve()
    files = prepare(workdir, files_from)
    with serve(_served_folder(workdir, withhold), previous_port(workdir)) as base_url:
        write_sources(workdir, files, base_url)
        env = dict(env or os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.pop("SNAKEMAKE_PROFILE", None)
        if dvc:
            dvc_params(workdir)
            if not (workdir / ".dvc").exists():
                subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=workdir,
                               check=True)
            subprocess.run([sys.executable, "-m", "diffdistill", "dvc-yaml"], cwd=workdir, env=env, check=True,
                           capture_output=True)
        t0 = time.time()
        proc = subprocess.run(command(args, dvc, configfiles), cwd=workdir, env=env, capture_output=capture, text=True,
                              timeout=timeout)
        proc.seconds = time.time() - t0
    return proc


def main(argv):
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    workdir, rest = argv[0], argv[1:]
    dvc = "--dvc" in rest
    rest = [a for a in rest if a != "--dvc"]
    proc = run(workdir, rest, dvc=dvc, capture=False)
    print(json.dumps({"rehearsal": str(workdir), "returncode": proc.returncode, "seconds": round(proc.seconds, 1)}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
