#!/usr/bin/env bash
# Example cron job. crontab line (every night at 02:15; flock keeps two runs from overlapping):
#   15 2 * * *  flock -n /tmp/rerank-nightly.lock /opt/rerank/jobs/cron/rerank-nightly.sh >>/var/log/rerank-nightly.log 2>&1
#
# Configure it as you configure the command: RERANK_BATCH_ and the option's name
# (RERANK_BATCH_MODEL, RERANK_BATCH_MAX_LENGTH, RERANK_BATCH_DEVICES, ...), which `rerank-batch run`
# reads itself; this script passes no option of its own over them. It only gives tonight's
# defaults to RERANK_BATCH_INPUT (the input, an argument of the command), RERANK_BATCH_OUTPUT and
# RERANK_BATCH_SUMMARY. Log lines carry their time (stderr is not a terminal under cron).
#
# If a night's run is killed (reboot, OOM killer), the next invocation of the same command
# resumes from OUTPUT.ckpt/ instead of starting over. Exit status: 0 done, 2 bad input, options
# or output (fix and rerun), 1 runtime failure (rerun resumes), 75 another run holds the
# checkpoint (try later), 130/143 interrupted (rerun resumes).
set -uo pipefail
DAY=$(date +%F)
IN=${RERANK_BATCH_INPUT:-/data/candidates/$DAY.parquet}
export RERANK_BATCH_OUTPUT=${RERANK_BATCH_OUTPUT:-/data/reranked/$DAY.parquet}
case $RERANK_BATCH_OUTPUT in  # the summary is a local file beside a local output (a file or a dataset dir/)
  *://*) ;;
  *) export RERANK_BATCH_SUMMARY=${RERANK_BATCH_SUMMARY:-${RERANK_BATCH_OUTPUT%/}.summary.json} ;;
esac
OUT=$RERANK_BATCH_OUTPUT

"${RERANK_BATCH_BIN:-rerank-batch}" run "$IN"
rc=$?
case $rc in
  0) echo "$(date -Is) rerank ok: $OUT" ;;
  2) echo "$(date -Is) rerank stopped on its input, options or output (exit 2);" \
        "the error line above says what to change" ;;
  75) echo "$(date -Is) another run holds the checkpoint of $OUT (exit 75); try again later" ;;
  *) echo "$(date -Is) rerank stopped with status $rc; the next run resumes" ;;
esac
exit $rc
