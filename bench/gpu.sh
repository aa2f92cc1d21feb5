#!/usr/bin/env bash
# One prepared call for a lent GPU machine (no package registry there): install this checkout without
# dependencies (torch, numpy, opencv, onnx, onnxruntime are already present), show the GPU, then run
# bench/gpu_bench.py, which writes $OUT/gpu.json (else bench/results/gpu.json) section by section.
#
#   bash bench/gpu.sh            # on the GPU machine, ~7 minutes
#   bash bench/gpu.sh --smoke    # tiny sizes on any machine: tests the script
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import mnet.search.enas" >/dev/null 2>&1; then
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
        # no usable setuptools there: lay the import root out by hand (pyproject's package-dir map)
        SHIM="$(mktemp -d)"
        cp -r mnet "$SHIM/mnet"
        for stage in search calibration export runtime; do cp -r "$stage" "$SHIM/mnet/$stage"; done
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
exec "$PY" bench/gpu_bench.py "$@"
