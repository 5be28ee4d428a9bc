"""`rerank-batch prepare`: pairs Parquet from BEIR folders and multiple-choice files."""

from __future__ import annotations

import os

import click

from .common import check_target, domain_errors, log_options, setup_logging, wrote


@click.group("prepare")
def prepare_cmd():
    """Build a pairs file for `rerank-batch run` from a common dataset layout."""


@prepare_cmd.command("beir")
@click.argument("beir_dir")
@click.option("--run", "run_path", required=True, help="TREC run file of first-stage candidates.")
@click.option("-o", "--output", required=True, help="Pairs Parquet to write.")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Keep the top K candidates per query.")
@click.option("--split", default=None, help="qrels/<split>.tsv gives the relevance column (it must exist). [default: "
              "test; a folder with no qrels/ gives null relevance]")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file.")
@log_options
def beir_cmd(beir_dir, run_path, output, depth, split, overwrite, quiet, verbose, log_level):
    """Pairs from a BEIR folder and a TREC run file (first-stage score and rank kept)."""
    setup_logging(verbose, quiet, log_level)
    # Loaded when the command runs, not at CLI start-up (the other commands and --help stay fast).
    from pipeline.evaluation.prepare import prepare_beir

    with domain_errors():
        reads = [run_path] + [os.path.join(beir_dir, n) for n in ("corpus.jsonl", "queries.jsonl")]
        reads += [os.path.join(beir_dir, "qrels", f"{split or 'test'}.tsv")]
        check_target(output, "-o", reads=reads, overwrite=overwrite)
        n = prepare_beir(beir_dir, run_path, output, depth=depth, split=split)
    wrote("%s (%d pairs)", output, n)


@prepare_cmd.command("mc")
@click.argument("path")
@click.option("-o", "--output", required=True, help="Pairs Parquet to write.")
@click.option("--qrels-out", default=None, help="Also write TREC qrels for `rerank-batch eval`.")
@click.option("--query-col", default="query", show_default=True, help="Question column.")
@click.option("--docs-col", default="documents", show_default=True, help="List-of-candidates column.")
@click.option("--label-col", default="label", show_default=True, help="Index (or list of indices) of the right one.")
@click.option("--id-col", default="query_id", show_default=True,
              help="Question id column; without it, ids are q0, q1, ... by row.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o or --qrels-out file.")
@log_options
def mc_cmd(path, output, qrels_out, query_col, docs_col, label_col, id_col, overwrite, quiet, verbose, log_level):
    """Pairs from a multiple-choice file (query, candidates, index of the right one)."""
    setup_logging(verbose, quiet, log_level)
    # Loaded when the command runs, not at CLI start-up (the other commands and --help stay fast).
    from pipeline.evaluation.prepare import prepare_mc

    with domain_errors():
        check_target(output, "-o", reads=[path], overwrite=overwrite)
        if qrels_out:
            check_target(qrels_out, "--qrels-out", reads=[path], writes=[output], overwrite=overwrite)
        n = prepare_mc(path, output, query_col=query_col, docs_col=docs_col, label_col=label_col, id_col=id_col,
                       qrels_out=qrels_out)
    wrote("%s (%d pairs)%s", output, n, f" and {qrels_out}" if qrels_out else "")
