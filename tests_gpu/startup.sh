#!/usr/bin/env bash
# Seconds to the first batch on a GPU machine (tests_gpu/startup.py), at most 4 minutes. Run from
# the repository root; polars wheels in .whl/ are installed when polars is missing. JSON to
# $OUT/startup.json, the table to $OUT/startup.txt.
#   bash tests_gpu/startup.sh            # 0.6B, then the encoder shapes while time is left
#   bash tests_gpu/startup.sh --smoke    # CPU check of the script itself
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import polars" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, tokenizers, safetensors; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'safetensors', safetensors.__version__)"
python3 -X importtime -c "import torch" 2>&1 | tail -1
timeout 235 python3 tests_gpu/startup.py --out "$OUT" --budget-s 190 "$@" 2>&1 | grep -vE "Writing|Loading|it/s\]" | tee "$OUT/startup.txt"
