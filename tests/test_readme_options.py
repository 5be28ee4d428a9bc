"""The README's table of `rerank-batch run` options is checked against `rerank-batch run --help`
(the way sqlite-utils builds its CLI reference from --help), so the two cannot drift apart: every
option of the command has a row, and every option a row names exists."""

from __future__ import annotations

import os
import re

from conftest import ROOT, run_cli

OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def help_options(args: list[str]) -> set[str]:
    """Option names (short and long) that `rerank-batch ARGS --help` lists, --help itself aside."""
    r = run_cli([*args, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    names = set()
    for line in r.output.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)  # a declaration; wrapped help is indented deeper
        if m:
            names.update(OPTION.findall(m.group(1).split(" [")[0]))
    return names - {"-h", "--help"}


def readme_table_options(heading: str) -> set[str]:
    """Option names in the first column of the table under the README heading HEADING."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:  # the table ended
            break
    assert len(rows) > 2, f"no table under {heading!r}"
    names = set()
    for row in rows[2:]:  # header and separator first
        first = re.split(r"(?<!\\)\|", row)[1]  # `\|` inside a cell is not a column break
        for code in re.findall(r"`([^`]*)`", first):
            names.update(OPTION.findall(code))
    return names


def test_help_lists_what_the_command_takes():
    """The parser of --help above sees every option click knows, so the comparison below is whole."""
    from jobs.run import run_cmd

    known = {o for p in run_cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    assert help_options(["run"]) == known - {"-h", "--help"}


def test_readme_run_options_table_matches_help():
    table = readme_table_options("## Options of `rerank-batch run`")
    helped = help_options(["run"])
    assert sorted(helped - table) == [], "options of `rerank-batch run` missing from the README's table"
    assert sorted(table - helped) == [], "options in the README's table that `rerank-batch run` does not take"


def test_every_option_of_every_command_has_help():
    """--help is the reference a user reads: an option listed bare there says nothing."""
    import click

    from jobs.cli import cli

    def bare(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from bare(sub, [*path, name])
        else:
            yield from ((" ".join(path), max(p.opts, key=len)) for p in cmd.params
                        if isinstance(p, click.Option) and not p.help)

    assert list(bare(cli, [])) == []
