#!/usr/bin/env bash
# The prepared device check of issue 24 (one short script, a few minutes on one H100/H200):
#   1. install the `bench` extra (eai-sparsify, sae-lens) from local wheels if they are not importable
#      (the device machine has no network: put the wheels in $WHEELS, default experiments/gpu_check/wheels);
#   2. the precision policies side by side with the peers (vlmsae.bench.gpu_peers: tokens/s, peak memory,
#      peers' differing selections, gpu_sae_step_fast_exact_65k_speedup, the 100-step
#      gpu_fast_exact_differing_selections, FVE per policy) -> $OUT/gpu_peers.json;
#   3. python -m vlmsae.bench.gpu_decode --smoke -> $OUT/gpu_decode.txt;
#   4. with FULL=1, the whole `make bench-gpu` module (extraction, MS, many SAEs) -> $OUT/gpu_full.json.
# Usage: OUT=/some/dir PYTHON=.venv/bin/python bash experiments/gpu_check/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
OUT=${OUT:-outputs/gpu_check}
WHEELS=${WHEELS:-experiments/gpu_check/wheels}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
if ! $PY -c "import sparsify, sae_lens" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    $PY -m pip install --no-index --find-links "$WHEELS" eai-sparsify sae-lens 2>&1 | tail -3
  else
    echo "no $WHEELS: the peers will be recorded as null with the reason" | tee "$OUT/peers_missing.txt"
  fi
fi
timeout 420 $PY -m vlmsae.bench.gpu_peers > "$OUT/gpu_peers.json" 2> "$OUT/gpu_peers.err"; echo "gpu_peers rc=$?"
timeout 120 $PY -m vlmsae.bench.gpu_decode --smoke 2>&1 | tee "$OUT/gpu_decode.txt" | tail -5
if [ "${FULL:-0}" = 1 ]; then
  timeout 900 $PY -c "import json; from vlmsae.bench import gpu; print(json.dumps(gpu.run(), indent=1))" \
    > "$OUT/gpu_full.json" 2> "$OUT/gpu_full.err"; echo "bench-gpu rc=$?"
fi
$PY - "$OUT/gpu_peers.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
for key in ("gpu_sae_step_fast_exact_65k_speedup", "gpu_fast_exact_differing_selections"):
    print(key, r.get(key))
PYEOF
