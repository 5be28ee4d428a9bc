#!/usr/bin/env bash
# GPU tests, then the main benchmark, results under $OUT. Run from the repository root on a GPU
# machine, with polars wheels in .whl/ (for machines without network access) and a copy of the
# RAR-b data the CPU tests read (../shared/data) in .devdata/.
#   bash tests_gpu/run_on_device.sh [tests|bench|all] [extra bench lines file]
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export RERANK_SHARED_DATA=$PWD/.devdata
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
bench() { python3 -m jobs.cli bench "$@"; }
if [[ $what == tests || $what == all ]]; then
    python3 -m pytest -x -q -p no:cacheprovider tests/test_parity.py 2>&1 | tail -3
    python3 -m pytest -x -q -s -p no:cacheprovider tests_gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "^\s*$" | tail -15
fi
if [[ $what == bench || $what == all ]]; then
    bench --arch 0.6b --workload w-mixed --seed-pairs 1500 --profile --json "$OUT/b_06b_mixed.json" 2>&1 | grep -v "^rerank-batch: summary"
fi
if [[ -n ${2:-} ]]; then
    while read -r line; do [[ -z $line ]] && continue; echo "== bench $line"; eval bench $line 2>&1 | grep -v "^rerank-batch:"; done < "$2"
fi
