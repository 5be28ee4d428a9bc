"""`rerank-batch cache stats|prune LOCATION`: look into a score cache and remove entries from it."""

from __future__ import annotations

import datetime
import json

import click

from .common import domain_errors, log_options, setup_logging


@click.group("cache")
def cache_cmd():
    """Inspect and prune a score cache (the LOCATION given to `rerank-batch run --cache`)."""


def _day(ts) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts is not None else "-"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cache_cmd.command("stats")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@log_options
def stats_cmd(location, as_json, quiet, verbose, log_level):
    """Size, entries and files of the cache at LOCATION, by model (and dtype and options)."""
    setup_logging(verbose, quiet, log_level)
    from pipeline.cache.admin import stats  # imported when the command runs: the CLI starts fast

    with domain_errors():
        rec = stats(location)
    if as_json:
        click.echo(json.dumps(rec, indent=2))
        return
    click.echo(f"{rec['location']}: {rec['entries']:,} entries, {_size(rec['bytes'])} in {rec['files']} files, "
               f"{len(rec['models'])} model scope(s)" + (f", {rec['damaged']} damaged file(s)" if rec["damaged"] else ""))
    rows = [("scope", "model", "dtype", "max_length", "entries", "files", "size", "oldest", "newest")]
    for m in rec["models"]:
        rows.append((m["scope"][:12], m["model"], m["dtype"], str(m["max_length"]), f"{m['entries']:,}",
                     str(m["files"]), _size(m["bytes"]), _day(m["oldest"]), _day(m["newest"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@cache_cmd.command("prune")
@click.argument("location")
@click.option("--model", "models", multiple=True, metavar="DIR|NAME|SCOPE",
              help="Remove every entry of this model: its directory (matched by path or by content), its "
              "name as `cache stats` shows it (a hub id), or a scope id (8+ hex digits). Repeatable.")
@click.option("--older-than", default=None, metavar="DATE|AGE",
              help="Remove entries written before this date (2026-01-31, local time) or older than this age "
              "(30d, 12h).")
@log_options
def prune_cmd(location, models, older_than, quiet, verbose, log_level):
    """Remove entries from the cache at LOCATION and merge each model's files into few (safe while
    runs use the cache). With no option it only merges and removes damaged files."""
    setup_logging(verbose, quiet, log_level)
    from pipeline.cache.admin import parse_when, prune  # when the command runs: the CLI starts fast

    with domain_errors():
        cutoff = parse_when(older_than) if older_than else None
        rec = prune(location, models=models, older_than=cutoff)
    for m in rec["models_removed"]:
        click.echo(f"removed model {m['model']} ({m['dtype']}, scope {m['scope'][:12]})")
    click.echo(f"{rec['location']}: removed {rec['entries_removed']:,} entries of removed models, "
               f"{rec['entries_old']:,} older entries, {rec['damaged_removed']} damaged file(s); "
               f"{rec['files_before']} files merged into {rec['files_after']} ({rec['entries_after']:,} entries)")
