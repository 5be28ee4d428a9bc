"""The score cache (--cache) and exact dedup: cached and uncached outputs agree on real data,
the key changes with everything that decides a score (and only that), damaged files are skipped,
merges lose nothing, and the cache commands do what they say."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import real_pairs, reference_scores, run_cli, shared, stop_after_pairs
from pipeline.cache import segment
from pipeline.cache.cache import PairCache, prepare
from pipeline.cache.key import Scope, make_scope, model_identity, pair_keys
from pipeline.config import RunConfig
from pipeline.errors import InputError

TOL = 1e-5  # float32 parity bound of the project


@pytest.fixture(scope="module")
def data(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("cache")
    inp = d / "in.parquet"
    pq.write_table(real_pairs(80), inp, row_group_size=50)  # 240 real pairs, 4 of them exact repeats
    ref = d / "ref.parquet"
    r = run_cli(["run", inp, "--model", models["tied"], "-o", ref, "--window", 40, "-q", "--summary", d / "ref.json"])
    assert r.exit_code == 0, r.output
    return {"dir": d, "input": inp, "ref": pq.read_table(ref), "model": models["tied"],
            "ref_summary": json.load(open(d / "ref.json"))}


def _run(data, inp, out, cache=None, *extra):
    args = ["run", inp, "--model", data["model"], "-o", out, "--window", 40, "-q", "--summary", f"{out}.json",
            *extra]
    if cache is not None:
        args += ["--cache", cache]
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    return pq.read_table(out), json.load(open(f"{out}.json"))


def assert_same(got: pa.Table, ref: pa.Table, tol: float = TOL):
    """Rows, order, ids and ranks equal; scores within the float32 bound."""
    assert got.column_names == ref.column_names and got.num_rows == ref.num_rows
    for c in ref.column_names:
        if c not in ("score", "rank"):
            assert got.column(c).equals(ref.column(c)), c
    np.testing.assert_allclose(got["score"].to_numpy(), ref["score"].to_numpy(), atol=tol, rtol=0)


def _unique(t: pa.Table) -> int:
    return len(set(zip(*(t.column(c).to_pylist() for c in ("instruction", "query", "document")))))


def _cache_files(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.rbc"))


# -- parity on real data --------------------------------------------------------------------------

def test_dedup_scores_each_distinct_text_once_and_equals_the_reference(data):
    """Real RAR-b pairs with exact repeats (and copies under other ids): each text is computed once,
    every row gets its score, and the scores are the reference recipe's."""
    s = data["ref_summary"]
    t = pq.read_table(data["input"])
    assert s["duplicate_pairs"] == t.num_rows - _unique(t) > 0
    assert s["pairs_computed"] == _unique(t) and s["pairs_from_cache"] == 0
    assert s["pairs_scored"] == s["pairs_this_run"] == t.num_rows  # every row scored, progress counted all
    got = data["ref"]
    key = list(zip(*(got.column(c).to_pylist() for c in ("instruction", "query", "document"))))
    by_text = {}
    for k, sc in zip(key, got["score"].to_pylist()):
        assert by_text.setdefault(k, sc) == sc  # repeats carry the very same score
    ins, qs, ds = zip(*key)
    ref = reference_scores(data["model"], ins, qs, ds)
    np.testing.assert_allclose(got["score"].to_numpy(), ref, atol=TOL, rtol=0)


def test_copies_under_other_ids_count_as_duplicates(data, tmp_path):
    t = pq.read_table(data["input"]).slice(0, 40)
    copy = t.set_column(t.column_names.index("doc_id"), "doc_id",
                        pa.array([f"copy-{x}" for x in t.column("doc_id").to_pylist()], t.schema.field("doc_id").type))
    both = pa.concat_tables([t, copy])
    inp = tmp_path / "dup.parquet"
    pq.write_table(both, inp)
    got, s = _run(data, inp, tmp_path / "o.parquet", None, "--window", 80)
    assert s["duplicate_pairs"] == 80 - _unique(t) and s["pairs_computed"] == _unique(t)
    scores = dict(zip(got.column("doc_id").to_pylist(), got["score"].to_pylist()))
    assert all(scores[f"copy-{d}"] == scores[d] for d in t.column("doc_id").to_pylist())


def test_cached_rerun_equals_the_uncached_run(data, tmp_path):
    cache = tmp_path / "cache"
    first, s1 = _run(data, data["input"], tmp_path / "a.parquet", cache)
    assert first.equals(data["ref"])  # an empty cache changes nothing
    assert (s1["pairs_computed"], s1["pairs_from_cache"]) == (data["ref_summary"]["pairs_computed"], 0)
    again, s2 = _run(data, data["input"], tmp_path / "b.parquet", cache)
    assert_same(again, data["ref"])
    assert s2["pairs_computed"] == 0 and s2["pairs_from_cache"] == s1["pairs_computed"]
    assert s2["duplicate_pairs"] == s1["duplicate_pairs"]
    assert s2["pairs_this_run"] == s2["pairs_scored"] == data["ref"].num_rows  # hits count as done
    assert s2["batches"] == 0 and s2["tokens"] == 0  # nothing went through the model


def test_nested_input_cached_rerun_equals_the_uncached_run(data, tmp_path):
    inp = tmp_path / "nested.parquet"
    pq.write_table(pq.read_table(shared("ARC-Challenge.nested.parquet")).slice(0, 30), inp)  # lists of 3-5
    ref, s0 = _run(data, inp, tmp_path / "ref.parquet")
    _run(data, inp, tmp_path / "a.parquet", tmp_path / "cache")
    got, s = _run(data, inp, tmp_path / "b.parquet", tmp_path / "cache")
    assert s["pairs_computed"] == 0 and s["pairs_from_cache"] == s0["pairs_computed"] > 100
    assert_same(got, ref)


def test_grown_input_scores_only_the_new_pairs(data, tmp_path):
    """The nightly case: last night's pairs plus new ones; only the new ones are computed."""
    cache = tmp_path / "cache"
    _run(data, data["input"], tmp_path / "a.parquet", cache)
    old = pq.read_table(data["input"])
    new = real_pairs(100)
    new_rows = new.filter(pa.array([d not in set(old.column("doc_id").to_pylist())
                                    for d in new.column("doc_id").to_pylist()]))
    grown = pa.concat_tables([old, new_rows])
    inp = tmp_path / "grown.parquet"
    pq.write_table(grown, inp)
    fresh, _ = _run(data, inp, tmp_path / "fresh.parquet")
    got, s = _run(data, inp, tmp_path / "cached.parquet", cache)
    assert s["pairs_from_cache"] == _unique(old)
    assert s["pairs_computed"] == _unique(grown) - _unique(old)
    assert_same(got, fresh)


def test_a_changed_weight_file_never_hits(data, tmp_path):
    cache = tmp_path / "cache"
    _run(data, data["input"], tmp_path / "a.parquet", cache)
    changed = tmp_path / "model"
    shutil.copytree(data["model"], changed)
    w = changed / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # one bit of one weight, far from any sample a quick hash reads
    w.write_bytes(bytes(raw))
    r = run_cli(["run", data["input"], "--model", changed, "-o", tmp_path / "b.parquet", "--window", 40, "-q",
                 "--cache", cache, "--summary", tmp_path / "b.json"])
    assert r.exit_code == 0, r.output
    s = json.load(open(tmp_path / "b.json"))
    assert s["pairs_from_cache"] == 0 and s["pairs_computed"] == data["ref_summary"]["pairs_computed"]
    # The same bytes at another path are the same model.
    same = tmp_path / "same"
    shutil.copytree(data["model"], same)
    r = run_cli(["run", data["input"], "--model", same, "-o", tmp_path / "c.parquet", "--window", 40, "-q",
                 "--cache", cache, "--summary", tmp_path / "c.json"])
    assert r.exit_code == 0, r.output
    assert json.load(open(tmp_path / "c.json"))["pairs_computed"] == 0


# -- the key ---------------------------------------------------------------------------------------

class _Kind:
    def __init__(self, family="yes-no", template=None, num_labels=0):
        from pipeline.engines.template import QWEN3_RERANKER

        self.family, self.num_labels = family, num_labels
        self.template = QWEN3_RERANKER if template is None else template


def _scope(model, kind=None, dtype="float32", **kw):
    return make_scope(RunConfig(inputs=(), model=model, **kw), kind or _Kind(), dtype).id


@pytest.mark.parametrize("change", [
    dict(dtype="bfloat16"), dict(kw=dict(max_length=512)), dict(kw=dict(activation="none")),
    dict(kind="seq-cls-causal"), dict(template="bge"),
])
def test_what_decides_a_score_is_in_the_scope(tied_model, change):
    from pipeline.engines.template import BGE_RERANKER_V2_GEMMA

    base = _scope(tied_model)
    kind = _Kind(family=change.get("kind", "yes-no"),
                 template=BGE_RERANKER_V2_GEMMA if change.get("template") else None)
    assert _scope(tied_model, kind, change.get("dtype", "float32"), **change.get("kw", {})) != base


@pytest.mark.parametrize("kw", [dict(engine="transformers"), dict(attention="sdpa"), dict(prefix_sharing="on"),
                                dict(max_batch_tokens=512), dict(window_pairs=7), dict(device="cpu"),
                                dict(compile="off"), dict(instruction="another default"),
                                dict(cache="/elsewhere"), dict(commit_every=5.0)])
def test_what_leaves_scores_equal_is_not_in_the_scope(tied_model, kw):
    assert _scope(tied_model, **kw) == _scope(tied_model)


def test_pair_keys_separate_texts_and_group_queries():
    s = b"s" * 16
    hi, lo = pair_keys(s, ["i", "i", "i", "i", "i"], ["q", "q", "qq", "q", "q"], ["ab", "a", "b", "b", "ab"])
    keys = list(zip(hi.tolist(), lo.tolist()))
    assert keys[0] == keys[4] and len(set(keys)) == 4  # same text, same key; else distinct
    assert hi[0] >> 32 == hi[1] >> 32 == hi[3] >> 32 != hi[2] >> 32  # a query's documents share the top bits
    # the boundaries between the three texts count: ("q", "qab") is not ("qa", "b")
    h2, l2 = pair_keys(s, ["i", "i"], ["qa", "q"], ["b", "ab"])
    assert (h2[0], l2[0]) != (h2[1], l2[1])
    assert pair_keys(b"t" * 16, ["i"], ["q"], ["ab"])[1][0] != lo[0]  # another scope, another key


def test_model_hashes_follow_the_bytes_not_the_clock(tied_model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    m = tmp_path / "m"
    shutil.copytree(tied_model, m)
    first = model_identity(str(m))
    assert (tmp_path / "xdg" / "rerank-batch" / "file-hashes.json").exists()  # remembered
    w = m / "model.safetensors"
    st = os.stat(w)
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0xFF
    w.write_bytes(bytes(raw))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only ctime moved
    assert model_identity(str(m))["model.safetensors"] != first["model.safetensors"]
    assert {k: v for k, v in model_identity(str(m)).items() if k != "model.safetensors"} == \
        {k: v for k, v in first.items() if k != "model.safetensors"}


# -- files, damage, merges --------------------------------------------------------------------------

def _keys(n, seed=0, per_query=4):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2**32, -(-n // per_query), dtype=np.uint64)
    hi = (np.repeat(q, per_query)[:n] << np.uint64(32)) | rng.integers(0, 2**32, n, dtype=np.uint64)
    lo = rng.integers(0, 2**63, n, dtype=np.uint64)
    return hi, lo, rng.random(n).astype(np.float32)


def _cache(tmp_path, name="c"):
    loc = str(tmp_path / name)
    prepare(loc)
    return PairCache(loc, Scope(b"\x07" * 16, {}, {"path": "m", "name": "m"}))


def test_a_file_is_read_only_where_the_keys_can_be(tmp_path):
    c = _cache(tmp_path)
    hi, lo, sc = _keys(200_000, per_query=100)
    c.add(hi, lo, sc)
    h = next(iter(c.files.headers.values()))
    assert c.files.memory < 0.5 * h.n  # the reader holds ~0.3 byte an entry, not the keys (16 bytes)
    pick = np.arange(500, 600)  # one query's documents
    found, got = c.lookup(hi[pick], lo[pick])
    assert found.all() and np.array_equal(got, sc[pick])
    assert c.files.blocks_read <= 3  # one query: its block or two, not the file
    miss_hi, miss_lo, _ = _keys(10_000, seed=5)
    before = c.files.blocks_read
    assert not c.lookup(miss_hi, miss_lo)[0].any()
    assert c.files.blocks_read - before < 500  # the filter answers most misses without a read
    c.close()


def test_damaged_files_are_skipped_never_read_wrong(tmp_path, caplog):
    c = _cache(tmp_path)
    parts = [_keys(3000, seed=s) for s in range(3)]
    for hi, lo, sc in parts:
        c.add(hi, lo, sc)
    names = sorted(c.files.headers)
    folder = tmp_path / "c" / c.scope.hex
    c.close()
    # one byte of a score changed, one file cut short, one replaced by garbage of the same name
    h0 = c.files.headers.get(names[0]) or segment.decode_header(names[0], (folder / names[0]).read_bytes(),
                                                                (folder / names[0]).stat().st_size)
    raw = bytearray((folder / names[0]).read_bytes())
    raw[h0.header_bytes + 64 * 8 * 2 + 3] ^= 0x10  # inside the scores of the first block
    (folder / names[0]).write_bytes(bytes(raw))
    with open(folder / names[1], "r+b") as f:
        f.truncate((folder / names[1]).stat().st_size - 24)
    (folder / names[2]).write_bytes(b"RBCACHE1" + os.urandom(500))
    caplog.set_level(logging.WARNING, logger="pipeline.cache")
    d = PairCache(str(tmp_path / "c"), c.scope)
    for _ in range(2):  # reported once, however often it is met
        for hi, lo, sc in parts:
            found, got = d.lookup(hi, lo)
            assert not found.any()
    msgs = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(msgs) == 3 and all("is skipped and its pairs are scored again" in m for m in msgs)
    assert any("block checksum mismatch" in m for m in msgs)
    assert any("truncated or appended to" in m for m in msgs)
    d.close()
    # prune removes them, and nothing else
    r = run_cli(["cache", "prune", tmp_path / "c"])
    assert r.exit_code == 0, r.output
    assert "3 damaged file(s)" in r.output
    assert list(folder.glob("*.rbc")) == []


def test_a_folder_in_place_of_a_file_is_skipped_and_left_alone(tmp_path, caplog):
    """Opening a folder succeeds and only its reads fail (EISDIR): that error disabled the whole
    cache for a run, and `cache prune` failed on it every time."""
    c = _cache(tmp_path)
    parts = [_keys(2000, seed=s) for s in range(2)]
    for hi, lo, sc in parts:
        c.add(hi, lo, sc)
    names = sorted(c.files.headers)
    folder = tmp_path / "c" / c.scope.hex
    c.close()
    (folder / names[0]).unlink()
    (folder / names[0]).mkdir()
    (folder / names[0] / "theirs.txt").write_text("x")
    caplog.set_level(logging.WARNING, logger="pipeline.cache")
    d = PairCache(str(tmp_path / "c"), c.scope)
    hits = [d.lookup(hi, lo)[0] for hi, lo, _ in parts]
    assert sum(h.all() for h in hits) == 1 and sum(h.any() for h in hits) == 1  # the other file still serves
    served = 1 if hits[1].all() else 0
    found, got = d.lookup(parts[served][0], parts[served][1])
    assert found.all() and np.array_equal(got, parts[served][2])
    assert any("it is not a regular file" in r.getMessage() for r in caplog.records)
    d.close()
    r = run_cli(["cache", "prune", tmp_path / "c"])
    assert r.exit_code == 0, r.output
    assert (folder / names[0] / "theirs.txt").read_text() == "x"
    assert "is a folder, not a cache file; it is left in place" in r.output


def test_a_file_from_another_scope_is_not_used(tmp_path, caplog):
    c = _cache(tmp_path)
    hi, lo, sc = _keys(1000)
    c.add(hi, lo, sc)
    other = PairCache(c.location, Scope(b"\x08" * 16, {}, {"path": "m2", "name": "m2"}))
    src = tmp_path / "c" / c.scope.hex
    dst = tmp_path / "c" / other.scope.hex
    dst.mkdir()
    for f in src.glob("*.rbc"):
        shutil.copy(f, dst / f.name)
    caplog.set_level(logging.WARNING, logger="pipeline.cache")
    assert not other.lookup(hi, lo)[0].any()
    assert any("belongs to another scope" in r.getMessage() for r in caplog.records)
    c.close()
    other.close()


def test_writes_merge_as_tiers_fill_and_lose_nothing(tmp_path):
    from pipeline.cache import compact

    c = _cache(tmp_path)
    chunks = [_keys(1000, seed=s) for s in range(2 * compact.FANOUT + 3)]
    for hi, lo, sc in chunks:
        c.add(hi, lo, sc)
    c.add(*chunks[0])  # the same keys again: one entry per key after merges
    assert c.stats["merges"] >= 2
    c.files.refresh()
    assert len(c.files.headers) < compact.FANOUT
    hi = np.concatenate([k[0] for k in chunks])
    lo = np.concatenate([k[1] for k in chunks])
    sc = np.concatenate([k[2] for k in chunks])
    found, got = c.lookup(hi, lo)
    assert found.all() and np.array_equal(got, sc)
    r = run_cli(["cache", "prune", tmp_path / "c"])
    assert r.exit_code == 0, r.output
    c.files.refresh()
    assert sum(h.n for h in c.files.headers.values()) == len(set(zip(hi.tolist(), lo.tolist())))
    found, got = c.lookup(hi, lo)
    assert found.all() and np.array_equal(got, sc)
    c.close()


def test_a_merge_holds_one_key_range_at_a_time(tmp_path, monkeypatch):
    """A merge's memory follows PART, not the entries merged: its outputs are cut into key ranges
    of at most PART entries that do not overlap, and merging the same entries in ranges of an
    eighth of them peaks well under half the memory of one range."""
    import tracemalloc

    from pipeline.cache import compact

    chunks = [_keys(20_000, seed=s) for s in range(compact.FANOUT - 1)]

    def merged(part, name):
        monkeypatch.setattr(compact, "PART", part)
        c = _cache(tmp_path, name)
        for k in chunks:  # fewer runs than a tier holds: written as files, not merged yet
            c.add(*k)
        assert c.stats["merges"] == 0
        names = sorted(c.files.headers)
        tracemalloc.start()
        try:
            compact.merge(c.files, names, c.store, c.scope.id)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        c.files.refresh()
        return c, peak

    whole, whole_peak = merged(len(chunks) * 20_000, "whole")
    cut, cut_peak = merged(20_000, "cut")
    heads = sorted(cut.files.headers.values(), key=lambda h: h.min_hi)
    assert len(heads) >= len(chunks) - 1 and all(h.n <= 20_000 * 1.2 for h in heads)
    assert all(a.max_hi < b.min_hi for a, b in zip(heads, heads[1:]))
    assert cut_peak < whole_peak / 2, (cut_peak, whole_peak)
    hi, lo, sc = (np.concatenate([k[i] for k in chunks]) for i in range(3))
    for c in (whole, cut):
        found, got = c.lookup(hi, lo)
        assert found.all() and np.array_equal(got, sc)
        c.close()


def test_two_merges_of_the_same_files_at_once_lose_nothing(tmp_path):
    from pipeline.cache import compact

    a = _cache(tmp_path)
    chunks = [_keys(500, seed=s) for s in range(5)]
    for k in chunks:
        a.add(*k)
    b = PairCache(a.location, a.scope)
    b.files.refresh()  # b has listed and opened the same files
    names = sorted(a.files.headers)
    compact.merge(a.files, names, a.store, a.scope.id)  # a merges them and deletes them...
    compact.merge(b.files, names, b.store, b.scope.id)  # ...b merges its open copies too
    fresh = PairCache(a.location, a.scope)
    hi, lo, sc = (np.concatenate([k[i] for k in chunks]) for i in range(3))
    found, got = fresh.lookup(hi, lo)
    assert found.all() and np.array_equal(got, sc)
    fresh.files.refresh()
    assert len(fresh.files.headers) == 2  # the two outputs, same entries: the next merge folds them
    for x in (a, b, fresh):
        x.close()


def test_a_merge_leaves_a_damaged_input_out(tmp_path, caplog):
    from pipeline.cache import compact

    c = _cache(tmp_path)
    chunks = [_keys(500, seed=s) for s in range(3)]
    for k in chunks:
        c.add(*k)
    name = next(n for n, h in c.files.headers.items() if h.min_hi == int(chunks[1][0].min()))  # chunk 1's file
    path = tmp_path / "c" / c.scope.hex / name
    raw = bytearray(path.read_bytes())
    raw[-30] ^= 0x01
    path.write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, logger="pipeline.cache")
    res = compact.merge_all(c.files, c.store, c.scope.id)
    assert res["entries_out"] == 1000
    fresh = PairCache(c.location, c.scope)
    for i, (hi, lo, sc) in enumerate(chunks):
        found, got = fresh.lookup(hi, lo)
        assert found.all() == (i != 1) and np.array_equal(got[found], sc[found])
    c.close()
    fresh.close()


# -- the location and the commands ------------------------------------------------------------------

def test_cache_location_errors(data, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (foreign, f"--cache {foreign}: not a rerank-batch cache and not empty (holds notes.txt); pass a new or "
                  "empty directory or prefix"),
        (a_file, f"--cache {a_file}: is a file; pass a directory (or an object-storage prefix)"),
        (tmp_path / "no" / "such", f"--cache {tmp_path / 'no' / 'such'}: the directory {tmp_path / 'no'} does not "
                                   "exist; create it or pass another --cache"),
    ]
    for loc, msg in cases:
        r = run_cli(["run", data["input"], "--model", data["model"], "-o", tmp_path / "o.parquet", "--cache", loc])
        assert r.exit_code == 2, r.output
        assert msg in r.output
        assert "Traceback" not in r.output
    assert os.listdir(foreign) == ["notes.txt"]
    assert not (tmp_path / "o.parquet.ckpt").exists() and not (tmp_path / "o.parquet").exists()


def test_an_empty_cache_location_is_no_cache(tmp_path):
    assert RunConfig(inputs=(), cache="").cache is None
    assert RunConfig(inputs=(), cache=tmp_path / "c").cache == str(tmp_path / "c")  # a path-like, as a string


def test_the_cache_comes_from_the_environment_too(data, tmp_path):
    cache = tmp_path / "envcache"
    r = run_cli(["run", data["input"], "--model", data["model"], "-o", tmp_path / "o.parquet", "--window", 40, "-q"],
                env={"RERANK_BATCH_CACHE": str(cache)})
    assert r.exit_code == 0, r.output
    assert _cache_files(cache)
    r = run_cli(["run", "--help"], terminal_width=200)
    assert "RERANK_BATCH_CACHE" in r.output


def test_stats_and_prune(data, tmp_path):
    cache = tmp_path / "cache"
    _run(data, data["input"], tmp_path / "a.parquet", cache)
    _run(data, data["input"], tmp_path / "b.parquet", cache, "--max-length", 512)
    n = data["ref_summary"]["pairs_computed"]
    r = run_cli(["cache", "stats", cache, "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["entries"] == 2 * n and len(st["models"]) == 2 and st["damaged"] == 0
    assert sorted(m["max_length"] for m in st["models"]) == [512, 8192]
    assert {m["model_path"] for m in st["models"]} == {os.path.abspath(data["model"])}
    r = run_cli(["cache", "stats", cache])
    assert r.exit_code == 0 and f"{2 * n:,} entries" in r.output and "float32" in r.output
    # --older-than a date in the past removes nothing; tomorrow's date removes everything
    r = run_cli(["cache", "prune", cache, "--older-than", "2001-01-01"])
    assert r.exit_code == 0 and "0 older entries" in r.output, r.output
    r = run_cli(["cache", "prune", cache, "--model", data["model"]])
    assert r.exit_code == 0, r.output
    assert r.output.count("removed model ") == 2 and f"removed {2 * n:,} entries of removed models" in r.output
    assert json.loads(run_cli(["cache", "stats", cache, "--json"]).output)["entries"] == 0
    _run(data, data["input"], tmp_path / "c.parquet", cache)
    import datetime

    tomorrow = (datetime.date.today() + datetime.timedelta(days=1)).isoformat()
    r = run_cli(["cache", "prune", cache, "--older-than", tomorrow])
    assert r.exit_code == 0 and f"{n:,} older entries" in r.output, r.output
    assert _cache_files(cache) == [] and os.listdir(cache) == [".rerank-batch-cache"]


@pytest.mark.parametrize("args,msg", [
    (["stats", "{tmp}"], "{tmp}: not a rerank-batch cache (no readable .rerank-batch-cache); check the location "
                         "(a run makes one with --cache)"),
    (["prune", "{cache}", "--older-than", "last week"], "--older-than 'last week': not a date or an age; write it "
                                                        "like 2026-01-31, 2026-01-31T12:00 or 30d"),
    (["prune", "{cache}", "--model", "nobody/nothing"], "--model nobody/nothing: no model in the cache {cache} "
                                                        "matches it; `rerank-batch cache stats` lists them"),
])
def test_cache_command_errors(tmp_path, args, msg):
    cache = tmp_path / "cache"
    prepare(str(cache))
    fill = lambda s: s.format(tmp=tmp_path, cache=cache)  # noqa: E731
    r = run_cli(["cache", *map(fill, args)])
    assert r.exit_code == 2, r.output
    assert fill(msg) in r.output and "Traceback" not in r.output


def test_prepare_takes_an_empty_directory_and_marks_it(tmp_path):
    (tmp_path / "empty").mkdir()
    prepare(str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == [".rerank-batch-cache"]
    prepare(str(tmp_path / "empty"))  # ours now: taken again
    (tmp_path / "empty" / ".rerank-batch-cache").write_text("{}")
    with pytest.raises(InputError, match="unreadable or of another version"):
        prepare(str(tmp_path / "empty"))


# -- resume ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first,second", [(False, True), (True, False), (True, True)])
def test_a_stopped_run_resumes_the_same_checkpoint_with_or_without_the_cache(data, tmp_path, first, second):
    from pipeline.errors import Interrupted
    from pipeline.run import run

    cache = str(tmp_path / "cache")
    out = tmp_path / "out.parquet"
    # Units of 10 and 40 pairs (rows 0-39, 40-49, 50-89, ...), batches of a few pairs: the stop
    # comes inside the unit of rows 100-139, whose pairs scored so far are committed as a partial.
    cfg = RunConfig(inputs=(str(data["input"]),), output=str(out), model=data["model"], window_pairs=40,
                    max_batch_tokens=512, cache=cache if first else None)
    with pytest.raises(Interrupted):
        run(cfg, progress=False, **stop_after_pairs(110))
    assert os.listdir(tmp_path / "out.parquet.ckpt" / "partial")
    import dataclasses

    s = run(dataclasses.replace(cfg, cache=cache if second else None), progress=False)
    assert s.units_resumed >= 1 or s.pairs_resumed  # the checkpoint was taken up, not refused or restarted
    assert_same(pq.read_table(out), data["ref"])
    assert s.pairs_resumed + s.pairs_this_run == data["ref"].num_rows
    if first and second:  # every unit reached the cache: the finished ones before the stop, and the
        # unfinished one with the pairs the stopped run committed for it
        again = run(dataclasses.replace(cfg, output=str(tmp_path / "again.parquet"), cache=cache), progress=False)
        assert again.pairs_computed == 0
        assert_same(pq.read_table(tmp_path / "again.parquet"), data["ref"])


# -- long documents as windows (--chunk-tokens) -------------------------------------------------------

@pytest.fixture(scope="module")
def windows(tmp_path_factory, models):
    """Real pairs whose documents split into windows of 12 tokens, with copies of 10 rows under
    other ids in the same unit of 30 rows; the reference recipe's score of every window."""
    from test_chunks import M, N, reference_windows

    d = tmp_path_factory.mktemp("cache-windows")
    src = real_pairs(20)  # 60 real pairs
    copy = src.slice(0, 10)
    copy = copy.set_column(copy.column_names.index("doc_id"), "doc_id",
                           pa.array([f"copy-{x}" for x in copy.column("doc_id").to_pylist()],
                                    copy.schema.field("doc_id").type))
    t = pa.concat_tables([src.slice(0, 20), copy, src.slice(20)])  # units: rows 0-29, 30-59, 60-69
    inp = d / "in.parquet"
    pq.write_table(t, inp, row_group_size=30)
    model = models["tied"]
    instr, queries, docs = (t.column(c).to_pylist() for c in ("instruction", "query", "document"))
    per_row = reference_windows(model, docs, N, M)
    texts = [(i, q, w) for i, q, ws in zip(instr, queries, per_row) for w in ws]
    distinct = sorted(set(texts))
    ref = dict(zip(distinct, reference_scores(model, *zip(*distinct)).tolist()))
    return {"dir": d, "input": inp, "table": t, "model": model, "texts": texts,
            "ref": [[ref[(i, q, w)] for w in ws] for i, q, ws in zip(instr, queries, per_row)],
            "args": ["--chunk-tokens", N, "--chunk-overlap", M, "--window", 30]}


def _windows_run(w, out, cache=None, *extra):
    cs = f"{out}.cs.parquet"
    args = ["run", w["input"], "--model", w["model"], "-o", out, "-q", "--summary", f"{out}.json",
            "--chunk-scores", cs, *w["args"], *extra]
    if cache is not None:
        args += ["--cache", cache]
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    return pq.read_table(out), pq.read_table(cs), json.load(open(f"{out}.json"))


def _check_windows(w, got, cs):
    """Every row's windows scored as the reference on their text; the row's score their max."""
    by_doc = {r["doc_id"]: r for r in got.to_pylist()}
    flat = []
    for doc_id, ref in zip(w["table"].column("doc_id").to_pylist(), w["ref"]):
        row = by_doc[doc_id]
        assert row["chunks"] == len(ref)
        assert abs(row["score"] - max(ref)) <= TOL
        flat.extend(ref)
    np.testing.assert_allclose(cs.column("score").to_numpy(), np.array(flat, np.float32), atol=TOL, rtol=0)


def test_windows_repeated_in_a_unit_are_scored_once(windows, tmp_path):
    """Dedup works on the scored items, the windows: a repeated row's windows, and windows two
    documents share, are computed once; every row still gets all of its windows' scores."""
    got, cs, s = _windows_run(windows, tmp_path / "o.parquet")
    texts = windows["texts"]
    # Units of 30 rows; the copies (rows 20-29) repeat rows 0-9 of their unit.
    start = np.cumsum([0] + [len(r) for r in windows["ref"]])
    per_unit = [len(set(texts[start[a]:start[b]])) for a, b in ((0, 30), (30, 60), (60, 70))]
    assert s["pairs_scored"] == len(texts) and s["pairs_computed"] == sum(per_unit)
    assert s["duplicate_pairs"] == len(texts) - sum(per_unit) > 0
    _check_windows(windows, got, cs)


def test_windows_are_cached_by_their_text(windows, tmp_path):
    """A chunked rerun takes every window from the cache; a run of whole documents takes those
    whose document is one window (scored as itself either way); outputs equal uncached runs."""
    cache = tmp_path / "cache"
    first, cs1, s1 = _windows_run(windows, tmp_path / "a.parquet", cache)
    _check_windows(windows, first, cs1)
    assert s1["pairs_from_cache"] == 0
    again, cs2, s2 = _windows_run(windows, tmp_path / "b.parquet", cache)
    assert s2["pairs_computed"] == 0 and s2["pairs_from_cache"] == s1["pairs_computed"]
    assert s2["batches"] == 0 and s2["pairs_this_run"] == len(windows["texts"])
    _check_windows(windows, again, cs2)
    for c in ("chunks", "best_chunk", "doc_id"):
        assert again.column(c).equals(first.column(c)), c
    # Whole documents: a document of one window has the key of that window.
    whole, sw = _run({"model": windows["model"]}, windows["input"], tmp_path / "w.parquet", cache)
    t = windows["table"]
    one = {(i, q, d) for i, q, d, ref in zip(*(t.column(c).to_pylist() for c in ("instruction", "query", "document")),
                                              windows["ref"]) if len(ref) == 1}
    assert sw["pairs_from_cache"] == len(one) > 0
    plain, _ = _run({"model": windows["model"]}, windows["input"], tmp_path / "p.parquet")
    assert_same(whole, plain)


def test_a_stopped_chunked_run_resumes_with_the_cache(windows, tmp_path):
    from pipeline.errors import Interrupted
    from pipeline.run import run
    from test_chunks import M, N

    cache = str(tmp_path / "cache")
    out = tmp_path / "out.parquet"
    cfg = RunConfig(inputs=(str(windows["input"]),), output=str(out), model=windows["model"], window_pairs=30,
                    chunk_tokens=N, chunk_overlap=M, cache=cache, max_batch_tokens=512)
    with pytest.raises(Interrupted):
        run(cfg, progress=False, **stop_after_pairs(len(windows["texts"]) // 2))
    assert os.listdir(tmp_path / "out.parquet.ckpt" / "partial")  # windows of the unit in flight
    s = run(cfg, progress=False)
    assert s.units_resumed >= 1 or s.pairs_resumed
    got = pq.read_table(out)
    by_doc = {r["doc_id"]: r for r in got.to_pylist()}
    for doc_id, ref in zip(windows["table"].column("doc_id").to_pylist(), windows["ref"]):
        assert abs(by_doc[doc_id]["score"] - max(ref)) <= TOL
    import dataclasses

    again = run(dataclasses.replace(cfg, output=str(tmp_path / "again.parquet")), progress=False)
    assert again.pairs_computed == 0  # the stopped run's committed windows reached the cache too
