#!/usr/bin/env bash
# Download (on a machine with PyPI access) the wheels that a GPU box with PyTorch, transformers,
# numpy, pandas, pyarrow, pillow, matplotlib, tqdm and pyyaml lacks for the benchmarks, into
# .whl/ (Python 3.12, manylinux x86-64). run_all.sh installs them from there without network.
#
#   bash benchmarks/gpu/fetch_wheels.sh [python-version]     # default 3.12
set -euo pipefail
cd "$(dirname "$0")/../.."
PYV="${1:-3.12}"
PY="${PYTHON:-python3}"
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64; do plat+=(--platform "$p"); done
# Binary wheels for the target interpreter.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${plat[@]}" -d .whl "soundfile>=0.12" "soxr>=0.3" "cffi>=1.0"
# Pure-Python ones.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "webdataset>=0.2.86" braceexpand pycparser
ls -l .whl
du -sh .whl
