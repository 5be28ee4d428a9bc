"""Exact dedup across the whole run: repeats spread over many units (and files) are computed once,
whether the unit that first had the text is finished (the run's store in the checkpoint) or still
in flight (it waits for that unit's scores); every executor, a kill anywhere then resume (local
disk and object storage); the outputs are the reference recipe's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import KILL_AT_REPLACE_CHILD, ROOT, real_pairs, reference_scores, run_cli
from s3server import bucket, s3_server  # noqa: F401 - fixtures

TOL = 1e-5  # float32 parity bound of the project
WAIT_S = 600  # a ceiling for events on a loaded machine, never a measured bound
COLS = ("instruction", "query", "document")

_CHILD = KILL_AT_REPLACE_CHILD + r"""
if os.environ.get("DEDUP_FLUSH"):  # write the run's store after every unit of this small input
    import pipeline.cache.runwide as runwide
    runwide.FLUSH_ENTRIES = int(os.environ["DEDUP_FLUSH"])
sys.argv = ["rerank-batch"] + sys.argv[1:]
from jobs.cli import main
main()
"""


def _texts(t: pa.Table) -> list[tuple]:
    return list(zip(*(t.column(c).to_pylist() for c in COLS)))


def _with_repeats(src: pa.Table, n_rep: int, seed: int) -> pa.Table:
    """`src` plus `n_rep` of its rows again under other ids, all shuffled: repeats land in every unit."""
    rng = np.random.default_rng(seed)
    rep = src.take(pa.array(rng.integers(0, src.num_rows, n_rep)))
    rep = rep.set_column(rep.column_names.index("doc_id"), "doc_id",
                         pa.array([f"rep-{i}" for i in range(n_rep)], rep.schema.field("doc_id").type))
    both = pa.concat_tables([src, rep])
    return both.take(pa.array(rng.permutation(both.num_rows)))


@pytest.fixture(scope="module")
def job(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("dedup")
    t = _with_repeats(real_pairs(40), 60, seed=3)  # 180 rows, about 120 distinct texts
    inp = d / "in.parquet"
    pq.write_table(t, inp)
    texts = _texts(t)
    distinct = sorted(set(texts))
    ref = dict(zip(distinct, reference_scores(models["tied"], *zip(*distinct)).tolist()))
    return {"dir": d, "input": inp, "table": t, "model": models["tied"], "ref": ref, "distinct": len(distinct),
            "xdg": str(d / "xdg")}


def _args(job, inp, out, *extra):
    return ["run", str(inp), "--model", job["model"], "-o", str(out), "--window", "15", "-q", *map(str, extra)]


def assert_reference(job, got: pa.Table, table: pa.Table | None = None, same: bool = True):
    """Every row of the input, with its own ids, scored as the reference recipe scores its text;
    rows of one text carry the very same score (`same`: one worker computed it once)."""
    table = job["table"] if table is None else table
    assert got.num_rows == table.num_rows
    assert sorted(got.column("doc_id").to_pylist()) == sorted(table.column("doc_id").to_pylist())
    texts = _texts(got)
    want = np.array([job["ref"][k] for k in texts], np.float32)
    np.testing.assert_allclose(got["score"].to_numpy(), want, atol=TOL, rtol=0)
    by_text = {}
    for k, sc in zip(texts, got["score"].to_pylist() if same else ()):
        assert by_text.setdefault(k, sc) == sc


def _run(job, tmp_path, *extra, name="o"):
    out = tmp_path / f"{name}.parquet"
    r = run_cli(_args(job, job["input"], out, "--summary", tmp_path / f"{name}.json", *extra),
                env={"XDG_CACHE_HOME": job["xdg"]})
    assert r.exit_code == 0, r.output
    return pq.read_table(out), json.load(open(tmp_path / f"{name}.json"))


# -- one process ---------------------------------------------------------------------------------

def test_repeats_spread_over_many_units_are_computed_once(job, tmp_path):
    """12 units of 15 rows, a third of the rows repeats of rows anywhere else: each distinct text
    goes through the model once, every other row takes its score, and the run leaves nothing
    behind (its dedup store goes with the checkpoint)."""
    got, s = _run(job, tmp_path)
    rows = job["table"].num_rows
    assert s["pairs_computed"] == job["distinct"]
    assert s["duplicate_pairs"] == rows - job["distinct"] > 40
    assert s["pairs_from_cache"] == 0 and s["pairs_scored"] == s["pairs_this_run"] == rows  # progress: all done
    assert_reference(job, got)
    assert sorted(os.listdir(tmp_path)) == ["o.json", "o.parquet"]


def test_with_the_cache_the_counts_are_the_same_and_a_rerun_takes_each_text_once(job, tmp_path):
    """The shared cache answers texts new to the run; repeats stay repeats, whether the unit
    that had them first is finished or not."""
    cache = tmp_path / "cache"
    got, s = _run(job, tmp_path, "--cache", cache, name="a")
    assert (s["pairs_computed"], s["pairs_from_cache"]) == (job["distinct"], 0)
    assert s["duplicate_pairs"] == job["table"].num_rows - job["distinct"]
    again, s2 = _run(job, tmp_path, "--cache", cache, name="b")
    assert (s2["pairs_computed"], s2["pairs_from_cache"]) == (0, job["distinct"])
    assert s2["duplicate_pairs"] == s["duplicate_pairs"]
    assert_reference(job, got)
    assert_reference(job, again)


def _files_with_repeats(job, d, n_files=6, rows=4):
    """Small files (units of 4 rows), each but the first repeating rows of the one before."""
    src = real_pairs(8).slice(0, n_files * rows)
    paths, tables = [], []
    for k in range(n_files):
        t = src.slice(k * rows, rows)
        if k:
            prev = tables[-1].slice(0, 2)
            prev = prev.set_column(prev.column_names.index("doc_id"), "doc_id",
                                   pa.array([f"f{k}-{x}" for x in prev.column("doc_id").to_pylist()],
                                            prev.schema.field("doc_id").type))
            t = pa.concat_tables([prev, t.slice(0, rows - 2)])
        tables.append(t)
        paths.append(d / f"part-{k}.parquet")
        pq.write_table(t, paths[-1])
    return paths, pa.concat_tables(tables)


class _Counting:
    """Wraps InFlight.match to count the pairs that waited for a unit in flight, and to set
    `planned` once the second unit is planned."""

    def __init__(self, monkeypatch):
        from pipeline.cache import runwide

        self.waited = 0
        self.plans = 0
        self.planned = threading.Event()
        real = runwide.InFlight.match

        def match(inflight, plan, positions, keys):
            wait = real(inflight, plan, positions, keys)
            self.waited += int(wait.sum())
            self.plans += 1
            if self.plans >= 2:
                self.planned.set()
            return wait

        monkeypatch.setattr(runwide.InFlight, "match", match)


def test_repeats_of_the_unit_in_flight_wait_for_its_scores(job, tmp_path, monkeypatch):
    """Small files scored together (one group, units still in flight): a file repeating the one
    before waits for that unit's scores, which come in stream order, before its own result."""
    from pipeline.config import RunConfig
    from pipeline.run import run

    counting = _Counting(monkeypatch)
    paths, table = _files_with_repeats(job, tmp_path)
    out = tmp_path / "o.parquet"
    s = run(RunConfig(inputs=tuple(map(str, paths)), output=str(out), model=job["model"], window_pairs=40),
            progress=False)
    distinct = len(set(_texts(table)))
    assert counting.waited == table.num_rows - distinct > 0  # every repeat waited: none was stored yet
    assert s.pairs_computed == distinct and s.duplicate_pairs == table.num_rows - distinct
    ref = dict(zip(sorted(set(_texts(table))), reference_scores(job["model"], *zip(*sorted(set(_texts(table)))))))
    assert_reference({"ref": ref}, pq.read_table(out), table)


def test_a_repeat_in_the_very_next_unit_waits_while_that_unit_is_scored(job, tmp_path, monkeypatch):
    """Units scored one by one: unit 1 repeats rows of unit 0 and is planned (by the prefetch
    thread) while unit 0 is still being scored: its repeats wait for unit 0's scores."""
    from pipeline import scoring
    from pipeline.config import RunConfig
    from pipeline.run import run

    counting = _Counting(monkeypatch)
    real_result = scoring.Work.result
    first = []

    def result(work, scores):
        if not first:  # unit 0 is finished only once unit 1 is planned
            first.append(work)
            assert counting.planned.wait(WAIT_S)
        return real_result(work, scores)

    monkeypatch.setattr(scoring.Work, "result", result)
    src = real_pairs(10)  # 30 rows
    u0 = src.slice(0, 15)
    rep = u0.slice(0, 5)
    rep = rep.set_column(rep.column_names.index("doc_id"), "doc_id",
                         pa.array([f"next-{x}" for x in rep.column("doc_id").to_pylist()], rep.schema.field("doc_id").type))
    table = pa.concat_tables([u0, rep, src.slice(15, 10)])  # unit 1 (rows 15-29): 5 repeats of unit 0
    inp = tmp_path / "in.parquet"
    pq.write_table(table, inp)
    out = tmp_path / "o.parquet"
    s = run(RunConfig(inputs=(str(inp),), output=str(out), model=job["model"], window_pairs=15), progress=False)
    distinct = len(set(_texts(table)))
    assert counting.waited == 5
    assert s.pairs_computed == distinct and s.duplicate_pairs == table.num_rows - distinct
    texts = sorted(set(_texts(table)))
    assert_reference({"ref": dict(zip(texts, reference_scores(job["model"], *zip(*texts))))}, pq.read_table(out), table)


def test_plans_wait_on_units_in_flight_and_then_read_the_store(tmp_path):
    """The in-flight table without a model: a later plan waits for an earlier unit's texts, gets
    their scores when it finishes, and a plan made after that finds them in the run's store."""
    from pipeline.cache.cache import PairCache
    from pipeline.cache.dedup import plan_unit
    from pipeline.cache.key import Scope
    from pipeline.cache.runwide import InFlight, RunDedup

    scope = Scope(b"s" * 16, {}, {})
    dd = RunDedup(PairCache(str(tmp_path / "dedup"), scope, private=True))
    fl = InFlight()
    ins = ["i"] * 3
    a = plan_unit(ins, ["q", "q", "q"], ["x", "y", "x"], run=dd, inflight=fl)
    assert list(a.todo) == [0, 1] and a.duplicates == 1 and len(fl) == 2
    b = plan_unit(ins, ["q", "q", "q"], ["y", "z", "y"], run=dd, inflight=fl)
    assert list(b.todo) == [1] and b.duplicates == 2 and b.waiting == 1  # "y" waits, its copy is a repeat
    with pytest.raises(RuntimeError, match="still wait"):
        b.fill(np.array([0.5], np.float32))
    full_a = a.fill(np.array([0.25, 0.75], np.float32))
    dd.add(a, np.array([0.25, 0.75], np.float32))
    fl.finish(a, full_a)
    assert b.waiting == 0
    assert b.fill(np.array([0.5], np.float32)).tolist() == [0.75, 0.5, 0.75]
    d = plan_unit(ins, ["q"], ["x"], run=dd, inflight=fl)  # a is finished, not yet stored: at once
    assert len(d.todo) == 0 and d.waiting == 0 and d.duplicates == 1
    assert d.fill(np.zeros(0, np.float32)).tolist() == [0.25]
    assert len(fl) == 3 and dd.buffered == 2
    dd.flush()
    fl.release([a])
    assert len(fl) == 1 and dd.buffered == 0  # only b's "z" is in flight now
    c = plan_unit(ins, ["q", "q"], ["x", "y"], run=dd, inflight=fl)  # a's texts: from the store
    assert c.todo is not None and len(c.todo) == 0 and c.duplicates == 2
    assert c.fill(np.zeros(0, np.float32)).tolist() == [0.25, 0.75]
    dd.close()


# -- kill anywhere, then resume ------------------------------------------------------------------

def _spawn(job, args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, XDG_CACHE_HOME=job["xdg"], DEDUP_FLUSH="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed_texts(ck, table) -> set:
    """The texts of the rows of the units the checkpoint holds (unit ids: file-start-stop rows)."""
    got = set()
    texts = _texts(table)
    for name in os.listdir(ck / "done"):
        if name.startswith("."):
            continue
        rec = json.load(open(ck / "done" / name))
        for e in rec.get("units", [rec]):
            _, start, stop = map(int, e["unit"].split("-"))
            got |= set(texts[start:stop])
    return got


@pytest.mark.parametrize("where", [r"/done/[^/]*\.json$:3:after", r"/dedup/.*\.rbc$:3:before",
                                   r"/dedup/.*\.rbc$:4:after"])
def test_sigkill_then_resume_computes_no_committed_text_again(job, tmp_path, where):
    """Killed after a unit's record, or just before or after its scores reach the run's store
    (written after every unit here, as a unit of a default window is): the same command then
    gives the uninterrupted output, computes only texts no committed unit has, and leaves nothing
    behind."""
    out = tmp_path / "out.parquet"
    ck = tmp_path / "out.parquet.ckpt"
    args = _args(job, job["input"], out, "--summary", tmp_path / "s.json")
    p = _spawn(job, args, {"KILL_AT_REPLACE": where})
    p.wait(timeout=WAIT_S)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()[-2000:]
    committed = _committed_texts(ck, job["table"])
    assert committed and os.listdir(ck / "dedup")
    p = _spawn(job, args)
    assert p.wait(timeout=WAIT_S) == 0, p.stderr.read()[-2000:]
    assert_reference(job, pq.read_table(out))
    s = json.load(open(tmp_path / "s.json"))
    # No text of a committed unit is computed again (a kill between a unit's store write and its
    # record may leave texts stored but not committed: those are not computed either).
    assert s["pairs_computed"] <= job["distinct"] - len(committed)
    assert s["pairs_computed"] + s["duplicate_pairs"] == s["pairs_this_run"]
    assert sorted(os.listdir(tmp_path)) == ["out.parquet", "s.json"]


def test_a_killed_run_with_its_checkpoint_in_a_bucket_resumes(job, tmp_path, bucket, s3_server):
    """The run's store goes through the checkpoint's object storage like the parts: a run killed
    after three finished units resumes with their texts known, and the checkpoint, dedup store
    included, is gone at the end."""
    from pipeline.storage.location import location

    ck = f"{bucket}/ck"
    out = tmp_path / "out.parquet"
    args = _args(job, job["input"], out, "--checkpoint-dir", ck, "--summary", tmp_path / "s.json")
    p = _spawn(job, args, s3_server)
    done = location(ck) / "done"
    deadline = time.monotonic() + WAIT_S
    while len([n for n in done.list() if not n.startswith(".")]) < 3:
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    stored = [n for scope in (location(ck) / "dedup").list() for n in (location(ck) / "dedup" / scope).list()
              if n.endswith(".rbc")]
    assert stored  # the finished units' scores are in the bucket
    p = _spawn(job, args, s3_server)
    assert p.wait(timeout=WAIT_S) == 0, p.stderr.read()[-2000:]
    assert_reference(job, pq.read_table(out))
    s = json.load(open(tmp_path / "s.json"))
    assert s["units_resumed"] >= 3 and s["pairs_computed"] < job["distinct"]
    assert s["pairs_computed"] + s["duplicate_pairs"] == s["pairs_this_run"]
    assert location(ck).list() == []


# -- executors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("executor", [["--devices", "cpu,cpu"], ["--executor", "ray", "--workers", "2"]])
def test_workers_share_finished_units_through_the_checkpoint(job, tmp_path, executor):
    """Each worker has its own in-flight table; finished units reach every worker through the
    run's store. A text in flight on two workers at once may be computed by both, never more."""
    if "ray" in executor:
        pytest.importorskip("ray")
    got, s = _run(job, tmp_path, *executor)
    rows = job["table"].num_rows
    # A text computed on two workers at once may differ in the last bits (other batches).
    assert_reference(job, got, same=False)
    assert job["distinct"] <= s["pairs_computed"] < rows
    assert s["pairs_computed"] + s["duplicate_pairs"] == rows and s["pairs_from_cache"] == 0
    assert sorted(os.listdir(tmp_path)) == ["o.json", "o.parquet"]
