"""`rerank-batch fuse`: one run from several (reciprocal rank fusion, CombSUM, CombMNZ)."""

from __future__ import annotations

import click

from .common import FiniteRange, JobError, check_target, domain_errors, log_options, setup_logging, wrote


@click.command("fuse")
@click.argument("runs", nargs=-1, required=True, metavar="RUN RUN [RUN ...]")
@click.option("--method", type=click.Choice(["rrf", "combsum", "combmnz"]), required=True,
              help="rrf: sum of 1/(k + rank); combsum: sum of normalized scores; combmnz: combsum times the "
              "number of runs that hold the document.")
@click.option("--k", type=FiniteRange(min=0), default=None,
              help="The k of rrf (default 60).")
@click.option("--norm", type=click.Choice(["minmax", "zscore", "none"]), default=None,
              help="Per-query score normalization of combsum and combmnz (default minmax).")
@click.option("-o", "--output", required=True, help="Fused run to write: Parquet (query_id, doc_id, score, rank), "
              "or a TREC run file when the name ends in .trec.")
@click.option("--tag", default=None, help="Run tag of a .trec output (default: the method).")
@click.option("--score-col", default="score", show_default=True, help="Score column of each Parquet RUN.")
@click.option("--query-id-col", default="query_id", show_default=True, help="Query id column of each Parquet RUN.")
@click.option("--doc-id-col", default="doc_id", show_default=True, help="Document id column of each Parquet RUN.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file.")
@log_options
def fuse_cmd(runs, method, k, norm, output, tag, score_col, query_id_col, doc_id_col, overwrite, quiet, verbose,
             log_level):
    """Fuse RUNs (scored Parquet files or TREC run files) per query over the union of their
    documents, e.g. the first stage with the reranked run."""
    setup_logging(verbose, quiet, log_level)
    # Loaded when the command runs, not at CLI start-up (the other commands and --help stay fast).
    from pipeline.evaluation.fusion import fuse_files

    with domain_errors():
        if len(runs) < 2:
            raise JobError("fuse needs two or more runs, e.g. the first-stage run and the reranked one", 2)
        if method == "rrf" and norm is not None:
            raise JobError("--norm applies to combsum and combmnz; rrf fuses ranks: drop --norm", 2)
        if method != "rrf" and k is not None:
            raise JobError("--k applies to rrf; combsum and combmnz fuse scores: drop --k", 2)
        if tag is not None and not output.endswith(".trec"):
            raise JobError("--tag names the run in a TREC file; end -o in .trec or drop --tag", 2)
        check_target(output, "-o", reads=runs, overwrite=overwrite)
        n = fuse_files(list(runs), output, method=method, k=60.0 if k is None else k, norm=norm or "minmax",
                       tag=tag or method, score_col=score_col, query_id_col=query_id_col, doc_id_col=doc_id_col)
    wrote("%s (%d documents, %s of %d runs)", output, n, method, len(runs))
