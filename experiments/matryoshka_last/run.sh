#!/usr/bin/env bash
# Matryoshka BatchTopK x1..x64 on the projected CLIP ViT-L/14 embedding. See README.md.
# IMAGENET=/data/imagenet/train ACTS=/acts/clip_l14 bash experiments/matryoshka_last/run.sh
set -euo pipefail
IMAGENET=${IMAGENET:-/data/imagenet/train}
ACTS=${ACTS:-/acts/clip_l14}
[ -f "$ACTS/last/manifest.json" ] || python -m vlmsae.extract model=clip_l14 data=folder \
    data.root="$IMAGENET" layer=last tokens=cls out="$ACTS/last"
python -m vlmsae.train -m experiment=matryoshka_last data.acts="$ACTS/last" "$@"
