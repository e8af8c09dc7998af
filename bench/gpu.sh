#!/usr/bin/env bash
# Every GPU measurement and proof in one command of at most 8 minutes (the stages' timeouts add up to 480 s): `bash bench/gpu.sh` from the repository
# root on a lent H100/H200 (see README.md "Speed"). Each stage has its own timeout and no stage stops the
# others (no `set -e`): a failed or timed-out stage is recorded in $OUT/gpu-summary.json with its exit status.
# JSON goes to $OUT (default bench/results/gpu): real CUDA kernels per frame and the cost of a kernel inside a
# graph; the 2B graph mode's ms per frame (p50/p90), time to first audio and peak memory; the original
# runtime's ms per frame on the same GPU; the concurrency sweep with streams_realtime; the graph == eager proof.
# Needs only torch, numpy, tokenizers and safetensors; the original runtime also needs transformers and sphn
# (wheels in .whl are installed if present), and its stage fails alone without them.
# Without CUDA it runs the same stages as a smoke test on the tiny shape on the CPU (tests/test_gpu.py runs it).
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  SHAPE=2b; FRAMES=100; SWEEP=1,8,32,64,128; SWEEP_FRAMES=30; BATCHES=1,64; DEVICE=cuda; SCALE=1
else
  SHAPE=tiny; FRAMES=4; SWEEP=1,2; SWEEP_FRAMES=4; BATCHES=1,4; DEVICE=cpu; SCALE=0
fi
STAGES=()

# stage NAME SECONDS COMMAND...: run COMMAND with a timeout, its output in $OUT/NAME.log, its status recorded.
stage() {
  local name=$1 seconds=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (timeout ${seconds}s): $*"
  timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 20 "$OUT/$name.log"
  STAGES+=("{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}")
}

stage device 20 $PY -c "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,
  'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))"
stage kernels 60 $PY -m dia2_worker.bench --kernels --shape $SHAPE --batch $BATCHES \
  --no-compile --device $DEVICE --json "$OUT/kernels-$SHAPE.json"
stage speed $((SCALE ? 90 : 60)) $PY -m dia2_worker.bench --shape $SHAPE --device $DEVICE \
  --modes $([ $SCALE = 1 ] && echo graph || echo eager-fp32) --frames $FRAMES --json "$OUT/bench-$SHAPE.json"
stage original $((SCALE ? 120 : 60)) $PY -m dia2_worker.bench --shape $SHAPE --device $DEVICE --modes original \
  --json "$OUT/original-$SHAPE.json"
stage concurrency $((SCALE ? 120 : 60)) $PY -m dia2_worker.bench --shape $SHAPE --device $DEVICE \
  --concurrency $SWEEP --frames $SWEEP_FRAMES --json "$OUT/concurrency-$SHAPE.json"
stage proofs $((SCALE ? 70 : 30)) $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not gpu_script" \
  --junitxml "$OUT/proofs.xml"
# The proofs' outcomes as JSON: test name -> passed / failed / skipped.
$PY - "$OUT/proofs.xml" >"$OUT/proofs.json" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (OSError, ET.ParseError) as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
outcome = lambda case: next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
print(json.dumps({case.get("name"): outcome(case) for case in cases}, indent=1))
PYEOF

{
  echo "{\"shape\": \"$SHAPE\", \"device\": \"$DEVICE\", \"stages\": ["
  (IFS=,; echo "${STAGES[*]}")
  echo "]}"
} >"$OUT/gpu-summary.json"
cat "$OUT/gpu-summary.json"
