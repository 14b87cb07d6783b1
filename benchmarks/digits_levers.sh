#!/bin/bash
# Issue 17's levers on the digits default: a U-ViT trained with label dropout (a null class for
# classifier-free guidance), N images per class sampled at each guidance scale, `confidence` selection
# of K per class, the ConvNet evaluated as the default run does, seeds 0-2. The CLI steps with override
# files; run in a checkout whose data/digits (prepare, classifier, fid_stats) exists, e.g. after
# `snakemake --cores all data/digits/classifier.pt data/digits/fid_stats.npz`. Prints one line per
# (scale, K): the three accuracies and their mean. Usage: bash benchmarks/digits_levers.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: digits_levers.sh OUT_DIR}
SCALES=${SCALES:-"0 1 2 3"}; DRAW=${DRAW:-500}; KEEP=${KEEP:-"100 200"}; DROPOUT=${DROPOUT:-0.1}
mkdir -p "$OUT"
printf 'digits:\n  train: {label_dropout: %s}\n' "$DROPOUT" > "$OUT/train.yaml"
[ -f "$OUT/model/ema.pt" ] || python -m diffdistill train --params params.yaml --params "$OUT/train.yaml" \
  --dataset digits --data data/digits --fid-stats data/digits/fid_stats.npz --out "$OUT/model" --threads 2 \
  --log-file "$OUT/train.log"
for g in $SCALES; do
  d="$OUT/g$g"; mkdir -p "$d"
  printf 'digits:\n  train: {label_dropout: %s}\n  sample: {guidance_scale: %s, max_per_class: %s, budget_seconds: 3600}\n' \
    "$DROPOUT" "$g" "$DRAW" > "$d/params.yaml"
  P="--params params.yaml --params $d/params.yaml"
  [ -f "$d/samples.npz" ] || python -m diffdistill sample $P --dataset digits --checkpoint "$OUT/model/ema.pt" \
    --out "$d" --threads 2 --log-file "$d/sample.log"
  for k in $KEEP; do
    printf 'digits:\n  select: {images_per_class: %s}\n' "$k" > "$d/select$k.yaml"
    [ -f "$d/selected$k.npz" ] || python -m diffdistill select --params params.yaml --params "$d/select$k.yaml" \
      --dataset digits --samples "$d/samples.npz" --classifier data/digits/classifier.pt --out "$d/selected$k.npz" \
      --threads 2 --log-file "$d/select.log"
    for s in 0 1 2; do
      o="$d/eval_keep${k}_seed$s.json"
      [ -f "$o" ] || python -m diffdistill evaluate $P --dataset digits --set synthetic --seed $s \
        --train "$d/selected$k.npz" --test data/digits/test.npz --out "$o" --threads 1 --log-file "$d/evaluate.log"
    done
    python -c "import json,sys; a=[json.load(open(f'$d/eval_keep${k}_seed{s}.json'))['accuracy'] for s in range(3)]; print('guidance $g keep $k', ' '.join(f'{x:.4f}' for x in a), f'mean {sum(a)/3:.4f}')"
  done
done
