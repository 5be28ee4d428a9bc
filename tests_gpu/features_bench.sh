#!/usr/bin/env bash
# The feature benchmarks on a GPU machine, records under $OUT: the score cache's savings
# (tests_gpu/cache_bench.py) and long documents as windows against Reranker.predict
# (`bench --chunk-tokens`), 0.6B random weights, bf16. Run from the repository root; for a
# machine without network access, put a polars wheel in .whl/.
#   bash tests_gpu/features_bench.sh [cache] [longdoc] [longdoc-shared]     (default: all three)
# Environment: CACHE_ARGS (more arguments of cache_bench.py, e.g. "--parts grown,dups"), CACHE_REPEATS,
# LONGDOC_REPEATS, LONGDOC_ARGS (e.g. "--window 200"), and each step's time limit in seconds (CACHE_TMO, LONGDOC_TMO).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import polars" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/features.txt"
quiet() { grep -vE "^rerank-batch:|Writing|Loading|it/s\]$"; }
for step in ${*:-cache longdoc longdoc-shared}; do
  echo "== $step" | tee -a "$OUT/features.txt"
  case $step in
    cache) timeout "${CACHE_TMO:-330}" python3 tests_gpu/cache_bench.py --repeats "${CACHE_REPEATS:-1}" ${CACHE_ARGS:-} "$OUT/cache_bench.json" 2>&1 | quiet | tee -a "$OUT/features.txt" ;;
    longdoc) timeout "${LONGDOC_TMO:-200}" python3 -m jobs.cli bench --arch 0.6b --chunk-tokens 512 --chunk-overlap 128 \
               --repeats "${LONGDOC_REPEATS:-2}" ${LONGDOC_ARGS:-} --json "$OUT/longdoc_06b_auto.json" 2>&1 | quiet | tee -a "$OUT/features.txt" ;;
    longdoc-shared) timeout "${LONGDOC_TMO:-200}" python3 -m jobs.cli bench --arch 0.6b --chunk-tokens 512 --chunk-overlap 128 \
               --prefix-sharing on --repeats "${LONGDOC_REPEATS:-2}" ${LONGDOC_ARGS:-} --json "$OUT/longdoc_06b_shared.json" 2>&1 | quiet | tee -a "$OUT/features.txt" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
