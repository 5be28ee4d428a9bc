"""Executors: the device pool (--devices cpu,cpu) and Ray Data give the single-process run's rows,
scores and ranks; a killed worker loses nothing; a killed driver leaves a checkpoint that the
same command resumes."""

from __future__ import annotations

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

WAIT_S = 600  # a ceiling for events on a loaded 2-core machine, never a measured bound


@pytest.fixture(scope="module")
def data(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("exec")
    long_in = d / "long.parquet"
    pq.write_table(real_pairs(80), long_in, row_group_size=50)  # 240 pairs
    nested_in = d / "nested.parquet"
    pq.write_table(pq.read_table(shared("ARC-Challenge.nested.parquet")).slice(0, 40), nested_in)
    refs = {}
    for name, inp in (("long", long_in), ("nested", nested_in)):
        out = d / f"{name}.ref.parquet"
        r = run_cli(["run", inp, "--model", models["tied"], "-o", out, "--window", 40, "-q"])
        assert r.exit_code == 0, r.output
        refs[name] = pq.read_table(out)
    return {"dir": d, "long": long_in, "nested": nested_in, "refs": refs, "model": models["tied"]}


def assert_same(got: pa.Table, ref: pa.Table):
    assert got.column_names == ref.column_names
    assert got.num_rows == ref.num_rows
    for c in ref.column_names:
        if c != "score":
            assert got.column(c).equals(ref.column(c)), c
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", ["long", "nested"])
def test_device_pool_equals_single_process(data, form, tmp_path):
    out = tmp_path / "pool.parquet"
    r = run_cli(["run", data[form], "--model", data["model"], "-o", out, "--window", 40, "-q",
                 "--devices", "cpu,cpu", "--summary", tmp_path / "s.json"])
    assert r.exit_code == 0, r.output
    assert_same(pq.read_table(out), data["refs"][form])
    import json

    summary = json.load(open(tmp_path / "s.json"))
    rows = summary["extra"]["devices"]
    assert [row["device"] for row in rows] == ["cpu", "cpu"]
    assert sum(row["units"] for row in rows) == summary["units"]
    _assert_startup_from_workers(summary)


def _assert_startup_from_workers(summary):
    """The startup stages of a worker run: the driver's, then those of the first worker to score
    a batch (sent back from its process); each worker's own in its row."""
    got = {k.removeprefix("startup_").removesuffix("_s"): v for k, v in summary["extra"].items()
           if k.startswith("startup_")}
    assert {"inputs_and_config", "spawn_workers", "worker_process", "tokenizer", "weights", "first_batch"} <= set(got)
    assert all(v >= 0 for v in got.values())
    assert abs(sum(v for k, v in got.items() if k != "total") - got["total"]) < 0.01 * len(got)
    for row in summary["extra"]["devices"]:
        assert {"tokenizer", "weights", "first_batch"} <= set(row["startup"]), row


def test_ray_equals_single_process(data, tmp_path):
    pytest.importorskip("ray")
    import json

    for form in ("long", "nested"):
        out = tmp_path / f"ray-{form}.parquet"
        r = run_cli(["run", data[form], "--model", data["model"], "-o", out, "--window", 40, "-q",
                     "--executor", "ray", "--workers", 2, "--summary", tmp_path / f"{form}.json"])
        assert r.exit_code == 0, r.output
        assert_same(pq.read_table(out), data["refs"][form])
    _assert_startup_from_workers(json.load(open(tmp_path / "long.json")))


def _child(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
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
        time.sleep(0.05)


def _parts(ckpt) -> int:
    d = os.path.join(ckpt, "parts")
    return len([n for n in os.listdir(d) if n.endswith(".parquet")]) if os.path.isdir(d) else 0


def _pool_workers(pid: int) -> list[int]:
    """The driver's worker processes (spawned Python children, not the resource tracker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    out = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            out.append(k)
    return out


def _ray_workers() -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"ray::") and b"RayUnitScorer" in cmd:
            out.append(int(name))
    return out


def test_killed_pool_worker_loses_nothing(data, tmp_path):
    out = tmp_path / "o.parquet"
    p = _child(["run", data["long"], "--model", data["model"], "-o", out, "--window", 10, "--log-level", "warning",
                "--devices", "cpu,cpu", "--keep-checkpoint"])
    ck = str(out) + ".ckpt"
    _wait_for(lambda: _parts(ck) >= 1 and len(_pool_workers(p.pid)) == 2, p, "the first part")
    victim = _pool_workers(p.pid)[0]
    os.kill(victim, signal.SIGKILL)
    _, err = p.communicate(timeout=WAIT_S)
    assert p.returncode == 0, err[-2000:]
    assert "exited with -9" in err  # the death was seen, and its units went to the other worker
    assert_same(pq.read_table(out), data["refs"]["long"])


def test_killed_driver_resumes_without_the_pool(data, tmp_path):
    out = tmp_path / "o.parquet"
    args = ["run", data["long"], "--model", data["model"], "-o", out, "--window", 10, "-q"]
    p = _child(args + ["--devices", "cpu,cpu"])
    ck = str(out) + ".ckpt"
    _wait_for(lambda: _parts(ck) >= 2, p, "two parts")
    workers = _pool_workers(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    # Orphaned workers notice the closed pipe and leave on their own.
    deadline = time.monotonic() + 120
    while any(os.path.exists(f"/proc/{w}") and _alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    assert not out.exists()
    r = run_cli(args)  # the same command, one process: resumes what the pool committed
    assert r.exit_code == 0, r.output
    assert_same(pq.read_table(out), data["refs"]["long"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_ray_worker_is_retried(data, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "o.parquet"
    p = _child(["run", data["long"], "--model", data["model"], "-o", out, "--window", 10, "--log-level", "warning",
                "--executor", "ray", "--workers", 2])
    ck = str(out) + ".ckpt"
    _wait_for(lambda: _parts(ck) >= 1 and _ray_workers(), p, "the first part")
    os.kill(_ray_workers()[0], signal.SIGKILL)
    _, err = p.communicate(timeout=WAIT_S)
    assert p.returncode == 0, err[-2000:]
    assert_same(pq.read_table(out), data["refs"]["long"])


def test_devices_parsing():
    from pipeline.errors import InputError
    from pipeline.driver.execute import parse_devices

    assert parse_devices("cpu,cpu", 0) == ["cpu", "cpu"]
    assert parse_devices("2", 0) == ["cpu", "cpu"]
    assert parse_devices("all", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert parse_devices("cuda:0,cuda:2", 4) == ["cuda:0", "cuda:2"]
    assert parse_devices("0,3", 4) == ["cuda:0", "cuda:3"]
    for bad, n in (("all", 0), ("cuda:2", 2), ("tpu", 1), ("3", 2), ("0", 1), ("", 1)):
        with pytest.raises(InputError):
            parse_devices(bad, n)


def test_cli_usage_errors(data, tmp_path):
    out = tmp_path / "o.parquet"
    base = ["run", data["long"], "--model", data["model"], "-o", out]
    r = run_cli(base + ["--devices", "tpu"])
    assert r.exit_code == 2 and "'tpu' is not a device" in r.output
    r = run_cli(base + ["--executor", "ray", "--devices", "cpu,cpu"])
    assert r.exit_code == 2 and "--devices is for the local executor" in r.output
    r = run_cli(base + ["--workers", "2"])
    assert r.exit_code == 2 and "need --executor ray" in r.output
    assert not out.exists()


def test_ray_missing_is_one_line(monkeypatch):
    import builtins

    from pipeline.errors import InputError
    from pipeline.executors import ray_data

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(InputError, match=r"rerank-batch\[ray\]"):
        ray_data.import_ray()


def test_pool_serves_empty_handed_workers_first():
    """A worker asking one unit ahead must not take the units of a worker still loading."""
    from collections import deque

    from pipeline.executors.pool import WorkerState, _answer

    class Conn:
        def __init__(self):
            self.sent = []

        def send(self, msg):
            self.sent.append(msg)

    fast = WorkerState(0, "cuda:0", None, Conn(), waiting=2, ready=True)
    slow = WorkerState(1, "cuda:1", None, Conn())  # still loading: has not asked yet
    queue = deque(["u1", "u2"])
    _answer([fast, slow], queue)
    assert list(fast.held) == ["u1"] and list(queue) == ["u2"] and fast.waiting == 1
    slow.waiting = 1
    _answer([fast, slow], queue)
    assert list(slow.held) == ["u2"] and not queue
    # With more units than empty hands, the look-ahead request is served.
    fast.held.clear()
    fast.waiting = 2
    queue.extend(["u3", "u4", "u5"])
    _answer([fast, slow], queue)
    assert list(fast.held) == ["u3", "u4"]
