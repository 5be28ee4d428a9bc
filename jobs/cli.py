"""The `rerank-batch` command: a group of thin jobs over the `pipeline` library."""

from __future__ import annotations

import click

from pipeline.signals import graceful_signals

STOP = None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="rerank-batch")
def cli():
    """Offline batch reranking of Parquet (query, document) pairs."""


def _register():
    from .bench import bench_cmd
    from .eval import eval_cmd
    from .prepare import prepare_cmd
    from .run import run_cmd

    cli.add_command(run_cmd)
    cli.add_command(prepare_cmd)
    cli.add_command(eval_cmd)
    cli.add_command(bench_cmd)


_register()


def main():
    global STOP
    with graceful_signals() as flag:
        STOP = flag
        cli()


if __name__ == "__main__":
    main()
