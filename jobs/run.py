"""`rerank-batch run`: score and rank Parquet pairs with a yes/no reranker."""

from __future__ import annotations

import logging
import os

import click

from pipeline.config import DEFAULT_INSTRUCTION, DEVICE, RunConfig
from pipeline.storage.uri import is_uri

from .common import JobError, SizeType, check_target, domain_errors, log_options, setup_logging, wrote

log = logging.getLogger("rerank-batch")

# Every option can come from the environment: RERANK_BATCH_MODEL, RERANK_BATCH_MAX_LENGTH, ...
# (how Airflow, Kubernetes and cron configure a tool); the command line wins over the environment.
ENV_PREFIX = "RERANK_BATCH"


@click.command("run", context_settings={"auto_envvar_prefix": ENV_PREFIX})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--output", help="Ranked Parquet file, or a dataset directory (a path ending in / or an existing "
              "directory: part-00000.parquet, ... and _SUCCESS). [default: <stem>.reranked.parquet beside the first "
              "input file, DIR.reranked.parquet beside an input directory]")
@click.option("--output-file-rows", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Rows per file of a dataset output at most; a query's rows stay in one file.")
@click.option("--model", default="Qwen/Qwen3-Reranker-0.6B", show_default=True, metavar="DIR|HUB_ID",
              help="Model directory, or a hub id (org/name) from the Hugging Face cache, downloaded into it when "
              "the hub is reachable.")
@click.option("--query-col", default="query", show_default=True, help="Query column.")
@click.option("--doc-col", default="document", show_default=True, help="Document column (long form).")
@click.option("--docs-col", default="documents", show_default=True,
              help="List-of-documents column (nested form, used when --doc-col is absent).")
@click.option("--instruction", default=DEFAULT_INSTRUCTION, show_default=True,
              help="Task instruction; an `instruction` column overrides it row by row.")
@click.option("--instruction-col", default="instruction", show_default=True, help="Per-row instruction column.")
@click.option("--template", default=None,
              help="Prompt template of causal-LM rerankers: qwen3-reranker, bge-reranker-v2-gemma, or a JSON file "
              "(prefix, body, suffix, positive, negative). [default: by model type]")
@click.option("--family", type=click.Choice(["auto", "yes-no", "seq-cls"]), default="auto", show_default=True,
              help="Reranker kind: from config.architectures, a yes/no causal LM, or a classification head.")
@click.option("--activation", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: a probability (softmax over two, sigmoid of one logit); none: the raw logit.")
@click.option("--max-length", type=click.IntRange(min=8), default=8192, show_default=True,
              help="Tokens per pair, template included; longer bodies are truncated at the end.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Keep the best K rows of each query.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="auto: bfloat16 on CUDA, float32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--gpu-memory-limit", type=SizeType(), default=None,
              help="Cap on GPU memory for this process, e.g. 4GiB (enforced).")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=None,
              help="Token budget per packed batch. [default: sized from measured GPU memory; 8192 on CPU]")
@click.option("--empty-cache-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Call torch.cuda.empty_cache() every N batches (always after an OOM); 0: never else.")
@click.option("--window", "window_pairs", type=click.IntRange(min=1), default=16384, show_default=True,
              help="Pairs per unit of work: the length-sort window and the checkpoint step.")
@click.option("--commit-every", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              metavar="SECONDS", help="Commit the pairs scored so far to the checkpoint after this many seconds "
              "of scoring, also inside a unit: a crash loses at most that much scoring (SIGINT/SIGTERM "
              "commit first and lose none).")
@click.option("--on-null", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="A null query or document: stop with an error, or keep the row unscored.")
@click.option("--attention", type=click.Choice(["auto", "flash_attn", "torch_varlen", "sdpa"]),
              default="auto", show_default=True, help="Attention kernel for packed batches.")
@click.option("--engine", type=click.Choice(["auto", "fused", "transformers"]), default="auto", show_default=True,
              help="Forward: our fused Qwen3 path where it applies, or transformers' own modules.")
@click.option("--compile", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="torch.compile the fused path's elementwise steps (auto: on CUDA).")
@click.option("--prefix-sharing", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Compute each query's shared prompt prefix once for all its candidates (causal "
                   "rerankers; auto: where it saves >= 20% of the tokens). Same scores.")
@click.option("--cache", default=None, metavar="LOCATION",
              help="Score cache shared by runs: a directory or an object-storage prefix (s3://...). Pairs found "
              "there are not scored again; new scores are added as units finish. Empty: no cache.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run.")
@click.option("--checkpoint-dir", default=None, help="Where parts and the manifest go. [default: OUTPUT.ckpt]")
@click.option("--keep-checkpoint", is_flag=True, help="Keep the checkpoint after success.")
@click.option("--restart", is_flag=True, help="Discard an existing checkpoint and start over.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--summary", "summary_path", default=None, help="Write the JSON summary to this file.")
@click.option("--devices", default=None,
              help="Several devices of this host, one worker process each: all, a count, or a list like "
              "cuda:0,cuda:2 (cpu,cpu on CPU). [default: this process on --device]")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this host (with --devices, one process per device); ray: Ray Data workers.")
@click.option("--ray-address", default=None, help="Ray cluster to join (e.g. ray://head:10001 or auto). "
              "[default: start a local Ray]")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray workers (actors). [default: one per GPU of the cluster, else per CPU]")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
              help="GPUs per Ray worker. [default: 1 where the cluster has GPUs, else 0]")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="CPUs per Ray worker (its tokenizer and, on CPU, its torch threads).")
@log_options
def run_cmd(inputs, output, summary_path, quiet, verbose, log_level, **opts):
    """Score (query, document) pairs in INPUT (Parquet or JSONL files, directories or globs) and
    write them ranked per query.

    Every option can also be set from the environment: RERANK_BATCH_ and the option's name in
    capitals, e.g. RERANK_BATCH_MODEL, RERANK_BATCH_MAX_LENGTH, RERANK_BATCH_OVERWRITE=1."""
    setup_logging(verbose, quiet, log_level)
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
            if is_uri(summary_path):
                raise JobError(f"--summary {summary_path}: the summary is a local file; pass a local path (the run "
                               "also logs it)", 2)
            check_target(summary_path, "--summary", reads=[p for p in cfg.inputs if not is_uri(p)],
                         writes=[] if is_uri(cfg.output) else [cfg.output])
            if not is_uri(cfg.output) and os.path.realpath(summary_path).startswith(
                    os.path.realpath(cfg.output).rstrip(os.sep) + os.sep):
                raise JobError(f"--summary {summary_path}: inside the output directory, which holds the dataset "
                               "only; pass a path beside it", 2)
        log.debug("%d input files, output %s; %s", len(cfg.inputs), cfg.output, cfg)
    with domain_errors(kept=" (finished units are kept in the checkpoint)"):
        summary = run(cfg, progress=False if quiet else None, should_stop=_stop_flag())
    text = summary.to_json()
    if summary_path:
        with open(summary_path, "w") as f:
            f.write(text + "\n")
    wrote("%s (%d rows)", cfg.output, summary.rows)


for _p in run_cmd.params:  # named after the long option (--window: RERANK_BATCH_WINDOW), listed in --help
    if isinstance(_p, click.Option):
        _long = max(_p.opts, key=len).lstrip("-")
        _p.envvar = f"{ENV_PREFIX}_{_long.replace('-', '_').upper()}"
        _p.show_envvar = True


def _stop_flag():
    # Set by jobs.cli.main's signal context; None when called as a library (e.g. CliRunner). Kept
    # in jobs.common: under `python -m jobs.cli`, importing jobs.cli here would make a second copy.
    from . import common

    return common.STOP
