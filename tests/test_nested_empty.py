"""Nested input: a row whose list of documents is empty stays in the output, unscored."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import run_cli


def test_an_empty_list_keeps_its_row_unscored_and_last_in_its_group(tmp_path, tied_model):
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"query": ["q one", "q two", "q one", "q three"],
                             "documents": [["alpha doc", "beta doc"], [], [], ["gamma doc"]],
                             "tag": [1, 2, 3, 4]}), inp)
    out, summary = tmp_path / "out.parquet", tmp_path / "summary.json"
    r = run_cli(["run", inp, "--model", tied_model, "-o", out, "-q", "--summary", summary])
    assert r.exit_code == 0, r.output
    got = pq.read_table(out).to_pylist()
    assert [(g["query"], g["tag"], g["document"], g["doc_index"]) for g in got] == [
        ("q one", 1, got[0]["document"], got[0]["doc_index"]), ("q one", 1, got[1]["document"], got[1]["doc_index"]),
        ("q one", 3, None, None), ("q two", 2, None, None), ("q three", 4, "gamma doc", 0)]
    assert sorted(g["document"] for g in got[:2]) == ["alpha doc", "beta doc"]
    assert [g["rank"] for g in got] == [1, 2, None, None, 1]
    assert [g["score"] is None for g in got] == [False, False, True, True, False]
    s = json.loads(summary.read_text())
    assert (s["rows"], s["pairs_scored"], s["empty_lists"], s["skipped_null"]) == (5, 3, 2, 0)

    # The scored rows are those of the same input without the empty lists.
    pq.write_table(pa.table({"query": ["q one", "q three"], "documents": [["alpha doc", "beta doc"], ["gamma doc"]],
                             "tag": [1, 4]}), tmp_path / "plain.parquet")
    assert run_cli(["run", tmp_path / "plain.parquet", "--model", tied_model, "-o", tmp_path / "plain.out.parquet",
                    "-q"]).exit_code == 0
    plain = pq.read_table(tmp_path / "plain.out.parquet").to_pylist()
    want = {(p["document"], p["tag"]): p["score"] for p in plain}
    for g in got:
        if g["document"] is not None:
            np.testing.assert_allclose(g["score"], want[(g["document"], g["tag"])], atol=1e-6)


def test_top_k_drops_the_rows_of_empty_lists_like_other_unscored_rows(tmp_path, tied_model):
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"query": ["q one", "q two"], "documents": [["alpha doc", "beta doc"], []]}), inp)
    out = tmp_path / "out.parquet"
    r = run_cli(["run", inp, "--model", tied_model, "-o", out, "-q", "--top-k", "1"])
    assert r.exit_code == 0, r.output
    got = pq.read_table(out)
    assert got.column("query").to_pylist() == ["q one"] and got.column("rank").to_pylist() == [1]
