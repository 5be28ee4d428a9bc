"""The score cache under whole runs: SIGKILL anywhere then resume, runs that overlap on one cache
(local disk and object storage), the device pool and Ray. Every output equals the uncached
run's (float32 bound), and the cache is left readable and complete."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import KILL_AT_REPLACE_CHILD, ROOT, real_pairs, run_cli
from s3server import bucket, s3_server  # noqa: F401 - fixtures

WAIT_S = 600  # a ceiling for events on a loaded 2-core machine, never a measured bound
TOL = 1e-5

# The CLI in a child, optionally SIGKILLing itself at the Nth os.replace whose target matches
# (as tests/test_resume.py does): before a cache file's rename, or just after it.
_CHILD = KILL_AT_REPLACE_CHILD + r"""
sys.argv = ["rerank-batch"] + sys.argv[1:]
from jobs.cli import main
main()
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("cacheruns")
    inp = d / "in.parquet"
    pq.write_table(real_pairs(300), inp, row_group_size=117)  # 900 real pairs, 17 units of 53
    small = d / "small.parquet"
    pq.write_table(real_pairs(60), small, row_group_size=50)  # 180 pairs
    refs = {}
    for name, path in (("in", inp), ("small", small)):
        out = d / f"{name}.ref.parquet"
        r = run_cli(["run", path, "--model", models["tied"], "-o", out, "--window", 53, "-q"])
        assert r.exit_code == 0, r.output
        refs[name] = pq.read_table(out)
    return {"dir": d, "in": inp, "small": small, "refs": refs, "model": models["tied"],
            "xdg": str(d / "xdg")}


def _args(job, inp, out, cache, *extra, quiet=True):
    return ["run", str(inp), "--model", job["model"], "-o", str(out), "--window", "53", *(["-q"] if quiet else []),
            "--cache", str(cache), *map(str, extra)]


def _spawn(job, args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, XDG_CACHE_HOME=job["xdg"], **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same(got, ref, tol=TOL):
    assert got.column_names == ref.column_names and got.num_rows == ref.num_rows
    for c in ref.column_names:
        if c not in ("score", "rank"):
            assert got.column(c).equals(ref.column(c)), c
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), atol=tol, rtol=0)


def _done(ck):
    try:
        return len([n for n in os.listdir(ck / "done") if not n.startswith(".")])
    except FileNotFoundError:
        return 0


def _rbc(cache) -> int:
    return sum(1 for _ in cache.rglob("*.rbc")) if cache.exists() else 0


_OURS = re.compile(r"^([0-9]{13}-[0-9a-f]{16}\.rbc|scope\.json|\.tmp-[0-9a-f]{32}-([0-9]{13}-[0-9a-f]{16}\.rbc|"
                   r"scope\.json))$")


def _assert_cache_sound(cache, job, total_unique):
    """Only names the cache writes; no damaged file; and a rerun computes nothing."""
    for p in cache.rglob("*"):
        if p.is_file() and p.name != ".rerank-batch-cache":
            assert _OURS.match(p.name), p
    r = run_cli(["cache", "stats", cache, "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["damaged"] == 0 and st["entries"] >= total_unique
    return st


def _unique(t) -> int:
    return len(set(zip(*(t.column(c).to_pylist() for c in ("instruction", "query", "document")))))


def _summary_of_rerun(job, inp, cache, tmp_path, name="rerun"):
    out = tmp_path / f"{name}.parquet"
    r = run_cli(_args(job, inp, out, cache, "--summary", tmp_path / f"{name}.json"), env={"XDG_CACHE_HOME": job["xdg"]})
    assert r.exit_code == 0, r.output
    return pq.read_table(out), json.load(open(tmp_path / f"{name}.json"))


# -- kill anywhere -------------------------------------------------------------------------------

def test_sigkill_at_random_moments_with_the_cache_then_resume(job, tmp_path):
    """Killed at random events (after 1-4 more finished units, plus a few polls: mid-batch,
    mid-cache-write, mid-part), resumed with the same command each time: the output is the
    uninterrupted run's, and the cache holds every pair exactly as a clean run would."""
    out = tmp_path / "out.parquet"
    ck = tmp_path / "out.parquet.ckpt"
    cache = tmp_path / "cache"
    rng = random.Random(11)
    kills = 0
    for attempt in range(40):
        if out.exists():
            break
        # The first four kills come one finished unit (and a few polls) after the resume, so that
        # they all land before the 17 units are done whatever the machine's speed; later ones
        # roam further.
        target = _done(ck) + (1 if kills < 4 else rng.randint(1, 4))
        extra_polls = rng.randint(0, 6 if kills < 4 else 30)
        p = _spawn(job, _args(job, job["in"], out, cache))
        while p.poll() is None and _done(ck) < target and not out.exists():
            time.sleep(0.005)
        for _ in range(extra_polls):
            if p.poll() is not None:
                break
            time.sleep(0.005)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            continue
        assert p.returncode == 0, p.stderr.read()[-2000:]
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 4, f"only {kills} kills landed"
    if ck.exists() or not out.exists():
        p = _spawn(job, _args(job, job["in"], out, cache))
        assert p.wait(timeout=WAIT_S) == 0, p.stderr.read()[-2000:]
    assert_same(pq.read_table(out), job["refs"]["in"])
    assert sorted(os.listdir(tmp_path)) == ["cache", "out.parquet"]
    n = _unique(job["refs"]["in"])
    _assert_cache_sound(cache, job, n)
    got, s = _summary_of_rerun(job, job["in"], cache, tmp_path)
    assert s["pairs_computed"] == 0 and s["pairs_from_cache"] == n  # every unit reached the cache
    assert_same(got, job["refs"]["in"])


@pytest.mark.parametrize("where", [r"\.rbc$:2:before", r"\.rbc$:3:after", r"scope\.json$:1:before"])
def test_sigkill_inside_a_cache_write_then_resume(job, tmp_path, where):
    out = tmp_path / "out.parquet"
    cache = tmp_path / "cache"
    p = _spawn(job, _args(job, job["small"], out, cache), {"KILL_AT_REPLACE": where})
    p.wait(timeout=WAIT_S)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()[-2000:]
    p = _spawn(job, _args(job, job["small"], out, cache))
    assert p.wait(timeout=WAIT_S) == 0, p.stderr.read()[-2000:]
    assert_same(pq.read_table(out), job["refs"]["small"])
    _assert_cache_sound(cache, job, _unique(job["refs"]["small"]))
    _, s = _summary_of_rerun(job, job["small"], cache, tmp_path)
    assert s["pairs_computed"] == 0


# -- runs that overlap ---------------------------------------------------------------------------

def _overlap(job, tmp_path, cache, files_in, env_extra=None, inp_key="in"):
    """Run A; once A has added its first file to the cache (`files_in(cache)` counts them), start
    B and C on the same cache (B on the same input, C on a smaller one) while A still runs."""
    inp = job[inp_key]
    outs = {k: tmp_path / f"{k}.parquet" for k in "abc"}
    extra = ["--summary"]
    pa_ = _spawn(job, _args(job, inp, outs["a"], cache, *extra, tmp_path / "a.json"), env_extra)
    deadline = time.monotonic() + WAIT_S
    while files_in(cache) < 1:
        assert pa_.poll() is None, pa_.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert pa_.poll() is None  # A is still scoring: the runs overlap
    pb = _spawn(job, _args(job, inp, outs["b"], cache, *extra, tmp_path / "b.json"), env_extra)
    pc = _spawn(job, _args(job, job["small"], outs["c"], cache, *extra, tmp_path / "c.json"), env_extra)
    for p in (pa_, pb, pc):
        assert p.wait(timeout=WAIT_S) == 0, p.stderr.read()[-2000:]
    return outs, {k: json.load(open(tmp_path / f"{k}.json")) for k in "abc"}


def test_overlapping_runs_share_one_cache_on_local_disk(job, tmp_path):
    cache = tmp_path / "cache"
    outs, s = _overlap(job, tmp_path, cache, _rbc)
    assert_same(pq.read_table(outs["a"]), job["refs"]["in"])
    assert_same(pq.read_table(outs["b"]), job["refs"]["in"])
    assert_same(pq.read_table(outs["c"]), job["refs"]["small"])
    assert s["b"]["pairs_from_cache"] > 0  # B read what A wrote while A ran
    n = _unique(job["refs"]["in"])
    st = _assert_cache_sound(cache, job, n)
    assert len(st["models"]) == 1
    got, s2 = _summary_of_rerun(job, job["in"], cache, tmp_path)
    assert s2["pairs_computed"] == 0 and s2["pairs_from_cache"] == n
    assert_same(got, job["refs"]["in"])
    r = run_cli(["cache", "prune", cache])  # folds the entries both runs wrote
    assert r.exit_code == 0, r.output
    assert json.loads(run_cli(["cache", "stats", cache, "--json"]).output)["entries"] == n


def test_overlapping_runs_share_one_cache_in_a_bucket(job, tmp_path, bucket, s3_server):
    from pipeline.cache.store import CacheStore

    cache = f"{bucket}/rb-cache"

    def count(c):
        store = CacheStore(c)
        return sum(1 for d in store.list("") if not d.rsplit("/", 1)[-1].startswith(".")
                   for n in store.list(d.rsplit("/", 1)[-1]) if n.endswith(".rbc"))
    outs, s = _overlap(job, tmp_path, cache, count, s3_server, inp_key="small")
    assert_same(pq.read_table(outs["a"]), job["refs"]["small"])
    assert_same(pq.read_table(outs["b"]), job["refs"]["small"])
    assert_same(pq.read_table(outs["c"]), job["refs"]["small"])
    assert s["b"]["pairs_from_cache"] > 0
    n = _unique(job["refs"]["small"])
    r = run_cli(["cache", "stats", cache, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["damaged"] == 0
    # A fresh host (an empty mirror) reads everything from the bucket.
    job2 = dict(job, xdg=str(tmp_path / "fresh-xdg"))
    got, s2 = _summary_of_rerun(job2, job["small"], cache, tmp_path)
    assert s2["pairs_computed"] == 0 and s2["pairs_from_cache"] == n
    assert_same(got, job["refs"]["small"])
    r = run_cli(["cache", "prune", cache])
    assert r.exit_code == 0, r.output
    assert json.loads(run_cli(["cache", "stats", cache, "--json"]).output)["entries"] == n


def test_a_damaged_object_in_a_bucket_is_skipped(job, tmp_path, bucket, s3_server):
    from pipeline.cache.store import CacheStore

    cache = f"{bucket}/rb-cache"
    p = _spawn(job, _args(job, job["small"], tmp_path / "a.parquet", cache), s3_server)
    assert p.wait(timeout=WAIT_S) == 0, p.stderr.read()[-2000:]
    store = CacheStore(cache)
    scope = next(n for n in store.list("") if not n.startswith("."))
    names = [n for n in store.list(scope) if n.endswith(".rbc")]
    raw = bytearray(store.read(names[0]))
    raw[-7] ^= 0x40  # a byte of the last block
    store.write(names[0], bytes(raw))
    fresh = dict(job, xdg=str(tmp_path / "fresh-xdg"))  # a host that never saw the good copy
    p = _spawn(fresh, _args(fresh, job["small"], tmp_path / "b.parquet", cache, "--summary", tmp_path / "b.json",
                            "--log-level", "warning", quiet=False), s3_server)
    _, err = p.communicate(timeout=WAIT_S)
    assert p.returncode == 0, err[-2000:]
    assert err.count("is damaged (block checksum mismatch)") == 1, err
    assert_same(pq.read_table(tmp_path / "b.parquet"), job["refs"]["small"])
    s = json.load(open(tmp_path / "b.json"))
    assert 0 < s["pairs_computed"] < _unique(job["refs"]["small"])


# -- executors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("executor", [["--devices", "cpu,cpu"], ["--executor", "ray", "--workers", "2"]])
def test_workers_read_and_write_the_cache(job, tmp_path, executor):
    if "ray" in executor:
        pytest.importorskip("ray")
    cache = tmp_path / "cache"
    first = tmp_path / "first.parquet"
    r = run_cli(_args(job, job["small"], first, cache, "--window", 20, "--summary", tmp_path / "1.json", *executor),
                env={"XDG_CACHE_HOME": job["xdg"]})
    assert r.exit_code == 0, r.output
    assert_same(pq.read_table(first), job["refs"]["small"])
    n = _unique(job["refs"]["small"])
    s1 = json.load(open(tmp_path / "1.json"))
    assert s1["pairs_computed"] == n and s1["pairs_from_cache"] == 0
    second = tmp_path / "second.parquet"
    r = run_cli(_args(job, job["small"], second, cache, "--window", 20, "--summary", tmp_path / "2.json", *executor),
                env={"XDG_CACHE_HOME": job["xdg"]})
    assert r.exit_code == 0, r.output
    s2 = json.load(open(tmp_path / "2.json"))
    assert s2["pairs_computed"] == 0 and s2["pairs_from_cache"] == n
    assert s2["pairs_this_run"] == job["refs"]["small"].num_rows
    assert_same(pq.read_table(second), job["refs"]["small"])


def test_killed_pool_driver_resumes_with_the_cache(job, tmp_path):
    out = tmp_path / "o.parquet"
    cache = tmp_path / "cache"
    args = _args(job, job["in"], out, cache, "--window", 30)
    p = _spawn(job, args + ["--devices", "cpu,cpu"])
    ck = tmp_path / "o.parquet.ckpt"
    deadline = time.monotonic() + WAIT_S
    while _done(ck) < 3:
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    p = _spawn(job, args)  # one process: resumes what the pool committed, takes the cache's entries
    assert p.wait(timeout=WAIT_S) == 0, p.stderr.read()[-2000:]
    assert_same(pq.read_table(out), job["refs"]["in"])
    _assert_cache_sound(cache, job, _unique(job["refs"]["in"]))
