"""`rerank-batch export`: a scored Parquet file as a TREC run file."""

from __future__ import annotations

import click

from .common import check_target, domain_errors, log_options, setup_logging, wrote


@click.command("export")
@click.argument("scored")
@click.option("-o", "--output", required=True, help="TREC run file to write ('qid Q0 docid rank score tag').")
@click.option("--tag", default=None, help="The run tag (last field of each line; default: the file name of SCORED "
              "without extensions).")
@click.option("--score-col", default="score", show_default=True, help="Column that ranks the documents.")
@click.option("--query-id-col", default="query_id", show_default=True, help="Column that holds the query id.")
@click.option("--doc-id-col", default="doc_id", show_default=True, help="Column that holds the document id.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file.")
@log_options
def export_cmd(scored, output, tag, score_col, query_id_col, doc_id_col, overwrite, quiet, verbose, log_level):
    """Write SCORED (the output of `rerank-batch run`, or any run) as a TREC run file, ranked per
    query as `eval` ranks it: score descending, ties by document id descending."""
    setup_logging(verbose, quiet, log_level)
    # Loaded when the command runs, not at CLI start-up (the other commands and --help stay fast).
    from pipeline.evaluation.runs import export_trec

    with domain_errors():
        check_target(output, "-o", reads=[scored], overwrite=overwrite)
        n = export_trec(scored, output, tag=tag, score_col=score_col, query_id_col=query_id_col,
                        doc_id_col=doc_id_col)
    wrote("%s (%d lines)", output, n)
