"""The README is copy-pasteable: every command block that needs no GPU, no hub and no install
runs as written (the sample data, prepare/run/fuse/eval on beir-mini, the multiple-choice walkthrough
on ../shared/data, the Python API snippets); `bench --smoke` runs in tests/test_bench.py.

Commands run in-process (click's CliRunner, `exec` for Python), in a copy of sample_data with a
../shared/data beside it that holds a slice of the real ARC-Challenge set (the whole set takes
minutes on a CPU); `/tmp/` is mapped to a test directory so parallel runs do not collide."""

from __future__ import annotations

import os
import re
import shlex
import shutil

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_cli, shared

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(lang: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return [body for kind, body in FENCE.findall(f.read()) if kind == lang]


def skipped(line: str) -> str | None:
    """Why a README command does not run here, or None when it must."""
    if line.startswith(("pip install", "bash .ci/run")):
        return "installs"
    if "Qwen/Qwen3-Reranker" in line or "candidates.parquet" in line:
        return "needs the real model from the hub"
    if "--arch " in line and "--arch tiny" not in line:
        return "GPU: a full-size architecture"
    if line.startswith("rerank-batch bench --smoke"):
        return "run as written by tests/test_bench.py (a minute on a loaded CPU: not twice)"
    return None


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    work = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "sample_data"), work / "sample_data")
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    arc = pq.read_table(shared("ARC-Challenge.nested.parquet")).slice(0, 20)
    pq.write_table(arc, data / "ARC-Challenge.nested.parquet")
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def test_readme_command_blocks_run_as_written(sandbox):
    ran, skips = [], []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if skipped(line):
                skips.append(line)
                continue
            assert not re.search(r"[|;&<>$`]", line.split(" #")[0]), f"not a plain command: {line}"
            args = shlex.split(line.replace("/tmp/", f"{sandbox}/tmp/"), comments=True)
            assert args[0] == "rerank-batch", line
            r = run_cli(args[1:])
            assert r.exit_code == 0, f"{line}\n{r.output}"
            ran.append(args[1])
    # Every kind of command of the README ran: the sample run and the walkthroughs.
    assert ran.count("prepare") == 2 and ran.count("eval") == 2 and ran.count("run") == 6
    assert ran.count("fuse") == 1 and ran.count("export") == 1 and ran.count("cache") == 2
    assert len(skips) == 6, skips  # update when the README gains a command that cannot run here
    assert os.path.exists(sandbox / "tmp" / "mini.png") and os.path.exists(sandbox / "tmp" / "arc.ranked.parquet")
    assert os.path.exists(sandbox / "tmp" / "mini.fused.parquet") and os.path.exists(sandbox / "tmp" / "arc.ranked.trec")
    assert os.path.exists(sandbox / "tmp" / "pairs.chunks.parquet")  # the long-documents example
    assert os.path.exists(sandbox / "tmp" / "rerank-cache" / ".rerank-batch-cache")  # the score-cache example
    # Pasted twice, a walkthrough block still runs (--overwrite where it writes).
    for block in [b for b in blocks("bash") if "prepare mc" in b]:
        for line in block.splitlines():
            if line.startswith("rerank-batch") and not skipped(line):
                assert run_cli(shlex.split(line.replace("/tmp/", f"{sandbox}/tmp/"), comments=True)[1:]).exit_code == 0


def test_readme_python_snippets_run(sandbox, capsys):
    snippets = [b for b in blocks("python") if "from pipeline" in b]
    assert len(snippets) == 2
    for code in snippets:
        exec(compile(code.replace("/tmp/", f"{sandbox}/tmp/"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "corpus_id" in out and os.path.exists(sandbox / "tmp" / "pairs.ranked.parquet")


def test_readme_sample_eval_output_is_what_eval_prints(sandbox):
    """The table the README shows under the BEIR walkthrough (first stage, reranker, fusion) is the
    one its commands print."""
    shown = next(b for b in blocks("text") if b.startswith("run "))
    block = next(b for b in blocks("bash") if "prepare beir" in b)
    out = None
    for line in block.splitlines():
        args = shlex.split(line.replace("/tmp/", f"{sandbox}/tmp/"), comments=True)
        r = run_cli(args[1:])
        assert r.exit_code == 0, f"{line}\n{r.output}"
        out = r.stdout  # the table; the `wrote` lines go to stderr
    assert out.strip() == shown.strip()
