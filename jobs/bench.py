"""`rerank-batch bench`: the naive Hugging Face recipe against our engine, on random-weight models of real
architectures."""

from __future__ import annotations

import json

import click

from .common import FiniteRange, SizeType, config_option, domain_errors, log_options, setup_logging, wrote


@click.command("bench")
@click.option("--arch", type=click.Choice(["tiny", "0.6b", "4b", "8b", "minilm-l6", "xlmr-large", "modernbert-base"]),
              default="0.6b", show_default=True, help="Qwen3 shapes, or cross-encoder shapes (these imply --peer).")
@click.option("--workload", type=click.Choice(["w-mixed", "w-short", "w-long", "w-longq", "w-longdoc"]),
              default="w-mixed", show_default=True,
              help="Synthetic pairs: w-mixed (6,000, one per query, documents of every length), w-short (100 "
              "queries × 100 short candidates), w-long (1,000 long documents), w-longq (200 long queries × 50 "
              "candidates), w-longdoc (20 short queries × 50 documents of 2k-8k tokens; with --chunk-tokens).")
@click.option("--pairs", type=click.IntRange(min=1), default=None, help="Use the first N pairs of the workload.")
@click.option("--seed-pairs", type=click.IntRange(min=0), default=1500, show_default=True,
              help="Pairs scored with the naive recipe (input order, batches of 16, fp16, padding; 0 skips it); its "
              "rate is compared with ours.")
@click.option("--e2e/--no-e2e", default=True, show_default=True, help="Also run Parquet in -> ranked Parquet out.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed passes per row (the median is reported).")
@config_option("--device", help="auto, cpu, cuda or cuda:N (as rerank-batch run).")
@config_option("--gpu-memory-limit", type=SizeType(), help="Cap on GPU memory, e.g. 4GiB (as rerank-batch run).")
@config_option("--max-batch-tokens",
               help="Token budget per packed batch. [default: sized from measured GPU memory]")
@config_option("--compile", help="torch.compile the fused elementwise steps (as rerank-batch run).")
@config_option("--engine", help="Our fused forward or transformers' own modules (as rerank-batch run).")
@config_option("--dtype", help="Our engine's dtype (as rerank-batch run; fp8 and fp8-fast on CUDA 8.9+); the naive recipe runs "
               "in fp16. Not with --peer, --devices, --chunk-tokens or --host-only.")
@config_option("--attention", help="Attention kernel for packed batches (as rerank-batch run).")
@config_option("--prefix-sharing", help="Share each query's prompt prefix across its candidates (as rerank-batch run).")
@click.option("--smoke", is_flag=True, help="CPU, tiny architecture, 64 pairs: checks that the bench runs.")
@click.option("--host-only", is_flag=True,
              help="The host side alone, on the CPU: run end to end with a forward that costs nothing (sharing "
                   "off and on) and the encoder alone; pairs/s the host can feed a device. With a cross-encoder "
                   "--arch: the whole CLI in fresh processes on that tokenizer (3,000 and 30,000 pairs, or --pairs), "
                   "its scoring span's stages and the CPU each pair costs.")
@click.option("--device-us-per-token", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="With --host-only: the forward sleeps this long per computed token, as a device of that "
                   "speed would take (H100, 0.6B bf16: about 2.7); e2e near the device's rate = overlapped.")
@click.option("--profile", is_flag=True, help="Print the top CUDA kernels of one model-only pass (CUDA; also with --peer).")
@click.option("--devices", "device_counts", default=None,
              help="Whole runs on 1..N devices of this host, e.g. 1,2,4 (CPU workers where no GPU): pairs/s in "
              "total and per device, speed-up over one device, busy share, driver CPU per unit.")
@click.option("--window", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Pairs per unit for --devices runs: enough units for every device to stay busy. With "
              "--chunk-tokens: documents per unit of the run (given explicitly; otherwise the run's default).")
@click.option("--peer", is_flag=True,
              help="Measure against sentence-transformers' CrossEncoder.predict (when importable) and the "
                   "whole CLI in fresh processes, on a model saved to disk, instead of the naive recipe.")
@click.option("--st/--no-st", default=True, show_default=True, help="With --peer: the sentence-transformers rows.")
@click.option("--cli-row/--no-cli-row", default=True, show_default=True, help="With --peer: the fresh-process CLI row.")
@click.option("--cli-pairs", type=click.IntRange(min=1), default=None,
              help="With --peer: the CLI row scores N pairs of the workload (a long run, as users' are), the "
                   "other rows --pairs. [default: --pairs]")
@click.option("--cli-stages", is_flag=True,
              help="With --peer: time each fresh-process CLI run's stages (read, tokenize, gather, forward, "
                   "device sync, commit, ...) with the real model on the device, and report where its scoring "
                   "span goes.")
@click.option("--chunk-tokens", type=int, default=None, metavar="N",
              help="Long documents as windows of N tokens: `run --chunk-tokens` against the same windows scored "
              "through Reranker.predict (one call, and one per query). Default workload then: w-longdoc.")
@click.option("--chunk-overlap", type=int, default=None, metavar="M",
              help="With --chunk-tokens: tokens consecutive windows share. [default: N/4]")
@click.option("--aggregate", default=None, metavar="max|first|mean",
              help="With --chunk-tokens: a document's score from its windows'. [default: max]")
@click.option("--json", "json_path", default=None, help="Write the record here.")
@log_options
def bench_cmd(arch, workload, pairs, seed_pairs, e2e, repeats, device, gpu_memory_limit, max_batch_tokens,
              compile, engine, dtype, attention, prefix_sharing, smoke, host_only, device_us_per_token, profile, device_counts, window, peer, st, cli_row,
              cli_pairs, cli_stages, chunk_tokens, chunk_overlap, aggregate, json_path, quiet, verbose, log_level):
    """Measure pairs/s, tokens/s, MFU, peak memory and GPU busy time against the naive recipe (or,
    with --peer, against sentence-transformers; with --devices, on 1..N devices)."""
    setup_logging(verbose, quiet, log_level)
    # The bench modules load torch: imported when the command runs, so the CLI starts fast.
    from pipeline.bench.peer import ENCODER_ARCHS

    if dtype != "auto" and (device_counts or host_only or peer or arch in ENCODER_ARCHS or chunk_tokens is not None
                            or chunk_overlap is not None or aggregate is not None):
        raise click.UsageError("--dtype applies to the default rows (the naive recipe against our engine) only; drop "
                               "it, or drop --peer, --devices, --chunk-tokens and --host-only")
    if cli_stages and (not (peer or arch in ENCODER_ARCHS) or not cli_row or device_counts or host_only
                       or chunk_tokens is not None or chunk_overlap is not None or aggregate is not None):
        raise click.UsageError("--cli-stages times the peer bench's CLI row: use it with --peer (or a cross-encoder "
                               "--arch) and the CLI row, without --no-cli-row, --devices, --chunk-tokens or "
                               "--host-only")
    if cli_pairs is not None and (not (peer or arch in ENCODER_ARCHS) or not cli_row or device_counts or host_only
                                  or chunk_tokens is not None):
        raise click.UsageError("--cli-pairs sizes the peer bench's CLI row: use it with --peer (or a cross-encoder "
                               "--arch) and the CLI row, without --no-cli-row, --devices, --chunk-tokens or "
                               "--host-only")
    if device_counts:
        from pipeline.bench.devices import format_devices_table, run_devices_bench

        try:
            counts = [int(x) for x in device_counts.split(",")]
        except ValueError:
            raise click.BadParameter("write counts like 1,2,4", param_hint="--devices") from None
        if smoke:
            arch, pairs = "tiny", pairs or 64
        with domain_errors():
            rec = run_devices_bench(arch, workload, counts, pairs=pairs, repeats=repeats, window=window)
        _emit(rec, format_devices_table(rec), json_path)
        return
    if chunk_tokens is not None or chunk_overlap is not None or aggregate is not None:
        from pipeline.bench.longdoc import format_longdoc_table, run_longdoc_bench

        ctx = click.get_current_context()
        if ctx.get_parameter_source("workload") == click.core.ParameterSource.DEFAULT:
            workload = "w-longdoc"
        if smoke:
            arch, device, pairs, repeats = "tiny", "cpu", pairs or 8, 1
        with domain_errors():
            rec = run_longdoc_bench(arch, workload, device=device, pairs=pairs, chunk_tokens=chunk_tokens,
                                    chunk_overlap=chunk_overlap, aggregate=aggregate or "max", repeats=repeats,
                                    compile=compile, attention=attention, max_batch_tokens=max_batch_tokens,
                                    engine=engine, prefix_sharing=prefix_sharing, gpu_memory_limit=gpu_memory_limit,
                                    window=window if click.get_current_context().get_parameter_source("window").name
                                    != "DEFAULT" else None)
        _emit(rec, format_longdoc_table(rec), json_path)
        return
    if host_only and arch in ENCODER_ARCHS:
        from pipeline.bench.host import format_cross_host_table, run_cross_host_bench

        sizes = (pairs,) if pairs else ((64,) if smoke else (3000, 30000))
        with domain_errors():
            rec = run_cross_host_bench(arch, workload, pairs=sizes, repeats=1 if smoke else repeats)
        _emit(rec, format_cross_host_table(rec), json_path)
        return
    if host_only:
        from pipeline.bench.host import format_host_table, run_host_bench

        with domain_errors():
            rec = run_host_bench(workload, pairs=pairs or (64 if smoke else None), repeats=1 if smoke else repeats,
                                 us_per_token=device_us_per_token)
        _emit(rec, format_host_table(rec), json_path)
        return
    if peer or arch in ENCODER_ARCHS:
        from pipeline.bench.peer import format_peer_table, run_peer_bench

        with domain_errors():
            rec = run_peer_bench(arch, workload, device=device, pairs=pairs, repeats=repeats, st=st, cli=cli_row,
                                 cli_stages=cli_stages, cli_pairs=cli_pairs, profile=profile,
                                 compile=compile)
        if rec.get("profile"):
            click.echo(rec["profile"])
        _emit(rec, format_peer_table(rec), json_path)
        return
    from pipeline.bench.throughput import format_table, run_bench

    if smoke:
        arch, device, pairs, seed_pairs, repeats = "tiny", "cpu", pairs or 64, min(seed_pairs, 32), 1
    with domain_errors():
        rec = run_bench(arch, workload, device=device, seed_pairs=seed_pairs, e2e=e2e,
                        gpu_memory_limit=gpu_memory_limit, pairs=pairs, repeats=repeats, compile=compile,
                        attention=attention, max_batch_tokens=max_batch_tokens, profile=profile, engine=engine,
                        prefix_sharing=prefix_sharing, dtype=dtype)
    if rec.get("profile"):
        click.echo(rec["profile"])
    _emit(rec, format_table(rec), json_path)


def _emit(rec: dict, table: str, json_path: str | None) -> None:
    click.echo(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rec, f, indent=2)
        wrote("%s", json_path)
