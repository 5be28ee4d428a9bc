"""`rerank-batch eval`: ranking metrics of a scored file against qrels, exact to trec_eval; with
several runs, each compared with the first (jobs/eval_runs.py)."""

from __future__ import annotations

import json

import click
import polars as pl

from pipeline.errors import InputError

from .common import FiniteRange, JobError, check_target, domain_errors, log_options, setup_logging, wrote


@click.command("eval")
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--qrels", default=None, help="TREC qrels ('qid 0 docid rel'), BEIR TSV, or Parquet "
              "(query_id, doc_id, relevance).")
@click.option("--relevance-col", default=None, help="Take relevance from this column of the RUN (one Parquet RUN) instead of --qrels.")
@click.option("--metrics", default="ndcg@10,map,mrr,p@1,recall@10", show_default=True,
              help="Comma-separated: ndcg, ndcg@k, map, map@k, mrr, mrr@k, recall@k, p@k.")
@click.option("--score-col", default="score", show_default=True, help="Score column of each Parquet RUN (the reranker's).")
@click.option("--baseline-col", default=None,
              help="Evaluate this column too (a first-stage score, or the input order) beside the scores.")
@click.option("--baseline-ascending", is_flag=True,
              help="Lower baseline values rank first (ranks, positions such as doc_index).")
@click.option("--query-id-col", default="query_id", show_default=True,
              help="Column of SCORED that holds the query id the qrels use.")
@click.option("--doc-id-col", default="doc_id", show_default=True,
              help="Column of SCORED that holds the document id the qrels use.")
@click.option("--json", "json_path", default=None, help="Write means (by metric name), per-query values and "
              "the comparisons here.")
@click.option("--plot", "plot_path", default=None, help="PNG of the per-query change of the first metric "
              "against the first RUN, or for one RUN against --baseline-col (needs matplotlib).")
@click.option("--name", "names", multiple=True, help="Name of a run in the table and the JSON (default: its "
              "file name without extensions); give it once per RUN, in order.")
@click.option("--permutations", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Sign flips the randomization test draws per comparison (every one when there are fewer).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomization test's draws.")
@click.option("--correction", type=click.Choice(["holm", "bonferroni", "none"]), default="holm", show_default=True,
              help="Correction of the p-values for the number of comparisons in the table (runs after the first "
              "times metrics).")
@click.option("--alpha", type=FiniteRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Significance level: corrected p-values below it are marked * in the table and the plot.")
@click.option("--test", type=click.Choice(["randomization", "ttest"]), default="randomization", show_default=True,
              help="The paired test whose corrected p-value marks significance (both are in --json).")
@log_options
def eval_cmd(runs, qrels, relevance_col, metrics, score_col, baseline_col, baseline_ascending, query_id_col,
             doc_id_col, json_path, plot_path, names, permutations, seed, correction, alpha, test, quiet, verbose,
             log_level):
    """Evaluate the ranking of each RUN against relevance judgments; with several, compare each
    with the first (paired tests). A RUN is a scored Parquet file (the output of `rerank-batch
    run`) or a TREC run file ('qid Q0 docid rank score tag')."""
    setup_logging(verbose, quiet, log_level)
    if len(runs) > 1:
        from .eval_runs import eval_runs

        return eval_runs(runs, names=names, qrels=qrels, relevance_col=relevance_col, metrics=metrics,
                         score_col=score_col, baseline_col=baseline_col, query_id_col=query_id_col,
                         doc_id_col=doc_id_col, json_path=json_path, plot_path=plot_path,
                         permutations=permutations, seed=seed, correction=correction, alpha=alpha, test=test)
    scored = runs[0]
    # Loaded when the command runs, not at CLI start-up (the other commands and --help stay fast).
    from pipeline.evaluation.metrics import evaluate, format_table, parse_metrics, plot_delta, read_qrels
    from pipeline.evaluation.runs import load_run, run_names

    with domain_errors():
        if (qrels is None) == (relevance_col is None):
            raise JobError("give exactly one of --qrels FILE and --relevance-col COL", 2)
        if plot_path and not baseline_col:
            raise JobError("--plot draws the change against a baseline; add --baseline-col COL", 2)
        for option, target in (("--json", json_path), ("--plot", plot_path)):
            if target:
                check_target(target, option, reads=[scored, qrels], writes=[json_path if option == "--plot" else None])
        ms = parse_metrics(metrics)
        name = run_names([scored], names)[0]
        # Each column with the option that named it, for the message when the file lacks it.
        cols = {score_col: "--score-col"}
        cols.update({c: o for c, o in ((baseline_col, "--baseline-col"), (relevance_col, "--relevance-col")) if c})
        run = load_run(scored, query_id_col, doc_id_col, cols)
        if relevance_col:
            dtype = run.schema[relevance_col]
            if not (dtype.is_integer() or dtype == pl.Boolean):
                raise InputError(f"{scored}: --relevance-col {relevance_col!r} holds {dtype}, not relevance grades; "
                                 "name a column of integers (0 = not relevant)")
            judgments = run.select("query_id", "doc_id", pl.col(relevance_col).cast(pl.Int64).alias("relevance"))
        else:
            judgments = read_qrels(qrels)
        means, per_q = evaluate(run, judgments, ms, score_col)
        if per_q.height == 0:  # only --qrels can miss: --relevance-col judges every query of SCORED
            raise InputError(f"{scored}: no query of the run is in the qrels; check --query-id-col and the qrels")
        base_means = base_per_q = None
        if baseline_col:
            base_means, base_per_q = evaluate(run, judgments, ms, baseline_col, descending=not baseline_ascending)
        if plot_path:
            plot_delta(per_q, base_per_q, ms[0].name, plot_path)
    where = f", relevance from column {relevance_col!r}" if relevance_col else " in both the run and the qrels"
    click.echo(format_table(means, base_means, per_q.height, where))
    if plot_path:
        wrote("%s (the per-query change of %s)", plot_path, ms[0].name)
    if json_path:
        record = dict(means)
        record["queries"] = per_q.height
        record["runs"] = {name: dict(means)}
        record["per_query"] = {r["query_id"]: {m.name: r[m.name] for m in ms} for r in per_q.iter_rows(named=True)}
        if base_means is not None:
            record["baseline"] = base_means
            record["delta"] = {k: means[k] - base_means[k] for k in means}
            record["baseline_per_query"] = {r["query_id"]: {m.name: r[m.name] for m in ms}
                                            for r in base_per_q.iter_rows(named=True)}
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
        wrote("%s", json_path)
