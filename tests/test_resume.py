"""Crash safety: SIGKILL at any moment, SIGTERM, full disk and fingerprints. Every rerun must
end with exactly the rows and scores of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import KILL_AT_REPLACE_CHILD, ROOT, real_pairs, run_cli, stop_after_pairs
from pipeline.config import RunConfig
from pipeline.errors import CheckpointError, Interrupted, RerankError
from pipeline.run import run

# A child that runs the CLI, optionally SIGKILLing itself at the Nth os.replace whose target
# matches a regex: before the rename (a temp file fully written, not yet in place: the narrowest
# window of a non-atomic writer) or just after it.
_CHILD = KILL_AT_REPLACE_CHILD + r"""
spec = os.environ.get("KILL_AT_UNLINK")
if spec:  # SIGKILL before the Nth unlink whose path matches (the checkpoint's cleanup)
    pattern, nth = spec.rsplit(":", 1)
    real_unlink = os.unlink
    seen_u = [0]
    def unlink(path, *a, **k):
        if re.search(pattern, str(path)):
            seen_u[0] += 1
            if seen_u[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
        return real_unlink(path, *a, **k)
    os.unlink = unlink
sys.argv = ["rerank-batch"] + sys.argv[1:]
from jobs.cli import main
main()
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("resume")
    inp = d / "in.parquet"
    pq.write_table(real_pairs(1000), inp, row_group_size=117)  # 3000 pairs, awkward row groups
    ref = d / "ref.parquet"
    r = run_cli(["run", inp, "--model", models["tied"], "-o", ref, "--window", 53, "-q"])
    assert r.exit_code == 0, r.output
    return {"dir": d, "input": inp, "ref": pq.read_table(ref), "model": models["tied"]}


def _args(job, out):
    return ["run", str(job["input"]), "--model", job["model"], "-o", str(out), "--window", "53", "-q"]


def _spawn(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_same(out, ref, tol=1e-5):
    """The uninterrupted run's rows and scores (to the parity bound: a resumed run may batch a pair
    with other pairs, which moves a float32 score by about 1e-7); ranks may differ only between
    documents of one query whose scores tie within that bound."""
    got = pq.read_table(out)
    assert got.num_rows == ref.num_rows
    assert len(set(got.column("doc_id").to_pylist())) == got.num_rows  # no duplicates
    if got.equals(ref):
        return
    key = [("query_id", "ascending"), ("doc_id", "ascending")]
    g, r = got.sort_by(key), ref.sort_by(key)
    assert g.drop(["score", "rank"]).equals(r.drop(["score", "rank"]))
    gs, rs = g["score"].to_numpy(), r["score"].to_numpy()
    np.testing.assert_allclose(gs, rs, atol=tol, rtol=0)
    q = np.array(r["query_id"].to_pylist())
    for i in np.flatnonzero(g["rank"].to_numpy() != r["rank"].to_numpy()):
        rivals = (q == q[i]) & (np.arange(len(q)) != i)
        assert (np.abs(rs[rivals] - rs[i]) <= 2 * tol).any(), f"row {i}: rank moved without a tie"


def _done(ck):
    """Finished units: the checkpoint's done records (the events the kill tests wait on)."""
    d = ck / "done"
    try:
        return len([n for n in os.listdir(d) if not n.startswith(".")])
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_moments_then_resume(job, tmp_path):
    """Each attempt is killed at a random event of the checkpoint (after 2-10 more finished units,
    plus a random few polls), not at a wall-clock time, so the test kills as often on a loaded
    machine as on an idle one."""
    out = tmp_path / "out.parquet"
    ck = tmp_path / "out.parquet.ckpt"
    rng = random.Random(7)
    kills = 0
    for attempt in range(40):
        target = _done(ck) + rng.randint(2, 10)
        extra_polls = rng.randint(0, 20)
        if out.exists():
            # Killed after publishing, before the cleanup ended: this rerun only cleans up. Killing
            # it too (within the 0-100 ms of polls, before it has even started) would repeat forever.
            break
        p = _spawn(_args(job, out))
        while p.poll() is None and _done(ck) < target and not out.exists():
            time.sleep(0.005)
        for _ in range(extra_polls):  # land mid-batch, mid-part, mid-record or mid-final-write
            if p.poll() is not None:
                break
            time.sleep(0.005)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            if out.exists() and not ck.exists():
                break  # killed while exiting, after all the work was done
            continue
        assert p.returncode == 0, p.stderr.read()[-2000:]
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 5, f"only {kills} kills landed"
    if ck.exists() or not out.exists():
        p = _spawn(_args(job, out))  # the rerun after any kill ends with exit 0 and the output
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    # else the last kill landed after the run had finished and removed its checkpoint: the
    # output is complete, and a rerun is a new run over an existing output (--overwrite).
    _assert_same(out, job["ref"])
    assert sorted(os.listdir(tmp_path)) == ["out.parquet"]


@pytest.mark.parametrize("where", [
    "/parts/[^/]+$:3:before",     # a part fully written, not renamed
    "/parts/[^/]+$:3:after",      # a part in place, without its done record
    "/done/[^/]+$:4:before",      # a done record written, not renamed
    "/out\\.parquet$:1:before",   # the final output written, not renamed
    "/out\\.parquet$:1:after",    # the output in place, not yet marked published
    "checkpoint$:2:after",        # marked published, the checkpoint not yet removed
    "checkpoint$:1:before",       # the marker's first write: its temp file only, not renamed
    "checkpoint$:2:before",       # the output in place, the "published" marker's temp file not renamed
])
def test_sigkill_inside_writes_then_resume(job, tmp_path, where):
    out = tmp_path / "out.parquet"
    p = _spawn(_args(job, out), {"KILL_AT_REPLACE": where})
    p.wait(timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()[-2000:]
    marked = (tmp_path / "out.parquet.ckpt" / ".rerank-batch-checkpoint").exists()
    assert marked != (where == "checkpoint$:1:before")
    if where.endswith("1:before"):
        assert not out.exists()  # never a half-written output under the real name
    p = _spawn(_args(job, out))
    p.wait(timeout=300)
    assert p.returncode == 0, p.stderr.read()[-2000:]
    _assert_same(out, job["ref"])
    assert sorted(os.listdir(tmp_path)) == ["out.parquet"]  # no temp files left behind


def test_sigterm_stops_promptly_and_resumes(job, tmp_path):
    out = tmp_path / "out.parquet"
    ck = tmp_path / "out.parquet.ckpt"
    p = _spawn(_args(job, out))
    t0 = time.monotonic()
    while _done(ck) < 1:
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.monotonic() - t0 < 120
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    t1 = time.monotonic()
    p.wait(timeout=30)
    assert time.monotonic() - t1 < 5, "SIGTERM did not stop the run promptly"
    assert p.returncode == 143
    err = p.stderr.read()
    assert re.search(r"interrupted by signal 15; [0-9,]+ of 3,000 pairs are kept in the checkpoint and none will be "
                     r"scored again; rerun the same command to resume", err), err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()
    done = [n[:-len(".json")] for n in os.listdir(ck / "done")]
    assert done and all((ck / "parts" / f"{u}.parquet").exists() for u in done)
    p = _spawn(_args(job, out))
    p.wait(timeout=300)
    assert p.returncode == 0
    _assert_same(out, job["ref"])


def _cfg(job, out, **kw):
    return RunConfig(inputs=(str(job["input"]),), output=str(out), model=job["model"], window_pairs=53, **kw)


def test_fingerprint_mismatch_is_refused_and_restart_starts_over(job, tmp_path):
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted) as exc:
        run(_cfg(job, out), progress=False, **stop_after_pairs(100, signal.SIGINT))
    assert exc.value.exit_code == 130
    r = run_cli(_args(job, out) + ["--max-length", "512"])
    assert r.exit_code == 2
    assert ("the checkpoint was made with --max-length 8192, this run has --max-length 512; rerun with "
            "--max-length 8192 to resume, or pass --restart to start over") in r.output
    # A changed input file is named too.
    with pytest.raises(CheckpointError, match="different inputs"):
        other = tmp_path / "other.parquet"
        pq.write_table(real_pairs(10), other)
        run(RunConfig(inputs=(str(other),), output=str(out), model=job["model"], window_pairs=53,
                      checkpoint_dir=str(tmp_path / "out.parquet.ckpt")), progress=False)
    r = run_cli(_args(job, out) + ["--max-length", "512", "--restart"])
    assert r.exit_code == 0, r.output
    assert pq.read_table(out).num_rows == job["ref"].num_rows


def test_full_disk_during_a_part_write_leaves_a_valid_checkpoint(job, tmp_path, monkeypatch):
    import errno

    from pipeline.storage.location import LocalLocation

    out = tmp_path / "out.parquet"
    real = LocalLocation.write_atomic
    calls = [0]

    def failing(self, data):
        if os.path.basename(os.path.dirname(self.key)) == "parts":
            calls[0] += 1
            if calls[0] == 5:
                def full(tmp, dst):  # the temp file written, its rename refused
                    raise OSError(errno.ENOSPC, "No space left on device")
                real_replace, os.replace = os.replace, full
                try:
                    return real(self, data)
                finally:
                    os.replace = real_replace
        return real(self, data)

    monkeypatch.setattr(LocalLocation, "write_atomic", failing)
    with pytest.raises(RerankError, match="cannot write a checkpoint part .No space left on device.; free disk space"):
        run(_cfg(job, out), progress=False)
    monkeypatch.setattr(LocalLocation, "write_atomic", real)
    ck = tmp_path / "out.parquet.ckpt"
    assert _done(ck) == 4
    assert not [n for n in os.listdir(ck / "parts") if n.startswith(".tmp")]
    run(_cfg(job, out), progress=False)
    _assert_same(out, job["ref"])


def test_keep_checkpoint_and_checkpoint_dir(job, tmp_path):
    out = tmp_path / "out.parquet"
    ck = tmp_path / "elsewhere"
    r = run_cli(_args(job, out) + ["--checkpoint-dir", ck, "--keep-checkpoint"])
    assert r.exit_code == 0, r.output
    records = [json.loads((ck / "done" / n).read_text()) for n in os.listdir(ck / "done")]
    assert len(records) == len(os.listdir(ck / "parts"))
    assert sum(r["pairs"] for r in records) == job["ref"].num_rows
    assert not (tmp_path / "out.parquet.ckpt").exists()


def test_a_unit_scored_on_its_own_gives_the_part_the_run_commits(job, tmp_path):
    """The executor contract: any unit, scored alone through the scoring loop every unit worker
    runs, gives the part the run committed for it."""
    from pipeline.driver.plan import validate
    from pipeline.engines.score import load_engine
    from pipeline.scoring import score_units

    out = tmp_path / "out.parquet"
    cfg = _cfg(job, out, keep_checkpoint=True, device="cpu")
    run(cfg, progress=False)
    layout, units, _ = validate(dataclasses.replace(cfg, overwrite=True))
    unit = units[len(units) // 2]  # one from the middle, read alone
    (got, part, info), = list(score_units([unit], layout, cfg, load_engine(cfg)))
    committed = pq.read_table(tmp_path / "out.parquet.ckpt" / "parts" / f"{unit.id}.parquet")
    assert got == unit and part.equals(committed)
    assert info["pairs"] == part.num_rows


@pytest.mark.parametrize("where", [
    "/parts/[^/]+$:1", "/parts/[^/]+$:30", "/done/[^/]+$:2", "fingerprint\\.json$:1", "checkpoint$:1",
])
def test_sigkill_during_cleanup_then_the_rerun_exits_0(job, tmp_path, where):
    """A kill between deleting files of the checkpoint; the rerun of the same
    command (an Airflow retry) must end with exit 0 and the complete output, and leave nothing."""
    out = tmp_path / "out.parquet"
    p = _spawn(_args(job, out), {"KILL_AT_UNLINK": where})
    p.wait(timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.read()[-2000:]
    assert out.exists()
    p = _spawn(_args(job, out))
    p.wait(timeout=300)
    err = p.stderr.read()
    assert p.returncode == 0, err[-2000:]
    _assert_same(out, job["ref"])
    assert sorted(os.listdir(tmp_path)) == ["out.parquet"]
