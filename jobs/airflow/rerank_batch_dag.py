"""Example Airflow 3 DAG: `rerank-batch run` as one task with retries.

Configure it as you configure the command: the RERANK_BATCH_* variables of the worker's
environment (RERANK_BATCH_MODEL, RERANK_BATCH_OUTPUT, RERANK_BATCH_MAX_LENGTH, ...; the command
reads them itself, see `rerank-batch run --help`), plus RERANK_BATCH_INPUT for the input, which
is an argument rather than an option. A run's conf may override input, output and model and add
options (`airflow dags trigger rerank_batch -c '{"model": "/models/m", "extra": "--devices all"}'`);
what the conf leaves empty is not passed, so the environment, then the command's default,
decides: the DAG has no defaults of its own to override them with.

Exit statuses: 0 success; 75 (another run holds the checkpoint) leaves the task skipped; 2 (bad
input, options or output) fails it at once, since every retry would fail the same way; any other
failure is retried, and a retry reruns the same command, which resumes from the checkpoint
beside the output: only unfinished units are scored again. The task log shows the command's
lines, with timestamps.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param
from airflow.sdk.exceptions import AirflowException, AirflowFailException

RERANK = os.environ.get("RERANK_BATCH_BIN", "rerank-batch")
LOCKED, BAD_INPUT = 75, 2  # rerank-batch's exit statuses: try later; fix and rerun

# Empty conf values are not passed (the worker's RERANK_BATCH_* decide); `sh` quotes for bash.
COMMAND = """set -u
input={{ params.input | sh }}
input=${input:-${RERANK_BATCH_INPUT:?set RERANK_BATCH_INPUT or pass "input" in the run conf}}
{% if params.output %}export RERANK_BATCH_OUTPUT={{ params.output | sh }}
{% endif %}{% if params.model %}export RERANK_BATCH_MODEL={{ params.model | sh }}
{% endif %}case ${RERANK_BATCH_OUTPUT:-} in  # a local summary beside a local output (a file or a dataset dir/)
  ""|*://*) ;;
  *) export RERANK_BATCH_SUMMARY=${RERANK_BATCH_SUMMARY:-${RERANK_BATCH_OUTPUT%/}.summary.json} ;;
esac
exec """ + shlex.quote(RERANK) + """ run "$input" {{ params.extra }}
"""


class RerankBatchOperator(BashOperator):
    """A BashOperator that fails without retrying when the command exits 2 (bad input or options)."""

    def execute(self, context):
        try:
            return super().execute(context)
        except AirflowException:  # AirflowSkipException (exit 75) is one too: it passes through
            proc = self.subprocess_hook.sub_process
            if proc is not None and proc.returncode == BAD_INPUT:
                raise AirflowFailException(
                    "rerank-batch exited 2: bad input, options or output; not retried, since a retry would fail "
                    "the same way: the error line above says what to change") from None
            raise


with DAG(
    dag_id="rerank_batch",
    description="Score and rank Parquet (query, document) pairs with a reranker",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=1)},
    params={
        "input": Param("", type="string", description="Input file, directory or glob (default: RERANK_BATCH_INPUT)"),
        "output": Param("", type="string", description="Output (default: RERANK_BATCH_OUTPUT, else beside the input)"),
        "model": Param("", type="string", description="Model (default: RERANK_BATCH_MODEL, else the command's)"),
        "extra": Param("", type="string", description="More options, e.g. --devices all"),
    },
    user_defined_filters={"sh": shlex.quote},
    tags=["rerank-batch"],
) as dag:
    RerankBatchOperator(
        task_id="rerank",
        bash_command=COMMAND,
        skip_on_exit_code=LOCKED,
        # Let a run that is being stopped leave its checkpoint consistent (SIGTERM first).
        execution_timeout=timedelta(hours=24),
    )
