"""`rerank-batch run`: score and rank Parquet pairs with a yes/no reranker."""

from __future__ import annotations

import logging
import os

import click

from pipeline.config import DEVICE, RunConfig

from . import common
from .common import JobError, SizeType, check_target, config_option, domain_errors, log_options, setup_logging, wrote

log = logging.getLogger("rerank-batch")

# Every option can come from the environment: RERANK_BATCH_MODEL, RERANK_BATCH_MAX_LENGTH, ...
# (how Airflow, Kubernetes and cron configure a tool); the command line wins over the environment.
ENV_PREFIX = "RERANK_BATCH"


@click.command("run", context_settings={"auto_envvar_prefix": ENV_PREFIX})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@config_option("-o", "--output", help="Ranked Parquet file, or a dataset directory (a path ending in / or an "
               "existing directory: part-00000.parquet, ... and _SUCCESS). [default: <stem>.reranked.parquet beside "
               "the first input file, DIR.reranked.parquet beside an input directory]")
@config_option("--output-file-rows", help="Rows per file of a dataset output at most; a query's rows stay in one file.")
@config_option("--model", metavar="DIR|HUB_ID",
               help="Model directory, or a hub id (org/name) from the Hugging Face cache, downloaded into it when "
               "the hub is reachable.")
@config_option("--query-col", help="Query column.")
@config_option("--doc-col", help="Document column (long form).")
@config_option("--docs-col", help="List-of-documents column (nested form, used when --doc-col is absent).")
@config_option("--instruction", help="Task instruction; an `instruction` column overrides it row by row.")
@config_option("--instruction-col", help="Per-row instruction column.")
@config_option("--template", help="Prompt template of causal-LM rerankers: qwen3-reranker, bge-reranker-v2-gemma, or a "
               "JSON file (prefix, body, suffix, positive, negative). [default: by model type]")
@config_option("--family", help="Reranker kind: from config.architectures, a yes/no causal LM, or a classification "
               "head.")
@config_option("--activation", help="auto: a probability (softmax over two, sigmoid of one logit); none: the raw logit.")
@config_option("--max-length", help="Tokens per pair, template included; longer bodies are truncated at the end.")
@config_option("--top-k", help="Keep the best K rows of each query.")
@click.option("--chunk-tokens", type=int, default=None, metavar="N",
              help="Score each document as windows of N of its own tokens (N >= 8) and give the row their "
              "aggregate; adds the columns chunks and best_chunk. [default: each document whole, cut at "
              "--max-length]")
@click.option("--chunk-overlap", type=int, default=None, metavar="M",
              help="Tokens consecutive windows share (0 <= M < N). [default: N/4, rounded down]")
@click.option("--aggregate", default=None, metavar="max|first|mean",
              help="A row's score from its windows': the best one's, the first one's, or their mean. "
              "[default: max]")
@click.option("--chunk-scores", default=None, metavar="PATH",
              help="Also write every window's score (query_id, doc_id, chunk, start_token, score) to this "
              "Parquet file; needs --chunk-tokens.")
@config_option("--dtype", help="auto: bfloat16 on CUDA, float32 on CPU. fp8: the Qwen3 projections as fp8 GEMMs "
               "(CUDA compute capability 8.9+: Ada, Hopper; docs/FP8.md); fp8-fast: the same with the GEMMs' "
               "fast accumulation (faster, scores measured as close).")
@config_option("--device", help="auto, cpu, cuda or cuda:N.")
@config_option("--gpu-memory-limit", type=SizeType(), help="Cap on GPU memory for this process, e.g. 4GiB (enforced).")
@config_option("--max-batch-tokens",
               help="Token budget per packed batch. [default: sized from measured GPU memory; 8192 on CPU]")
@config_option("--empty-cache-every",
               help="Call torch.cuda.empty_cache() every N batches (always after an OOM); 0: never else.")
@config_option("--window", "window_pairs",
               help="Pairs per unit of work: the length-sort window and the checkpoint step.")
@config_option("--commit-every", metavar="SECONDS",
               help="Commit the pairs scored so far to the checkpoint after this many seconds of scoring, also "
               "inside a unit: a crash loses at most that much scoring (SIGINT/SIGTERM commit first and lose none).")
@config_option("--on-null", help="A null query or document: stop with an error, or keep the row unscored.")
@config_option("--attention", help="Attention kernel for packed batches.")
@config_option("--engine", help="Forward: our fused Qwen3 path where it applies, or transformers' own modules.")
@config_option("--compile", help="torch.compile the fused path's elementwise steps (auto: on CUDA, "
               "except cross-encoders of hidden size 384 or less).")
@config_option("--prefix-sharing", help="Compute each query's shared prompt prefix once for all its candidates (causal "
               "rerankers; auto: where it saves >= 20% of the tokens). Same scores.")
@config_option("--cache", help="Score cache shared by runs: a directory or an object-storage prefix (s3://...). "
               "Pairs found there are not scored again; new scores are added as units finish. Empty: no cache.")
@config_option("--trust-remote-code", help="Allow the model's own Python code to run.")
@config_option("--checkpoint-dir", help="Where parts and their records go. [default: OUTPUT.ckpt]")
@config_option("--keep-checkpoint", help="Keep the checkpoint after success.")
@config_option("--restart", help="Discard an existing checkpoint and start over.")
@config_option("--overwrite", help="Replace an existing output file.")
@click.option("--summary", "summary_path", default=None, help="Write the JSON summary to this file.")
@config_option("--devices", help="Several devices of this host, one worker process each: all, a count, or a list like "
               "cuda:0,cuda:2 (cpu,cpu on CPU). [default: this process on --device]")
@config_option("--executor", help="local: this host (with --devices, one process per device); ray: Ray Data workers.")
@config_option("--ray-address", help="Ray cluster to join (e.g. ray://head:10001 or auto). [default: start a local Ray]")
@config_option("--workers", help="Ray workers (actors). [default: one per GPU of the cluster, else per CPU]")
@config_option("--gpus-per-worker", help="GPUs per Ray worker. [default: 1 where the cluster has GPUs, else 0]")
@config_option("--cpus-per-worker", help="CPUs per Ray worker (its tokenizer and, on CPU, its torch threads).")
@log_options
def run_cmd(inputs, output, summary_path, quiet, verbose, log_level, **opts):
    """Score (query, document) pairs in INPUT (Parquet or JSONL files, directories or globs) and
    write them ranked per query.

    Every option can also be set from the environment: RERANK_BATCH_ and the option's name in
    capitals, e.g. RERANK_BATCH_MODEL, RERANK_BATCH_MAX_LENGTH, RERANK_BATCH_OVERWRITE=1."""
    setup_logging(verbose, quiet, log_level)
    # pipeline.run loads pyarrow and the data path: imported when the command runs, so the CLI starts fast.
    from pipeline.run import run

    with domain_errors(before_work=True):
        if opts["device"] == "cpu" and opts["gpu_memory_limit"]:
            raise JobError("--gpu-memory-limit applies to CUDA only; drop it or use --device cuda", 2)
        if opts["executor"] == "ray" and opts["devices"]:
            raise JobError("--devices is for the local executor; with --executor ray use --workers and "
                           "--gpus-per-worker", 2)
        if opts["executor"] != "ray" and (opts["ray_address"] or opts["workers"] or opts["gpus_per_worker"] is not None):
            raise JobError("--ray-address, --workers and --gpus-per-worker need --executor ray", 2)
        if not DEVICE.match(opts["device"] or ""):  # named as the option (RunConfig names the field)
            raise JobError(f"--device {opts['device']!r}: not a device; use auto, cpu, cuda or cuda:N", 2)
        cfg = RunConfig(inputs=inputs, output=output, **opts)
        if summary_path:  # never over the output or an input (it was written over them)
            _check_summary(summary_path, cfg)
        log.debug("inputs %s, output %s; %s", cfg.inputs, cfg.output, cfg)
    with domain_errors(kept=" (finished units are kept in the checkpoint)"):
        summary = run(cfg, progress=False if quiet else None, should_stop=_stop_token())
    text = summary.to_json()
    if summary_path:
        try:
            with open(summary_path, "w") as f:
                f.write(text + "\n")
        except OSError as exc:  # the output is published by now: say so
            raise JobError(f"--summary {summary_path}: cannot write it ({exc.strerror or exc}); the output "
                           f"{summary.output} is complete, and the run's `summary` log line holds the same "
                           "record", 1) from None
    wrote("%s (%d rows)", summary.output, summary.rows)


def _check_summary(summary_path: str, cfg: RunConfig) -> None:
    """The summary is a local file, never over the output or an input, nor inside a dataset
    output. The run's planning finds the input files and the output (pipeline.driver.plan.locate)."""
    from pipeline.driver.plan import locate
    from pipeline.storage.location import location

    summary = location(summary_path)
    if summary.local_path is None:
        raise JobError(f"--summary {summary_path}: the summary is a local file; pass a local path (the run "
                       "also logs it)", 2)
    cfg, inputs = locate(cfg)
    out = location(cfg.output)
    # Only local files can be the summary's path (None: elsewhere, skipped).
    check_target(summary_path, "--summary", reads=[i.local_path for i in inputs], writes=[out.local_path])
    where = os.path.dirname(os.path.realpath(summary_path))
    if not os.access(where, os.W_OK):  # found now, not after the run (a read-only mount, another owner's folder)
        raise JobError(f"--summary {summary_path}: the directory {where} is not writable; pass a path in a "
                       "writable directory", 2)
    if summary.inside(out):
        raise JobError(f"--summary {summary_path}: inside the output directory, which holds the dataset "
                       "only; pass a path beside it", 2)


for _p in run_cmd.params:  # named after the long option (--window: RERANK_BATCH_WINDOW), listed in --help
    if isinstance(_p, click.Option):
        _long = max(_p.opts, key=len).lstrip("-")
        _p.envvar = f"{ENV_PREFIX}_{_long.replace('-', '_').upper()}"
        _p.show_envvar = True


def _stop_token():
    # Set by jobs.cli.main's signal context; None when called as a library (e.g. CliRunner). Kept
    # in jobs.common: under `python -m jobs.cli`, importing jobs.cli here would make a second copy.
    return common.STOP
