"""SIGINT/SIGTERM are honoured everywhere: while loading the model, while
ranking and writing the output, during imports; a second signal exits at once. The child holds
at a named place and touches an event file there, so the tests wait on that event, not on time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT

SAMPLE = os.path.join(ROOT, "sample_data", "pairs.parquet")
TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")

_CHILD = r"""
import hashlib, os, sys, time
event, hold = os.environ.get("EVENT"), os.environ.get("HOLD")

def holding(real):
    def held(*a, **k):
        open(event, "w").close()
        if hold == "native":  # in native code (GIL released): Python handlers wait
            buf = bytes(64 << 20)
            while True:
                hashlib.sha256(buf).digest()
        while not os.path.exists(event + ".go"):
            time.sleep(0.01)
        return real(*a, **k)
    return held

if hold == "import":
    import builtins
    real_import = builtins.__import__
    def imp(name, *a, **k):
        if name == "pipeline.config" and not os.path.exists(event):
            open(event, "w").close()
            import signal
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the signal lands while importing
        return real_import(name, *a, **k)
    builtins.__import__ = imp
elif hold == "job-import":  # inside the job, before its run begins: SIGTERM while it imports the run
    import builtins
    real_import = builtins.__import__
    def imp(name, *a, **k):
        if name == "pipeline.run" and not os.path.exists(event):
            open(event, "w").close()
            import signal
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises here, at once
        return real_import(name, *a, **k)
    builtins.__import__ = imp
elif hold == "load":
    import pipeline.engines.score as s
    s.load_engine = holding(s.load_engine)
elif hold == "write":
    import pipeline.data.write as w
    w.ranked_tables = holding(w.ranked_tables)
elif hold == "native":
    import pipeline.engines.score as s
    s.TorchEngine.score_stream = holding(s.TorchEngine.score_stream)
sys.argv = ["rerank-batch"] + sys.argv[1:]
from jobs.cli import main
main()
"""


# The same child, run as `python -m jobs.cli` runs it: the CLI module is __main__, not jobs.cli.
_CHILD_AS_M = _CHILD.replace("from jobs.cli import main\nmain()\n",
                             "import runpy\nrunpy.run_module('jobs.cli', run_name='__main__', alter_sys=True)\n")


def _spawn(tmp_path, hold, out, child=_CHILD):
    env = dict(os.environ, EVENT=str(tmp_path / "event"), HOLD=hold)
    return subprocess.Popen(
        [sys.executable, "-c", child, "run", SAMPLE, "--model", TINY, "-o", str(out), "-q", "--window", "5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_event(p, tmp_path):
    while not (tmp_path / "event").exists():
        assert p.poll() is None, p.stderr.read()[-2000:]
        time.sleep(0.01)


@pytest.mark.parametrize("hold, sig, child", [("load", signal.SIGTERM, _CHILD), ("write", signal.SIGTERM, _CHILD),
                                              ("write", signal.SIGINT, _CHILD), ("load", signal.SIGTERM, _CHILD_AS_M)])
def test_signal_while_loading_or_writing_stops_with_no_output(tmp_path, hold, sig, child):
    """The last case: under `python -m jobs.cli` the job once read the stop flag of a second copy
    of the CLI module (always unset), so SIGTERM came out as exit 130, 'signal 2'."""
    assert child.count("runpy") == (2 if child is _CHILD_AS_M else 0)
    out = tmp_path / "out.parquet"
    p = _spawn(tmp_path, hold, out, child)
    _wait_event(p, tmp_path)
    p.send_signal(sig)
    try:
        code = p.wait(timeout=120)  # held forever otherwise: without the fix it never exits
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"signal {sig} during {hold} was not honoured")
    err = p.stderr.read()
    assert code == 128 + sig, err[-2000:]
    kept = 28 if hold == "write" else 0  # all scored, or nothing yet
    assert (f"interrupted by signal {int(sig)}; {kept} of 28 pairs are kept in the checkpoint and none will be "
            "scored again; rerun the same command to resume") in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    if hold == "write":  # the checkpoint is intact: the rerun only ranks and writes
        env = dict(os.environ, PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-m", "jobs.cli", "run", SAMPLE, "--model", TINY, "-o", str(out),
                            "--window", "5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "resuming: 6 units already scored" in r.stderr
        assert pq.read_metadata(out).num_rows == 28


def test_two_signals_50ms_apart_count_as_two(tmp_path):
    """While the main thread is in native code, Python runs one handler for both signals; the
    run must still see two and exit at once (it holds in native code forever otherwise)."""
    out = tmp_path / "out.parquet"
    p = _spawn(tmp_path, "native", out)
    _wait_event(p, tmp_path)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    try:
        code = p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the second signal was not counted")
    assert code == 143
    assert not out.exists()


def test_sigint_during_imports_prints_no_traceback(tmp_path):
    p = _spawn(tmp_path, "import", tmp_path / "out.parquet")
    code = p.wait(timeout=120)
    err = p.stderr.read()
    assert (tmp_path / "event").exists()
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_signal_before_the_run_begins_exits_128_plus_signum(tmp_path):
    """Inside the job, before its run takes over the signals' meaning: click would turn the
    KeyboardInterrupt into "Aborted!" and exit 1, which a scheduler reads as a failed run."""
    out = tmp_path / "out.parquet"
    p = _spawn(tmp_path, "job-import", out)
    code = p.wait(timeout=120)
    err = p.stderr.read()
    assert (tmp_path / "event").exists()
    assert code == 143, err[-2000:]
    assert "Aborted" not in err and "Traceback" not in err
    assert not out.exists()
