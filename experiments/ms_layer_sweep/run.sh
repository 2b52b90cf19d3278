#!/usr/bin/env bash
# BatchTopK x1..x64 at layers 11/17/22/23 of CLIP ViT-L/14 (CLS), the paper's MS study. See README.md.
# IMAGENET=/data/imagenet/train ACTS=/acts/clip_l14 bash experiments/ms_layer_sweep/run.sh
set -euo pipefail
IMAGENET=${IMAGENET:-/data/imagenet/train}
ACTS=${ACTS:-/acts/clip_l14}
LAYERS=${LAYERS:-11,17,22,23}
for L in ${LAYERS//,/ }; do
  [ -f "$ACTS/layer$L/manifest.json" ] || python -m vlmsae.extract model=clip_l14 data=folder \
      data.root="$IMAGENET" layer="$L" tokens=cls out="$ACTS/layer$L"
done
python -m vlmsae.train -m experiment=ms_layer_sweep layer="$LAYERS" "data.acts=$ACTS/layer\${layer}" "$@"
