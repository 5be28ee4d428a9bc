"""Several runs against one baseline: per metric, the mean per-query difference and two paired,
two-sided significance tests over the queries judged in the qrels and present in both runs,
the p-values corrected for the number of comparisons in the table.

- t-test: scipy.stats.ttest_rel(run, baseline).
- randomization test: sign flips of the per-query differences, the statistic their mean
  (p_randomization); every flip when there are few queries, else `resamples` drawn from a
  generator seeded with `seed`, the same draws for every comparison, so a p-value does not
  depend on the other runs of the table.
When every per-query difference is 0 both tests say p = 1 (ttest_rel's would be NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.errors import InputError

CORRECTIONS = ("holm", "bonferroni", "none")
TESTS = ("randomization", "ttest")


@dataclass(frozen=True)
class Comparison:
    """One run against the baseline on one metric."""
    delta: float  # mean of (run - baseline) over the common queries
    p_ttest: float
    p_randomization: float
    p_corrected: float  # of the test that marks significance, after the correction
    queries: int


def paired(run: pl.DataFrame, base: pl.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-query values of `metric` (run, baseline) on the queries both tables have, by query id."""
    j = run.select("query_id", pl.col(metric).alias("_a")).join(
        base.select("query_id", pl.col(metric).alias("_b")), on="query_id").sort("query_id")
    return j["_a"].to_numpy().astype(np.float64), j["_b"].to_numpy().astype(np.float64)


def p_ttest(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import ttest_rel  # scipy loads only for the comparisons that ask for it

    if len(a) < 2 or np.all(a == b):
        return 1.0
    return float(ttest_rel(a, b).pvalue)


def p_randomization(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired randomization test of mean(a - b): the share of sign assignments of the
    per-query differences whose |mean| is at least the observed one. Every assignment when
    2^n <= resamples (exact); else `resamples` drawn with numpy's generator seeded with `seed`,
    p = (hits + 1) / (resamples + 1), the observed assignment counted once, so p is never 0.
    (scipy.stats.permutation_test computes the same with permutation_type="samples" but took
    3-6 s per comparison of 1,172 queries, against 0.1 s here.)"""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n == 0 or not d.any():
        return 1.0
    obs = abs(np.ones(n) @ d) / n
    floor = obs - 1e-9 * obs  # a flipped sum equal to the observed one may differ in the last bits
    step = max(1, 4_000_000 // n)  # sign rows per matrix product: 32 MB at most
    if n < 63 and 2 ** n <= resamples:
        hits = 0
        for start in range(0, 2 ** n, step):
            rows = np.arange(start, min(2 ** n, start + step), dtype=np.int64)
            signs = ((rows[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
            hits += int(np.sum(np.abs(signs @ d) / n >= floor))
        return hits / 2 ** n
    rng = np.random.default_rng(seed)
    hits, left = 0, resamples
    while left:
        k = min(left, step)
        signs = rng.integers(0, 2, size=(k, n), dtype=np.int8) * 2.0 - 1.0
        hits += int(np.sum(np.abs(signs @ d) / n >= floor))
        left -= k
    return (hits + 1) / (resamples + 1)


def correct(pvalues: list[float], method: str) -> list[float]:
    """Holm's step-down or Bonferroni's adjusted p-values (capped at 1), in the input order."""
    m = len(pvalues)
    if method == "none" or m == 0:
        return list(pvalues)
    if method == "bonferroni":
        return [min(1.0, p * m) for p in pvalues]
    if method != "holm":
        raise ValueError(method)
    out = [0.0] * m
    running = 0.0
    for i, idx in enumerate(sorted(range(m), key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - i) * pvalues[idx]))
        out[idx] = running
    return out


def compare(per_query: dict[str, pl.DataFrame], metrics: list[str], *, resamples: int = 10_000, seed: int = 0,
            correction: str = "holm", test: str = "randomization") -> dict[str, dict[str, Comparison]]:
    """{run: {metric: Comparison}} of every run but the first (the baseline) against the first.
    `per_query` maps run names, baseline first, to per-query tables (query_id, one column per
    metric) from metrics.per_query."""
    names = list(per_query)
    base = per_query[names[0]]
    raw = {}
    for name in names[1:]:
        for m in metrics:
            a, b = paired(per_query[name], base, m)
            delta = float(np.mean(a - b)) if len(a) else math.nan
            raw[name, m] = (delta, p_ttest(a, b), p_randomization(a, b, resamples, seed), len(a))
    keys = list(raw)
    chosen = [raw[k][2] if test == "randomization" else raw[k][1] for k in keys]
    adjusted = dict(zip(keys, correct(chosen, correction)))
    out: dict[str, dict[str, Comparison]] = {}
    for (name, m), (delta, pt, pr, n) in raw.items():
        out.setdefault(name, {})[m] = Comparison(delta, pt, pr, adjusted[name, m], n)
    return out


def describe(test: str, resamples: int, correction: str, n_comparisons: int, alpha: float) -> str:
    how = (f"paired randomization test (every sign flip, or {resamples} drawn when there are more)"
           if test == "randomization" else "paired t-test")
    fix = "uncorrected" if correction == "none" else \
        f"{'Holm' if correction == 'holm' else 'Bonferroni'}-corrected over {n_comparisons} comparisons"
    return f"{how}, {fix}; * p < {alpha:g}"


def format_comparison(means: dict[str, dict[str, float]], comparisons: dict[str, dict[str, Comparison]],
                      n_queries: int, *, alpha: float, footer: str) -> str:
    """Means by run (rows) and metric (columns); under each run but the first its mean
    difference to the first (Δ, marked * when significant) and the corrected p-value."""
    names = list(means)
    metrics = list(means[names[0]])
    base = names[0]
    w = max(len("run"), *(len(n) for n in names), len("  Δ")) + 2
    cw = max(9, *(len(m) + 2 for m in metrics))
    lines = [f"{'run':<{w}}" + "".join(f"{m:>{cw - 1}} " for m in metrics)]
    for name in names:
        lines.append(f"{name:<{w}}" + "".join(f"{means[name][m]:>{cw - 1}.4f} " for m in metrics))
        if name in comparisons:
            c = comparisons[name]
            mark = {m: "*" if c[m].p_corrected < alpha else " " for m in metrics}
            lines.append(f"{'  Δ':<{w}}" + "".join(f"{c[m].delta:>+{cw - 1}.4f}{mark[m]}" for m in metrics))
            lines.append(f"{'  p':<{w}}" + "".join(f"{c[m].p_corrected:>{cw - 1}.4f} " for m in metrics))
    lines = [line.rstrip() for line in lines]
    lines.append(f"({n_queries} queries judged and in every run)")
    lines.append(f"Δ and p against {base}: {footer}")
    for name, c in comparisons.items():
        n = next(iter(c.values())).queries
        if n != n_queries:
            lines.append(f"({name}: Δ and p over the {n} judged queries it shares with {base})")
    return "\n".join(lines)


def plot_comparison(per_query: dict[str, pl.DataFrame], comparisons: dict[str, dict[str, Comparison]],
                    metric: str, path: str, alpha: float) -> None:
    """One panel per run against the baseline: its per-query differences of `metric`, sorted;
    a run whose difference is significant at `alpha` is marked (★ and a dark frame)."""
    try:  # an optional dependency (the plot extra)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib; pip install 'rerank-batch[plot]'") from None
    names = list(per_query)
    base = names[0]
    others = names[1:]
    fig, axes = plt.subplots(len(others), 1, figsize=(10, 2.8 * len(others)), squeeze=False)
    for ax, name in zip(axes[:, 0], others):
        a, b = paired(per_query[name], per_query[base], metric)
        delta = np.sort(a - b)[::-1]
        colors = np.where(delta > 0, "#2a9d8f", np.where(delta < 0, "#e76f51", "#999999"))
        ax.bar(np.arange(len(delta)), delta, color=colors, width=1.0)
        ax.axhline(0, color="black", linewidth=0.6)
        c = comparisons[name][metric]
        sig = c.p_corrected < alpha
        up, down = int((delta > 0).sum()), int((delta < 0).sum())
        ax.set_title(f"{'★ ' if sig else ''}{name} − {base}: Δ{metric} {c.delta:+.4f}, p {c.p_corrected:.4f}"
                     f"{' (significant)' if sig else ''}; {up} better, {down} worse, "
                     f"{len(delta) - up - down} unchanged", fontweight="bold" if sig else "normal")
        ax.set_ylabel(f"Δ {metric}")
        if sig:
            for spine in ax.spines.values():
                spine.set_linewidth(2.0)
    axes[-1, 0].set_xlabel("queries, sorted by change")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
