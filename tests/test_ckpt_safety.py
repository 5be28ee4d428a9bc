"""Checkpoints that are ours only, locked, content-verified, and cheap to commit. Each test
reproduces a failure that a weaker checkpoint would let through."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, after_pairs, real_pairs, run_cli, stop_after_pairs
from pipeline.config import RunConfig
from pipeline.errors import CheckpointError, InputError, Interrupted
from pipeline.run import run

_CHILD = r"""
import sys
sys.argv = ["rerank-batch"] + sys.argv[1:]
from jobs.cli import main
main()
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("safety")
    inp = d / "in.parquet"
    pq.write_table(real_pairs(100), inp, row_group_size=37)  # 300 pairs, 6 units of 53
    refs = {}
    for n in (64, 128):
        ref = d / f"ref{n}.parquet"
        r = run_cli(["run", inp, "--model", models["tied"], "-o", ref, "--window", 53, "-q", "--max-length", n])
        assert r.exit_code == 0, r.output
        refs[n] = pq.read_table(ref)
    return {"dir": d, "input": inp, "refs": refs, "model": models["tied"]}


def _args(job, inp, out, n=64, *extra):
    return ["run", str(inp), "--model", job["model"], "-o", str(out), "--window", "53", "-q",
            "--max-length", str(n), *map(str, extra)]


def _spawn(args):
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _cfg(job, inp, out, **kw):
    return RunConfig(inputs=(str(inp),), output=str(out), model=job["model"], window_pairs=53, max_length=64, **kw)


def _done(ck):
    try:
        return len([n for n in os.listdir(ck / "done") if not n.startswith(".")])
    except FileNotFoundError:
        return 0


# -- finding 1: never delete what we did not create --------------------------------------------

def test_checkpoint_dir_we_do_not_own_is_refused_and_untouched(job, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(job["input"], data / "pairs.parquet")
    (data / "notes.txt").write_text("mine")
    before = sorted(os.listdir(data))
    for extra in ([], ["--restart"]):
        r = run_cli(_args(job, data / "pairs.parquet", data / "ranked.parquet", 64, "--checkpoint-dir", data, *extra))
        assert r.exit_code == 2, r.output
        assert f"{data}: not a rerank-batch checkpoint and not empty (holds notes.txt, pairs.parquet)" in r.output
        assert sorted(os.listdir(data)) == before


@pytest.mark.parametrize("names", [("parts/my_data.parquet", "done/report.json"),
                                   ("fingerprint.json", ".tmp-settings.json"), (".rerank-batch-lock", "done/x.json")])
def test_a_directory_whose_files_have_our_names_but_no_marker_is_refused_and_untouched(job, tmp_path, names):
    """Names a checkpoint uses (parts/, done/, fingerprint.json, .tmp-*) do not make a directory
    ours: only the marker does. Before, such files were taken for a checkpoint's and deleted."""
    ck = tmp_path / "mine"
    for n in names:
        (ck / n).parent.mkdir(parents=True, exist_ok=True)
        (ck / n).write_text("{}")
    before = sorted(str(p.relative_to(ck)) for p in ck.rglob("*"))
    r = run_cli(_args(job, job["input"], tmp_path / "out.parquet", 64, "--checkpoint-dir", ck))
    assert r.exit_code == 2, r.output
    assert "not a rerank-batch checkpoint and not empty" in r.output
    assert sorted(str(p.relative_to(ck)) for p in ck.rglob("*")) == before
    assert not (tmp_path / "out.parquet").exists()


def test_what_a_starting_run_makes_before_its_marker_is_not_a_stranger(tmp_path):
    """A second run that looks while the first has its lease but not yet its marker must wait
    (exit 75 on the lease), not call the directory someone else's."""
    from pipeline.storage import checkpoint
    from pipeline.storage.location import location

    hexid = "0123456789abcdef" * 2
    for n in (".rerank-batch-lock", ".rerank-batch-lease.json", f".probe-{hexid}",
              f".tmp-{hexid}-.rerank-batch-checkpoint", f".tmp-{hexid}-.rerank-batch-lease.json"):
        (tmp_path / n).write_text("")
    assert checkpoint.strangers(location(str(tmp_path))) == []
    (tmp_path / f".tmp-{hexid}-fingerprint.json").write_text("")
    assert checkpoint.strangers(location(str(tmp_path))) == [f".tmp-{hexid}-fingerprint.json"]


def test_an_empty_checkpoint_dir_of_the_user_is_kept_and_only_our_files_go(job, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        run(_cfg(job, job["input"], out, checkpoint_dir=str(ck)), progress=False, **stop_after_pairs(1))
    (ck / "notes.txt").write_text("a stranger's file in our checkpoint")
    r = run_cli(_args(job, job["input"], out, 64, "--checkpoint-dir", ck))
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).equals(job["refs"][64])
    assert os.listdir(ck) == ["notes.txt"]  # ours gone, theirs and the directory kept


# -- finding 2: a lock, and two runs at random offsets --------------------------------------------

def test_overlapping_runs_at_random_offsets(job, tmp_path):
    rng = random.Random(11)
    for i in range(4):
        d = tmp_path / f"r{i}"
        d.mkdir()
        out = d / "out.parquet"
        ck = d / "out.parquet.ckpt"
        a = _spawn(_args(job, job["input"], out, 64))
        wait_units = rng.randint(0, 4)  # start the second run after a random number of finished units
        while a.poll() is None and _done(ck) < wait_units:
            time.sleep(0.005)
        b = _spawn(_args(job, job["input"], out, 128))
        ra, rb = a.wait(timeout=300), b.wait(timeout=300)
        errs = {64: a.stderr.read(), 128: b.stderr.read()}
        codes = {64: ra, 128: rb}
        assert sorted(codes.values()) in ([0, 2], [0, 75]), errs
        winner = 64 if ra == 0 else 128
        loser = 128 if winner == 64 else 64
        if codes[loser] == 75:
            assert "another run holds this checkpoint (pid " in errs[loser]
        else:
            assert "the output exists; pass --overwrite" in errs[loser]
        assert "Traceback" not in errs[loser]
        assert pq.read_table(out).equals(job["refs"][winner])  # whole, and of one option set
        assert sorted(os.listdir(d)) == ["out.parquet"]


def test_a_lock_of_a_dead_run_does_not_block(job, tmp_path):
    out = tmp_path / "out.parquet"
    p = _spawn(_args(job, job["input"], out, 64))
    ck = tmp_path / "out.parquet.ckpt"
    while _done(ck) < 1:
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    holder = json.loads((ck / ".rerank-batch-lock").read_text())
    assert holder["pid"] == p.pid
    p.kill()
    p.wait()
    r = run_cli(_args(job, job["input"], out, 64))
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).equals(job["refs"][64])


# -- findings 3 and 4: inputs verified by content ---------------------------------------------

def _edit_one_char(path):
    data = bytearray(path.read_bytes())
    doc = pq.read_table(path).column("document")[5].as_py().encode()
    at = data.find(doc)
    assert at > 0
    k = at + len(doc) // 2
    data[k] = ord("X") if data[k] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))


def test_same_size_edit_is_refused_and_touch_or_copy_resumes(job, tmp_path):
    inp = tmp_path / "in.parquet"
    pq.write_table(real_pairs(100), inp, row_group_size=37, compression="none")
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        run(_cfg(job, inp, out), progress=False, **stop_after_pairs(100))
    assert _done(out.parent / (out.name + ".ckpt")) > 0
    # A touch, then a copy with the same bytes: the checkpoint resumes.
    os.utime(inp, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(Interrupted):
        run(_cfg(job, inp, out), progress=False, **stop_after_pairs(100))
    assert _done(out.parent / (out.name + ".ckpt")) > 0
    shutil.copy(inp, tmp_path / "copy.parquet")
    os.replace(tmp_path / "copy.parquet", inp)
    size = inp.stat().st_size
    _edit_one_char(inp)
    assert inp.stat().st_size == size
    r = run_cli(_args(job, inp, out, 64))
    assert r.exit_code == 2, r.output
    assert (f"{inp}: the file changed since the checkpoint was made (its content differs); its old scores cannot "
            "be reused: pass --restart to score it again") in r.output
    r = run_cli(_args(job, inp, out, 64, "--restart"))
    assert r.exit_code == 0, r.output
    got = pq.read_table(out)
    ref = run_cli(_args(job, inp, tmp_path / "fresh.parquet", 64))
    assert ref.exit_code == 0
    assert got.equals(pq.read_table(tmp_path / "fresh.parquet"))


def test_touch_then_resume_gives_the_uninterrupted_output(job, tmp_path):
    inp = tmp_path / "in.parquet"
    shutil.copy(job["input"], inp)
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        run(_cfg(job, inp, out), progress=False, **stop_after_pairs(100))
    assert _done(out.parent / (out.name + ".ckpt")) > 0
    os.utime(inp)
    run(_cfg(job, inp, out), progress=False)
    assert pq.read_table(out).equals(job["refs"][64])


def test_input_replaced_mid_run_is_never_published(job, tmp_path):
    inp = tmp_path / "in.parquet"
    shutil.copy(job["input"], inp)
    out = tmp_path / "out.parquet"

    def replace_with_longer():
        pq.write_table(real_pairs(120), tmp_path / "new.parquet", row_group_size=37)
        os.replace(tmp_path / "new.parquet", inp)

    with pytest.raises(InputError, match="the file changed during the run; nothing was published: rerun with "
                                         "--restart"):
        run(_cfg(job, inp, out), progress=False, on_progress=after_pairs(1, replace_with_longer))
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


# -- finding 8: a damaged part is redone --------------------------------------------------------

def test_zero_byte_or_garbage_parts_are_scored_again(job, tmp_path):
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        run(_cfg(job, job["input"], out), progress=False, **stop_after_pairs(150))
    ck = tmp_path / "out.parquet.ckpt"
    parts = sorted((ck / "parts").iterdir())
    assert len(parts) >= 2
    parts[0].write_bytes(b"")
    parts[1].write_bytes(b"garbage" * 100)
    r = run_cli(_args(job, job["input"], out, 64))
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).equals(job["refs"][64])


# -- finding 10: options that change float32 scores are in the fingerprint --------------------

@pytest.mark.parametrize("extra, field", [
    (["--engine", "transformers"], "--engine auto, this run has --engine transformers; rerun with --engine auto"),
    (["--max-batch-tokens", "999"], "no --max-batch-tokens, this run has --max-batch-tokens 999; rerun without "
                                    "--max-batch-tokens")])
def test_engine_and_batch_budget_must_match_to_resume(job, tmp_path, extra, field):
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        run(_cfg(job, job["input"], out), progress=False, **stop_after_pairs(100))
    assert _done(out.parent / (out.name + ".ckpt")) > 0
    r = run_cli(_args(job, job["input"], out, 64, *extra))
    assert r.exit_code == 2, r.output
    assert f"the checkpoint was made with {field} to resume, or pass --restart to start over" in r.output


# -- findings 11 and 13: commit cost independent of the number of units ------------------------

def test_commit_writes_two_small_objects_whatever_the_unit_count(job, tmp_path, monkeypatch):
    from pipeline.storage.location import LocalLocation

    writes = []
    units = {}  # record name -> the units it lists
    real = LocalLocation.write_atomic

    def record(self, data):
        writes.append((f"{os.path.basename(os.path.dirname(self.key))}/{self.name}", len(data)))
        if writes[-1][0].startswith("done/"):
            units[writes[-1][0]] = len(json.loads(data).get("units", [0]))
        return real(self, data)

    monkeypatch.setattr(LocalLocation, "write_atomic", record)
    out = tmp_path / "out.parquet"
    cfg = RunConfig(inputs=(str(job["input"]),), output=str(out), model=job["model"], window_pairs=2, max_length=64)
    run(cfg, progress=False)
    records = [n for n, _ in writes if n.startswith("done/")]
    parts = [n for n, _ in writes if n.startswith("parts/")]
    assert len(records) == len(parts) > 150  # one unit per 2 pairs, split at row groups
    other = [n for n, _ in writes if not n.startswith(("done/", "parts/"))]
    assert len(other) <= 4  # marker, fingerprint, published marker (and a probe): not per unit
    # A record does not grow: one unit's is small, and one of units committed together (units
    # whose pairs earlier units of the run all answered, as exact repeats, join a group) grows
    # only with the units it lists, never with the run.
    sizes = {n: size for n, size in writes if n.startswith("done/")}
    assert all(size < 512 * units[n] for n, size in sizes.items())
    assert max(size for n, size in sizes.items() if units[n] == 1) < 512
    got, ref = pq.read_table(out), job["refs"][64]
    assert got.num_rows == ref.num_rows
    diff = (got.sort_by("doc_id").column("score").to_numpy() - ref.sort_by("doc_id").column("score").to_numpy())
    assert abs(diff).max() <= 1e-5


# -- finding 11: many small files share batches ----------------------------------------------------

def test_many_small_files_share_full_batches(job, tmp_path):
    """60 one-row files are 60 units (a unit never spans files), but their pairs are scored
    together in full batches, not in 60 batches of one pair; each unit keeps its own part."""
    src = pq.read_table(job["input"]).slice(0, 60)
    many = tmp_path / "many"
    many.mkdir()
    for i in range(src.num_rows):
        pq.write_table(src.slice(i, 1), many / f"f{i:03d}.parquet")
    one = tmp_path / "one.parquet"
    pq.write_table(src, one)
    kw = dict(model=job["model"], max_length=64, window_pairs=64)
    s_many = run(RunConfig(inputs=(str(many),), output=str(tmp_path / "many.out.parquet"), **kw), progress=False)
    s_one = run(RunConfig(inputs=(str(one),), output=str(tmp_path / "one.out.parquet"), **kw), progress=False)
    assert s_many.units == 60 and s_one.units == 1
    assert s_many.batches == s_one.batches  # the same packing as one file, not one batch per file
    got = pq.read_table(tmp_path / "many.out.parquet").sort_by("doc_id")
    ref = pq.read_table(tmp_path / "one.out.parquet").sort_by("doc_id")
    assert got.column("doc_id").equals(ref.column("doc_id"))
    assert abs(got.column("score").to_numpy() - ref.column("score").to_numpy()).max() <= 1e-6


# -- finding 14: --restart does not overwrite an output without --overwrite ----------------------

def test_restart_does_not_overwrite_an_existing_output(job, tmp_path):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"someone's file")
    r = run_cli(_args(job, job["input"], out, 64, "--restart"))
    assert r.exit_code == 2, r.output
    assert "the output exists; pass --overwrite to replace it" in r.output
    assert out.read_bytes() == b"someone's file"
    assert sorted(os.listdir(tmp_path)) == ["out.parquet"]


# -- the summary's seconds is the whole run; its two rates say which time they count -------------

def test_summary_seconds_is_the_whole_run(job, tmp_path):
    out, s = tmp_path / "out.parquet", tmp_path / "s.json"
    r = run_cli(_args(job, job["input"], out, 64, "--summary", s))
    assert r.exit_code == 0, r.output
    summary = json.loads(s.read_text())
    stages = sum(v for k, v in summary["extra"].items() if k.startswith("seconds_"))
    assert summary["seconds"] >= stages > 0


def test_summary_names_its_scoring_rate_and_its_whole_run_rate(job, tmp_path):
    out, s = tmp_path / "out.parquet", tmp_path / "s.json"
    r = run_cli(_args(job, job["input"], out, 64, "--summary", s))
    assert r.exit_code == 0, r.output
    summary = json.loads(s.read_text())
    assert "pairs_per_s" not in summary and "tokens_per_s" not in summary
    assert summary["run_pairs_per_s"] == pytest.approx(summary["pairs_scored"] / summary["seconds"], rel=1e-2)
    # Scoring is part of the run, so its rate can only be the higher one.
    assert summary["scoring_pairs_per_s"] >= summary["run_pairs_per_s"] > 0
    assert summary["scoring_tokens_per_s"] > summary["scoring_pairs_per_s"]


def test_checkpoint_error_is_a_checkpoint_error(job, tmp_path):
    """A different input list is named as such (the fingerprint's inputs)."""
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        run(_cfg(job, job["input"], out), progress=False, **stop_after_pairs(100))
    assert _done(out.parent / (out.name + ".ckpt")) > 0
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"query": ["q"], "document": ["d"]}), other)
    with pytest.raises(CheckpointError, match="different inputs"):
        run(RunConfig(inputs=(str(other),), output=str(out), model=job["model"], window_pairs=53, max_length=64,
                      checkpoint_dir=str(tmp_path / "out.parquet.ckpt")), progress=False)


def test_a_checkpoint_of_the_old_format_is_named_and_kept(job, tmp_path):
    ck = tmp_path / "out.parquet.ckpt"
    (ck / "parts").mkdir(parents=True)
    (ck / "manifest.json").write_text("{}")
    r = run_cli(_args(job, job["input"], tmp_path / "out.parquet"))
    assert r.exit_code == 2 and "a checkpoint of an older rerank-batch (manifest.json)" in r.output, r.output
    assert sorted(os.listdir(ck)) == ["manifest.json", "parts"]


def test_a_rerun_with_another_top_k_rewrites_a_published_output(job, tmp_path):
    """--top-k is not in the fingerprint (it shapes the output, not the scores), so the
    published record carries it: a rerun that asks for another writes the output again."""
    out = tmp_path / "out.parquet"
    r = run_cli(_args(job, job["input"], out, 64, "--keep-checkpoint"))
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).equals(job["refs"][64])
    r = run_cli(_args(job, job["input"], out, 64, "--top-k", 1, "--overwrite"))
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    ref = job["refs"][64]
    key = "query_id" if "query_id" in ref.column_names else "query"
    assert t.num_rows == len(set(ref.column(key).to_pylist())) < ref.num_rows  # one row per query
    assert set(t.column("rank").to_pylist()) == {1}


def test_a_recursive_glob_over_the_outputs_folder_resumes(job, tmp_path):
    """`D/**/*.parquet -o D/out.parquet`: after a kill, the checkpoint's parts under D are not
    taken for inputs (they were: 'the input already has a column score')."""
    d = tmp_path / "D"
    (d / "sub").mkdir(parents=True)
    shutil.copy(job["input"], d / "sub" / "in.parquet")
    out = d / "out.parquet"
    spec = str(d / "**" / "*.parquet")
    with pytest.raises(Interrupted):
        run(_cfg(job, spec, out), progress=False, **stop_after_pairs(1))
    assert _done(d / "out.parquet.ckpt") >= 1
    r = run_cli(_args(job, spec, out, 64))
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).equals(job["refs"][64])


def test_a_file_whose_name_looks_like_a_glob_is_that_file(job, tmp_path):
    f = tmp_path / "data[1].parquet"
    shutil.copy(job["input"], f)
    r = run_cli(_args(job, f, tmp_path / "out.parquet", 64))
    assert r.exit_code == 0, r.output
    assert pq.read_table(tmp_path / "out.parquet").equals(job["refs"][64])


@pytest.mark.parametrize("target", ["output", "input", "dir"])
def test_the_summary_never_lands_on_the_output_an_input_or_a_directory(job, tmp_path, target):
    inp = tmp_path / "in.parquet"
    shutil.copy(job["input"], inp)
    out = tmp_path / "out.parquet"
    if target == "output":
        out.write_bytes(b"an old output")
    path = {"output": out, "input": inp, "dir": tmp_path}[target]
    before = inp.read_bytes()
    r = run_cli(_args(job, inp, out, 64, "--overwrite", "--summary", path))
    assert r.exit_code == 2, r.output
    assert f"--summary {path}:" in r.output
    assert inp.read_bytes() == before
    if target == "output":
        assert out.read_bytes() == b"an old output"


def test_a_checkpoint_made_for_another_output_does_not_own_this_one(job, tmp_path):
    """A kept checkpoint of `-o o1` reused with `-o p` where p exists: p is not the checkpoint's
    to replace (it was overwritten), so --overwrite is asked for; o1's own rerun still resumes."""
    ck, o1, p = tmp_path / "ck", tmp_path / "o1.parquet", tmp_path / "p.parquet"
    r = run_cli(_args(job, job["input"], o1, 64, "--checkpoint-dir", ck, "--keep-checkpoint"))
    assert r.exit_code == 0, r.output
    p.write_bytes(b"precious")
    r = run_cli(_args(job, job["input"], p, 64, "--checkpoint-dir", ck))
    assert r.exit_code == 2, r.output
    assert "the output exists; pass --overwrite" in r.output
    assert p.read_bytes() == b"precious"
    r = run_cli(_args(job, job["input"], o1, 64, "--checkpoint-dir", ck))
    assert r.exit_code == 0, r.output
    assert pq.read_table(o1).equals(job["refs"][64])


def test_restart_clears_a_damaged_marker(job, tmp_path):
    """The error for a damaged marker names --restart; --restart then has to work."""
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        run(_cfg(job, job["input"], out), progress=False, **stop_after_pairs(1))
    marker = tmp_path / "out.parquet.ckpt" / ".rerank-batch-checkpoint"
    marker.write_text("{not json")
    r = run_cli(_args(job, job["input"], out, 64))
    assert r.exit_code == 2 and "pass --restart" in r.output, r.output
    r = run_cli(_args(job, job["input"], out, 64, "--restart"))
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).equals(job["refs"][64])


def test_restart_removes_the_temp_output_of_the_run_it_replaces(job, tmp_path):
    """A temp output left by a run killed in its final write carries that run's id; --restart
    gives the checkpoint a new id, and kept the old temp file (the output's size) forever."""
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        run(_cfg(job, job["input"], out), progress=False, **stop_after_pairs(1))
    old_id = json.loads((tmp_path / "out.parquet.ckpt" / ".rerank-batch-checkpoint").read_text())["run_id"]
    left = tmp_path / f".out.parquet.{old_id}-0badf00d.partial"
    left.write_bytes(b"a killed final write")
    theirs = tmp_path / ".out.parquet.someoneelse-0badf00d.partial"
    theirs.write_bytes(b"not ours")
    r = run_cli(_args(job, job["input"], out, 64, "--restart"))
    assert r.exit_code == 0, r.output
    assert not left.exists() and theirs.exists()
    assert pq.read_table(out).equals(job["refs"][64])


def test_a_long_output_name_is_written(job, tmp_path):
    """The temp output's name adds about 30 characters to the output's: with a 240-byte name it
    went past the file system's 255 and failed after all the scoring."""
    out = tmp_path / ("a" * 232 + ".parquet")
    r = run_cli(_args(job, job["input"], out, 64))
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).equals(job["refs"][64])


def test_a_full_disk_at_the_start_is_exit_1_and_leaves_no_directory(job, tmp_path, monkeypatch):
    """No space for the lock file: a runtime failure (exit 1, free space), not a usage error,
    and the checkpoint directory the run had just made is gone again."""
    import errno as _errno

    from pipeline.storage import lock

    real = lock.LocalLease.acquire

    def full(self, *a, **k):
        open(self.path, "w").close()  # made, then the write of its record fails
        raise OSError(_errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.LocalLease, "acquire", full)
    out = tmp_path / "out.parquet"
    r = run_cli(_args(job, job["input"], out, 64))
    monkeypatch.setattr(lock.LocalLease, "acquire", real)
    assert r.exit_code == 1, r.output
    assert "No space left on device); free space there" in r.output
    assert not (tmp_path / "out.parquet.ckpt").exists() and not out.exists()


def test_an_output_that_appears_while_scoring_is_not_replaced_without_overwrite(job, tmp_path):
    out = tmp_path / "out.parquet"

    def someone_writes_it():
        out.write_bytes(b"precious")

    with pytest.raises(InputError, match="the output appeared while this run was scoring; pass --overwrite"):
        run(_cfg(job, job["input"], out), progress=False, on_progress=after_pairs(1, someone_writes_it))
    assert out.read_bytes() == b"precious"
    assert _done(tmp_path / "out.parquet.ckpt") >= 1  # the scores are kept for the rerun
    r = run_cli(_args(job, job["input"], out, 64, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).equals(job["refs"][64])


# -- a checkpoint's folders moved by a link; parts and records verified by content ---------------

def _partial(job, out, n=150):
    """A run of the 6-unit job stopped after the unit of its n-th pair: its checkpoint directory."""
    with pytest.raises(Interrupted):
        run(_cfg(job, job["input"], out), progress=False, **stop_after_pairs(n))
    ck = out.parent / (out.name + ".ckpt")
    assert _done(ck) >= 2
    return ck


def _strangers_beside(folder):
    folder.mkdir()
    (folder / "precious_dataset.parquet").write_bytes(b"PAR1 not ours PAR1")
    (folder / "settings.json").write_text('{"keep": true}')
    (folder / "00000-notes.json").write_text("{}")  # close to our names, not one of them


@pytest.mark.parametrize("folder", ["parts", "done", "dedup"])
def test_a_linked_parts_or_done_folder_is_used_and_only_our_files_in_it_are_deleted(job, tmp_path, folder):
    out = tmp_path / "out.parquet"
    ck = _partial(job, out)
    n = _done(ck)
    big = tmp_path / "bigger-disk"
    _strangers_beside(big)
    for p in (ck / folder).iterdir():
        shutil.move(p, big / p.name)
    (ck / folder).rmdir()
    os.symlink(big, ck / folder)
    s = run(_cfg(job, job["input"], out), progress=False)
    assert s.units_resumed == n  # read through the link
    assert pq.read_table(out).equals(job["refs"][64])
    assert sorted(os.listdir(big)) == ["00000-notes.json", "precious_dataset.parquet", "settings.json"]
    assert not ck.exists()  # our files, then the link (not its folder), then the checkpoint


@pytest.mark.parametrize("folder", ["parts", "done"])
def test_restart_with_a_linked_folder_deletes_only_our_files_in_it(job, tmp_path, folder):
    out = tmp_path / "out.parquet"
    ck = _partial(job, out)
    big = tmp_path / "bigger-disk"
    _strangers_beside(big)
    for p in (ck / folder).iterdir():
        shutil.move(p, big / p.name)
    (ck / folder).rmdir()
    os.symlink(big, ck / folder)
    s = run(_cfg(job, job["input"], out, restart=True, keep_checkpoint=True), progress=False)
    assert s.units_resumed == 0
    assert pq.read_table(out).equals(job["refs"][64])
    ours = sorted(n for n in os.listdir(big) if n not in ("00000-notes.json", "precious_dataset.parquet",
                                                          "settings.json"))
    assert len(ours) == s.units and all(n.endswith(".parquet" if folder == "parts" else ".json") for n in ours)
    assert (big / "precious_dataset.parquet").read_bytes() == b"PAR1 not ours PAR1"
    assert (big / "settings.json").read_text() == '{"keep": true}'


def test_a_unit_file_that_is_a_link_is_unlinked_not_followed(job, tmp_path):
    out = tmp_path / "out.parquet"
    ck = _partial(job, out)
    part = sorted((ck / "parts").iterdir())[0]
    elsewhere = tmp_path / "kept" / part.name
    elsewhere.parent.mkdir()
    shutil.move(part, elsewhere)
    os.symlink(elsewhere, part)
    run(_cfg(job, job["input"], out), progress=False)
    assert pq.read_table(out).equals(job["refs"][64])
    assert elsewhere.exists() and not ck.exists()


def _flip_document_byte(part):
    """Change one byte of a part so that it still reads, with the same size and rows, but one
    document's text differs (parts carry no page checksums): the first such byte from the start."""
    data = bytes(part.read_bytes())
    before = pq.read_table(part)
    for k in range(4, len(data) - 8):
        changed = bytearray(data)
        changed[k] ^= 0x01
        try:
            t = pq.read_table(pa.BufferReader(bytes(changed)))
        except (pa.ArrowException, OSError):
            continue
        if (t.num_rows == before.num_rows and t.drop_columns(["document"]).equals(before.drop_columns(["document"]))
                and not t.column("document").equals(before.column("document"))):
            part.write_bytes(bytes(changed))
            return
    raise AssertionError(f"no byte of {part} changes a document alone")


def test_a_part_whose_bytes_changed_is_scored_again(job, tmp_path, caplog):
    out = tmp_path / "out.parquet"
    ck = _partial(job, out)
    n = _done(ck)
    part = sorted((ck / "parts").iterdir())[0]
    size = part.stat().st_size
    _flip_document_byte(part)
    assert part.stat().st_size == size and pq.read_metadata(part).num_rows > 0
    with caplog.at_level("WARNING"):
        s = run(_cfg(job, job["input"], out), progress=False)
    assert pq.read_table(out).equals(job["refs"][64])
    assert s.units_resumed == n - 1 and s.pairs_scored == 300  # all but the changed one
    uid = part.name[: -len(".parquet")]
    assert [r.getMessage() for r in caplog.records if uid in r.getMessage()] == [
        f"{ck}: unit {uid}: its part differs from its record (the part's content changed); scoring it again"]


def test_a_part_and_record_copied_over_another_units_are_scored_again(job, tmp_path, caplog):
    out = tmp_path / "out.parquet"
    ck = _partial(job, out)
    a, b = [p.name[: -len(".parquet")] for p in sorted((ck / "parts").iterdir())[:2]]
    shutil.copy(ck / "parts" / f"{a}.parquet", ck / "parts" / f"{b}.parquet")
    shutil.copy(ck / "done" / f"{a}.json", ck / "done" / f"{b}.json")
    with caplog.at_level("WARNING"):
        run(_cfg(job, job["input"], out), progress=False)
    assert pq.read_table(out).equals(job["refs"][64])
    assert f"{ck}: unit {b}: its record is of unit {a}; scoring it again" in caplog.text


def test_an_edited_record_is_not_trusted_by_the_summary(job, tmp_path, caplog):
    out = tmp_path / "out.parquet"
    ck = _partial(job, out)
    rec = sorted((ck / "done").iterdir())[0]
    rec.write_text(rec.read_text().replace('"pairs": ', '"pairs": 40'))
    with caplog.at_level("WARNING"):
        s = run(_cfg(job, job["input"], out), progress=False)
    assert s.pairs_scored == 300 and s.rows == 300
    assert pq.read_table(out).equals(job["refs"][64])
    assert (f"{ck}: unit {rec.name[:-len('.json')]}: its record is not the one written with its part (edited, or "
            "of an older version); scoring it again") in caplog.text


def test_a_part_changed_while_the_run_goes_on_is_scored_again_before_the_final_write(job, tmp_path):
    out = tmp_path / "out.parquet"
    ck = tmp_path / "out.parquet.ckpt"
    flipped = []

    def flip_first_part():  # after the third unit's batch: two units are committed
        if _done(ck) >= 2:
            _flip_document_byte(sorted((ck / "parts").iterdir())[0])
            flipped.append(1)

    s = run(_cfg(job, job["input"], out), progress=False, on_progress=after_pairs(150, flip_first_part))
    assert flipped
    assert pq.read_table(out).equals(job["refs"][64])
    assert s.pairs_scored == 300


def test_parts_that_keep_changing_on_disk_fail_the_run_and_publish_nothing(job, tmp_path, monkeypatch):
    from pipeline.storage import checkpoint

    monkeypatch.setattr(checkpoint, "part_digest", lambda data: "0" * 64)  # never what was written
    out = tmp_path / "out.parquet"
    r = run_cli(_args(job, job["input"], out, 64))
    assert r.exit_code == 1, r.output
    ck = tmp_path / "out.parquet.ckpt"
    assert r.output.strip().splitlines()[-1] == (
        f"Error: {ck}: the part of unit 00000-000000000000-000000000037 changed on disk right after it was written; "
        "check that disk (or pass another --checkpoint-dir), then rerun the same command")
    assert not out.exists()
