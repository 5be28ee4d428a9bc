"""The host side of a run: what feeds the device, measured by `bench --host-only --arch <cross-encoder>`
(pipeline/bench/host.py). A run imports no pandas; the first batch of a small input does not wait
for the whole input to be tokenized; a stream of chunks is batched as the rule says (a chunk's
full batches at once, the remainder with the next chunk) whatever the chunks' sizes, each pair
scored once with the whole input's score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, _corpus, real_pairs, run_cli
from forward_doubles import FaultyForward
from pipeline.config import RunConfig
from pipeline.engines import forwards
from pipeline.engines.packing import plan_batches
from pipeline.engines.score import TorchEngine, load_engine
from pipeline.engines.tokenize import Encoded

TOL = 1e-5


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from pipeline.bench.synthetic import build_cross_encoder

    return str(build_cross_encoder(tmp_path_factory.mktemp("bert"), "bert", _corpus()[:200], num_labels=1))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    t = real_pairs(300)  # 900 pairs: under a quarter of a window, in 3 chunks (256, 512, the rest)
    path = str(tmp_path_factory.mktemp("in") / "pairs.parquet")
    pq.write_table(t.select(["query_id", "query", "doc_id", "document"]), path)
    return path, t.num_rows


def test_a_run_imports_no_pandas(bert, pairs_file, tmp_path):
    """pyarrow imports pandas (0.3 s and more) at its first pandas probe; a run never needs it,
    and an import in the first unit delayed its first batch."""
    code = ("import sys; from pipeline.config import RunConfig; from pipeline.run import run\n"
            f"s = run(RunConfig(inputs=({pairs_file[0]!r},), output={str(tmp_path / 'o.parquet')!r}, model={bert!r}, "
            "device='cpu', max_length=512), progress=False)\n"
            "print(s.pairs_scored, 'pandas' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == [str(pairs_file[1]), "False"]


def test_a_small_input_is_scored_while_it_is_tokenized(bert, pairs_file, tmp_path, monkeypatch):
    """A unit under a quarter of a window joins a group of small units; the group's chunks go to
    the device as they come: the last chunk is tokenized only once the first batch ran (it
    waits for that event; before, the whole group was tokenized first and this run would fail)."""
    from pipeline.engines import tokenize
    from pipeline.run import run

    first_batch = threading.Event()
    real = forwards.choose
    monkeypatch.setattr(forwards, "choose", lambda m, cfg: FaultyForward(real(m, cfg),
                                                                        lambda batch, calls: first_batch.set()))
    encode = tokenize.CrossEncoderEncoder.encode
    calls = []

    def gated(self, instructions, queries, documents):
        calls.append(len(queries))
        if len(calls) >= 3 and not first_batch.wait(120):  # a failure guard, not a timing
            raise AssertionError("the last chunks were tokenized before any batch ran")
        return encode(self, instructions, queries, documents)

    monkeypatch.setattr(tokenize.CrossEncoderEncoder, "encode", gated)
    n = pairs_file[1]
    s = run(RunConfig(inputs=(pairs_file[0],), output=str(tmp_path / "o.parquet"), model=bert, device="cpu", max_length=512,
                      max_batch_tokens=2048), progress=False)
    assert n < RunConfig(inputs=(), output="").window_pairs // 4  # one small unit: a group
    assert len(calls) >= 3 and s.pairs_scored == n
    ref = run(RunConfig(inputs=(pairs_file[0],), output=str(tmp_path / "r.parquet"), model=bert, device="cpu", max_length=512,
                        max_batch_tokens=2048), progress=False)
    a, b = pq.read_table(s.output), pq.read_table(ref.output)
    assert a.equals(b)


def _batches_by_rule(lengths: np.ndarray, sizes: list[int], budget: int) -> list[list[int]]:
    """The documented rule, written out: pool = the remainder, then the chunk's pairs; plan the
    pool; send every batch but the last; at the end send the rest."""
    out, pool, start = [], np.empty(0, np.int64), 0
    for k in sizes:
        pool = np.concatenate([pool, np.arange(start, start + k)])
        start += k
        plan = plan_batches(lengths[pool], budget)
        out += [pool[b].tolist() for b in plan[:-1]]
        pool = pool[plan[-1]]
    if len(pool):
        out += [pool[b].tolist() for b in plan_batches(lengths[pool], budget)]
    return out


@pytest.mark.parametrize("sizes", [[5, 40, 3, 1, 30], [79], [1] * 79])
def test_a_stream_is_batched_by_the_rule_and_scores_each_pair_once(bert, sizes):
    eng = load_engine(RunConfig(inputs=(), output="", model=bert, device="cpu", max_length=512))
    t = real_pairs(60)
    distinct = list(dict.fromkeys(zip(t.column("query").to_pylist(), t.column("document").to_pylist())))[:79]
    q, d = [a for a, _ in distinct], [b for _, b in distinct]
    assert len(q) == 79
    whole = eng.encoder.encode([None] * len(q), q, d)
    seen: list[list[tuple]] = []
    # Pairs told apart by their ids: the batches the forward gets, as stream positions.
    pos = {tuple(whole.ids[whole.offsets[i]:whole.offsets[i + 1]].tolist()): i for i in range(len(whole))}
    assert len(pos) == len(whole)

    def record(batch, calls):
        seen.append([pos[tuple(batch.ids[a:b].tolist())] for a, b in zip(batch.cu[:-1], batch.cu[1:])])

    budget = 900
    small = TorchEngine(FaultyForward(eng.forward, record), eng.encoder, RunConfig(inputs=(), output=""), eng.info,
                        token_budget=budget)
    chunks, start = [], 0
    for k in sizes:
        chunks.append(Encoded(whole.ids[whole.offsets[start]:whole.offsets[start + k]],
                              whole.offsets[start:start + k + 1] - whole.offsets[start],
                              whole.truncated[start:start + k],
                              whole.type_ids[whole.offsets[start]:whole.offsets[start + k]]))
        start += k
    got = small.score_stream(iter(chunks))
    assert seen == _batches_by_rule(whole.lengths, sizes, budget)
    assert sorted(i for b in seen for i in b) == list(range(len(whole)))
    assert np.abs(got - eng.score(whole)).max() <= TOL


def test_bench_host_only_for_a_cross_encoder(tmp_path):
    out = tmp_path / "host.json"
    r = run_cli(["bench", "--host-only", "--arch", "minilm-l6", "--smoke", "--json", out])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    row = rec["sizes"]["64"]
    assert row["pairs"] == 64 and row["scoring_pairs_per_s"]["median"] > 0
    # Every stage of the scoring span ran (a fast one may round to 0 s), and the span holds its
    # first batch.
    for stage in ("read", "plan_dedup", "tokenize", "gather", "commit", "part_encode"):
        assert row["stages"][stage]["calls"] > 0 and row["stages"][stage]["wall_s"] >= 0, stage
    assert 0 < row["first_batch_after_s"] <= row["runs"][0]["scoring_s"]
    assert row["cpu_us_per_pair"] > 0 and row["tokenizer_us_per_pair"] >= 0
    assert "ceiling pairs/s" in r.output


def _assert_stages_of_a_real_run(rec: dict) -> None:
    """A host_child record of a run with the real forward: every stage of the scoring span ran
    (a fast one may round to 0 s), and the span holds its first batch."""
    assert rec["forward"] == "real"
    for stage in ("read", "tokenize", "gather", "forward", "device_sync", "commit", "part_encode"):
        assert rec["stages"][stage]["calls"] > 0 and rec["stages"][stage]["wall_s"] >= 0, stage
    assert rec["stages"]["forward"]["wall_s"] > 0 and "forward_to_device" not in rec["stages"]
    assert 0 < rec["first_batch_after_s"] <= rec["first_batch_done_after_s"] <= rec["scoring_s"]
    assert rec["scoring_process_cpu_s"] > 0
    assert rec["forward_device_s"] is None  # CUDA events only on CUDA


def test_bench_peer_cli_stages_times_each_cli_run(tmp_path):
    """`bench --peer --cli-stages`: every fresh-process CLI run carries its stage record with the
    real forward timed, the CLI row's summary figures as without it, and the table a stages line.
    With --cli-pairs, the CLI row scores that many pairs and the in-process rows --pairs."""
    out = tmp_path / "peer.json"
    r = run_cli(["bench", "--arch", "minilm-l6", "--peer", "--no-st", "--device", "cpu", "--pairs", 12,
                 "--cli-pairs", 20, "--repeats", 2, "--cli-stages", "--json", out])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    cli = rec["cli"]
    assert rec["pairs"] == 12 and rec["cli_pairs"] == 20 and "cli scoring (20 pairs): " in r.output
    assert len(cli["runs"]) == 2
    for run in cli["runs"]:
        assert run["pairs"] == 20 and run["pairs_per_s"] > 0 and "startup_total_s" in run and run["scoring_s"] > 0
        _assert_stages_of_a_real_run(run["stage_record"])
    assert cli["stages"]["forward"]["calls"] > 0 and cli["stages_span"]["scoring_s"] > 0
    assert cli["stages_span"]["forward_device_s"] is None
    assert "cli stages (2 runs, median wall s / thread cpu s): " in r.output and " forward " in r.output
    assert "cli scoring span (median): " in r.output


def test_the_stage_timers_leave_the_scores_unchanged(bert, pairs_file, tmp_path):
    """The CLI row with and without the stage timers (host_child --real-forward) writes the same
    rows and scores."""
    from pipeline.bench.peer import cli_rows

    timed_dir, plain_dir = tmp_path / "timed", tmp_path / "plain"
    timed_dir.mkdir()
    plain_dir.mkdir()
    timed = cli_rows(bert, pairs_file[0], "cpu", 1, 512, str(timed_dir), stages=True)
    plain = cli_rows(bert, pairs_file[0], "cpu", 1, 512, str(plain_dir))
    _assert_stages_of_a_real_run(timed["runs"][0]["stage_record"])
    assert "stage_record" not in plain["runs"][0] and "stages" not in plain
    a, b = pq.read_table(timed_dir / "cli-0.parquet"), pq.read_table(plain_dir / "cli-0.parquet")
    assert a.num_rows == b.num_rows == pairs_file[1]
    assert a.drop_columns(["score"]).equals(b.drop_columns(["score"]))
    sa, sb = a.column("score").to_numpy(), b.column("score").to_numpy()
    assert np.abs(sa - sb).max() <= TOL
