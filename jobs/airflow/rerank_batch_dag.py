"""Example Airflow 3 DAG: `rerank-batch run` as one task with retries.

A retry reruns the same command, and the same command resumes from the checkpoint beside the
output: only unfinished units are scored again. Exit status 2 (bad input or options) will fail
the same way on every retry; the task log shows the one-line reason.

Parameters come from the run's conf (`airflow dags trigger -c '{"input": ...}'`), defaulting
to the RERANK_* environment variables below, so the file needs no edit to try it out.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param

RERANK = os.environ.get("RERANK_BATCH_BIN", "rerank-batch")

with DAG(
    dag_id="rerank_batch",
    description="Score and rank Parquet (query, document) pairs with a reranker",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=1)},
    params={
        "input": Param(os.environ.get("RERANK_INPUT", "/data/pairs.parquet"), type="string"),
        "output": Param(os.environ.get("RERANK_OUTPUT", "/data/pairs.reranked.parquet"), type="string"),
        "model": Param(os.environ.get("RERANK_MODEL", "Qwen/Qwen3-Reranker-0.6B"), type="string"),
        "extra": Param(os.environ.get("RERANK_EXTRA", ""), type="string"),
    },
    tags=["rerank-batch"],
) as dag:
    BashOperator(
        task_id="rerank",
        bash_command=(
            f"{RERANK} run '{{{{ params.input }}}}' -o '{{{{ params.output }}}}' "
            "--model '{{ params.model }}' --summary '{{ params.output }}.summary.json' "
            "--quiet {{ params.extra }}"
        ),
        # Let a run that is being stopped leave its checkpoint consistent (SIGTERM first).
        execution_timeout=timedelta(hours=24),
    )
