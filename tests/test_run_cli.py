"""`rerank-batch run` end to end: output schema, ranks, grouping, top-k, defaults, exit codes."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import ROOT, real_pairs, run_cli

SAMPLE = os.path.join(ROOT, "sample_data", "pairs.parquet")
TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")


def test_sample_command_writes_ranked_output(tmp_path):
    out = tmp_path / "ranked.parquet"
    summary = tmp_path / "s.json"
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "--summary", summary, "-q"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    src = pq.read_table(SAMPLE)
    assert t.schema.names == src.schema.names + ["score", "rank"]
    assert t.schema.field("score").type == pa.float32()
    assert t.schema.field("rank").type == pa.int32()
    assert sorted(t.column("doc_id").to_pylist()) == sorted(src.column("doc_id").to_pylist())
    s = json.loads(summary.read_text())
    assert s["rows"] == src.num_rows and s["pairs_scored"] == src.num_rows and s["tokens"] > 0
    assert not os.path.exists(str(out) + ".ckpt")  # removed on success


def _check_ranking(t: pa.Table, group_col: str, src_order: list):
    d = t.to_pydict()
    groups = d[group_col]
    # Groups come in order of first appearance in the input.
    seen = []
    for g in groups:
        if not seen or seen[-1] != g:
            assert g not in seen, "a group is split in the output"
            seen.append(g)
    assert seen == list(dict.fromkeys(src_order))
    # Within a group: ranks 1..n, scores non-increasing.
    for g in seen:
        idx = [i for i, x in enumerate(groups) if x == g]
        assert [d["rank"][i] for i in idx] == list(range(1, len(idx) + 1))
        sc = [d["score"][i] for i in idx]
        assert all(a >= b for a, b in zip(sc, sc[1:]))


def test_ranks_and_groups_on_real_data(tmp_path, tied_model):
    src = real_pairs(60)
    # Shuffle so that a query's candidates are scattered over several units.
    perm = np.random.default_rng(0).permutation(src.num_rows)
    src = src.take(pa.array(perm))
    inp = tmp_path / "in.parquet"
    pq.write_table(src, inp)
    out = tmp_path / "out.parquet"
    r = run_cli(["run", inp, "--model", tied_model, "-o", out, "--window", 25, "-q"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.num_rows == src.num_rows
    _check_ranking(t, "query_id", src.column("query_id").to_pylist())


def test_group_by_instruction_and_query_without_query_id(tmp_path, tied_model):
    src = real_pairs(40).drop_columns(["query_id"])
    inp = tmp_path / "in.parquet"
    pq.write_table(src, inp)
    out = tmp_path / "out.parquet"
    assert run_cli(["run", inp, "--model", tied_model, "-o", out, "-q"]).exit_code == 0
    t = pq.read_table(out)
    keys = [f"{i}\x00{q}" for i, q in zip(t.column("instruction").to_pylist(), t.column("query").to_pylist())]
    t = t.append_column("g", pa.array(keys))
    _check_ranking(t, "g", [f"{i}\x00{q}" for i, q in zip(src.column("instruction").to_pylist(),
                                                          src.column("query").to_pylist())])


def test_ties_keep_input_order(tmp_path, tied_model):
    # Identical pairs score identically; their ranks must follow input order.
    rows = [{"query_id": "a", "doc_id": f"d{i}", "query": "same query", "document": "same text"} for i in range(5)]
    inp = tmp_path / "ties.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp)
    out = tmp_path / "out.parquet"
    assert run_cli(["run", inp, "--model", tied_model, "-o", out, "-q", "--max-batch-tokens", 1]).exit_code == 0
    t = pq.read_table(out)
    assert t.column("doc_id").to_pylist() == [f"d{i}" for i in range(5)]
    assert t.column("rank").to_pylist() == [1, 2, 3, 4, 5]


def test_top_k_keeps_the_best_k_per_query(tmp_path, tied_model):
    src = real_pairs(40)
    inp = tmp_path / "in.parquet"
    pq.write_table(src, inp)
    full, top = tmp_path / "full.parquet", tmp_path / "top.parquet"
    assert run_cli(["run", inp, "--model", tied_model, "-o", full, "-q"]).exit_code == 0
    assert run_cli(["run", inp, "--model", tied_model, "-o", top, "-q", "--top-k", 2]).exit_code == 0
    f = pq.read_table(full).to_pylist()
    t = pq.read_table(top).to_pylist()
    assert t == [r for r in f if r["rank"] <= 2]
    assert max(r["rank"] for r in t) == 2
    assert len(t) < len(f)


def test_default_output_path_and_directory_input(tmp_path, tied_model):
    d = tmp_path / "in"
    d.mkdir()
    src = real_pairs(10)
    pq.write_table(src.slice(0, 15), d / "a.parquet")
    pq.write_table(src.slice(15), d / "b.parquet")
    r = run_cli(["run", d, "--model", tied_model, "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "in.reranked.parquet"  # beside the directory, never inside it
    assert pq.read_table(out).num_rows == src.num_rows
    # Rerunning refuses to clobber the output.
    r = run_cli(["run", d, "--model", tied_model, "-q"])
    assert r.exit_code == 2
    assert "the output exists; pass --overwrite" in r.output


def test_glob_input_and_custom_columns(tmp_path, tied_model):
    src = real_pairs(10).rename_columns(["qid", "doc_id", "instruction", "question", "answer", "relevance"])
    for i in range(3):
        pq.write_table(src.slice(i * 10, 10), tmp_path / f"part-{i}.parquet")
    out = tmp_path / "o.parquet"
    r = run_cli(["run", str(tmp_path / "part-*.parquet"), "--query-col", "question", "--doc-col", "answer",
                 "--model", tied_model, "-o", out, "-q"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.num_rows == 30 and "answer" in t.schema.names and "question" in t.schema.names


def test_cli_options_take_the_config_defaults_and_choices():
    """Defaults live once, in RunConfig: every option of `run` (and of `bench`) that fills a
    config field has that field's default, and the choices or range RunConfig checks."""
    import dataclasses

    import click

    from jobs.bench import bench_cmd
    from jobs.common import SizeType
    from jobs.run import run_cmd
    from pipeline.config import RunConfig

    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    seen = set()
    for cmd in (run_cmd, bench_cmd):
        for p in cmd.params:
            f = fields.get(p.name)
            if f is None or not isinstance(p, click.Option) or (cmd is bench_cmd and p.name == "window"):
                continue
            seen.add(p.name)
            assert p.default == f.default, (cmd.name, p.name)
            if "choices" in f.metadata:
                assert list(p.type.choices) == list(f.metadata["choices"]), p.name
            elif isinstance(p.type, SizeType):  # sizes like 4GiB: more than zero bytes
                assert f.metadata["at_least"] == 1, p.name
            elif f.metadata.get("whole"):
                assert isinstance(p.type, click.IntRange) and p.type.min == f.metadata["at_least"], p.name
            elif "at_least" in f.metadata:
                low = f.metadata["above"] if f.metadata["above"] is not None else f.metadata["at_least"]
                assert isinstance(p.type, click.FloatRange) and p.type.min == low, p.name
                assert p.type.min_open == (f.metadata["above"] is not None), p.name
            elif f.metadata.get("place"):  # a path or a URI, shown as such
                assert p.metavar == "LOCATION" and isinstance(p.type, click.types.StringParamType), p.name
    # Every config field but the inputs (the argument) is an option of `run`.
    assert seen >= set(fields) - {"inputs"}, sorted(set(fields) - {"inputs"} - seen)


def test_config_refuses_values_the_cli_would_refuse():
    """RunConfig is the one place a value is checked: made in Python, a bad enum or range value is
    the same one-line InputError naming the field, the value and what it takes."""
    import pytest

    from pipeline.config import RunConfig
    from pipeline.errors import InputError

    cases = [(dict(on_null="skipp"), "on_null='skipp': must be one of error, skip"),
             (dict(attention="bogus"), "attention='bogus': must be one of auto, flash_attn, torch_varlen, sdpa"),
             (dict(dtype="fp16"), "dtype='fp16': must be one of auto, bfloat16, float16, float32, fp8, fp8-fast"),
             (dict(executor="dask"), "executor='dask': must be one of local, ray"),
             (dict(max_length=4), "max_length=4: must be a whole number of at least 8"),
             (dict(empty_cache_every=-1), "empty_cache_every=-1: must be a whole number of at least 0"),
             (dict(cpus_per_worker=0), "cpus_per_worker=0: must be a number of at least 0.1"),
             (dict(gpus_per_worker=-1.0), "gpus_per_worker=-1.0: must be a number of at least 0"),
             (dict(commit_every=0), "commit_every=0: must be a number of seconds above 0"),
             (dict(overwrite="yes"), "overwrite='yes': must be True or False"),
             (dict(cache=5), "cache=5: must be a path or a URI (a string)")]
    for kw, message in cases:
        with pytest.raises(InputError) as exc:
            RunConfig(inputs=(), output="", **kw)
        assert str(exc.value) == message


def test_usage_errors_are_one_line_with_the_fix(tmp_path):
    """A value out of range, a misspelt option, a missing argument: one `Error:` line, exit 2,
    no usage block; nothing written."""
    out = tmp_path / "o.parquet"
    cases = [
        (["run", SAMPLE, "--model", TINY, "-o", out, "--max-length", "4"],
         "Error: Invalid value for '--max-length' (env var: 'RERANK_BATCH_MAX_LENGTH'): 4 is not in the range "
         "x>=8. Try 'rerank-batch run --help' for help."),
        (["run", SAMPLE, "--model", TINY, "-o", out, "--max-lenght", "512"],
         "Error: No such option '--max-lenght'. Did you mean '--max-length'? Try 'rerank-batch run --help' "
         "for help."),
        (["run"], "Error: Missing argument 'INPUT...'. Try 'rerank-batch run --help' for help."),
        (["cache", "stats"], "Error: Missing argument 'LOCATION'. Try 'rerank-batch cache stats --help' for help."),
        (["rerun"], "Error: No such command 'rerun'. Did you mean 'run'? Try 'rerank-batch --help' for help."),
    ]
    for args, line in cases:
        r = run_cli(args, prog_name="rerank-batch")
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [line]
    assert os.listdir(tmp_path) == []


def test_a_bare_group_still_prints_its_help():
    r = run_cli(["cache"], prog_name="rerank-batch")
    assert r.output.startswith("Usage: rerank-batch cache [OPTIONS] COMMAND [ARGS]...")
    assert "stats" in r.output and "prune" in r.output
