"""Object storage against a real S3-compatible server on 127.0.0.1: the store's verbs, the lease,
and whole runs with input, output and checkpoint in a bucket, killed and resumed."""

from __future__ import annotations

import json
import os
import time

import pytest

from s3server import bucket, s3_server  # noqa: F401 - fixtures


def test_remote_store_verbs(bucket):
    from pipeline.storage.remote import RemoteStore

    st = RemoteStore(f"{bucket}/ck")
    assert st.list("") == [] and st.list("done") == []
    st.write("done/a.json", b"{}")
    st.write("parts/a.parquet", b"x" * 10)
    st.write("marker", b"m")
    assert st.exists("marker") and not st.exists("nope")
    assert st.size("parts/a.parquet") == 10 and st.size("nope") is None
    assert st.read("marker") == b"m"
    assert st.list("done") == ["done/a.json"]
    assert st.list("") == ["done", "marker", "parts"]
    st.delete("done/a.json")
    st.delete("done/a.json")  # deleting what is gone is no error
    assert st.list("done") == []
    assert st.is_writable() is None
    assert st.path("marker") == f"{bucket}/ck/marker"


def test_remote_lease_excludes_a_second_run_and_frees_on_release(bucket, monkeypatch):
    from pipeline.errors import LockedError
    from pipeline.storage import remote as sr

    monkeypatch.setattr(sr, "SETTLE_SECONDS", 0.05)
    st = sr.RemoteStore(f"{bucket}/ck")
    a = sr.RemoteLease(st, "lease", "run-a", seconds=30).acquire()
    with pytest.raises(LockedError, match=r"another run holds this checkpoint \(pid \d+ on"):
        sr.RemoteLease(st, "lease", "run-b", seconds=30).acquire()
    a.release()
    assert not st.exists("lease")
    b = sr.RemoteLease(st, "lease", "run-b", seconds=30).acquire()
    b.release()


def test_remote_lease_of_a_dead_holder_does_not_block(bucket, monkeypatch):
    from pipeline.errors import LockedError
    from pipeline.storage import remote as sr

    monkeypatch.setattr(sr, "SETTLE_SECONDS", 0.05)
    st = sr.RemoteStore(f"{bucket}/ck")
    # A holder on this host whose process is gone: free at once.
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    st.write("lease", json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "run_id": "old",
                                  "expires": time.time() + 600}).encode())
    sr.RemoteLease(st, "lease", "new", seconds=30).acquire().release()
    # A holder on another host: it blocks until its lease expires, then it is free.
    st.write("lease", json.dumps({"pid": 1, "host": "elsewhere", "run_id": "old2",
                                  "expires": time.time() + 600}).encode())
    with pytest.raises(LockedError, match="elsewhere"):
        sr.RemoteLease(st, "lease", "new2", seconds=30).acquire()
    st.write("lease", json.dumps({"pid": 1, "host": "elsewhere", "run_id": "old2",
                                  "expires": time.time() - 1}).encode())
    sr.RemoteLease(st, "lease", "new3", seconds=30).acquire().release()


def test_uri_detection():
    from pipeline.storage.uri import is_uri

    assert is_uri("s3://b/k") and is_uri("gs://b/k") and is_uri("hdfs://h:8020/p")
    assert not is_uri("/tmp/x.parquet") and not is_uri("rel/x.parquet") and not is_uri("file:///tmp/x")
    assert os.path.basename("s3://b/k/x.parquet") == "x.parquet"


def test_expand_and_publish(bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.errors import InputError
    from pipeline.storage import remote, uri

    local = tmp_path / "a.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), local)
    for key in ("in/a.parquet", "in/b.parquet", "in/sub/c.parquet", "in/notes.txt"):
        uri.publish(str(local), f"{bucket}/{key}")
    assert uri.expand(f"{bucket}/in") == [f"{bucket}/in/a.parquet", f"{bucket}/in/b.parquet"]
    assert uri.expand(f"{bucket}/in/") == [f"{bucket}/in/a.parquet", f"{bucket}/in/b.parquet"]
    assert uri.expand(f"{bucket}/in/*.parquet") == [f"{bucket}/in/a.parquet", f"{bucket}/in/b.parquet"]
    assert uri.expand(f"{bucket}/in/**/*.parquet")[-1] == f"{bucket}/in/sub/c.parquet"
    assert uri.expand(f"{bucket}/in/a.parquet") == [f"{bucket}/in/a.parquet"]
    for bad in ("in/none.parquet", "in/*.csv"):
        with pytest.raises(InputError):
            uri.expand(f"{bucket}/{bad}")
    assert pq.ParquetFile(uri.open_input(f"{bucket}/in/a.parquet")).read().num_rows == 3
    size, mtime = uri.stat(f"{bucket}/in/a.parquet")
    assert size == local.stat().st_size and mtime > 0
    assert uri.stat(f"{bucket}/in/none") is None
    assert uri.kind(f"{bucket}/in") == "dir" and uri.kind(f"{bucket}/in/a.parquet") == "file"
    # No temp object is left beside the published one.
    assert [n for n in remote.RemoteStore(f"{bucket}/in").list("") if "partial" in n] == []


# -- whole runs in a bucket -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, models):
    import pyarrow.parquet as pq

    from conftest import real_pairs, run_cli

    d = tmp_path_factory.mktemp("s3ref")
    inp = d / "in.parquet"
    pq.write_table(real_pairs(40), inp, row_group_size=30)  # 120 pairs
    out = d / "ref.parquet"
    r = run_cli(["run", inp, "--model", models["tied"], "-o", out, "--window", 20, "-q"])
    assert r.exit_code == 0, r.output
    return {"input": inp, "ref": pq.read_table(out), "model": models["tied"]}


def _read(uri):
    import pyarrow.parquet as pq

    from pipeline.storage.uri import open_input

    with open_input(uri) as f:
        return pq.read_table(f)


def test_run_in_a_bucket_equals_the_local_run(bucket, local_ref):
    from conftest import run_cli
    from pipeline.storage.remote import RemoteStore
    from pipeline.storage.uri import publish

    publish(str(local_ref["input"]), f"{bucket}/in/part-0.parquet")
    out = f"{bucket}/out/ranked.parquet"
    r = run_cli(["run", f"{bucket}/in/", "--model", local_ref["model"], "-o", out, "--window", 20, "-q"])
    assert r.exit_code == 0, r.output
    got = _read(out)
    assert got.equals(local_ref["ref"])
    # Only the output is left: no checkpoint objects, no temp objects.
    assert RemoteStore(bucket).list("out") == ["out/ranked.parquet"]
    # The output exists now: the same command is refused without --overwrite.
    r = run_cli(["run", f"{bucket}/in/", "--model", local_ref["model"], "-o", out, "-q"])
    assert r.exit_code == 2 and "pass --overwrite" in r.output


def test_killed_run_in_a_bucket_resumes(bucket, local_ref, s3_server):
    import signal
    import subprocess
    import sys

    from conftest import ROOT, run_cli
    from pipeline.storage.remote import RemoteStore
    from pipeline.storage.uri import publish

    publish(str(local_ref["input"]), f"{bucket}/in.parquet")
    out = f"{bucket}/out.parquet"
    args = ["run", f"{bucket}/in.parquet", "--model", local_ref["model"], "-o", out, "--window", 20, "-q"]
    env = dict(os.environ, PYTHONPATH=ROOT, **s3_server)
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = RemoteStore(out + ".ckpt")
    deadline = time.monotonic() + 600
    while len(ck.list("done")) < 2:
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no part appeared"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert ck.exists(".rerank-batch-lease.json")  # the dead run's lease is still there...
    r = run_cli(args)  # ...and does not block: its holder is gone
    assert r.exit_code == 0, r.output
    assert _read(out).equals(local_ref["ref"])
    assert RemoteStore(bucket).list("") == ["in.parquet", "out.parquet"]


def test_checkpoint_in_a_bucket_for_a_local_output(bucket, local_ref, tmp_path):
    from conftest import run_cli
    from pipeline.storage.remote import RemoteStore

    out = tmp_path / "o.parquet"
    r = run_cli(["run", local_ref["input"], "--model", local_ref["model"], "-o", out, "--window", 20, "-q",
                 "--checkpoint-dir", f"{bucket}/ck", "--keep-checkpoint"])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    assert pq.read_table(out).equals(local_ref["ref"])
    names = RemoteStore(f"{bucket}/ck").list("")
    assert ".rerank-batch-checkpoint" in names and "parts" in names and "done" in names


def test_foreign_prefix_is_not_a_checkpoint(bucket, local_ref, tmp_path):
    from conftest import run_cli
    from pipeline.storage.remote import RemoteStore

    RemoteStore(f"{bucket}/data").write("notes.txt", b"mine")
    r = run_cli(["run", local_ref["input"], "--model", local_ref["model"], "-o", tmp_path / "o.parquet",
                 "--checkpoint-dir", f"{bucket}/data", "-q"])
    assert r.exit_code == 2 and "not a rerank-batch checkpoint" in r.output
    assert RemoteStore(f"{bucket}/data").list("") == ["notes.txt"]


_HOLD_AFTER_FIRST_COMMIT = r"""
import os, sys, time
import pipeline.storage.checkpoint as c
real = c.Checkpoint.commit
def commit(self, *a, **k):
    out = real(self, *a, **k)
    while not os.path.exists(os.environ["RELEASE"]):  # hold the lease until the test says go
        time.sleep(0.02)
    return out
c.Checkpoint.commit = commit
sys.argv = ["rerank-batch"] + sys.argv[1:]
from jobs.cli import main
main()
"""


def test_a_second_run_on_the_same_bucket_checkpoint_is_refused(bucket, local_ref, s3_server, tmp_path):
    """Two runs of one command on one output in a bucket: while the first holds the lease, the
    second exits 75 naming the holder and touches nothing; the first ends with the right output."""
    import subprocess
    import sys

    from conftest import ROOT
    from pipeline.storage.remote import RemoteStore
    from pipeline.storage.uri import publish

    publish(str(local_ref["input"]), f"{bucket}/in.parquet")
    out = f"{bucket}/out.parquet"
    args = [str(a) for a in ["run", f"{bucket}/in.parquet", "--model", local_ref["model"], "-o", out,
                             "--window", 20, "-q"]]
    release = tmp_path / "release"
    env = dict(os.environ, PYTHONPATH=ROOT, RELEASE=str(release), **s3_server)
    first = subprocess.Popen([sys.executable, "-c", _HOLD_AFTER_FIRST_COMMIT, *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = RemoteStore(out + ".ckpt")
    deadline = time.monotonic() + 600
    try:
        while not ck.list("done"):  # the first run holds the lease and has committed a unit
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run committed nothing"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        release.touch()
    assert second.returncode == 75, second.stderr[-2000:]
    assert f"pid {first.pid} on" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert _read(out).equals(local_ref["ref"])
    assert RemoteStore(bucket).list("") == ["in.parquet", "out.parquet"]


class _Recording:
    """A pyarrow filesystem seen through a proxy that records the verbs called on it."""

    def __init__(self, fs, calls):
        self._fs, self._calls = fs, calls

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if callable(attr):
            def call(*a, **k):
                self._calls.append((name, a))
                return attr(*a, **k)
            return call
        return attr


@pytest.mark.parametrize("limit", [None, 0])
def test_publish_moves_a_temp_object_up_to_the_copy_limit_and_uploads_in_place_above(bucket, tmp_path, monkeypatch,
                                                                                      limit):
    """S3's CopyObject stops at 5 GiB: a larger output is uploaded to its key directly (the
    limit is lowered here to take that path with a small file); either way the key ends with
    the whole new object, and no temp object is left."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    from pipeline.storage import remote, uri

    calls: list = []
    real_resolve = uri.resolve
    monkeypatch.setattr(uri, "resolve", lambda u: (_Recording(real_resolve(u)[0], calls), real_resolve(u)[1]))
    moved: list = []
    real_copy = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda src, dst, **k: (moved.append(dst), real_copy(
        src, dst, source_filesystem=k["source_filesystem"], destination_filesystem=k["destination_filesystem"]._fs
        if isinstance(k["destination_filesystem"], _Recording) else k["destination_filesystem"])))
    if limit is not None:
        monkeypatch.setattr(uri, "S3_COPY_LIMIT", limit)
    local = tmp_path / "out.parquet"
    pq.write_table(pa.table({"x": list(range(1000))}), local)
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"x": [7]}), old)
    key = f"{bucket}/pub-{limit}/out.parquet"
    uri.publish(str(old), key)
    calls.clear(), moved.clear()
    uri.publish(str(local), key)
    assert _read(key).column("x").to_pylist() == list(range(1000))
    verbs = [c[0] for c in calls]
    if limit is None:
        assert "move" in verbs and moved[0].endswith(".partial")  # temp object, then one CopyObject
    else:
        assert "move" not in verbs and moved == [key.split("://", 1)[1]]  # straight to the key
    assert [n for n in remote.RemoteStore(f"{bucket}/pub-{limit}").list("") if "partial" in n] == []
