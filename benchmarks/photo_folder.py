"""An RGB ImageFolder tree of real photographs, for issue 17's own-images check: no download.

The three colour photographs that scikit-learn and matplotlib install (a temple in China, a flower,
Grace Hopper) each become a class; every image is a random square crop, 40 to 160 px across, resized to
32 px (prepare_data resizes it again to the block's image_size). Crops of one photograph share its
colours and textures but not its content, so the classes overlap where the photographs do (sky, dark
background, skin and petals).

    python benchmarks/photo_folder.py OUT_DIR [--per-class 200] [--seed 0]
"""
import argparse
from pathlib import Path

import matplotlib
import numpy as np
import sklearn.datasets
from PIL import Image

PHOTOS = {
    "china": Path(sklearn.datasets.__file__).parent / "images" / "china.jpg",
    "flower": Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg",
    "hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
}


def write_tree(out, per_class=200, seed=0, size=32, crop=(40, 160)):
    rng = np.random.default_rng(seed)
    for name, path in PHOTOS.items():
        photo = Image.open(path).convert("RGB")
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(crop[0], min(crop[1], *photo.size) + 1))
            left = int(rng.integers(0, photo.size[0] - side + 1))
            top = int(rng.integers(0, photo.size[1] - side + 1))
            patch = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            patch.save(Path(out) / name / f"{i:04d}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_tree(args.out, args.per_class, args.seed)
    print(f"wrote {args.per_class} crops per class of {', '.join(PHOTOS)} under {args.out}")
