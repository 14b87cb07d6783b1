#!/bin/bash
# Issue 17's own-images check: the README's "Your own images" block (`base: digits`) on an RGB
# ImageFolder tree of real photographs (benchmarks/photo_folder.py: three photographs, 200 random crops
# each, 16 px), run through Snakemake to results/{ds}/summary.json (challenge accuracies, DD-Ranking's
# LRS and ARS), once with the digits defaults of today (`photos`) and once with the defaults before
# issue 17 (`photos_before`: 200 drawn and 100 kept per class). Runs in a scratch clone
# of this checkout's HEAD under OUT_DIR; prints both summaries' numbers.
#   bash benchmarks/own_images_check.sh OUT_DIR      (12 min on 2 cores)
set -euo pipefail
OUT=$(realpath -m "${1:?usage: own_images_check.sh OUT_DIR}")
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
mkdir -p "$OUT"
[ -d "$OUT/wf" ] || git clone --quiet "$REPO" "$OUT/wf"
cd "$OUT/wf"
[ -d photos ] || python benchmarks/photo_folder.py photos --per-class 200 --seed 0
cat > photos.yaml <<'Y'
datasets: [photos, photos_before]
photos:
  base: digits
  data: {kind: folder, root: photos, image_size: 16, channels: 3}
  model: {in_chans: 3, num_classes: 3}
photos_before:
  base: photos
  sample: {max_per_class: 200}
  select: {images_per_class: 100}
Y
snakemake results/photos/summary.json results/photos_before/summary.json --cores 2 --configfile photos.yaml \
  > "$OUT/snakemake.log" 2>&1 || { tail -40 "$OUT/snakemake.log"; exit 1; }
python - <<'PY'
import json
for ds in ("photos", "photos_before"):
    s = json.load(open(f"results/{ds}/summary.json"))
    acc = {k: s[k]["mean"] for k in ("synthetic", "random_real", "full_real")}
    scores = {"LRS": s["dd_ranking"]["hard_label"]["lrs"], "ARS": s["dd_ranking"].get("augmentation", {}).get("ars")}
    print(ds, f"({s['n_synthetic']} generated)", " ".join(f"{k} {v:.4f}" for k, v in acc.items()),
          f"synthetic/random {acc['synthetic'] / acc['random_real']:.3f}",
          " ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None))
PY
