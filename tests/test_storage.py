"""The storage seam on its own: one Location type on the local disk (object storage: the same
verbs in test_object_storage.py), and the checkpoint sink's commits, groups, partial commits and
verified reads, as a worker sees them through its picklable spec."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow as pa
import pytest

from pipeline.storage.location import LocalLocation, location
from pipeline.storage.sink import CheckpointSink, PartsChanged

U = [f"00000-{i:012d}-{i + 1:012d}" for i in range(5)]  # unit ids


def _table(uid: str, n: int = 2) -> pa.Table:
    base = int(uid.split("-")[1]) * 10
    return pa.table({"_ord": pa.array(np.arange(base, base + n, dtype=np.int64)),
                     "score": pa.array(np.full(n, 0.5, np.float32)), "query": [uid] * n})


def _info(n: int = 2) -> dict:
    return {"pairs": n, "tokens": 10 * n, "truncated": 0, "skipped_null": 0, "rows": n}


def test_local_location_verbs(tmp_path):
    root = location(tmp_path)
    assert isinstance(root, LocalLocation) and root.kind() == "dir"
    f = root / "a/b.bin"
    f.write_atomic(b"xyz")
    assert f.read_bytes() == b"xyz" and f.stat().size == 3 and f.kind() == "file"
    assert (root / "a").list() == ["b.bin"] and root.list("dir") == ["a"] and root.list("file") == []
    assert [loc.name for loc in root.glob("**/*.bin")] == ["b.bin"]
    with f.open() as h:
        h.seek(1)
        assert h.read(2) == b"yz"
    out = root / "out.parquet"
    with out.staged("run1") as tmp:
        assert os.path.basename(tmp).startswith(".out.parquet.run1-") and tmp.endswith(".partial")
        open(tmp, "wb").write(b"whole")
        assert out.publish(tmp).size == 5
    assert out.read_bytes() == b"whole" and sorted(os.listdir(tmp_path)) == ["a", "out.parquet"]
    (root / ".out.parquet.run0-0000abcd.partial").write_atomic(b"left by a kill")
    out.remove_staged(["run0"])
    assert sorted(os.listdir(tmp_path)) == ["a", "out.parquet"]
    # A link in a folder's place is never followed: without `links` it stays, with it the link goes.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "linked")
    (root / "linked").remove_dir()
    assert os.path.islink(tmp_path / "linked")
    (root / "linked").remove_dir(links=True)
    assert not os.path.lexists(tmp_path / "linked") and elsewhere.is_dir()
    f.delete()
    f.delete()  # absent: no error
    assert root.writable() is None and (root / "nodir").folder_missing()


def _sink(tmp_path) -> CheckpointSink:
    return CheckpointSink.open(location(tmp_path / "ck"), {"options": {}}, [], restart=False, own_root=True)


def test_a_group_commit_is_two_objects_and_reads_back_verified(tmp_path):
    ck = _sink(tmp_path)
    ck.commit_group([(u, _table(u), _info()) for u in U[:3]])
    assert sorted(os.listdir(tmp_path / "ck" / "parts")) == [f"{U[0]}.parquet"]
    assert sorted(os.listdir(tmp_path / "ck" / "done")) == [f"{U[0]}.json"]
    assert [ck.read_part(u, ["query"]).column("query").to_pylist() for u in U[:3]] == [[u, u] for u in U[:3]]
    assert ck.done[U[1]]["pairs"] == 2 and ck.done[U[1]]["group"] == U[0]
    parts = ck.parts(U[:3])
    assert [parts.read(i, ["_ord"]).num_rows for i in range(3)] == [2, 2, 2] and parts.reads == 1
    # A worker's view, from the picklable spec: the same finished units, read from the store.
    other = pickle.loads(pickle.dumps(ck.spec())).attach()
    assert other.lease is None and set(other.finished()) == set(U[:3])
    # A byte changed in the shared part: every unit of the group is scored again.
    p = tmp_path / "ck" / "parts" / f"{U[0]}.parquet"
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    parts = ck.parts(U[:3])
    assert parts.read(0, ["_ord"]) is None and parts.read(2, ["_ord"]) is None and parts.reads == 1
    with pytest.raises(PartsChanged) as e:
        parts.check()
    assert e.value.unit_ids == [U[0]]  # the part, named by its first unit (forgetting it forgets the group)
    assert ck.forget(U[1], "changed") == U[:3] and not ck.done
    assert os.listdir(tmp_path / "ck" / "done") == []
    ck.close(remove=True)
    assert not (tmp_path / "ck").exists()


def test_partial_commits_of_many_units_are_one_object(tmp_path):
    ck = _sink(tmp_path)
    ck.commit_partials([(u, np.arange(3) + 10 * i, np.full(3, i, np.float32), {"tokens": 3 * (i + 1)})
                        for i, u in enumerate(U[:4])])
    assert len(os.listdir(tmp_path / "ck" / "partial")) == 1
    other = ck.spec().attach()  # another process lists the folder and finds each unit's pairs
    kept = other.kept(U[2])
    assert kept.ords.tolist() == [20, 21, 22] and kept.scores.tolist() == [2, 2, 2] and kept.counts["tokens"] == 9
    assert other.kept_pairs() == 12
    ck.commit(U[0], _table(U[0]), _info())  # the object still holds pairs of unfinished units
    assert len(os.listdir(tmp_path / "ck" / "partial")) == 1
    ck.commit_group([(u, _table(u), _info()) for u in U[1:4]])  # all its units finished: it goes
    assert os.listdir(tmp_path / "ck" / "partial") == []
    ck.close(remove=True)
