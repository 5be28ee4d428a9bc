"""The Airflow example DAG runs for real (`airflow dags test`), and a retry resumes; the cron
example runs the sample data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pipeline.config import RunConfig
from pipeline.errors import Interrupted
from pipeline.run import run

AIRFLOW = os.environ.get("RERANK_AIRFLOW", os.path.join(ROOT, ".venv-airflow", "bin", "airflow"))
TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")


def _airflow_env(tmp_path, inp, out, model):
    if not os.path.exists(AIRFLOW):
        pytest.fail(f"{AIRFLOW} is missing: run `bash .ci/run`, which creates the Airflow environment "
                    "(.venv-airflow), or set RERANK_AIRFLOW to an airflow executable")
    home = tmp_path / "airflow"
    home.mkdir()
    return dict(
        os.environ,
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=os.path.join(ROOT, "jobs", "airflow"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        RERANK_BATCH_BIN=shutil.which("rerank-batch"),
        RERANK_INPUT=str(inp), RERANK_OUTPUT=str(out), RERANK_MODEL=model, RERANK_EXTRA="--window 5",
    )


def test_airflow_dag_runs_and_a_retry_resumes(tmp_path):
    # The sample data, copied so that the run's output lands in tmp_path.
    inp = tmp_path / "pairs.parquet"
    shutil.copy(os.path.join(ROOT, "sample_data", "pairs.parquet"), inp)
    out = tmp_path / "ranked.parquet"
    # A first attempt that died part-way: the task's next try must resume, not start over.
    calls = [0]

    def stop():
        calls[0] += 1
        return calls[0] > 3
    stop.signum = signal.SIGTERM
    with pytest.raises(Interrupted):
        run(RunConfig(inputs=(str(inp),), output=str(out), model=TINY, window_pairs=5),
            progress=False, should_stop=stop)
    env = _airflow_env(tmp_path, inp, out, TINY)
    p = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([AIRFLOW, "dags", "test", "rerank_batch"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "rerank-batch: wrote" in p.stdout + p.stderr
    t = pq.read_table(out)
    assert t.num_rows == 28 and set(t.schema.names) >= {"score", "rank"}
    summary = json.loads((tmp_path / "ranked.parquet.summary.json").read_text())
    assert summary["units_resumed"] >= 1 and summary["units_resumed"] < summary["units"]


def test_cron_example_runs_the_sample(tmp_path):
    out = tmp_path / "nightly.parquet"
    env = dict(os.environ, RERANK_INPUT=os.path.join(ROOT, "sample_data", "pairs.parquet"),
               RERANK_OUTPUT=str(out), RERANK_MODEL=TINY)
    p = subprocess.run(["bash", os.path.join(ROOT, "jobs", "cron", "rerank-nightly.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rerank ok" in p.stdout
    assert pq.read_metadata(out).num_rows == 28
    # The same night again: the output exists, the job refuses (exit 2) and says why.
    p = subprocess.run(["bash", os.path.join(ROOT, "jobs", "cron", "rerank-nightly.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "the output exists; pass --overwrite to replace it" in p.stderr
