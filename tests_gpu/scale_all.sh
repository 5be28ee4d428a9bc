#!/usr/bin/env bash
# Scaling over the GPUs of one host, as one background job: the 0.6B and 4B `bench --devices`
# runs, then the 1M-pair whole run with a killed worker and a killed driver (about 20 minutes on
# 2 H100s). Start it with `setsid nohup bash tests_gpu/scale_all.sh &` so that it outlives the
# shell that started it, then watch $RES (default /tmp/res); DONE marks the end. Polars wheels
# in .whl/ are installed when polars is missing.
# The 2026-11-25 records (docs/results/devices_*_h100x2_*.json) came from these lines.
set -uo pipefail
RES=${RES:-/tmp/res}; mkdir -p "$RES"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import polars" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$RES/gpus.txt"
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
COUNTS=$(python3 -c "print(','.join(str(i) for i in range(1, $N + 1)))")
b() { python3 -m jobs.cli bench "$@"; }
b --arch 0.6b --workload w-mixed --pairs ${PAIRS_06B:-30000} --devices "$COUNTS" --repeats ${REPEATS:-3} \
  --json "$RES/devices_06b_mixed.json" > "$RES/b06.log" 2>&1
b --arch 4b --workload w-mixed --pairs ${PAIRS_4B:-8000} --devices "$COUNTS" --repeats 1 --window 512 \
  --json "$RES/devices_4b_mixed.json" > "$RES/b4.log" 2>&1
python3 tests_gpu/devices_kill_resume.py --arch 0.6b --workload w-short --pairs ${PAIRS_KILL:-1000000} \
  > "$RES/devices_kill_resume_1m.json" 2> "$RES/kill.log"
touch "$RES/DONE"
