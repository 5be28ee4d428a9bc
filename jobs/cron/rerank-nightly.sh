#!/usr/bin/env bash
# Example cron job. crontab line (every night at 02:15; flock keeps two runs from overlapping):
#   15 2 * * *  flock -n /tmp/rerank-nightly.lock /opt/rerank/jobs/cron/rerank-nightly.sh >>/var/log/rerank-nightly.log 2>&1
#
# If a night's run is killed (reboot, OOM killer), the next invocation of the same command
# resumes from OUTPUT.ckpt/ instead of starting over. Exit status: 0 done, 2 bad input or
# options (fix and rerun), 1 runtime failure (rerun resumes), 130/143 interrupted (rerun resumes).
set -uo pipefail
DAY=$(date +%F)
IN=${RERANK_INPUT:-/data/candidates/$DAY.parquet}
OUT=${RERANK_OUTPUT:-/data/reranked/$DAY.parquet}
MODEL=${RERANK_MODEL:-Qwen/Qwen3-Reranker-0.6B}

rerank-batch run "$IN" -o "$OUT" --model "$MODEL" --summary "$OUT.summary.json" --quiet
rc=$?
case $rc in
  0) echo "$(date -Is) rerank ok: $OUT" ;;
  2) echo "$(date -Is) rerank refused its input; see the message above" ;;
  *) echo "$(date -Is) rerank stopped with status $rc; the next run resumes" ;;
esac
exit $rc
