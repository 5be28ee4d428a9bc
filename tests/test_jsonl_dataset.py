"""JSONL input (long, nested, gzip, object storage) and dataset outputs (-o DIR/): the same rows
and scores as the Parquet file run, bad lines named by file and line, resume after SIGKILL, and
a publish that readers never see half done."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import KILL_AT_REPLACE_CHILD, ROOT, run_cli
from pipeline.errors import InputError
from s3server import bucket, s3_server  # noqa: F401 - fixtures

TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")
TOL = 1e-6  # CPU float32, different batchings

# The CLI in a child that SIGKILLs itself before or after the Nth os.replace whose target
# matches a regex (a unit's record, the dataset's rename into place, ...).
_CHILD = KILL_AT_REPLACE_CHILD + r"""
sys.argv = ["rerank-batch"] + sys.argv[1:]
from jobs.cli import main
main()
"""


def _killed_run(args, kill_at):
    p = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, KILL_AT_REPLACE=kill_at, PYTHONPATH=ROOT), timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def _rows():
    """The sample pairs, with an instruction column (some null) and pass-through columns of
    several JSON types, one of them date-like text (pyarrow.json would infer a timestamp)."""
    t = pq.read_table(os.path.join(ROOT, "sample_data", "pairs.parquet"))
    rows = t.to_pylist()
    for i, r in enumerate(rows):
        r["instruction"] = None if i % 3 else "Find the passage that answers the question"
        r["day"] = f"2024-01-{1 + i % 28:02d}"
        r["weight"] = i / 4 if i % 2 else i  # ints and floats: read as float64
    return rows


def _write_jsonl(path, rows, blank_lines=False):
    text = "".join(json.dumps(r) + "\n" + ("\n" if blank_lines and i % 5 == 0 else "") for i, r in enumerate(rows))
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def _nested(rows):
    by_q: dict = {}
    for r in rows:
        q = by_q.setdefault(r["query_id"], {"query_id": r["query_id"], "query": r["query"],
                                             "instruction": r["instruction"], "day": r["day"],
                                             "weight": r["weight"], "documents": []})
        q["documents"].append(r["document"])
    return list(by_q.values())


def _parquet(path, rows):
    t = pa.Table.from_pylist(rows)
    if "weight" in t.column_names:
        t = t.set_column(t.schema.get_field_index("weight"), "weight", t.column("weight").cast(pa.float64()))
    pq.write_table(t, path)


def _run(inp, out, *extra):
    r = run_cli(["run", *([inp] if not isinstance(inp, list) else inp), "--model", TINY, "-o", out, "-q",
                 "--window", 5, *extra])
    assert r.exit_code == 0, r.output
    return r


def _same(got: pa.Table, ref: pa.Table):
    assert got.schema == ref.schema
    assert got.drop_columns(["score"]).equals(ref.drop_columns(["score"]))
    assert np.abs(np.asarray(got.column("score")) - np.asarray(ref.column("score"))).max() <= TOL


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("jsonl")
    rows = _rows()
    _parquet(d / "long.parquet", rows)
    _parquet(d / "nested.parquet", _nested(rows))
    _run(d / "long.parquet", d / "long.ref.parquet")
    _run(d / "nested.parquet", d / "nested.ref.parquet")
    return {"dir": d, "rows": rows, "long": pq.read_table(d / "long.ref.parquet"),
            "nested": pq.read_table(d / "nested.ref.parquet")}


@pytest.mark.parametrize("name", ["long.jsonl", "long.jsonl.gz", "nested.jsonl", "nested.jsonl.gz"])
def test_jsonl_equals_parquet(ref, tmp_path, name):
    rows = ref["rows"] if name.startswith("long") else _nested(ref["rows"])
    _write_jsonl(tmp_path / name, rows, blank_lines=True)
    _run(tmp_path / name, tmp_path / "out.parquet")
    got = pq.read_table(tmp_path / "out.parquet")
    _same(got, ref["long" if name.startswith("long") else "nested"])
    assert got.schema.field("day").type == pa.string()  # the text it was, not a timestamp
    assert got.schema.field("weight").type == pa.float64()


def test_jsonl_directory_and_default_output(ref, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rows = ref["rows"]
    _write_jsonl(d / "a.jsonl", rows[:10])
    _write_jsonl(d / "b.jsonl.gz", rows[10:])
    r = run_cli(["run", d, "--model", TINY, "-q", "--window", 5])
    assert r.exit_code == 0, r.output
    _same(pq.read_table(tmp_path / "in.reranked.parquet"), ref["long"])
    _parquet(d / "c.parquet", rows[:3])  # a directory of two formats
    r = run_cli(["run", d, "--model", TINY, "-q", "-o", tmp_path / "x.parquet"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (
        f"Error: {d}/c.parquet: Parquet and JSONL inputs in one run; convert them to one format, or run each format "
        "on its own")


BAD = [
    ('{"query": "a", "document": "b"}\n\n{"query": "c" "document": "d"}\n',
     "line 3 is not a JSON object of the file's fields (Missing a comma or '}' after an object member); fix or "
     "remove that line (each line must be one JSON object, every value of a field of one type)"),
    ('{"query": "a", "document": "b"}\n{"query": "c", "document": 7}\n',
     "line 2 is not a JSON object of the file's fields (Column(/document) changed from string to number); fix or "
     "remove that line (each line must be one JSON object, every value of a field of one type)"),
    ('{"query": "a", "document": "b"}\n{"document": "d"}\n',
     "line 2: field 'query' is null or missing; fill it, or pass --on-null skip to keep such rows unscored"),
    ('{"query": "a", "documents": ["b"]}\n{"query": "c", "documents": null}\n',
     "line 2: field 'documents' is null or missing; give an empty list or remove the line"),
    ('{"query": "a", "documents": ["b", null]}\n',
     "line 1: field 'documents' holds a null document; fill it, or pass --on-null skip to keep such rows unscored"),
    # a misnamed field is named as in a Parquet file, with the option that fixes it
    ('{"question": "a", "document": "b"}\n{"question": "c", "document": "d"}\n',
     "no query column 'query' (columns: question, document); pass --query-col NAME"),
    ('{"query": "a", "document": "b"}\n[1, 2]\n',
     "line 2 is not a JSON object of the file's fields (Column() changed from object to array); fix or remove that "
     "line (each line must be one JSON object, every value of a field of one type)"),
]


@pytest.mark.parametrize("text,expected", BAD)
def test_bad_jsonl_line_is_one_line_exit_2(tmp_path, text, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    r = run_cli(["run", p, "--model", TINY, "-q"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == f"Error: {p}: {expected}"
    assert not os.path.exists(tmp_path / "bad.reranked.parquet")
    assert not os.path.exists(tmp_path / "bad.reranked.parquet.ckpt")


def test_scan_units_do_not_depend_on_chunking(ref, tmp_path):
    """Units are cut by rows and bytes, the same whatever the scan's chunk size; reading them
    back by range gives the file's rows; a bad line deep in a later chunk is named exactly."""
    from pipeline.data import jsonl
    from pipeline.data.read import Unit, iter_unit_tables

    rows = _nested(ref["rows"]) * 7
    p = str(tmp_path / "n.jsonl")
    _write_jsonl(p, rows, blank_lines=True)
    big = jsonl.scan(p, "query", "document", "documents", "instruction", 11)
    small = jsonl.scan(p, "query", "document", "documents", "instruction", 11, chunk_bytes=300)
    assert big.spans == small.spans and big.schema == small.schema and len(big.spans) > 5
    assert big.pairs == sum(len(r["documents"]) for r in rows) and big.rows == len(rows)
    units = [Unit(0, p, s.start, s.stop, s.start, s.byte_start, s.byte_stop) for s in big.spans]
    got = pa.concat_tables(t for _, t in iter_unit_tables(units[3:] + units[:3], schema=big.schema))
    assert got.column("documents").to_pylist() == [r["documents"] for r in rows[units[3].start:] +
                                                   rows[:units[3].start]]
    with open(p, "a") as f:
        f.write('{"query": "x", "documents": 5}\n')
    lines = open(p).read().count("\n")
    with pytest.raises(InputError, match=rf": line {lines} is not a JSON object"):
        jsonl.scan(p, "query", "document", "documents", "instruction", 11, chunk_bytes=300)


def test_sigkill_and_resume_with_jsonl_gz(ref, tmp_path):
    inp = tmp_path / "in.jsonl.gz"
    _write_jsonl(inp, ref["rows"])
    out = tmp_path / "out.parquet"
    args = ["run", inp, "--model", TINY, "-o", out, "-q", "--window", 5]
    _killed_run(args, r"done/[^/]*\.json$:3:after")  # three units committed, then killed
    assert len(os.listdir(tmp_path / "out.parquet.ckpt" / "done")) == 3 and not out.exists()
    r = run_cli([*args, "--summary", tmp_path / "s.json"])
    assert r.exit_code == 0, r.output
    assert json.load(open(tmp_path / "s.json"))["units_resumed"] == 3
    _same(pq.read_table(out), ref["long"])


def _read_dataset(d):
    import pyarrow.dataset as pads

    return pads.dataset(str(d), format="parquet").to_table()


def _check_dataset(d, ref_table, limit):
    import polars as pl

    names = sorted(os.listdir(d))
    parts = [n for n in names if n.endswith(".parquet")]
    assert names == ["_SUCCESS"] + parts and parts == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    seen: dict = {}
    sizes = []
    for i, n in enumerate(parts):
        t = pq.read_table(os.path.join(d, n))
        sizes.append(t.num_rows)
        for q in set(t.column("query_id").to_pylist()):
            assert q not in seen, f"query {q} in {seen[q]} and {n}"
            seen[q] = n
    groups = ref_table.group_by("query_id").aggregate([("rank", "count")]).column("rank_count").to_pylist()
    assert all(s <= max(limit, max(groups)) for s in sizes)
    union = _read_dataset(d)
    assert union.equals(ref_table)  # in order: the single-file output
    assert pl.scan_parquet(os.path.join(d, "*.parquet")).collect().to_arrow().num_rows == ref_table.num_rows
    body = json.load(open(os.path.join(d, "_SUCCESS")))
    assert body["writer"] == "rerank-batch" and body["rows"] == ref_table.num_rows
    return parts


def test_dataset_output_bounded_files_whole_queries(ref, tmp_path):
    _run(ref["dir"] / "long.parquet", f"{tmp_path}/ds/", "--output-file-rows", 9)
    parts = _check_dataset(tmp_path / "ds", ref["long"], 9)
    assert len(parts) >= 3
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # no temp, spill or checkpoint left beside it
    # An existing directory means a dataset too; --overwrite replaces ours, dropping its extra files.
    _run(ref["dir"] / "long.parquet", tmp_path / "ds", "--output-file-rows", 1000, "--overwrite")
    assert _check_dataset(tmp_path / "ds", ref["long"], 1000) == ["part-00000.parquet"]


def test_dataset_output_refusals_delete_nothing(ref, tmp_path):
    base = ["run", ref["dir"] / "long.parquet", "--model", TINY, "-q"]
    _run(ref["dir"] / "long.parquet", f"{tmp_path}/ds/")
    r = run_cli([*base, "-o", f"{tmp_path}/ds/"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path}/ds/: the output exists; pass --overwrite to replace it")
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "part-00000.parquet").write_text("not ours either")
    r = run_cli([*base, "-o", other, "--overwrite"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        f"Error: {other}/: the directory is not empty and is not a dataset written by rerank-batch (holds "
        "notes.txt); pass a new or empty directory with -o")
    assert sorted(os.listdir(other)) == ["notes.txt", "part-00000.parquet"]
    (tmp_path / "afile").write_text("x")
    r = run_cli([*base, "-o", f"{tmp_path}/afile/"])
    assert r.exit_code == 2 and "a file, not a directory" in r.output


def test_a_dataset_output_that_is_a_link_is_replaced_and_its_target_kept(ref, tmp_path):
    """--overwrite once emptied the linked folder (its files deleted through the link) and left
    the link behind under a hidden name; now the link goes, as a file output's does, and the
    folder it points to keeps what it held."""
    inp = ref["dir"] / "long.parquet"
    (tmp_path / "big").mkdir()
    _run(inp, f"{tmp_path}/big/ds/", "--output-file-rows", 100)
    before = {n: (tmp_path / "big" / "ds" / n).read_bytes() for n in os.listdir(tmp_path / "big" / "ds")}
    (tmp_path / "ds").symlink_to(tmp_path / "big" / "ds")
    _run(inp, f"{tmp_path}/ds/", "--output-file-rows", 9, "--overwrite")
    assert not os.path.islink(tmp_path / "ds")
    _check_dataset(tmp_path / "ds", ref["long"], 9)
    assert {n: (tmp_path / "big" / "ds" / n).read_bytes() for n in os.listdir(tmp_path / "big" / "ds")} == before
    assert sorted(os.listdir(tmp_path)) == ["big", "ds"]  # no link or folder left aside


def test_a_local_temporary_folder_marks_a_dataset_as_someone_elses(ref, tmp_path):
    """Object storage's uploads wait under _temporary/; a local one is the user's, and a folder
    holding it is refused even with --overwrite (it was moved into a hidden folder)."""
    inp = ref["dir"] / "long.parquet"
    _run(inp, f"{tmp_path}/ds/")
    (tmp_path / "ds" / "_temporary").mkdir()
    (tmp_path / "ds" / "_temporary" / "notes.txt").write_text("important")
    listing = sorted(os.listdir(tmp_path / "ds"))
    r = run_cli(["run", inp, "--model", TINY, "-q", "-o", f"{tmp_path}/ds/", "--overwrite"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path}/ds/: the directory is not empty and is not a dataset written by rerank-batch (holds "
        "_temporary); pass a new or empty directory with -o")
    assert sorted(os.listdir(tmp_path / "ds")) == listing
    assert (tmp_path / "ds" / "_temporary" / "notes.txt").read_text() == "important"
    assert sorted(os.listdir(tmp_path)) == ["ds"]


@pytest.mark.parametrize("kill_at", [
    r"/ds$:1:before",   # every file written, the temp directory not yet renamed into place
    r"/ds$:1:after",    # in place, the checkpoint not yet marked published
    r"\.old$:1:after",  # the previous dataset set aside, the new one not yet in place
])
def test_dataset_publish_killed_then_resumed(ref, tmp_path, kill_at):
    inp = ref["dir"] / "long.parquet"
    out = f"{tmp_path}/ds/"
    _run(inp, out, "--output-file-rows", 100)  # a previous dataset of ours, to be replaced
    args = ["run", inp, "--model", TINY, "-o", out, "-q", "--window", 5, "--output-file-rows", 9, "--overwrite"]
    _killed_run(args, kill_at)
    if os.path.isdir(out):  # a reader sees the old dataset or the new one, whole, never a mix
        assert _read_dataset(out).equals(ref["long"]) and os.path.exists(f"{out}_SUCCESS")
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    _check_dataset(out, ref["long"], 9)
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # temp, set-aside and checkpoint all gone


def test_object_storage_jsonl_in_dataset_out(ref, tmp_path, bucket, monkeypatch):
    import pyarrow.dataset as pads
    from pyarrow import fs as pafs

    from pipeline.storage import lock
    from pipeline.storage.location import location

    monkeypatch.setattr(lock, "SETTLE_SECONDS", 0.05)
    local = tmp_path / "in.jsonl.gz"
    _write_jsonl(local, ref["rows"])
    location(f"{bucket}/in/pairs.jsonl.gz").publish(str(local))
    out = f"{bucket}/out/"
    _run(f"{bucket}/in/", out, "--output-file-rows", 9)
    st = location(out)
    names = st.list()
    assert "_SUCCESS" in names and not any(n.startswith("_temporary") for n in names)
    assert json.loads((st / "_SUCCESS").read_bytes())["rows"] == ref["long"].num_rows
    fs, path = st.fs, st.fs_path
    got = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    _same(got, ref["long"])
    # Replaced by a run with fewer files: the old extra files go, _SUCCESS is rewritten last.
    _run(f"{bucket}/in/pairs.jsonl.gz", out, "--output-file-rows", 1000, "--overwrite")
    assert st.list() == ["_SUCCESS", "part-00000.parquet"]
    assert fs.get_file_info(pafs.FileSelector(path + "/_temporary", allow_not_found=True)) == []
