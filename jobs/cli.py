"""The `rerank-batch` command: a group of thin jobs over the `pipeline` library."""

from __future__ import annotations

import os
import signal
import sys


def _quiet_exit(signum, frame):  # nothing to save yet: exit 130/143 without a traceback
    os._exit(128 + signum)


# Installed before the heavy imports below, and given back once they are done.
_early = {s: signal.signal(s, _quiet_exit) for s in (signal.SIGINT, signal.SIGTERM)}

import click  # noqa: E402

from pipeline.runtime import bytecode  # noqa: E402
from pipeline.runtime.signals import graceful_signals  # noqa: E402

from . import common  # noqa: E402


class _OneLineUsageErrors(click.Group):
    """Usage errors (an unknown option, a value out of range, a missing argument) as one
    `Error: …` line, like every other error of the command: click would print the usage and a
    hint on two more lines. The hint stays, at the end of the line."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
        except KeyboardInterrupt:
            # A signal before the job's run began (its imports, its checks): nothing to keep, so
            # 128+signum as documented. Left to click, it would print "Aborted!" and exit 1.
            raise SystemExit(_signal_status()) from None


def _signal_status() -> int:
    return 128 + ((common.STOP and common.STOP.signum) or signal.SIGINT)


def _one_line(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # a bare group: its help, as asked
        return exc
    message = exc.format_message().rstrip()
    helps = exc.ctx.command.get_help_option_names(exc.ctx) if exc.ctx is not None else ()
    if helps:
        if not message.endswith((".", "?", "!")):  # a parameter type's own message ends without one
            message += "."
        message += f" Try '{exc.ctx.command_path} {max(helps, key=len)}' for help."
    one = click.UsageError(message)  # no context: UsageError.show prints no usage block
    one.exit_code = exc.exit_code
    return one


@click.group(cls=_OneLineUsageErrors,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="rerank-batch")
def cli():
    """Offline batch reranking of Parquet (query, document) pairs."""


def _register():
    # After the early handlers above: a signal while these load exits quietly.
    from .bench import bench_cmd
    from .cache import cache_cmd
    from .eval import eval_cmd
    from .export import export_cmd
    from .fuse import fuse_cmd
    from .prepare import prepare_cmd
    from .run import run_cmd

    cli.add_command(run_cmd)
    cli.add_command(prepare_cmd)
    cli.add_command(eval_cmd)
    cli.add_command(export_cmd)
    cli.add_command(fuse_cmd)
    cli.add_command(bench_cmd)
    cli.add_command(cache_cmd)


_register()
for _s, _h in _early.items():
    signal.signal(_s, _h)


def main():
    bytecode.use_pycache()  # before torch is imported (importing this module does not): see bytecode.py
    try:
        with graceful_signals() as stop:
            # Kept in jobs.common, which the jobs read: under `python -m jobs.cli` this module is
            # __main__, and a job importing jobs.cli would get a second copy.
            common.STOP = stop
            cli()
    except KeyboardInterrupt:  # a signal outside any run (click's own code): no traceback
        _exit_now(_signal_status())
    except SystemExit as exc:
        _exit_now(exc.code)
    _exit_now(0)


def _exit_now(code) -> None:
    """Exit without the interpreter's teardown. After torch.compile has run, freeing the modules
    and caches took 10-12 s (measured on a 2-core CPU machine, 8-9 s on the H100 machine) after
    the output was written; the exit handlers still run, and every file is closed by then."""
    import atexit

    if isinstance(code, str):  # sys.exit("message"): printed, exit status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
