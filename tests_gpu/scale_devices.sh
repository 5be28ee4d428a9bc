#!/usr/bin/env bash
# Issues 10 and 11 on a GPU machine: the --devices overhead on one GPU and the scaling on all of
# them, then a whole run with a killed worker and a killed driver. Run from the repo root with
# .whl (polars wheels) carried; results under $OUT. WHAT=bench|kill|all picks the part; the
# kill test on 1M pairs (issue 11) takes longer than one device command may run, so give it a
# call of its own: WHAT=kill PAIRS_KILL=1000000. The 2-H100 run of 2026-11-25 (docs/PERFORMANCE.md)
# showed that the input must hold many units per device: units are 2,048 pairs (bench --window).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import polars" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
COUNTS=$(python3 -c "print(','.join(str(i) for i in range(1, $N + 1)))")
b() { python3 -m jobs.cli bench "$@" 2>&1 | grep -v "^rerank-batch"; }
WHAT=${WHAT:-all}
if [[ $WHAT != kill ]]; then
b --arch 0.6b --workload w-mixed --pairs ${PAIRS_06B:-60000} --devices "$COUNTS" --repeats 2 --json "$OUT/devices_06b_mixed.json"
b --arch 4b --workload w-mixed --pairs ${PAIRS_4B:-8000} --devices "$COUNTS" --repeats 1 --json "$OUT/devices_4b_mixed.json"
fi
if [[ $WHAT != bench ]]; then
python3 tests_gpu/devices_kill_resume.py --arch 0.6b --workload w-short --pairs ${PAIRS_KILL:-100000} > "$OUT/devices_kill_resume.json" 2> "$OUT/kill.log"; tail -30 "$OUT/devices_kill_resume.json"
fi
