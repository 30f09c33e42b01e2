#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one call on one GPU machine, short table last.
# Works offline: missing packages come from .whl/ (see fetch_wheels.sh); geobind from src/.
#
#   OUT=gpu-results bash benchmarks/gpu/run_all.sh            # writes JSON + logs to $OUT
#   PARTS="train-b32 train-audio" bash benchmarks/gpu/run_all.sh   # some parts only
#   QUICK=1 bash benchmarks/gpu/run_all.sh                     # fewer steps
#   SMOKE=1 bash benchmarks/gpu/run_all.sh                     # tiny models, runs on a CPU too
#   LIMIT_checks=60 LIMIT_train_b32=150 bash benchmarks/gpu/run_all.sh   # other time limits (s)
#
# Parts, most important first, and their time limits (21 minutes in all; where a call stops at
# 10 minutes, split them with PARTS, e.g. "checks train-b32" (360 s of limits, room for set-up)
# first, "train-audio" next, then "trainer train-b16" and "data"): checks (the fast paths against their references on the
# GPU's own kernels: gpu/checks.py, 120 s), train-b32 (stage 1 step at ViT-B/32, 240 s),
# train-audio (stage 2 step, 220 s), trainer (a short real `geobind train` on generated data:
# shards, device augmentation, compile, both stages; samples/s and data wait, 240 s), train-b16
# (150 s), data (input pipeline with all cores, and stage 1 fed from files: data wait; 150 s),
# embed (`geobind embed` end to end: 64k JPEG tiles in shards to Parquet, ViT-B/32; 150 s).
#
# Each part has its own time limit so one slow part cannot eat the others' time; the training
# benchmark writes its JSON after each stage, so a part stopped at its limit keeps what it measured.
# $OUT receives few files (gpu.txt, parts.log, one JSON per part); scratch data goes to $WORK.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu-results}"
WORK="${WORK:-$(mktemp -d -t geobind-gpu-XXXXXX)}"
mkdir -p "$OUT" "$WORK"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    # Only what this Python lacks (a carried wheel must not shadow an installed package), one
    # wheel at a time (a wheel for another Python skips itself, not the others), into a
    # folder of this run's own.
    SITE="$WORK/site"
    for wheel in .whl/*.whl; do
        dist=$(basename "$wheel" | cut -d- -f1)
        "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null && continue
        # pip's own reason on failure (a wheel for another Python, or no pip at all), and in $OUT.
        if why=$("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$wheel" 2>&1); then
            echo "installed $dist from .whl/"
        else
            echo "skipped $(basename "$wheel"): $(printf '%s\n' "$why" | grep -v '^\s*$' | tail -n 1)"
        fi | tee -a "$OUT/setup.log"
    done
    [ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=20; WARMUP=5; B32=b32; B16=b16; DATA_SIZE=(--images 1536 --image-px 512 --audio 8 --batch 128 --train-batch 128)
SMOKE_SIZE=(--size b32 --places 9000 --steps 30 --compile)  # 30 steps within one epoch
EMBED_SIZE=()
if [ -n "${QUICK:-}" ]; then STEPS=5; WARMUP=2; fi
if [ -n "${SMOKE:-}" ]; then
    STEPS=2; WARMUP=1; B32=tiny; B16=tiny; DATA_SIZE=(--quick); SMOKE_SIZE=(--size tiny --places 48 --steps 4)
    EMBED_SIZE=(--size tiny --tiles 96 --per-shard 20)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no GPU"; } \
    | tee "$OUT/gpu.txt"
"$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

PARTS="${PARTS:-checks train-b32 train-audio trainer train-b16 data embed}"
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
    local override="LIMIT_${name//-/_}"  # e.g. LIMIT_train_b32=150 shortens that part's limit
    limit=${!override:-$limit}
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/parts.log"
    # Logged into $OUT as it runs: a call stopped from outside still brings the log back.
    timeout "$limit" "$@" 2>&1 | tee "$WORK/$name.log" >> "$OUT/parts.log"
    local rc=${PIPESTATUS[0]}
    tail -n 25 "$WORK/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/parts.log"
}

# GPU-only correctness of the fast paths first (a failure there makes the timings moot).
CHECKS_ONLY=(); [ -n "${SMOKE:-}" ] && CHECKS_ONLY=(--only vit window_attention mel_resize device_augment prefetch one_behind
    attention_backends)
part checks 120 "$PY" benchmarks/gpu/checks.py "${CHECKS_ONLY[@]}" --out "$OUT/checks.json"
# Most important first: stage 1 at ViT-B/32, then stage 2, then ViT-B/16 (fewer variants).
part train-b32 240 "$PY" benchmarks/train_throughput.py --size "$B32" --steps "$STEPS" --warmup "$WARMUP" \
    --out "$OUT/train-b32.json"
part train-audio 220 "$PY" benchmarks/train_throughput.py --size "$B32" --stage2-only --steps "$STEPS" \
    --warmup "$WARMUP" --out "$OUT/train-audio.json"
part trainer 240 "$PY" benchmarks/gpu/train_smoke.py --out "$WORK/trainer-run" "${SMOKE_SIZE[@]}"
[ -f "$WORK/trainer-run/result.json" ] && cp "$WORK/trainer-run/result.json" "$OUT/trainer.json"
part train-b16 150 "$PY" benchmarks/train_throughput.py --size "$B16" --steps "$STEPS" --warmup "$WARMUP" \
    --variants compile:1 eager:1 --out "$OUT/train-b16.json"
# Input pipeline with the machine's cores, and stage-1 training fed from files: data wait.
WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
part data 150 "$PY" benchmarks/data_throughput.py "${DATA_SIZE[@]}" --workers "$WORKERS" \
    --train-steps 10 --rounds 1 --aug-batch 512 --work "$WORK/data" --out "$OUT/data.json"
# `geobind embed` end to end: shards -> Parquet, loader or device preprocessing, thumbnails.
part embed 150 "$PY" benchmarks/gpu/embed_smoke.py "${EMBED_SIZE[@]}" --work "$WORK/embed" --out "$OUT/embed.json"
"$PY" benchmarks/gpu/summary.py "$OUT"
