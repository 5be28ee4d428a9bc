"""What a new user trips over: options from the environment, where the default output goes, the
library taking a single path, file modes, quiet dependency logs, -v, progress on odd terminals."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import termios

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_cli

from pipeline.config import RunConfig
from pipeline.errors import InputError

SAMPLE = os.path.join(ROOT, "sample_data", "pairs.parquet")
TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")
N = pq.read_metadata(SAMPLE).num_rows
# A log line's time where stderr is not a terminal (CliRunner, capsys, cron): local ISO 8601.
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "


def test_every_run_option_comes_from_the_environment(tmp_path):
    out = tmp_path / "env.parquet"
    env = {"RERANK_BATCH_MODEL": TINY, "RERANK_BATCH_OUTPUT": str(out), "RERANK_BATCH_TOP_K": "1",
           "RERANK_BATCH_MAX_LENGTH": "64", "RERANK_BATCH_QUIET": "1", "RERANK_BATCH_WINDOW": "10",
           "RERANK_BATCH_SUMMARY": str(tmp_path / "s.json")}
    r = run_cli(["run", SAMPLE], env=env)
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.num_rows == len(set(t.column("query_id").to_pylist())) < N  # top-k 1 per query
    s = (tmp_path / "s.json").read_text()
    assert '"truncated": 0' not in s and '"units": 3' in s  # max length 64 truncates; window 10
    # The command line wins over the environment.
    out2 = tmp_path / "cli.parquet"
    r = run_cli(["run", SAMPLE, "-o", out2, "--top-k", "2"], env=env)
    assert r.exit_code == 0, r.output
    assert pq.read_table(out2).num_rows > t.num_rows
    # A bad value names the variable.
    r = run_cli(["run", SAMPLE], env={**env, "RERANK_BATCH_MAX_LENGTH": "many", "RERANK_BATCH_OVERWRITE": "1"})
    assert r.exit_code == 2 and "'many' is not a valid integer" in r.output, r.output


def test_help_lists_each_option_variable():
    from jobs.run import run_cmd

    r = run_cli(["run", "--help"], terminal_width=200)
    text = " ".join(r.output.split())
    for p in run_cmd.params:
        if p.param_type_name == "option":
            name = "RERANK_BATCH_" + max(p.opts, key=len).lstrip("-").replace("-", "_").upper()
            assert f"env var: {name}" in text, name


@pytest.fixture
def parts_dir(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    t = pq.read_table(SAMPLE)
    pq.write_table(t.slice(0, 10), d / "a.parquet")
    pq.write_table(t.slice(10), d / "b.parquet")
    return d


def test_directory_input_writes_beside_the_directory(parts_dir, tmp_path):
    before = sorted(os.listdir(parts_dir))
    r = run_cli(["run", parts_dir, "--model", TINY, "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "parts.reranked.parquet"
    assert pq.read_table(out).num_rows == N
    assert sorted(os.listdir(parts_dir)) == before  # nothing written inside the input directory
    # The rerun of the same command: refused only because the output exists, and --overwrite works.
    r = run_cli(["run", parts_dir, "--model", TINY, "-q"])
    assert r.exit_code == 2 and "the output exists; pass --overwrite" in r.output
    r = run_cli(["run", str(parts_dir) + "/", "--model", TINY, "-q", "--overwrite"])
    assert r.exit_code == 0, r.output
    # -o elsewhere reads only the inputs (no `score` column from an earlier output in the folder).
    r = run_cli(["run", parts_dir, "--model", TINY, "-q", "-o", tmp_path / "elsewhere.parquet"])
    assert r.exit_code == 0, r.output
    # A glob counts as the directory it searches.
    r = run_cli(["run", f"{parts_dir}/*.parquet", "--model", TINY, "-q", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(parts_dir)) == before


def _located(cfg):
    """(the input files as paths, the output) that planning finds for a config."""
    from pipeline.driver.plan import locate

    cfg, inputs = locate(cfg)
    return tuple(map(str, inputs)), cfg.output


def test_library_config_takes_one_path_a_directory_or_a_glob(parts_dir, tmp_path):
    from pipeline.run import run

    one = RunConfig(inputs=SAMPLE, output=str(tmp_path / "o.parquet"))
    assert _located(one)[0] == (SAMPLE,)
    assert _located(RunConfig(inputs=str(parts_dir)))[0] == (str(parts_dir / "a.parquet"),
                                                              str(parts_dir / "b.parquet"))
    assert _located(RunConfig(inputs=str(parts_dir)))[1] == str(parts_dir) + ".reranked.parquet"
    assert _located(RunConfig(inputs=[parts_dir / "b.parquet"]))[0] == (str(parts_dir / "b.parquet"),)
    cfg = RunConfig(inputs=f"{parts_dir}/*.parquet", output=str(tmp_path / "g.parquet"), model=TINY)
    assert len(_located(cfg)[0]) == 2
    assert run(cfg, progress=False).rows == N
    with pytest.raises(InputError, match="no file matches this pattern"):
        _located(RunConfig(inputs=f"{tmp_path}/none-*.parquet"))


def test_making_a_config_touches_no_file(tmp_path):
    """The config does no I/O: specs that name nothing yet are kept as given; planning finds
    the files (and refuses what is not there)."""
    cfg = RunConfig(inputs=(f"{tmp_path}/later-*.parquet", tmp_path / "later"), output=None)
    assert cfg.inputs == (f"{tmp_path}/later-*.parquet", str(tmp_path / "later")) and cfg.output is None
    with pytest.raises(InputError, match="no file matches this pattern"):
        _located(cfg)


def test_outputs_get_the_usual_mode(tmp_path):
    mode = 0o666 & ~_umask()
    pairs = tmp_path / "mini.parquet"
    r = run_cli(["prepare", "beir", os.path.join(ROOT, "sample_data", "beir-mini"), "--run",
                 os.path.join(ROOT, "sample_data", "beir-mini", "first-stage.trec"), "--depth", 2, "-o", pairs,
                 ])
    assert r.exit_code == 0, r.output
    assert os.stat(pairs).st_mode & 0o777 == mode
    out = tmp_path / "ranked.parquet"
    r = run_cli(["run", pairs, "--model", TINY, "-o", out, "-q"])
    assert r.exit_code == 0, r.output
    assert os.stat(out).st_mode & 0o777 == mode


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _cli(*args, env=None):
    full = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=ROOT, env=full,
                          capture_output=True, text=True)


def test_dependency_logs_are_quiet_and_verbose_adds_ours(tmp_path):
    # A wrong --family makes transformers report missing weights; only our one line may show.
    p = _cli("run", SAMPLE, "--model", TINY, "-o", tmp_path / "x.parquet", "--family", "seq-cls")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("Error: model ") and "LOAD REPORT" not in p.stderr
    quiet = _cli("run", SAMPLE, "--model", TINY, "-o", tmp_path / "q.parquet")
    loud = _cli("run", SAMPLE, "--model", TINY, "-o", tmp_path / "v.parquet", "-v")
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "batch of" not in quiet.stderr and "rerank-batch: batch of" in loud.stderr
    assert len(loud.stderr.splitlines()) > len(quiet.stderr.splitlines())


def test_setup_logging_silences_dependencies_unless_verbose(capsys):
    from jobs.common import setup_logging

    setup_logging()
    logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
    logging.getLogger("pipeline.run").debug("a debug line")
    logging.getLogger("pipeline.run").info("an info line")
    err = capsys.readouterr().err
    assert re.fullmatch(STAMP + r"rerank-batch: an info line\n", err), err
    setup_logging(verbose=True)
    logging.getLogger("huggingface_hub.file_download").warning("a hub warning")
    logging.getLogger("pipeline.run").debug("a debug line")
    err = capsys.readouterr().err
    assert "huggingface_hub.file_download: a hub warning" in err and "rerank-batch: a debug line" in err
    setup_logging()


def _tty(rows: int, cols: int):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return master, os.fdopen(slave, "w")


def test_zero_size_terminal_gets_log_lines_and_a_real_one_a_bar(caplog):
    from pipeline.runtime.progress import Progress, is_terminal

    master, f = _tty(0, 0)
    try:
        assert not is_terminal(f)
        with caplog.at_level(logging.INFO, logger="pipeline.runtime.progress"):
            p = Progress(100, bar=None, file=f, log_every_s=0)
            p.update(10, 500)
            p.close()
        assert p.bar is None and "10/100 pairs" in caplog.text
    finally:
        f.close()
        os.close(master)
    master, f = _tty(24, 80)
    try:
        assert is_terminal(f)
        p = Progress(100, bar=None, file=f)
        assert p.bar is not None
        p.close()
    finally:
        f.close()
        os.close(master)


def test_the_bar_redraws_at_every_batch():
    from pipeline.runtime.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    f = Tty()
    p = Progress(1000, bar=True, file=f, min_interval_s=0)
    steps = [300] + [5] * 20  # a fast first batch, then small ones
    done = 0
    for s in steps:
        p.update(s, 10 * s)
        done += s
        assert f"{done}/1000" in f.getvalue(), done
    p.close()


def test_bench_smoke_names_no_missing_peak():
    r = run_cli(["bench", "--smoke", "--no-e2e", "--seed-pairs", 0, "--pairs", 8])
    assert r.exit_code == 0, r.output
    assert "None" not in r.output and "no matmul peak off CUDA" in r.output


def test_current_directory_has_no_default_output(tmp_path, monkeypatch):
    shutil.copy(SAMPLE, tmp_path / "p.parquet")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="pass -o"):
        _located(RunConfig(inputs="."))
    with pytest.raises(InputError, match="pass -o"):
        _located(RunConfig(inputs="*.parquet"))
    assert _located(RunConfig(inputs="p.parquet"))[1] == "p.reranked.parquet"


# -- -q, --log-level and timestamps, the same on every subcommand --------------------------------

def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def test_quiet_run_prints_only_the_wrote_line(tmp_path):
    out = tmp_path / "q.parquet"
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "-q"])
    assert r.exit_code == 0, r.output
    lines = _lines(r.output)
    assert len(lines) == 1 and re.fullmatch(STAMP + f"rerank-batch: wrote {re.escape(str(out))} \\({N} rows\\)",
                                             lines[0]), r.output
    # Without -q: the INFO lines and the summary, each stamped too.
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", tmp_path / "loud.parquet"])
    assert r.exit_code == 0, r.output
    lines = _lines(r.output)
    assert any(" rerank-batch: summary {" in line for line in lines) and len(lines) > 2, r.output
    assert all(re.match(STAMP + "rerank-batch: ", line) for line in lines), r.output


def test_log_level_warning_drops_info_lines_but_not_the_result(tmp_path):
    out = tmp_path / "w.parquet"
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "--log-level", "warning"])
    assert r.exit_code == 0, r.output
    assert [line.split(" ", 1)[1] for line in _lines(r.output)] == [f"rerank-batch: wrote {out} ({N} rows)"]


def test_quiet_prepare_and_eval(tmp_path):
    beir = os.path.join(ROOT, "sample_data", "beir-mini")
    pairs = tmp_path / "pairs.parquet"
    r = run_cli(["prepare", "beir", beir, "--run", os.path.join(beir, "first-stage.trec"), "--depth", 2, "-o", pairs,
                 "-q"])
    assert r.exit_code == 0, r.output
    assert [line.split(" ", 1)[1] for line in _lines(r.output)] == [f"rerank-batch: wrote {pairs} (12 pairs)"]
    js = tmp_path / "e.json"
    r = run_cli(["eval", pairs, "--score-col", "first_stage_score", "--relevance-col", "relevance",
                 "--metrics", "p@1", "--json", js, "-q"])
    assert r.exit_code == 0, r.output
    lines = _lines(r.output)
    assert lines[0] == "metric       value" and lines[1].startswith("p@1  ") and len(lines) == 4, r.output
    assert lines[2] == "(6 queries, relevance from column 'relevance')"
    assert lines[3].split(" ", 1)[1] == f"rerank-batch: wrote {js}"


@pytest.mark.parametrize("args, message", [
    (["-q", "-v"], "-q and -v contradict each other; pass one of them"),
    (["-q", "--log-level", "info"], "--log-level info contradicts -q; pass one of them"),
    (["-v", "--log-level", "error"], "--log-level error contradicts -v; pass one of them"),
])
@pytest.mark.parametrize("command", [["run", SAMPLE], ["eval", SAMPLE, "--relevance-col", "x"],
                                     ["prepare", "mc", SAMPLE, "-o", "x.parquet"], ["bench", "--smoke"]])
def test_contradicting_log_options_are_refused_on_every_subcommand(command, args, message):
    r = run_cli(command + args)
    assert r.exit_code == 2
    assert r.output == f"Error: {message}\n"


@pytest.mark.parametrize("command", [["run"], ["eval"], ["prepare", "beir"], ["prepare", "mc"], ["bench"]])
def test_every_subcommand_has_the_log_options(command):
    r = run_cli(command + ["--help"])
    assert r.exit_code == 0
    for option in ("-q, --quiet", "-v, --verbose", "--log-level [debug|info|warning|error]"):
        assert option in r.output, (command, option)


def test_no_timestamps_on_a_terminal():
    from jobs.common import setup_logging

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, plain = Tty(), io.StringIO()
    try:
        setup_logging(stream=tty)
        logging.getLogger("pipeline.run").info("a line")
        setup_logging(stream=plain)
        logging.getLogger("pipeline.run").info("a line")
    finally:
        setup_logging()
    assert tty.getvalue() == "rerank-batch: a line\n"
    assert re.fullmatch(STAMP + "rerank-batch: a line\n", plain.getvalue()), plain.getvalue()


# -- resuming and checkpoint mismatches, told in the options' words ------------------------------

def _one_unit_then_stop(out):
    done = out.parent / (out.name + ".ckpt") / "done"

    def stop():  # once the first unit is committed
        return done.is_dir() and any(done.iterdir())
    stop.signum = 15
    return stop


def test_resume_counts_units_in_words_and_a_mismatch_names_the_option_and_both_values(tmp_path):
    from pipeline.errors import Interrupted
    from pipeline.run import run

    out = tmp_path / "o.parquet"
    with pytest.raises(Interrupted):
        run(RunConfig(inputs=SAMPLE, output=str(out), model=TINY, window_pairs=5), progress=False,
            should_stop=_one_unit_then_stop(out))
    ck = f"{out}.ckpt"
    assert len(os.listdir(os.path.join(ck, "done"))) == 1  # the run stops at the first unit committed
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "--window", 7])
    assert r.exit_code == 2
    assert r.output == (f"Error: {ck}: the checkpoint was made with --window 5, this run has --window 7; rerun with "
                        "--window 5 to resume, or pass --restart to start over\n")
    r = run_cli(["run", SAMPLE, "--model", TINY, "-o", out, "--window", 5])
    assert r.exit_code == 0, r.output
    assert f"rerank-batch: resuming: 1 unit already scored in {ck}" in r.output


def test_a_stop_asked_by_should_stop_is_not_reported_as_a_signal(tmp_path):
    from conftest import after_pairs

    from pipeline.errors import Interrupted
    from pipeline.run import run
    from pipeline.runtime.stop import StopToken

    out = tmp_path / "o.parquet"
    stop = StopToken()
    with pytest.raises(Interrupted) as exc:
        run(RunConfig(inputs=SAMPLE, output=str(out), model=TINY, window_pairs=5), progress=False,
            should_stop=stop, on_progress=after_pairs(5, stop.set))
    message = str(exc.value)
    assert message.startswith("stopped as should_stop asked; ") and "signal" not in message, message
    assert message.endswith(" of 28 pairs are kept in the checkpoint and none will be scored again; run the same "
                            "configuration again to resume"), message
    summary = run(RunConfig(inputs=SAMPLE, output=str(out), model=TINY, window_pairs=5), progress=False)
    assert summary.rows == 28 and summary.pairs_resumed > 0


def test_mismatch_messages_for_fields_without_one_option():
    from pipeline.storage.fingerprint import describe_mismatch

    assert describe_mismatch("options.nested", True, False) == (
        "the checkpoint was made from nested input (a list of documents per row), this run reads long-form input "
        "(a document per row); rerun with the same inputs and columns to resume")
    assert describe_mismatch("model.files.model.safetensors", "a", "b") == (
        "the model's model.safetensors is not the one the checkpoint was made with (--model); rerun with that "
        "model to resume")
    assert describe_mismatch("options.instruction", "Judge it", "Other") == (
        "the checkpoint was made with --instruction 'Judge it', this run has --instruction Other; rerun with "
        "--instruction 'Judge it' to resume")


@pytest.mark.parametrize("where, message", [
    ("s3://bucket/s.json", "--summary s3://bucket/s.json: the summary is a local file; pass a local path (the run "
                           "also logs it)"),
    ("ds/s.json", "--summary {tmp}/ds/s.json: inside the output directory, which holds the dataset only; pass a "
                  "path beside it"),
])
def test_the_summary_is_a_local_file_outside_a_dataset_output(tmp_path, where, message):
    from conftest import ROOT, run_cli

    (tmp_path / "ds").mkdir()
    target = where if "://" in where else str(tmp_path / where)
    r = run_cli(["run", os.path.join(ROOT, "sample_data", "pairs.parquet"), "--model",
                 os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker"), "-o", f"{tmp_path}/ds/", "--summary", target])
    assert r.exit_code == 2, r.output
    assert r.output == f"Error: {message.format(tmp=tmp_path)}\n"
    assert os.listdir(tmp_path / "ds") == []


def test_a_summary_that_cannot_be_written_is_one_line_before_or_after_the_run(tmp_path, monkeypatch):
    """It was a traceback after the output was published. A folder known to be unwritable is
    refused first (exit 2, nothing written); a write that fails anyway (here /proc, where no file
    can be made) is one line saying the output is complete (exit 1)."""
    from conftest import ROOT, run_cli

    real_access = os.access
    blocked = str(tmp_path / "ro")
    monkeypatch.setattr(os, "access", lambda p, mode, **k: (p != blocked and p != "/proc" and real_access(p, mode, **k))
                        or (p == "/proc"))
    (tmp_path / "ro").mkdir()
    base = ["run", os.path.join(ROOT, "sample_data", "pairs.parquet"), "--model",
            os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker"), "-q"]
    out = tmp_path / "o.parquet"
    r = run_cli([*base, "-o", out, "--summary", f"{blocked}/s.json"])
    assert r.exit_code == 2, r.output
    assert r.output == (f"Error: --summary {blocked}/s.json: the directory {blocked} is not writable; pass a path in "
                        "a writable directory\n")
    assert not out.exists() and not os.path.exists(f"{out}.ckpt")
    r = run_cli([*base, "-o", out, "--summary", "/proc/rerank-summary.json"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert lines[0].startswith("Error: --summary /proc/rerank-summary.json: cannot write it (")
    assert lines[0].endswith(f"); the output {out} is complete, and the run's `summary` log line holds the same "
                             "record"), lines[0]
    assert pq.read_metadata(out).num_rows == 28
