"""Commits by time (--commit-every): a unit still being scored commits the pairs scored so far,
so a kill loses at most that much scoring and a stop loses none, whatever the window; the rerun
scores only the rest of the unit and ends with the output of an uninterrupted run.

The children hold at named places (after a partial commit, in the pool's workers too, through a
sitecustomize hook on their path) and touch an event file there: the tests wait on files, never
on time."""

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

from conftest import ROOT, real_pairs, run_cli, shared, stop_after_pairs
from forward_doubles import wrap_chosen

WAIT_S = 600  # a ceiling for events on a loaded 2-core machine, never a measured bound

# Loaded by every Python process of a child run (the CLI and its spawned pool workers) through
# PYTHONPATH. With HOLD_EVENT set: after the HOLD_AFTER-th partial commit (HOLD_AT=partial) or
# scored batch (HOLD_AT=batch) of this process, touch HOLD_EVENT.<pid> and wait there until
# HOLD_EVENT.go exists (never, for a SIGKILL test); at most HOLD_COUNT processes hold (a worker
# started again after a kill does not). A pool worker touches HOLD_EVENT-stopped.<pid>
# when the driver's stop reaches it.
_HOOK = r'''
import os
if os.environ.get("HOLD_EVENT"):
    import threading, time
    _ev = os.environ["HOLD_EVENT"]
    _seen = [0]

    def _hold_after(real):
        def held(*a, **k):
            out = real(*a, **k)
            _seen[0] += 1
            d, base = os.path.split(_ev)
            held = [n for n in os.listdir(d) if n.startswith(base + ".") and n[len(base) + 1:].isdigit()]
            if _seen[0] == int(os.environ["HOLD_AFTER"]) and len(held) < int(os.environ["HOLD_COUNT"]):
                open(f"{_ev}.{os.getpid()}", "w").close()
                while not os.path.exists(_ev + ".go"):
                    time.sleep(0.01)
            return out
        return held

    if os.environ.get("HOLD_AT", "partial") == "partial":
        import pipeline.storage.sink as _s
        _s.CheckpointSink.commit_partials = _hold_after(_s.CheckpointSink.commit_partials)
    else:
        import pipeline.runtime.progress as _p
        _p.Progress.update = _hold_after(_p.Progress.update)

    import pipeline.executors.pool as _pool
    _init = _pool.DriverLink.__init__
    def _link_init(self, conn):
        _init(self, conn)
        def watch():
            self.stop.wait()
            open(f"{_ev}-stopped.{os.getpid()}", "w").close()
        threading.Thread(target=watch, daemon=True).start()
    _pool.DriverLink.__init__ = _link_init
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("commit")
    long_in = d / "long.parquet"
    pq.write_table(real_pairs(60), long_in, row_group_size=47)  # 180 pairs
    nested_in = d / "nested.parquet"
    pq.write_table(pq.read_table(shared("ARC-Challenge.nested.parquet")).slice(0, 30), nested_in)
    hook = d / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    refs = {}
    for name, inp in (("long", long_in), ("nested", nested_in)):
        out = d / f"{name}.ref.parquet"
        # Units end at row groups (47 rows): the local executor scores them in one stream, as
        # small units are; a worker scores each on its own.
        r = run_cli(["run", inp, "--model", models["tied"], "-o", out, "-q", "--max-batch-tokens", 600])
        assert r.exit_code == 0, r.output
        refs[name] = pq.read_table(out)
    return {"dir": d, "long": long_in, "nested": nested_in, "refs": refs, "model": models["tied"], "hook": hook}


def assert_same(got: pa.Table, ref: pa.Table):
    """Same rows in the same order, same ranks; scores to the float tolerance (batches differ)."""
    assert got.column_names == ref.column_names
    assert got.num_rows == ref.num_rows
    for c in ref.column_names:
        if c != "score":
            assert got.column(c).equals(ref.column(c)), c
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), atol=1e-6, rtol=0)


def _child(data, args, event=None, after=1, at="partial", count=2):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(data["hook"]), ROOT]))
    if event is not None:
        env.update(HOLD_EVENT=str(event), HOLD_AFTER=str(after), HOLD_AT=at, HOLD_COUNT=str(count))
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(pred, proc, what):
    deadline = time.monotonic() + WAIT_S
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _held(event, what="") -> list[str]:
    """The processes held at the event (what="-stopped": those the driver's stop reached)."""
    d, base = os.path.split(str(event) + what)
    return [n for n in os.listdir(d) if n.startswith(base + ".") and n[len(base) + 1:].isdigit()]


def _partial_pairs(ckpt) -> int:
    """Distinct pairs in the checkpoint's partial objects (units still in flight)."""
    d = os.path.join(ckpt, "partial")
    names = [n for n in os.listdir(d) if n.endswith(".parquet") and not n.startswith(".")] if os.path.isdir(d) else []
    return len({o for n in names for o in pq.read_table(os.path.join(d, n), columns=["_ord"])["_ord"].to_pylist()})


def _partial_pairs_by_unit(ckpt) -> dict[str, int]:
    """Distinct pairs in the partial objects of each unit still in flight."""
    d = os.path.join(ckpt, "partial")
    names = [n for n in os.listdir(d) if n.endswith(".parquet") and not n.startswith(".")] if os.path.isdir(d) else []
    ords: dict[str, set] = {}
    for n in names:
        ords.setdefault(n.split(".")[0], set()).update(pq.read_table(os.path.join(d, n), columns=["_ord"])["_ord"].to_pylist())
    return {u: len(o) for u, o in ords.items()}


def _done_pairs(ckpt) -> int:
    d = os.path.join(ckpt, "done")
    names = [n for n in os.listdir(d) if n.endswith(".json")] if os.path.isdir(d) else []
    recs = [json.load(open(os.path.join(d, n))) for n in names]
    return sum(r["pairs"] + r["skipped_null"] for r in recs)


@pytest.mark.parametrize("form, sharing", [("long", "off"), ("nested", "on")])
def test_sigkill_mid_unit_then_the_rerun_scores_only_the_rest(data, tmp_path, form, sharing):
    """Killed (SIGKILL: nothing runs at the kill) right after the third partial commit, before any
    unit has ended. The rerun takes those pairs from the checkpoint, scores only the others,
    and writes the uninterrupted run's rows, ranks and scores."""
    out = tmp_path / "o.parquet"
    ck = str(out) + ".ckpt"
    args = ["run", data[form], "--model", data["model"], "-o", out, "-q", "--max-batch-tokens", 600,
            "--prefix-sharing", sharing]
    event = tmp_path / "held"
    p = _child(data, args + ["--commit-every", "0.000001"], event, after=3)
    _wait_for(lambda: _held(event), p, "the third partial commit")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    total = data["refs"][form].num_rows
    kept = _partial_pairs(ck)
    assert 0 < kept < total and _done_pairs(ck) == 0  # mid-unit: only partial commits
    r = run_cli(args + ["--summary", tmp_path / "s.json"])
    assert r.exit_code == 0, r.output
    s = json.load(open(tmp_path / "s.json"))
    assert s["pairs_resumed"] == kept
    assert s["pairs_this_run"] == total - kept  # scored only the rest of the unit
    assert s["units_resumed"] == 0 and s["pairs_scored"] == total
    assert_same(pq.read_table(out), data["refs"][form])
    assert not os.path.exists(ck)


def test_sigterm_mid_unit_keeps_what_was_scored_and_says_so(data, tmp_path):
    """Commits every hour, so none happens by time: the stop itself commits what was scored. The
    run is held after its third batch, signalled, let go: it stops at the next batch."""
    out = tmp_path / "o.parquet"
    ck = str(out) + ".ckpt"
    args = ["run", data["long"], "--model", data["model"], "-o", out, "-q", "--max-batch-tokens", 600,
            "--commit-every", 3600]
    event = tmp_path / "held"
    p = _child(data, args, event, after=3, at="batch")
    _wait_for(lambda: _held(event), p, "the third batch")
    p.send_signal(signal.SIGTERM)
    (tmp_path / "held.go").touch()
    code = p.wait(timeout=WAIT_S)
    err = p.stderr.read()
    assert code == 143, err[-2000:]
    total = data["refs"]["long"].num_rows
    kept = _partial_pairs(ck)
    assert 0 < kept < total and _done_pairs(ck) == 0
    assert (f"interrupted by signal 15; {kept:,} of {total:,} pairs are kept in the checkpoint and none will be "
            "scored again; rerun the same command to resume") in err
    assert "Traceback" not in err
    r = run_cli(args + ["--summary", tmp_path / "s.json"])
    assert r.exit_code == 0, r.output
    s = json.load(open(tmp_path / "s.json"))
    assert s["pairs_resumed"] == kept and s["pairs_this_run"] == total - kept
    assert_same(pq.read_table(out), data["refs"]["long"])


def test_pool_sigterm_mid_unit_then_resume(data, tmp_path):
    """--devices cpu,cpu: both workers are held inside their first units (after a partial
    commit each) while the driver is stopped; let go once the stop has reached them, each commits
    what it scored since before it leaves, and the rerun through the pool scores only the rest."""
    out = tmp_path / "o.parquet"
    ck = str(out) + ".ckpt"
    total = data["refs"]["long"].num_rows
    args = ["run", data["long"], "--model", data["model"], "-o", out, "-q", "--max-batch-tokens", 600,
            "--window", (total + 1) // 2, "--devices", "cpu,cpu"]
    event = tmp_path / "held"
    p = _child(data, args + ["--commit-every", "0.000001"], event)
    _wait_for(lambda: len(_held(event)) == 2, p, "a partial commit in each worker")
    p.send_signal(signal.SIGTERM)
    _wait_for(lambda: len(_held(event, "-stopped")) == 2, p, "the stop reaching both workers")
    (tmp_path / "held.go").touch()
    code = p.wait(timeout=WAIT_S)
    err = p.stderr.read()
    assert code == 143, err[-2000:]
    kept = _done_pairs(ck) + _partial_pairs(ck)
    assert 0 < kept < total and _done_pairs(ck) == 0
    assert (f"interrupted by signal 15; {kept:,} of {total:,} pairs are kept in the checkpoint and none will be "
            "scored again; rerun the same command to resume") in err
    r = run_cli(args + ["--summary", tmp_path / "s.json"])
    assert r.exit_code == 0, r.output
    s = json.load(open(tmp_path / "s.json"))
    assert s["pairs_resumed"] == kept and s["pairs_this_run"] == total - kept
    assert_same(pq.read_table(out), data["refs"]["long"])


@pytest.mark.parametrize("executor", ["pool", "ray"])
def test_a_killed_worker_unit_is_finished_from_its_partial_commits(data, tmp_path, executor):
    """A worker (a pool process, a Ray actor) killed inside its unit after a partial commit: the
    worker that takes the unit over (the other pool process, the actor Ray starts again) scores
    only the pairs not committed; the output is the uninterrupted run's."""
    if executor == "ray":
        pytest.importorskip("ray")
    out = tmp_path / "o.parquet"
    ck = str(out) + ".ckpt"
    total = data["refs"]["long"].num_rows
    how = ["--devices", "cpu,cpu"] if executor == "pool" else ["--executor", "ray", "--workers", 1]
    args = ["run", data["long"], "--model", data["model"], "-o", out, "-q", "--max-batch-tokens", 600,
            "--commit-every", "0.000001", "--keep-checkpoint", *how]
    event = tmp_path / "held"
    p = _child(data, args, event, count=1)
    _wait_for(lambda: _held(event), p, "a partial commit")
    # The held worker's unit is frozen from here on; the other worker may still be committing
    # partials of its own units, so the count is taken per unit.
    kept = _partial_pairs_by_unit(ck)
    assert kept and all(0 < k < total for k in kept.values())
    os.kill(int(_held(event)[0].rsplit(".", 1)[1]), signal.SIGKILL)
    _, err = p.communicate(timeout=WAIT_S)
    assert p.returncode == 0, err[-2000:]
    records = [json.load(open(os.path.join(ck, "done", n))) for n in os.listdir(os.path.join(ck, "done"))]
    assert sum(r["pairs"] for r in records) == total
    resumed = {r["unit"]: r["resumed"]["pairs"] for r in records if "resumed" in r}
    assert len(resumed) == 1 and resumed.items() <= kept.items(), (resumed, kept)  # exactly the dead unit's pairs
    assert not os.listdir(os.path.join(ck, "partial"))  # redundant once the unit's record exists
    assert_same(pq.read_table(out), data["refs"]["long"])


def test_the_stop_message_counts_pairs_to_score_again():
    from pipeline.errors import Interrupted

    assert str(Interrupted(2, 2000, 4687, 187)) == (
        "interrupted by signal 2; 2,000 of 4,687 pairs are kept in the checkpoint and 187 will be scored "
        "again; rerun the same command to resume")
    assert str(Interrupted(15, 2000, 4687, None)) == (
        "interrupted by signal 15; 2,000 of 4,687 pairs are kept in the checkpoint; rerun the same command to "
        "resume")  # Ray: what was in flight is not known
    assert str(Interrupted(15)) == "interrupted by signal 15; rerun the same command to resume"


@pytest.mark.parametrize("value, message", [
    ("0", "Invalid value for '--commit-every' (env var: 'RERANK_BATCH_COMMIT_EVERY'): 0.0 is not in the range x>0."),
    ("soon", "Invalid value for '--commit-every' (env var: 'RERANK_BATCH_COMMIT_EVERY'): 'soon' is not a valid "
             "float range."),
])
def test_commit_every_usage_errors(data, tmp_path, value, message):
    r = run_cli(["run", data["long"], "--model", data["model"], "-o", tmp_path / "o.parquet", "--commit-every", value])
    assert r.exit_code == 2
    assert message in r.output


def test_commit_every_is_not_in_the_fingerprint(data, tmp_path):
    """A run stopped with one interval resumes with another (scores do not depend on it)."""
    from pipeline.config import RunConfig
    from pipeline.errors import InputError, Interrupted
    from pipeline.run import run

    out = tmp_path / "o.parquet"
    cfg = dict(inputs=(str(data["long"]),), output=str(out), model=data["model"], max_batch_tokens=600)
    with pytest.raises(Interrupted):  # stopped mid-unit: the stop commits what was scored
        run(RunConfig(**cfg, commit_every=0.5), progress=False, **stop_after_pairs(20))
    kept = _partial_pairs(str(out) + ".ckpt")
    assert kept > 0
    s = run(RunConfig(**cfg, commit_every=1e9), progress=False)
    assert s.pairs_resumed == kept and s.pairs_this_run == data["refs"]["long"].num_rows - kept
    assert_same(pq.read_table(out), data["refs"]["long"])
    with pytest.raises(InputError, match=r"commit_every=0: must be a number of seconds above 0"):
        RunConfig(**cfg, commit_every=0)


def test_a_failure_mid_unit_keeps_the_scored_pairs(data, tmp_path, monkeypatch):
    """A runtime failure in the fourth batch (as a pair that never fits in GPU memory makes): the
    three batches before it are committed, the checkpoint is kept (no unit had ended), and the
    rerun scores only the rest."""
    from pipeline.config import RunConfig
    from pipeline.errors import ScoringError
    from pipeline.run import run

    out = tmp_path / "o.parquet"
    cfg = RunConfig(inputs=(str(data["long"]),), output=str(out), model=data["model"], max_batch_tokens=600,
                    commit_every=1e9)
    scored = [0]

    def fourth_fails(batch, calls):
        if calls == 4:
            raise ScoringError("one pair of 9999 tokens does not fit in GPU memory")
        scored[0] += batch.pairs

    with monkeypatch.context() as patched:
        wrap_chosen(patched, fourth_fails)
        with pytest.raises(ScoringError):
            run(cfg, progress=False)
    assert _partial_pairs(str(out) + ".ckpt") == scored[0] > 0
    s = run(cfg, progress=False)
    assert s.pairs_resumed == scored[0] and s.pairs_this_run == data["refs"]["long"].num_rows - scored[0]
    assert_same(pq.read_table(out), data["refs"]["long"])


def test_cleanup_removes_a_marker_temp_file_left_by_a_kill(tmp_path):
    """A kill inside the marker's rewrite (when the output is marked published) leaves the
    marker's temp file; the cleanup that follows removes it with the rest, and the directory."""
    from pipeline.storage.location import location
    from pipeline.storage.sink import CheckpointSink

    d = tmp_path / "ck"
    ck = CheckpointSink.open(location(str(d)), {"options": {}}, [], restart=False, own_root=True)
    ck.commit_partial("00000-000000000000-000000000010", np.arange(3), np.zeros(3, np.float32), {"tokens": 3})
    (d / f".tmp-{'0' * 32}-.rerank-batch-checkpoint").write_text("{}")
    ck.close(remove=True)
    assert not d.exists()
