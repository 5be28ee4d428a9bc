#!/usr/bin/env bash
# --dtype fp8 on one GPU (tests_gpu/fp8_bench.py): fp8 against bf16, speed on the 0.6B/4B/8B shapes
# and fidelity against float32 on real RAR-b texts; record in $OUT/fp8_bench.json, table in
# $OUT/fp8_bench.txt. Run from the repository root; for a machine without network access, put a
# polars wheel in .whl/ (installed when polars is missing) and the RAR-b data in shared-data/.
# About 5 minutes on an H100; extra arguments go to the script (e.g. --archs 0.6b,8b --budget-s 300).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import polars" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD RERANK_SHARED_DATA=${RERANK_SHARED_DATA:-$PWD/shared-data} OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 570 python3 tests_gpu/fp8_bench.py "$@" 2>&1 | grep -vE "Writing|Loading|it/s" | tee "$OUT/fp8_bench.txt"
