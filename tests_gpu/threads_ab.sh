#!/usr/bin/env bash
# torch's CPU pool on a GPU run: the CLI's scoring rate with the default (one thread) against a
# pool on every core (OMP_NUM_THREADS, which the CLI rows' fresh processes inherit), for
# MiniLM-L6 on 60,000 W-mixed pairs (sentence-transformers' rows in the first run only) and the
# Qwen3 0.6B on W-short (shared prefixes: the host-bound workload). Records under $OUT. Run from
# the repository root on a GPU machine; polars wheels in .whl/ for machines without network
# access. About 7 minutes on an H100.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import polars" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
CORES=$(nproc)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
b() { name=$1; envs=$2; shift 2; echo "== $name [$envs]"
  env $envs timeout 200 python3 -m jobs.cli bench "$@" --json "$OUT/$name.json" 2>&1 \
    | grep -E "^(cli|st_bs|engine|vs )" | cut -c1-300; }
M="--arch minilm-l6 --workload w-mixed --pairs 3000 --cli-pairs 60000 --cli-stages --repeats 2"
b threads_minilm_l6_default "X=1" $M
b threads_minilm_l6_pool "OMP_NUM_THREADS=$CORES" $M --no-st
# MiniLM runs eagerly under --compile auto (hidden size 384); the compiled step beside it.
b threads_minilm_l6_compiled "RERANK_BATCH_COMPILE=on" $M --no-st --compile on
Q="--arch 0.6b --peer --no-st --workload w-short --pairs 1000 --cli-pairs 12000 --cli-stages --repeats 2"
b threads_06b_wshort_default "X=1" $Q
b threads_06b_wshort_pool "OMP_NUM_THREADS=$CORES" $Q
