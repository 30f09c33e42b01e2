#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one call on one GPU machine, short table last.
# Works offline: missing packages come from .whl/ (see fetch_wheels.sh); geobind from src/.
#
#   OUT=gpu-results bash benchmarks/gpu/run_all.sh            # writes JSON + logs to $OUT
#   QUICK=1 bash benchmarks/gpu/run_all.sh                     # fewer steps (smoke run)
#
# Each part has its own time limit so one slow part cannot eat the others' time; every part
# writes its JSON as it goes, so a part stopped at its limit still leaves what it measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/geobind-site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/geobind-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=20; WARMUP=5
if [ -n "${QUICK:-}" ]; then STEPS=5; WARMUP=2; fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
    tail -n 25 "$OUT/$name.log"
}

part train-b32 200 "$PY" benchmarks/train_throughput.py --size b32 --stage2 --steps "$STEPS" --warmup "$WARMUP" \
    --out "$OUT/train-b32.json"
part train-b16 120 "$PY" benchmarks/train_throughput.py --size b16 --steps "$STEPS" --warmup "$WARMUP" \
    --out "$OUT/train-b16.json"
# Input pipeline with the machine's cores, and stage-1 training fed from files: data wait.
WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
part data 150 "$PY" benchmarks/data_throughput.py --images 4096 --image-px 512 --audio 16 --workers "$WORKERS" \
    --batch 256 --train-batch 256 --train-steps 10 --rounds 1 --aug-batch 512 --out "$OUT/data.json"
"$PY" benchmarks/gpu/summary.py "$OUT"
