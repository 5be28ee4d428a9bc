#!/usr/bin/env bash
# Cross-encoders against sentence-transformers on a GPU: the packed cross-encoder tests, then
# `bench --peer` (sentence-transformers rows, fresh-process CLI rows) per shape; records under
# $OUT. Run from the repository root; for a machine without network access, put a polars wheel
# in .whl/ (installed when polars is missing) and a copy of the RAR-b data in .devdata/ (or name
# its folder in RERANK_SHARED_DATA).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import polars" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD RERANK_SHARED_DATA=${RERANK_SHARED_DATA:-$PWD/.devdata}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, sentence_transformers as s, importlib.util as u; print('torch', torch.__version__, 'transformers', transformers.__version__, 'st', s.__version__, 'accelerate', u.find_spec('accelerate') is not None)"
timeout 60 python3 -m pytest -x -q -s -p no:cacheprovider tests_gpu/test_gpu_encoders.py 2>&1 | grep -vE "^\s*$|Writing|Loading" | tail -12 | tee "$OUT/gpu_tests.log"
b() { name=$1; shift; echo "== bench $*"; timeout "$TMO" python3 -m jobs.cli bench "$@" --json "$OUT/$name.json" 2>&1 | grep -vE "^rerank-batch:|Writing|Loading|it/s" | tee -a "$OUT/tables.txt"; }
# Each record has the tokenizer load (ours and transformers', fresh processes) and the CLI's rate
# against sentence-transformers, each CLI run timed stage by stage (--cli-stages) for the
# cross-encoders. Shapes to run: the arguments (default all; the four together
# take more than one 10-minute command: split them, e.g. `minilm-l6 modernbert-base`, then
# `xlmr-large 0.6b`).
SHAPES=${*:-minilm-l6 xlmr-large modernbert-base 0.6b}
for s in $SHAPES; do case $s in
  # MiniLM's CLI row scores 60,000 pairs: on 6,000 a fresh process's first batches weigh too much.
  minilm-l6) TMO=200 b peer_minilm_l6 --arch minilm-l6 --workload w-mixed --pairs 3000 --cli-pairs 60000 --cli-stages --repeats 2 ;;
  xlmr-large) TMO=280 b peer_xlmr_large --arch xlmr-large --workload w-mixed --pairs 6000 --cli-stages ;;
  modernbert-base) TMO=160 b peer_modernbert --arch modernbert-base --workload w-mixed --pairs 1000 ;;
  0.6b) TMO=150 b peer_06b_cli --arch 0.6b --peer --no-st --workload w-mixed ;;
  *) echo "unknown shape $s"; exit 2 ;;
esac; done
cat "$OUT/tables.txt"
