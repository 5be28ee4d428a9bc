"""Chunked runs (--chunk-tokens) killed and resumed, on every executor and in a bucket: the rerun
ends with the uninterrupted run's rows, scores and window-scores file, which is derived from the
checkpoint's parts alone; expansion runs per unit, so memory does not grow with the input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, real_pairs, run_cli, shared
from s3server import bucket, s3_server  # noqa: F401 - fixtures
from test_commit_interval import _HOOK, _held, _wait_for
from test_resume import _spawn

CHUNK = ["--chunk-tokens", "12", "--chunk-overlap", "3"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("chunk-resume")
    inp = d / "in.parquet"
    pq.write_table(real_pairs(100), inp, row_group_size=47)  # 300 pairs, awkward row groups
    ref, cs = d / "ref.parquet", d / "ref-cs.parquet"
    r = run_cli(["run", inp, "--model", models["tied"], "-o", ref, "--window", 30, "-q", *CHUNK,
                 "--chunk-scores", cs])
    assert r.exit_code == 0, r.output
    nested = d / "nested.parquet"
    pq.write_table(pq.read_table(shared("ARC-Challenge.nested.parquet")).slice(0, 40), nested)
    nref, ncs = d / "nref.parquet", d / "nref-cs.parquet"
    r = run_cli(["run", nested, "--model", models["tied"], "-o", nref, "--window", 40, "-q", *CHUNK,
                 "--chunk-scores", ncs])
    assert r.exit_code == 0, r.output
    hook = d / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    return {"dir": d, "input": inp, "ref": pq.read_table(ref), "cs": pq.read_table(cs), "model": models["tied"],
            "nested": nested, "nref": pq.read_table(nref), "ncs": pq.read_table(ncs), "hook": hook}


def _args(job, out, cs, *extra):
    return ["run", str(job["input"]), "--model", job["model"], "-o", str(out), "--window", "30", "-q", *CHUNK,
            "--chunk-scores", str(cs), *map(str, extra)]


def assert_same(got: pa.Table, ref: pa.Table):
    """The rows of `ref` with their scores to 1e-6 (batches differ). Ranks too, except between
    rows whose scores tie: two documents may share their best window ("... before it cures, making
    sure it's square" and "... after it cures, ..."), and float noise orders such ties."""
    assert got.column_names == ref.column_names and got.num_rows == ref.num_rows

    def key(r):
        return r["doc_id"] if "doc_id" in r else (r["query_id"], r["doc_index"])
    g = {key(r): r for r in got.to_pylist()}
    for r in ref.to_pylist():
        o = g[key(r)]
        assert {k: v for k, v in o.items() if k not in ("score", "rank")} == \
            {k: v for k, v in r.items() if k not in ("score", "rank")}
        assert abs(o["score"] - r["score"]) <= 1e-6
        if o["rank"] != r["rank"]:
            tied = [x for x in ref.to_pylist() if x["query_id"] == r["query_id"] and x["rank"] == o["rank"]]
            assert tied and abs(tied[0]["score"] - r["score"]) <= 2e-6, (r, o)


def _same_windows(got: pa.Table, ref: pa.Table, atol: float = 0.0):
    assert got.schema == ref.schema and got.num_rows == ref.num_rows
    for c in ("query_id", "doc_id", "chunk", "start_token"):
        assert got.column(c).equals(ref.column(c)), c
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), atol=atol, rtol=0)


@pytest.mark.parametrize("where", [
    "/parts/[^/]+$:3:before",     # a part fully written, not renamed
    "/done/[^/]+$:4:after",       # a record in place, the next unit not begun
    "/cs\\.parquet$:1:before",    # the window scores written, not renamed
    "/cs\\.parquet$:1:after",     # the window scores in place, the output not written
    "/out\\.parquet$:1:after",    # the output in place, not yet marked published
    "checkpoint$:2:after",        # marked published, the checkpoint not yet removed
])
def test_sigkill_inside_writes_then_resume(job, tmp_path, where):
    out, cs = tmp_path / "out.parquet", tmp_path / "cs.parquet"
    p = _spawn(_args(job, out, cs), {"KILL_AT_REPLACE": where})
    p.wait(timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()[-2000:]
    if where.startswith("/cs") and where.endswith("before"):
        assert not cs.exists() and not out.exists()  # never half-written under the real name
    p = _spawn(_args(job, out, cs))
    p.wait(timeout=300)
    assert p.returncode == 0, p.stderr.read()[-2000:]
    assert pq.read_table(out).equals(job["ref"])  # whole units are scored as they were: the same bits
    _same_windows(pq.read_table(cs), job["cs"])
    assert sorted(os.listdir(tmp_path)) == ["cs.parquet", "out.parquet"]  # no temp file, no checkpoint


def test_window_scores_asked_for_after_publishing(job, tmp_path):
    """Published with the checkpoint kept; the rerun that asks for the window scores writes them
    from the parts (the option is an output, not in the fingerprint)."""
    out, cs = tmp_path / "out.parquet", tmp_path / "cs.parquet"
    args = _args(job, out, cs)
    i = args.index("--chunk-scores")
    r = run_cli(args[:i] + args[i + 2:] + ["--keep-checkpoint"])
    assert r.exit_code == 0, r.output
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    _same_windows(pq.read_table(cs), job["cs"])
    assert sorted(os.listdir(tmp_path)) == ["cs.parquet", "out.parquet"]


@pytest.mark.parametrize("form", ["long", "nested"])
def test_sigkill_mid_unit_resumes_from_the_windows_committed(job, tmp_path, form):
    """Partial commits of a unit in flight hold windows; the rerun scores only the other windows
    of the unit and writes the uninterrupted run's rows and window scores."""
    out, cs = tmp_path / "o.parquet", tmp_path / "cs.parquet"
    ck = str(out) + ".ckpt"
    inp, window, ref, ref_cs = ((job["input"], 300, job["ref"], job["cs"]) if form == "long" else
                                (job["nested"], 40, job["nref"], job["ncs"]))
    args = ["run", inp, "--model", job["model"], "-o", out, "-q", "--window", window, *CHUNK,
            "--chunk-scores", cs, "--max-batch-tokens", 600]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(job["hook"]), ROOT]), HOLD_EVENT=str(tmp_path / "held"),
               HOLD_AFTER="3", HOLD_AT="partial", HOLD_COUNT="1")
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args + ["--commit-every", "0.000001"])],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    _wait_for(lambda: _held(tmp_path / "held"), p, "the third partial commit")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    kept = sum(pq.read_metadata(os.path.join(ck, "partial", n)).num_rows
               for n in os.listdir(os.path.join(ck, "partial")) if n.endswith(".parquet") and not n.startswith("."))
    windows = ref_cs.num_rows
    assert 0 < kept < windows
    r = run_cli(args + ["--summary", tmp_path / "s.json"])
    assert r.exit_code == 0, r.output
    s = json.load(open(tmp_path / "s.json"))
    assert s["pairs_resumed"] == kept and s["pairs_this_run"] == windows - kept and s["pairs_scored"] == windows
    assert s["extra"]["chunking"]["windows"] == windows
    assert_same(pq.read_table(out), ref)
    _same_windows(pq.read_table(cs), ref_cs, atol=1e-6)


def test_sigterm_stops_and_says_what_is_kept(job, tmp_path):
    out, cs = tmp_path / "out.parquet", tmp_path / "cs.parquet"
    p = _spawn(_args(job, out, cs))
    deadline = time.monotonic() + 300
    while not (os.path.isdir(tmp_path / "out.parquet.ckpt" / "done") and os.listdir(tmp_path / "out.parquet.ckpt"
                                                                                      / "done")):
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    err = p.stderr.read()
    assert p.returncode == 143, err[-2000:]
    # The total is not known before every unit is tokenized: the line says what is kept.
    assert "interrupted by signal 15; rerun the same command to resume" in err and "Traceback" not in err
    p = _spawn(_args(job, out, cs))
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert pq.read_table(out).equals(job["ref"])
    _same_windows(pq.read_table(cs), job["cs"])


# -- executors --------------------------------------------------------------------------------------

def test_device_pool_equals_single_process(job, tmp_path):
    out, cs = tmp_path / "pool.parquet", tmp_path / "cs.parquet"
    r = run_cli(_args(job, out, cs, "--devices", "cpu,cpu"))
    assert r.exit_code == 0, r.output
    assert_same(pq.read_table(out), job["ref"])
    _same_windows(pq.read_table(cs), job["cs"], atol=1e-6)


def test_ray_equals_single_process(job, tmp_path):
    pytest.importorskip("ray")
    out, cs = tmp_path / "ray.parquet", tmp_path / "cs.parquet"
    r = run_cli(_args(job, out, cs, "--executor", "ray", "--workers", 2))
    assert r.exit_code == 0, r.output
    assert_same(pq.read_table(out), job["ref"])
    _same_windows(pq.read_table(cs), job["cs"], atol=1e-6)


# -- object storage -----------------------------------------------------------------------------------

def _read(key):
    from pipeline.storage.location import location

    with location(key).open() as f:
        return pq.read_table(f)


def test_killed_run_in_a_bucket_resumes(bucket, job, s3_server):
    from pipeline.storage.location import location

    location(f"{bucket}/in.parquet").write_atomic(open(job["input"], "rb").read())
    out, cs = f"{bucket}/out.parquet", f"{bucket}/scores/cs.parquet"
    args = ["run", f"{bucket}/in.parquet", "--model", job["model"], "-o", out, "--window", 30, "-q", *CHUNK,
            "--chunk-scores", cs]
    env = dict(os.environ, PYTHONPATH=ROOT, **s3_server)
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = location(out + ".ckpt") / "done"
    deadline = time.monotonic() + 600
    while len(done.list()) < 2:
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no part appeared"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    assert _read(out).equals(job["ref"])
    _same_windows(_read(cs), job["cs"])
    assert location(bucket).list() == ["in.parquet", "out.parquet", "scores"]
    assert (location(bucket) / "scores").list() == ["cs.parquet"]
    # It exists now: the same command is refused without --overwrite, with one line.
    r = run_cli(args)
    assert r.exit_code == 2 and "pass --overwrite" in r.output


# -- memory ------------------------------------------------------------------------------------------

_MEASURE = r"""
import json, resource, sys
import torch
from pipeline.bench.host import NullForward
from pipeline.bench.throughput import build_model
from pipeline.config import RunConfig
from pipeline.engines.score import engine_from_model
from pipeline.run import run
import tempfile
inp, out, docs = sys.argv[1], sys.argv[2], []
with tempfile.TemporaryDirectory() as wd:
    model, tok, _ = build_model("tiny", torch.device("cpu"), torch.float32, wd)
    scorer = engine_from_model(model, tok, RunConfig(inputs=(), output="", model="<host>", device="cpu"),
                               torch.device("cpu"), forward=NullForward(torch.device("cpu")))
    import pipeline.data.chunks as c
    real = c.expand_texts
    def expand_texts(documents, *a, **k):
        docs.append(len(documents))
        return real(documents, *a, **k)
    c.expand_texts = expand_texts
    s = run(RunConfig(inputs=(inp,), output=out, model="<host>", device="cpu", window_pairs=200, chunk_tokens=64,
                      overwrite=True, restart=True), progress=False, scorer=scorer)
print(json.dumps({"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "calls": docs,
                  "windows": s.extra["chunking"]["windows"]}))
"""


def test_expansion_streams_per_unit(tmp_path):
    """Documents of 1,500 tokens, 1,000 or 5,000 of them: each unit is expanded on its own (never
    more than a window of documents at once), and the peak memory of the whole run (scoring that
    costs nothing) does not grow with the input."""
    from pipeline.bench.throughput import WORDS

    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    doc = lambda: " ".join(rng.choice(words, 1500))  # noqa: E731 - about a token per word for this tokenizer
    base = [doc() for _ in range(200)]
    got = {}
    for n in (1000, 5000):
        inp = tmp_path / f"in{n}.parquet"
        pq.write_table(pa.table({"query": [f"q{i // 50}" for i in range(n)],
                                 "document": [base[i % 200] for i in range(n)]}), inp, row_group_size=1000)
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(inp), str(tmp_path / "out.parquet")], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-2000:]
        got[n] = json.loads(r.stdout.strip().splitlines()[-1])
        assert max(got[n]["calls"]) <= 200 and sum(got[n]["calls"]) == n
    assert got[5000]["windows"] == 5 * got[1000]["windows"] > 30 * 1000  # about 1 + (1500 - 64) / 48 each
    # Five times the input (and its windows): the peak stays within a fraction of the first run's.
    # (Measured on a 2-core CPU: 593 and 638 MB.)
    assert got[5000]["rss_kib"] < 1.15 * got[1000]["rss_kib"], {n: g["rss_kib"] for n, g in got.items()}
