#!/usr/bin/env bash
# Matryoshka x64 at block 22 of CLIP ViT-L/14-336 on 2 random tokens per image: LLaVA's steering SAE.
# IMAGENET=/data/imagenet/train ACTS=/acts/clip_l14_336 bash experiments/llava_steering_sae/run.sh
set -euo pipefail
IMAGENET=${IMAGENET:-/data/imagenet/train}
ACTS=${ACTS:-/acts/clip_l14_336}
[ -f "$ACTS/layer22_random2/manifest.json" ] || python -m vlmsae.extract model=clip_l14_336 data=folder \
    data.root="$IMAGENET" layer=22 tokens=random_k k=2 out="$ACTS/layer22_random2"
python -m vlmsae.train experiment=llava_steering_sae data.acts="$ACTS/layer22_random2" "$@"
