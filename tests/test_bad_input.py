"""Bad input: a one-line error naming the file, column or row and the fix, exit status 2, no
traceback, no output file. Runtime failures: exit 1 with the message."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, real_pairs, run_cli
from forward_doubles import wrap_chosen

SAMPLE = os.path.join(ROOT, "sample_data", "pairs.parquet")
TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.parquet").write_bytes(b"this is not parquet at all\n" * 10)
    (d / "pairs.csv").write_text("query,document\nq,d\n")
    good = (d / "good.parquet")
    pq.write_table(real_pairs(5), good)
    data = good.read_bytes()
    (d / "truncated.parquet").write_bytes(data[: len(data) // 2])
    pq.write_table(pa.table({"query": ["q", "q"], "document": [1, 2]}), d / "intdoc.parquet")
    pq.write_table(pa.table({"query": ["q", "q", "q"], "document": ["a", None, "c"]}), d / "nulldoc.parquet")
    pq.write_table(pa.table({"query": ["q", None], "documents": [["a"], ["b", "c"]]}), d / "nullquery_nested.parquet")
    pq.write_table(pa.table({"query": ["q"], "documents": [[1, 2]]}), d / "intlist.parquet")
    pq.write_table(pa.table({"query": ["q"], "document": ["a"], "score": [0.5]}), d / "hasscore.parquet")
    pq.write_table(pa.table({"query": ["q"], "document": ["a"], "_ord": [7]}), d / "hasord.parquet")
    pq.write_table(pa.table({"q": ["x"], "d": ["y"]}), d / "othercols.parquet")
    (d / "emptydir").mkdir()
    pq.write_table(pa.Table.from_arrays([pa.array(["q"]), pa.array(["a"]), pa.array(["b"])],
                                        names=["query", "document", "document"]), d / "dupcols.parquet")
    bad_utf8 = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 2, 6], np.int32).tobytes()),
                                                     pa.py_buffer(b"okba\xff\xfe")])
    pq.write_table(pa.table({"query": ["q", "q"], "document": bad_utf8}), d / "badutf8.parquet")
    os.mkfifo(d / "fifo.parquet")
    pq.write_table(pa.table({"query_id": pa.array([None] * 4, pa.string()), "query": ["a", "b", "c", "d"],
                             "document": ["w", "x", "y", "z"]}), d / "nullqid.parquet")
    pq.write_table(pa.table({"query": ["q", "r"], "documents": [["a"], ["b", None]]}), d / "nullelem.parquet")
    pq.write_table(pa.table({"query_id": ["1"], "query": ["q"], "document": ["a"]}), d / "qid_str.parquet")
    pq.write_table(pa.table({"query_id": [1], "query": ["q"], "document": ["a"]}), d / "qid_int.parquet")
    # Nulls only in the 3rd row group: refused from the footer, before anything is scored.
    late = real_pairs(40).select(["query", "document"])
    late = late.set_column(1, "document", pa.array(late.column("document").to_pylist()[:-1] + [None]))
    pq.write_table(late, d / "late_null.parquet", row_group_size=16)
    (d / "ckfile").write_text("a file")
    (d / "same-template.json").write_text(json.dumps({"prefix": "", "body": "{query} {document}", "suffix": "",
                                                      "positive": "yes", "negative": "yes"}))
    notok = d / "notok"
    import shutil

    shutil.copytree(TINY, notok)
    for f in os.listdir(notok):
        if f.startswith("tokenizer") or f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            os.remove(notok / f)
    (d / "bad-template.json").write_text(json.dumps({"prefix": "", "body": "{query} {document}", "positive": "yes"}))
    # A model directory that is not a causal LM.
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text(json.dumps({
        "architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    # A Qwen3 model whose tokenizer has no single "yes"/"no" tokens.
    _model_without_yes_no(d / "noyes")
    return d


def _model_without_yes_no(path):
    import shutil

    from transformers import AddedToken, Qwen2Tokenizer

    shutil.copytree(TINY, path)
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    for f in os.listdir(path):
        if f.startswith("tokenizer") or f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            os.remove(path / f)
    tok.save_pretrained(str(path))


CASES = [
    (["run", "{d}/missing.parquet"], "{d}/missing.parquet: no such file or directory; check the path"),
    (["run", "{d}/*.nomatch"], "{d}/*.nomatch: no file matches this pattern; check the glob"),
    (["run", "{d}/emptydir"],
     "{d}/emptydir: the directory holds no *.parquet, *.jsonl or *.jsonl.gz file; pass a file or another directory"),
    (["run", "{d}/garbage.parquet"], "{d}/garbage.parquet: not a readable Parquet file ("),
    (["run", "{d}/truncated.parquet"], "{d}/truncated.parquet: not a readable Parquet file ("),
    (["run", "{d}/truncated.parquet"], "; check that the file is complete and is Parquet"),
    (["run", "{d}/pairs.csv"], "; rerank-batch reads Parquet (.parquet) and JSONL (.jsonl, .jsonl.gz): convert the "
     "file to one of them"),
    (["run", "{d}/othercols.parquet"],
     "{d}/othercols.parquet: no query column 'query' (columns: q, d); pass --query-col NAME"),
    (["run", "{d}/othercols.parquet", "--query-col", "q"],
     "{d}/othercols.parquet: no document column 'document' and no list column 'documents' (columns: q, d); "
     "pass --doc-col NAME or --docs-col NAME"),
    (["run", "{d}/intdoc.parquet"],
     "{d}/intdoc.parquet: column 'document' is int64, not string; cast it to string or pass --doc-col"),
    (["run", "{d}/intlist.parquet"],
     "{d}/intlist.parquet: column 'documents' is list<element: int64>, not a list of strings; cast it or pass --docs-col"),
    (["run", "{d}/nulldoc.parquet"],
     "{d}/nulldoc.parquet: row 1 (from 0): column 'document' is null; fill it, or pass --on-null skip to keep such rows unscored"),
    (["run", "{d}/nullquery_nested.parquet"],
     "{d}/nullquery_nested.parquet: row 1 (from 0): column 'query' is null; fill it, or pass --on-null skip"),
    (["run", "{d}/hasscore.parquet"],
     "{d}/hasscore.parquet: the input already has a column 'score', which the output adds; rename or drop it first"),
    (["run", "{d}/hasord.parquet"],
     "{d}/hasord.parquet: column '_ord' is a name rerank-batch uses internally; rename it first"),
    (["run", "{d}/good.parquet", "--instruction-col", "query"],
     "{d}/good.parquet: --instruction-col 'query' is also the query or document column; pass another --instruction-col"),
    (["run", "{d}/good.parquet", "-o", "{d}/good.parquet"],
     "{d}/good.parquet: the output is one of the inputs; pass another -o"),
    (["run", "{d}/good.parquet", "-o", "{d}/nodir/out.parquet"],
     "{d}/nodir/out.parquet: the directory {d}/nodir does not exist; create it or pass another -o"),
    (["run", "{d}/good.parquet", "-o", "/proc/out.parquet"],
     "/proc/out.parquet: cannot write in /proc ("),
    (["run", "{d}/good.parquet", "-o", "{d}"],
     "{d}/: the input {d}/good.parquet lies inside the output directory; pass another -o"),
    (["run", "{d}/good.parquet", "--model", "{d}/nomodel"],
     "model {d}/nomodel: no such directory; check the path (a hub id is org/name)"),
    (["run", "{d}/good.parquet", "--model", "{d}/bert"],
     "model {d}/bert: architecture BertForMaskedLM is neither a causal LM nor a sequence classifier, so it "
     "cannot be a reranker; pass a reranker model"),
    (["run", "{d}/good.parquet", "--model", "{d}/noyes"],
     "the tokenizer has no single token for 'yes', so this model is not a yes/no reranker of this template; "
     "pass a reranker model or another --template"),
    (["run", "{d}/good.parquet", "--template", "nope"],
     "unknown template 'nope'; use one of: bge-reranker-v2-gemma, qwen3-reranker, or a JSON template file"),
    (["run", "{d}/good.parquet", "--template", "{d}/bad-template.json"],
     "bad-template.json: the template needs string fields prefix, body, suffix, positive (missing suffix); add them"),
    (["run", "{d}/good.parquet", "--device", "cpu", "--attention", "flash_attn"],
     "--attention flash_attn needs CUDA and this run is on cpu; use --attention sdpa (or auto) on CPU"),
    (["run", "{d}/good.parquet", "--device", "cpu", "--gpu-memory-limit", "4GiB"],
     "--gpu-memory-limit applies to CUDA only; drop it or use --device cuda"),
    (["run", "{d}/good.parquet", "--gpu-memory-limit", "lots"], "'lots' is not a size; write it like 4GiB, 4096MiB or 3.5GB. Try '"),
    # a Parquet file may repeat a column name; the reader must not pick one silently
    (["run", "{d}/dupcols.parquet"], "{d}/dupcols.parquet: the column name 'document' appears more than once; "
     "rename the copies"),
    (["run", "{d}/badutf8.parquet"], "{d}/badutf8.parquet: row 1 (from 0): column 'document' is not valid UTF-8; "
     "re-encode the text as UTF-8"),
    # opening a pipe blocks until a writer comes: the run hung, and one SIGTERM did not end it
    (["run", "{d}/fifo.parquet"], "{d}/fifo.parquet: not a regular file (a pipe, socket or device); write the pairs "
     "to a file and pass that"),
    (["run", "{d}/good.parquet", "--summary", "{d}/fifo.parquet"],
     "--summary {d}/fifo.parquet: not a regular file (a pipe, socket or device); pass a file path"),
    (["run", "{d}/good.parquet", "--device", "tpu"], "--device 'tpu': not a device; use auto, cpu, cuda or cuda:N"),
    (["run", "{d}/good.parquet", "--device", "cuda:x"], "--device 'cuda:x': not a device; use auto"),
    (["run", "{d}/good.parquet", "--device", ""], "--device '': not a device; use auto"),
    (["run", "{d}/good.parquet", "--summary", "{d}/nodir/s.json"],
     "--summary {d}/nodir/s.json: the directory {d}/nodir does not exist; create it or pass another path"),
    (["run", "{d}/good.parquet", "--restart", "--checkpoint-dir", "{d}/ckfile"],
     "{d}/ckfile: the checkpoint directory is a file; pass a directory with --checkpoint-dir"),
    (["run", "{d}/good.parquet", "--max-length", "1000000"], "--max-length 1000000 exceeds the"),
    # finding 5
    (["run", "{d}/nullqid.parquet"], "{d}/nullqid.parquet: row 0 (from 0): column 'query_id' is null; fill it, or pass "
     "--on-null skip"),
    # finding 9: types across files and nulls from footers, before any scoring
    (["run", "{d}/qid_str.parquet", "{d}/qid_int.parquet"],
     "{d}/qid_int.parquet: column 'query_id' is int64, but string in {d}/qid_str.parquet; give files of one schema"),
    (["run", "{d}/late_null.parquet"], "{d}/late_null.parquet: row 119 (from 0): column 'document' is null; fill it"),
    # finding 14
    (["run", "{d}/nullelem.parquet"], "{d}/nullelem.parquet: row 1 (from 0), document 1: column 'documents' is null"),
    (["run", "{d}/good.parquet", "--model", "{d}/notok"], "model {d}/notok: no tokenizer files (tokenizer.json"),
    (["run", "{d}/good.parquet", "--template", "{d}/same-template.json"],
     "same-template.json: the template's positive and negative are both 'yes'; make them differ"),
    (["run", "{d}/good.parquet", "--gpu-memory-limit", "4GiB"],
     "--gpu-memory-limit applies to CUDA only, and --device auto found no GPU here; drop the option or pass "
     "--device cuda"),
    (["run", "{d}/good.parquet", "--max-length", "20"], "--max-length 20 leaves no room for the pair: the template alone takes"),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[c[1].split(":")[0][-30:] + str(i) for i, c in enumerate(CASES)])
def test_bad_input_exits_2_with_one_line(bad, tmp_path, args, expected):
    d = str(bad)
    args = [a.replace("{d}", d) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.parquet")]
    if "--model" not in args:
        args += ["--model", TINY]
    r = run_cli(args)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    assert expected.replace("{d}", d) in errors[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "out.parquet").exists()
    assert not (tmp_path / "out.parquet.ckpt").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_on_null_skip_keeps_rows_unscored(bad, tmp_path):
    out = tmp_path / "out.parquet"
    summary = tmp_path / "s.json"
    r = run_cli(["run", bad / "nulldoc.parquet", "--on-null", "skip", "--model", TINY, "-o", out,
                 "--summary", summary, "-q"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pylist()
    assert [row["document"] for row in t] == ["a", "c", None] or [row["document"] for row in t] == ["c", "a", None]
    assert t[-1]["score"] is None and t[-1]["rank"] is None
    assert sorted(row["rank"] for row in t[:2]) == [1, 2]
    assert json.loads(summary.read_text())["skipped_null"] == 1


def test_zero_rows_give_an_empty_output_with_the_schema(tmp_path):
    inp = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, 0), inp)
    out = tmp_path / "out.parquet"
    r = run_cli(["run", inp, "--model", TINY, "-o", out, "-q"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.num_rows == 0
    assert t.schema.names == pq.read_schema(SAMPLE).names + ["score", "rank"]
    # Nested form: the list column becomes document plus doc_index.
    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"query_id": pa.array([], pa.string()), "query": pa.array([], pa.string()),
                             "documents": pa.array([], pa.list_(pa.string()))}), nested)
    out2 = tmp_path / "out2.parquet"
    assert run_cli(["run", nested, "--model", TINY, "-o", out2, "-q"]).exit_code == 0
    assert pq.read_schema(out2).names == ["query_id", "query", "document", "doc_index", "score", "rank"]


def test_empty_strings_are_valid_pairs(tmp_path):
    inp = tmp_path / "e.parquet"
    pq.write_table(pa.table({"query": ["", "q", ""], "document": ["d", "", ""]}), inp)
    out = tmp_path / "o.parquet"
    assert run_cli(["run", inp, "--model", TINY, "-o", out, "-q"]).exit_code == 0
    scores = pq.read_table(out).column("score").to_pylist()
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)


def _oom_over(limit):
    """A fault that raises CUDA's OOM for batches of more than `limit` tokens."""
    def fault(batch, calls):
        if len(batch.ids) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return fault


def test_oom_splits_the_batch_and_loses_no_row(tmp_path, monkeypatch, tied_model):
    inp = tmp_path / "in.parquet"
    pq.write_table(real_pairs(50), inp)
    ref, out = tmp_path / "ref.parquet", tmp_path / "out.parquet"
    assert run_cli(["run", inp, "--model", tied_model, "-o", ref, "-q"]).exit_code == 0
    wrap_chosen(monkeypatch, _oom_over(700))
    s = tmp_path / "s.json"
    r = run_cli(["run", inp, "--model", tied_model, "-o", out, "-q", "--summary", s])
    assert r.exit_code == 0, r.output
    a, b = pq.read_table(ref), pq.read_table(out)
    assert a.column("doc_id").to_pylist() == b.column("doc_id").to_pylist()
    assert np.abs(a.column("score").to_numpy() - b.column("score").to_numpy()).max() <= 1e-6
    summary = json.loads(s.read_text())
    assert summary["oom_retries"] > 0 and summary["rows"] == 150
    assert summary["batch_token_budget"] <= 700


def test_a_pair_that_never_fits_is_a_runtime_error_exit_1(tmp_path, monkeypatch):
    wrap_chosen(monkeypatch, _oom_over(10))
    out = tmp_path / "out.parquet"
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "-q"])
    assert r.exit_code == 1
    assert "does not fit in GPU memory; lower --max-length or raise --gpu-memory-limit" in r.output
    assert "Traceback" not in r.output
    assert not out.exists()


def test_gpu_memory_held_by_another_process_is_one_line(tmp_path, monkeypatch):
    """An OOM while loading the model names the free memory and the fix."""
    from pipeline.engines import score

    def load(cfg, kind=None, *, logits=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (simulated)")

    monkeypatch.setattr(score, "load_engine", load)
    out = tmp_path / "out.parquet"
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "-q"])
    assert r.exit_code == 1, r.output
    assert ("the GPU has not enough free memory to load it; another process may hold it: free the GPU, pick "
            "another with --device cuda:N, or pass --device cpu") in r.output
    assert "Traceback" not in r.output
    assert sorted(os.listdir(tmp_path)) == []  # no output, no checkpoint


def test_output_name_not_utf8_is_refused_without_debris(tmp_path):
    out = os.path.join(str(tmp_path), "out\udcff.parquet")  # a non-UTF-8 byte, as Python decodes it
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "-q"])
    assert r.exit_code == 2, r.output
    assert "the output name is not valid UTF-8; rename it" in r.output
    assert os.listdir(tmp_path) == []


def test_full_output_disk_at_the_final_write_is_one_line_and_resumable(tmp_path, monkeypatch):
    import errno

    import pipeline.data.write as wmod

    real = wmod.pq.ParquetWriter

    class Full(real):
        def write_table(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wmod.pq, "ParquetWriter", Full)
    out = tmp_path / "out.parquet"
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "-q"])
    assert r.exit_code == 1, r.output
    assert ("out.parquet: cannot write the output (No space left on device); free space in "
            f"{tmp_path} and rerun the same command: the scores are kept in the checkpoint") in r.output
    assert "Traceback" not in r.output
    assert sorted(os.listdir(tmp_path)) == ["out.parquet.ckpt"]  # no temp output left
    monkeypatch.setattr(wmod.pq, "ParquetWriter", real)
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path)) == ["out.parquet"]


def test_files_with_the_same_columns_in_another_order_score_as_one(tmp_path, tied_model):
    """The same columns in another order passed the start's check, then failed mid-run with a
    ValueError from the cast; they are read in the first file's order."""
    from conftest import real_pairs, run_cli

    t = real_pairs(20)
    pq.write_table(t, tmp_path / "a.parquet")
    pq.write_table(t.select(list(reversed(t.column_names))), tmp_path / "b.parquet")
    both, one = tmp_path / "both.parquet", tmp_path / "one.parquet"
    r = run_cli(["run", tmp_path / "a.parquet", tmp_path / "b.parquet", "--model", tied_model, "-o", both, "-q"])
    assert r.exit_code == 0, r.output
    r = run_cli(["run", tmp_path / "a.parquet", "--model", tied_model, "-o", one, "-q"])
    assert r.exit_code == 0, r.output
    got, ref = pq.read_table(both), pq.read_table(one)
    assert got.num_rows == 2 * ref.num_rows and got.column_names == ref.column_names
    # One file and two are batched differently: float32 scores agree to the documented 1e-6.
    np.testing.assert_allclose(np.sort(got.column("score").to_numpy()),
                               np.sort(np.tile(ref.column("score").to_numpy(), 2)), atol=1e-6, rtol=0)


def test_string_view_columns_score_like_strings(tmp_path, tied_model):
    """Polars writes string views; Arrow's take has no kernel for them, so the final rank failed
    with a traceback after all the scoring."""
    from conftest import real_pairs, run_cli

    if not hasattr(pa, "string_view"):
        pytest.skip("this pyarrow has no string_view type")  # pyarrow < 16: such files cannot exist
    t = real_pairs(10)
    text = (pa.types.is_string, pa.types.is_large_string)
    views = pa.table({n: (t.column(n).cast(pa.string_view()) if any(f(t.column(n).type) for f in text)
                          else t.column(n)) for n in t.column_names})
    assert any(pa.types.is_string_view(f.type) for f in views.schema)
    pq.write_table(views, tmp_path / "v.parquet")
    pq.write_table(t, tmp_path / "s.parquet")
    for name in ("v", "s"):
        r = run_cli(["run", tmp_path / f"{name}.parquet", "--model", tied_model, "-o", tmp_path / f"{name}.out.parquet", "-q"])
        assert r.exit_code == 0, r.output
    got, ref = pq.read_table(tmp_path / "v.out.parquet"), pq.read_table(tmp_path / "s.out.parquet")
    assert got.column("score").to_pylist() == ref.column("score").to_pylist()
    assert got.column("rank").to_pylist() == ref.column("rank").to_pylist()


@pytest.mark.parametrize("extra", [[], ["--devices", "cpu,cpu"]])
def test_a_bad_thread_count_in_the_environment_is_one_line_before_any_work(bad, tmp_path, monkeypatch, extra):
    """RERANK_CPU_THREADS that is not a count is refused when the run is planned, before a model
    loads or a worker starts (every executor plans first), with no checkpoint or output left."""
    from pipeline.engines import resolve

    def no_model(*a, **k):
        raise AssertionError("the model was resolved before the environment was checked")

    monkeypatch.setattr(resolve, "resolve", no_model)
    monkeypatch.setenv("RERANK_CPU_THREADS", "four")
    out = tmp_path / "out.parquet"
    r = run_cli(["run", bad / "good.parquet", "--model", TINY, "-o", out, "--device", "cpu", *extra])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: RERANK_CPU_THREADS='four' is not a count of threads; set it to a whole number of "
                      "at least 1 (such as 4), or unset it"], r.output
    assert "Traceback" not in r.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out, ck", [("c6/", "c6/ck"), ("c5.parquet", "c5.parquet"), ("c7/", "c7")])
def test_a_checkpoint_dir_in_the_output_is_refused_before_anything_is_made(bad, tmp_path, out, ck):
    """The checkpoint folder was made first, and then blamed: `c6/: the directory is not empty
    (holds ck)`, with c6/ left behind."""
    r = run_cli(["run", f"{bad}/good.parquet", "--model", TINY, "-o", f"{tmp_path}/{out}", "--checkpoint-dir",
                 f"{tmp_path}/{ck}"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == (f"Error: --checkpoint-dir {tmp_path}/{ck}: is the output or lies "
                                                 "inside it; pass a directory beside the output")
    assert os.listdir(tmp_path) == []
