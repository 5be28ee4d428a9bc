"""Object storage against a real S3-compatible server on 127.0.0.1: the store's verbs, the lease,
and whole runs with input, output and checkpoint in a bucket, killed and resumed."""

from __future__ import annotations

import json
import os
import time

import pytest

from s3server import bucket, s3_server  # noqa: F401 - fixtures


def test_object_location_verbs(bucket):
    from pipeline.storage.location import ObjectLocation, location

    st = location(f"{bucket}/ck")
    assert isinstance(st, ObjectLocation)
    assert st.list() == [] and (st / "done").list() == []
    (st / "done/a.json").write_atomic(b"{}")
    (st / "parts/a.parquet").write_atomic(b"x" * 10)
    (st / "marker").write_atomic(b"m")
    assert (st / "marker").exists() and not (st / "nope").exists()
    assert (st / "parts/a.parquet").stat().size == 10 and (st / "nope").stat() is None
    assert (st / "parts").kind() == "dir" and (st / "marker").kind() == "file"
    assert (st / "marker").read_bytes() == b"m"
    assert (st / "done").list() == ["a.json"]
    assert st.list() == ["done", "marker", "parts"] and st.list("file") == ["marker"]
    (st / "done/a.json").delete()
    (st / "done/a.json").delete()  # deleting what is gone is no error
    assert (st / "done").list() == []
    assert st.writable() is None
    assert str(st / "marker") == f"{bucket}/ck/marker"


def test_remote_lease_excludes_a_second_run_and_frees_on_release(bucket, monkeypatch):
    from pipeline.errors import LockedError
    from pipeline.storage import lock
    from pipeline.storage.location import location

    monkeypatch.setattr(lock, "SETTLE_SECONDS", 0.05)
    st = location(f"{bucket}/ck")
    a = lock.ObjectLease(st, "run-a", name="lease", seconds=30).acquire()
    with pytest.raises(LockedError, match=r"another run holds this checkpoint \(pid \d+ on"):
        lock.ObjectLease(st, "run-b", name="lease", seconds=30).acquire()
    a.release()
    assert not (st / "lease").exists()
    b = lock.ObjectLease(st, "run-b", name="lease", seconds=30).acquire()
    b.release()


def test_remote_lease_of_a_dead_holder_does_not_block(bucket, monkeypatch):
    from pipeline.errors import LockedError
    from pipeline.storage import lock
    from pipeline.storage.location import location

    monkeypatch.setattr(lock, "SETTLE_SECONDS", 0.05)
    st = location(f"{bucket}/ck")
    # A holder on this host whose process is gone: free at once.
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (st / "lease").write_atomic(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "run_id": "old",
                                            "expires": time.time() + 600}).encode())
    lock.ObjectLease(st, "new", name="lease", seconds=30).acquire().release()
    # A holder on another host: it blocks until its lease expires, then it is free.
    (st / "lease").write_atomic(json.dumps({"pid": 1, "host": "elsewhere", "run_id": "old2",
                                            "expires": time.time() + 600}).encode())
    with pytest.raises(LockedError, match="elsewhere"):
        lock.ObjectLease(st, "new2", name="lease", seconds=30).acquire()
    (st / "lease").write_atomic(json.dumps({"pid": 1, "host": "elsewhere", "run_id": "old2",
                                            "expires": time.time() - 1}).encode())
    lock.ObjectLease(st, "new3", name="lease", seconds=30).acquire().release()


def test_one_factory_picks_the_location():
    from pipeline.storage.location import LocalLocation, ObjectLocation, location

    assert all(isinstance(location(u), ObjectLocation) for u in ("s3://b/k", "gs://b/k", "hdfs://h:8020/p"))
    assert all(isinstance(location(p), LocalLocation) for p in ("/tmp/x.parquet", "rel/x.parquet", "file:///tmp/x"))
    assert location("file:///tmp/x").key == "/tmp/x"
    assert location("s3://b/k/x.parquet").name == "x.parquet" and location("s3://b/k/").key == "s3://b/k"


def test_expand_and_publish(bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.storage.places import resolve_inputs
    from pipeline.errors import InputError
    from pipeline.storage.location import location

    local = tmp_path / "a.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), local)
    for key in ("in/a.parquet", "in/b.parquet", "in/sub/c.parquet", "in/notes.txt"):
        location(f"{bucket}/{key}").publish(str(local))

    def expand(spec):
        return [str(loc) for loc in resolve_inputs(spec)]

    assert expand(f"{bucket}/in") == [f"{bucket}/in/a.parquet", f"{bucket}/in/b.parquet"]
    assert expand(f"{bucket}/in/") == [f"{bucket}/in/a.parquet", f"{bucket}/in/b.parquet"]
    assert expand(f"{bucket}/in/*.parquet") == [f"{bucket}/in/a.parquet", f"{bucket}/in/b.parquet"]
    assert expand(f"{bucket}/in/**/*.parquet")[-1] == f"{bucket}/in/sub/c.parquet"
    assert expand(f"{bucket}/in/a.parquet") == [f"{bucket}/in/a.parquet"]
    for bad in ("in/none.parquet", "in/*.csv"):
        with pytest.raises(InputError):
            expand(f"{bucket}/{bad}")
    with location(f"{bucket}/in/a.parquet").open() as f:
        assert pq.ParquetFile(f).read().num_rows == 3
    st = location(f"{bucket}/in/a.parquet").stat()
    assert st.size == local.stat().st_size and st.mtime_ns > 0
    assert location(f"{bucket}/in/none").stat() is None
    assert location(f"{bucket}/in").kind() == "dir" and location(f"{bucket}/in/a.parquet").kind() == "file"
    # No temp object is left beside the published one.
    assert [n for n in location(f"{bucket}/in").list() if "partial" in n] == []


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

    from pipeline.storage.location import location

    with location(uri).open() as f:
        return pq.read_table(f)


def _publish(local, uri):
    from pipeline.storage.location import location

    location(uri).publish(str(local))


def _names(uri, folder=""):
    """The names directly under a prefix (or under its `folder`)."""
    from pipeline.storage.location import location

    return (location(uri) / folder).list()


def test_run_in_a_bucket_equals_the_local_run(bucket, local_ref):
    from conftest import run_cli

    _publish(local_ref["input"], f"{bucket}/in/part-0.parquet")
    out = f"{bucket}/out/ranked.parquet"
    r = run_cli(["run", f"{bucket}/in/", "--model", local_ref["model"], "-o", out, "--window", 20, "-q"])
    assert r.exit_code == 0, r.output
    got = _read(out)
    assert got.equals(local_ref["ref"])
    # Only the output is left: no checkpoint objects, no temp objects.
    assert _names(bucket, "out") == ["ranked.parquet"]
    # The output exists now: the same command is refused without --overwrite.
    r = run_cli(["run", f"{bucket}/in/", "--model", local_ref["model"], "-o", out, "-q"])
    assert r.exit_code == 2 and "pass --overwrite" in r.output


def test_killed_run_in_a_bucket_resumes(bucket, local_ref, s3_server):
    import signal
    import subprocess
    import sys

    from conftest import ROOT, run_cli

    _publish(local_ref["input"], f"{bucket}/in.parquet")
    out = f"{bucket}/out.parquet"
    args = ["run", f"{bucket}/in.parquet", "--model", local_ref["model"], "-o", out, "--window", 20, "-q"]
    env = dict(os.environ, PYTHONPATH=ROOT, **s3_server)
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = out + ".ckpt"
    deadline = time.monotonic() + 600
    while len(_names(ck, "done")) < 2:
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no part appeared"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert ".rerank-batch-lease.json" in _names(ck)  # the dead run's lease is still there...
    r = run_cli(args)  # ...and does not block: its holder is gone
    assert r.exit_code == 0, r.output
    assert _read(out).equals(local_ref["ref"])
    assert _names(bucket) == ["in.parquet", "out.parquet"]


def test_checkpoint_in_a_bucket_for_a_local_output(bucket, local_ref, tmp_path):
    from conftest import run_cli

    out = tmp_path / "o.parquet"
    r = run_cli(["run", local_ref["input"], "--model", local_ref["model"], "-o", out, "--window", 20, "-q",
                 "--checkpoint-dir", f"{bucket}/ck", "--keep-checkpoint"])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    assert pq.read_table(out).equals(local_ref["ref"])
    names = _names(f"{bucket}/ck")
    assert ".rerank-batch-checkpoint" in names and "parts" in names and "done" in names


def test_a_bucket_output_with_a_local_checkpoint_resumes_after_publishing(bucket, local_ref, tmp_path):
    """Killed after the output was published but before the checkpoint went (here: kept), the
    same command finishes (exit 0) instead of refusing the output it wrote itself."""
    from conftest import run_cli

    args = ["run", local_ref["input"], "--model", local_ref["model"], "-o", f"{bucket}/lc/out.parquet",
            "--window", 20, "-q", "--checkpoint-dir", tmp_path / "ck"]
    r = run_cli(args + ["--keep-checkpoint"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ck" / ".rerank-batch-checkpoint").exists()
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "ck").exists()
    assert _read(f"{bucket}/lc/out.parquet").equals(local_ref["ref"])


def test_foreign_prefix_is_not_a_checkpoint(bucket, local_ref, tmp_path):
    from conftest import run_cli
    from pipeline.storage.location import location

    (location(f"{bucket}/data") / "notes.txt").write_atomic(b"mine")
    r = run_cli(["run", local_ref["input"], "--model", local_ref["model"], "-o", tmp_path / "o.parquet",
                 "--checkpoint-dir", f"{bucket}/data", "-q"])
    assert r.exit_code == 2 and "not a rerank-batch checkpoint" in r.output
    assert _names(f"{bucket}/data") == ["notes.txt"]


_HOLD_AFTER_FIRST_COMMIT = r"""
import os, sys, time
import pipeline.storage.sink as s
real = s.CheckpointSink.commit
def commit(self, *a, **k):
    out = real(self, *a, **k)
    while not os.path.exists(os.environ["RELEASE"]):  # hold the lease until the test says go
        time.sleep(0.02)
    return out
s.CheckpointSink.commit = commit
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

    _publish(local_ref["input"], f"{bucket}/in.parquet")
    out = f"{bucket}/out.parquet"
    args = [str(a) for a in ["run", f"{bucket}/in.parquet", "--model", local_ref["model"], "-o", out,
                             "--window", 20, "-q"]]
    release = tmp_path / "release"
    env = dict(os.environ, PYTHONPATH=ROOT, RELEASE=str(release), **s3_server)
    first = subprocess.Popen([sys.executable, "-c", _HOLD_AFTER_FIRST_COMMIT, *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = out + ".ckpt"
    deadline = time.monotonic() + 600
    try:
        while not _names(ck, "done"):  # the first run holds the lease and has committed a unit
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
    assert _names(bucket) == ["in.parquet", "out.parquet"]


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


MiB = 2**20


@pytest.fixture
def old_and_new(bucket, tmp_path):
    """A key holding an old object (1,000 bytes), and a 12 MiB new file to publish over it."""
    import os

    from pipeline.storage import uri

    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"O" * 1000)
    new.write_bytes(os.urandom(12 * MiB))
    key = f"{bucket}/pub-{tmp_path.name}/out.parquet"
    uri.publish(str(old), key)
    return old, new, key


def _bytes(key):
    from pipeline.storage.uri import resolve

    fs, path = resolve(key)
    with fs.open_input_stream(path) as f:
        return f.read()


def _no_temp_objects(key):
    return [n for n in _names(key.rsplit("/", 1)[0]) if "partial" in n] == []


def _big(monkeypatch):
    """Take the path of outputs over S3's copy limit with a small file (boto3, 5 MiB parts)."""
    from pipeline.storage import uri

    monkeypatch.setattr(uri, "S3_COPY_LIMIT", 0)
    monkeypatch.setattr(uri, "S3_MIN_PART", 5 * MiB)


@pytest.mark.parametrize("big", [False, True])
def test_publish_replaces_the_object_whole(old_and_new, monkeypatch, big):
    """Up to S3's copy limit: a temp object moved onto the key. Above it (lowered here): boto3
    uploads to the key itself in parts, and no move (one CopyObject, 5 GiB at most) is made."""
    from pipeline.storage import uri

    old, new, key = old_and_new
    calls: list = []
    real_resolve = uri.resolve
    monkeypatch.setattr(uri, "resolve", lambda u: (_Recording(real_resolve(u)[0], calls), real_resolve(u)[1]))
    if big:
        _big(monkeypatch)
    uri.publish(str(new), key)
    assert _bytes(key) == new.read_bytes()
    verbs = [c[0] for c in calls]
    assert ("move" in verbs) != big
    assert _no_temp_objects(key)


@pytest.mark.parametrize("big", [False, True])
def test_a_refused_part_fails_the_publish_and_keeps_the_old_object(old_and_new, monkeypatch, big):
    """A part that S3 refuses (expired credentials, throttling): publish raises, and the key
    still holds the old object. pyarrow's copy_files ignores such a failure at close, so a
    publish through it would have looked successful."""
    from moto.s3 import models
    from moto.s3.exceptions import AccessForbidden

    from pipeline.storage import uri

    old, new, key = old_and_new
    real = models.S3Backend.upload_part

    def refusing(self, bucket_name, multipart_id, part_id, value):
        if int(part_id) == 2:
            raise AccessForbidden("injected: part 2 refused")
        return real(self, bucket_name, multipart_id, part_id, value)

    monkeypatch.setattr(models.S3Backend, "upload_part", refusing)
    if big:
        _big(monkeypatch)
    with pytest.raises(OSError):
        uri.publish(str(new), key)
    monkeypatch.setattr(models.S3Backend, "upload_part", real)
    assert _bytes(key) == old.read_bytes()
    assert _no_temp_objects(key)


def test_a_local_read_error_mid_upload_keeps_the_old_object(old_and_new, monkeypatch):
    """The staged file fails to read half way: S3's stream, once closed, completes with what it
    was sent, so that part must never be the key itself: the temp object is deleted."""
    import builtins

    from pipeline.storage import uri

    old, new, key = old_and_new

    class Failing:
        def __init__(self, f):
            self.f, self.left = f, 6 * MiB

        def read(self, n):
            if self.left <= 0:
                raise OSError(5, "injected: Input/output error")
            self.left -= n
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(uri, "open", lambda p, m="r": Failing(builtins.open(p, m)), raising=False)
    with pytest.raises(OSError, match="injected"):
        uri.publish(str(new), key)
    assert _bytes(key) == old.read_bytes()
    assert _no_temp_objects(key)


def test_an_output_over_the_copy_limit_without_boto3_is_refused_before_any_upload(old_and_new, monkeypatch):
    import sys

    from pipeline.storage import uri

    old, new, key = old_and_new
    _big(monkeypatch)
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 raises ImportError
    with pytest.raises(uri.OutputUnpublished, match=r"rerank-batch\[s3\]"):
        uri.publish(str(new), key)
    assert _bytes(key) == old.read_bytes()


def test_an_unreachable_store_is_one_line_and_exit_1(local_ref, tmp_path, monkeypatch):
    """A store that does not answer is a runtime failure (exit 1) told in one line, not a
    traceback from pyarrow."""
    import uuid

    from conftest import run_cli

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    b = f"s3://down-{uuid.uuid4().hex[:8]}"  # a bucket no cached client has seen
    for args in (["run", f"{b}/in.parquet", "-o", tmp_path / "o.parquet"], ["run", local_ref["input"], "-o", f"{b}/o.parquet"]):
        r = run_cli(args + ["--model", local_ref["model"], "-q"])
        assert r.exit_code == 1, r.output
        lines = [line for line in r.output.strip().splitlines() if line]
        assert len(lines) == 1 and "Traceback" not in r.output, r.output
        assert lines[0].startswith("Error: When getting information for key"), lines[0]
        # Before any work: no word of a checkpoint that holds nothing.
        assert lines[0].endswith("; nothing was scored: check the disk, the bucket or the network, then rerun the "
                                 "same command"), lines[0]
    assert not (tmp_path / "o.parquet").exists()


REGION_DOWN = ("When resolving region for bucket 'down': AWS Error NETWORK_CONNECTION during HeadBucket operation: "
               "curlCode: 6, Could not resolve hostname")


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_region_lookup_that_cannot_reach_the_network_is_the_same_exit_1(local_ref, tmp_path, monkeypatch, where):
    """Without AWS_ENDPOINT_URL pyarrow first asks the network for the bucket's region; that failing
    is the store being unreachable (exit 1, nothing scored), not a wrong URI (exit 2). The network
    is never reached here: the lookup's error is what pyarrow raises."""
    from conftest import run_cli
    from pipeline.storage import uri

    def down(scheme_and_host):
        raise OSError(REGION_DOWN)

    monkeypatch.setattr(uri, "_filesystem", down)
    args = (["run", "s3://down/in.parquet", "-o", tmp_path / "o.parquet"] if where == "input"
            else ["run", local_ref["input"], "-o", "s3://down/o.parquet"])
    r = run_cli(args + ["--model", local_ref["model"], "-q"])
    assert r.exit_code == 1, r.output
    assert r.output == (f"Error: {REGION_DOWN}; nothing was scored: check the disk, the bucket or the network, then "
                        "rerun the same command\n")
    assert not (tmp_path / "o.parquet").exists()


def test_a_uri_pyarrow_cannot_open_is_still_exit_2(local_ref, tmp_path):
    from conftest import run_cli

    r = run_cli(["run", "nosuchscheme://b/in.parquet", "-o", tmp_path / "o.parquet", "--model", local_ref["model"]])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: nosuchscheme://b/in.parquet: cannot open this location (")
    assert r.output.endswith("); check the URI and the credentials in the environment (AWS_ENDPOINT_URL, "
                             "AWS_ACCESS_KEY_ID, ...)\n")


@pytest.mark.parametrize("output", ["o/x.parquet", "o/ds/"])
def test_a_run_into_a_bucket_leaves_no_empty_folder_markers(bucket, local_ref, s3_server, output):
    """pyarrow's S3 file system writes an empty "folder/" object when it deletes the last object
    under a prefix (the probe, the lease, the checkpoint): none may be left behind."""
    import boto3

    from conftest import run_cli

    _publish(local_ref["input"], f"{bucket}/in.parquet")
    r = run_cli(["run", f"{bucket}/in.parquet", "--model", local_ref["model"], "-o", f"{bucket}/{output}",
                 "--window", 20, "-q"])
    assert r.exit_code == 0, r.output
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket[len("s3://"):])["Contents"]]
    assert [k for k in keys if k.endswith("/")] == []
    assert "in.parquet" in keys and any(k.startswith(output) and k.endswith(".parquet") for k in keys)


@pytest.mark.parametrize("with_boto3", [True, False])
def test_store_deletes_leave_no_folder_marker(bucket, s3_server, monkeypatch, with_boto3):
    import boto3

    from pipeline.storage import uri
    from pipeline.storage.location import location

    if not with_boto3:  # pyarrow alone: only the marker of a folder left empty can go
        monkeypatch.setattr(uri, "_s3_client", lambda: None)
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])

    def keys():
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket[len("s3://"):]).get("Contents", []))

    st = location(f"{bucket}/a/ck")
    (st / "parts/x").write_atomic(b"1")
    (st / "parts/y").write_atomic(b"1")
    (st / "parts/x").delete()
    assert keys() == ["a/ck/parts/y"] if with_boto3 else keys() in (["a/ck/parts/y"], ["a/ck/parts/", "a/ck/parts/y"])
    (st / "parts/y").delete()
    (st / "parts").remove_dir()
    assert keys() == []
    assert st.writable() is None and keys() == []
