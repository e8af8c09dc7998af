#!/usr/bin/env bash
# Every GPU measurement and proof, for a session that has the lent GPU machine (see /work/.library/device).
# Run from the repository root on the device, one stage per call (each fits the 10-minute limit):
#   bash bench/gpu_session.sh proofs        graph == eager tokens (2B shape, 240 frames), seeded repeats, Mimi graph
#   bash bench/gpu_session.sh speed         bench: 2b and 1b, all modes; streaming Mimi decode in bf16
#   bash bench/gpu_session.sh concurrency   bench: 2b, batches 1..128
#   bash bench/gpu_session.sh coldstart     bake a 2B-shaped random checkpoint, then coldstart with --baseline
#   bash bench/gpu_session.sh compiled      bench: 2b, graph vs graph-compiled (torch.compile inside the graph)
#   bash bench/gpu_session.sh asr           frame gaps of running streams while prefixes are transcribed
#                                           (carry faster-whisper, ctranslate2, av and PyYAML wheels too)
# Results go to $OUT (the device tool brings them back); commit them under bench/results/.
# The machine has torch but not every pure-Python package: carry runpod, soundfile, boto3 (and their
# missing dependencies) as wheels in .whl (the device README's recipe); this script installs them if present.
set -euo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

case "${1:-}" in
  proofs)
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_mimi.py 2>&1 | tee "$OUT/proofs.log"
    ;;
  speed)
    python3 -m dia2_worker.mimi bench --device cuda --dtype bfloat16 --json "$OUT/mimi-decode-cuda.json" 2>&1 | tee "$OUT/mimi.log"
    python3 -m dia2_worker.bench --shape 2b --frames 200 --json "$OUT/bench-2b.json" 2>&1 | tee "$OUT/bench-2b.log"
    python3 -m dia2_worker.bench --shape 1b --frames 200 --json "$OUT/bench-1b.json" 2>&1 | tee "$OUT/bench-1b.log"
    ;;
  concurrency)
    python3 -m dia2_worker.bench --shape 2b --frames 100 --concurrency 1,2,4,8,16,32,64,96,128 \
      --json "$OUT/bench-2b-concurrency.json" 2>&1 | tee "$OUT/concurrency.log"
    ;;
  coldstart)
    [ -f /tmp/dia2-2b/manifest.json ] || python3 bake_weights.py --random-shape 2b --out /tmp/dia2-2b
    python3 -m dia2_worker.coldstart --model-dir /tmp/dia2-2b --runs 3 --device cuda --baseline \
      --json "$OUT/coldstart-2b.json" 2>&1 | tee "$OUT/coldstart.log"
    ;;
  compiled)
    python3 -m dia2_worker.bench --shape 2b --frames 200 --modes eager-bf16,graph,graph-compiled \
      --json "$OUT/bench-2b-compiled.json" 2>&1 | tee "$OUT/compiled.log"
    ;;
  asr)
    python3 -m dia2_worker.asr_bench --device cuda --streams 8 --frames 300 \
      --json "$OUT/asr-frame-gap-cuda.json" 2>&1 | tee "$OUT/asr.log"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh proofs|speed|concurrency|coldstart|compiled|asr" >&2
    exit 2
    ;;
esac
