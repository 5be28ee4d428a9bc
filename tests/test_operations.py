"""The Airflow example DAG runs for real (`airflow dags test`), and a retry resumes; the cron
example runs the sample data."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, stop_after_pairs
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
        # The command's own variables, read by the command: the DAG passes no option over them.
        RERANK_BATCH_INPUT=str(inp), RERANK_BATCH_OUTPUT=str(out), RERANK_BATCH_MODEL=model, RERANK_BATCH_WINDOW="5",
    )


def test_airflow_dag_runs_and_a_retry_resumes(tmp_path):
    # The sample data, copied so that the run's output lands in tmp_path.
    inp = tmp_path / "pairs.parquet"
    shutil.copy(os.path.join(ROOT, "sample_data", "pairs.parquet"), inp)
    out = tmp_path / "ranked.parquet"
    # A first attempt that died part-way: the task's next try must resume, not start over.
    with pytest.raises(Interrupted):  # stopped once the second unit (of 6) is scored
        run(RunConfig(inputs=(str(inp),), output=str(out), model=TINY, window_pairs=5),
            progress=False, **stop_after_pairs(10, signal.SIGTERM))
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


# The exit statuses of the DAG's task, through its real rendered command and operator, with a stand-in
# for rerank-batch that exits as told and prints what it was given (run by Airflow's own Python).
_PROBE = r"""
import importlib.util, json, sys
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

spec = importlib.util.spec_from_file_location("rerank_batch_dag", sys.argv[1])
dag_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dag_module)
task = dag_module.dag.get_task("rerank")
template = task.bash_command
for rc, conf in json.loads(sys.argv[2]):
    params = {"input": "", "output": "", "model": "", "extra": "", **conf}
    task.bash_command = task.render_template(template, {"params": params}, jinja_env=dag_module.dag.get_template_env())
    open(sys.argv[3], "w").write(str(rc))
    try:
        task.execute({})
        outcome = "success"
    except AirflowSkipException:
        outcome = "skipped"
    except AirflowFailException:
        outcome = "failed, no retry"
    except Exception:
        outcome = "failed, retried"
    print("OUTCOME", rc, outcome, flush=True)
"""

_FAKE = """#!/usr/bin/env bash
echo "GOT args=[$*] model=[${RERANK_BATCH_MODEL:-}] output=[${RERANK_BATCH_OUTPUT:-}] summary=[${RERANK_BATCH_SUMMARY:-}] END"
exit "$(cat "$FAKE_RC_FILE")"
"""


def test_airflow_dag_skips_when_locked_and_does_not_retry_bad_input(tmp_path):
    env = _airflow_env(tmp_path, "/data/in.parquet", "", "")
    fake = tmp_path / "fake-rerank-batch"
    fake.write_text(_FAKE)
    fake.chmod(0o755)
    env.update(RERANK_BATCH_BIN=str(fake), FAKE_RC_FILE=str(tmp_path / "rc"), RERANK_BATCH_OUTPUT="/data/out.parquet",
               RERANK_BATCH_MODEL="/models/from-env")
    cases = [[0, {}], [75, {}], [2, {}], [1, {}],
             [0, {"input": "/conf/in put.parquet", "model": "/models/from conf", "extra": "--window 7"}]]
    python = os.path.join(os.path.dirname(AIRFLOW), "python")
    p = subprocess.run([python, "-c", _PROBE, os.path.join(ROOT, "jobs", "airflow", "rerank_batch_dag.py"),
                        json.dumps(cases), tmp_path / "rc"], env=env, capture_output=True, text=True, timeout=600)
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-3000:]
    outcomes = [line.split(" ", 2)[1:] for line in p.stdout.splitlines() if line.startswith("OUTCOME")]
    assert outcomes == [["0", "success"], ["75", "skipped"], ["2", "failed, no retry"], ["1", "failed, retried"],
                        ["0", "success"]], text[-3000:]
    got = [re.search(r"GOT (.*) END", line).group(0)[:-4] for line in text.splitlines() if "GOT " in line]
    # Without conf, the worker's RERANK_BATCH_* decide: no --model or -o of the DAG's own over them.
    assert got[0] == ("GOT args=[run /data/in.parquet] model=[/models/from-env] output=[/data/out.parquet] "
                      "summary=[/data/out.parquet.summary.json]")
    # The conf overrides them, quoted for the shell; extra adds options.
    assert got[-1] == ("GOT args=[run /conf/in put.parquet --window 7] model=[/models/from conf] "
                       "output=[/data/out.parquet] summary=[/data/out.parquet.summary.json]")


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d rerank-batch: "


def test_cron_example_runs_the_sample(tmp_path):
    out = tmp_path / "nightly.parquet"
    # The model only through the command's own variable: the hub default would fail offline.
    env = dict(os.environ, RERANK_BATCH_INPUT=os.path.join(ROOT, "sample_data", "pairs.parquet"),
               RERANK_BATCH_OUTPUT=str(out), RERANK_BATCH_MODEL=TINY)
    for stale in ("RERANK_BATCH_SUMMARY", "RERANK_BATCH_QUIET", "RERANK_BATCH_LOG_LEVEL"):
        env.pop(stale, None)
    p = subprocess.run(["bash", os.path.join(ROOT, "jobs", "cron", "rerank-nightly.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rerank ok" in p.stdout
    assert pq.read_metadata(out).num_rows == 28
    assert json.loads((tmp_path / "nightly.parquet.summary.json").read_text())["rows"] == 28
    # Every log line in the cron log has its time.
    lines = p.stderr.splitlines()
    assert lines and all(re.match(STAMP, line) for line in lines), p.stderr
    assert re.match(STAMP + f"wrote {re.escape(str(out))} \\(28 rows\\)$", lines[-1]), p.stderr
    # The same night again: the output exists, the job refuses (exit 2) and says why, and the
    # script's own line does not blame the input.
    p = subprocess.run(["bash", os.path.join(ROOT, "jobs", "cron", "rerank-nightly.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert f"Error: {out}: the output exists; pass --overwrite to replace it\n" == p.stderr
    assert p.stdout.split(" ", 1)[1] == ("rerank stopped on its input, options or output (exit 2); the error line "
                                         "above says what to change\n")
