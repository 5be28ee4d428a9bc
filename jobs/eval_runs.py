"""`rerank-batch eval RUN RUN [...]`: several runs against the first, with significance tests."""

from __future__ import annotations

import json

import click

from pipeline.errors import InputError

from .common import JobError, check_target, domain_errors, wrote


def eval_runs(paths, *, names, qrels, relevance_col, metrics, score_col, baseline_col, query_id_col, doc_id_col,
              json_path, plot_path, permutations, seed, correction, alpha, test):
    """Evaluate every run, compare each after the first with the first; print the table."""
    # Loaded when the command runs, not at CLI start-up (the other commands and --help stay fast).
    from pipeline.evaluation.compare import compare, describe, format_comparison, plot_comparison
    from pipeline.evaluation.metrics import evaluate, parse_metrics, read_qrels
    from pipeline.evaluation.runs import read_run, run_names

    with domain_errors():
        if relevance_col:
            raise JobError("--relevance-col reads the judgments of one run; with several runs pass --qrels FILE", 2)
        if qrels is None:
            raise JobError("give --qrels FILE: several runs are judged against one set of qrels", 2)
        if baseline_col:
            raise JobError("--baseline-col compares two columns of one run; with several runs the first RUN is "
                           "the baseline: drop --baseline-col", 2)
        for option, target in (("--json", json_path), ("--plot", plot_path)):
            if target:
                check_target(target, option, reads=[*paths, qrels], writes=[json_path if option == "--plot" else None])
        ms = parse_metrics(metrics)
        labels = run_names(list(paths), names)
        judgments = read_qrels(qrels)
        means, per_q = {}, {}
        for path, label in zip(paths, labels):
            run = read_run(path, query_id_col, doc_id_col, score_col)
            means[label], per_q[label] = evaluate(run, judgments, ms)
            if per_q[label].height == 0:
                raise InputError(f"{path}: no query of the run is in the qrels; check --query-id-col and the qrels")
        base = per_q[labels[0]]
        for path, label in zip(paths[1:], labels[1:]):
            if not per_q[label].join(base, on="query_id", how="semi").height:
                raise InputError(f"{path}: no judged query in common with the baseline {paths[0]}; compare runs "
                                 "of the same queries")
        metric_names = list(dict.fromkeys(m.name for m in ms))
        comps = compare(per_q, metric_names, resamples=permutations, seed=seed, correction=correction, test=test)
        common = set(base["query_id"].to_list())
        for label in labels[1:]:
            common &= set(per_q[label]["query_id"].to_list())
        if plot_path:
            plot_comparison(per_q, comps, ms[0].name, plot_path, alpha)
    footer = describe(test, permutations, correction, (len(labels) - 1) * len(metric_names), alpha)
    click.echo(format_comparison(means, comps, len(common), alpha=alpha, footer=footer))
    if plot_path:
        wrote("%s (the per-query change of %s against %s)", plot_path, ms[0].name, labels[0])
    if json_path:
        record = {
            "runs": means,
            "comparisons": {name: {m: {"delta": c.delta, "p_ttest": c.p_ttest, "p_randomization": c.p_randomization,
                                       "p_corrected": c.p_corrected} for m, c in by_metric.items()}
                            for name, by_metric in comps.items()},
            "per_query": {label: {r["query_id"]: {m: r[m] for m in metric_names} for r in pq.iter_rows(named=True)}
                          for label, pq in per_q.items()},
            "queries": len(common),
            "baseline_run": labels[0],
            "test": test,
            "correction": correction,
            "alpha": alpha,
        }
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
        wrote("%s", json_path)
