"""The engine seam (pipeline/engines/engine.py): what a loaded engine tells and does, through the
protocol only. The forward is chosen once (forwards.choose) and faults reach it through its public
interface (forward_doubles.py); stats are snapshots; a stop token stops between batches; prefix
sharing comes from the config at load time; the engine package has no import cycle and uses no
other file's private names."""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, real_pairs
from forward_doubles import FaultyForward
from pipeline.config import RunConfig
from pipeline.engines import attention, forwards
from pipeline.engines.engine import Engine, EngineStats
from pipeline.engines.score import TorchEngine, activate, engine_from_model, load_engine
from pipeline.errors import ModelError
from pipeline.runtime.stop import StopToken

TINY = os.path.join(ROOT, "sample_data", "tiny-qwen3-reranker")
PAIRS = os.path.join(ROOT, "sample_data", "pairs.parquet")
TOL = 1e-5


def _cfg(model=TINY, **kw) -> RunConfig:
    return RunConfig(inputs=(PAIRS,), model=model, device="cpu", **kw)


@pytest.fixture(scope="module")
def texts():
    t = real_pairs(20)
    return (t.column("instruction").to_pylist(), t.column("query").to_pylist(), t.column("document").to_pylist())


@pytest.fixture(scope="module")
def tiny():
    return load_engine(_cfg())


def test_a_loaded_engine_is_an_engine_and_says_what_it_runs(tiny):
    assert isinstance(tiny, Engine)
    i = tiny.info
    assert (i.kind.family, i.forward, i.kernel, i.device, i.dtype, i.sharing, i.compiled) == (
        "yes-no", "fused", "sdpa", "cpu", "float32", "off", False)
    assert tiny.token_budget == 8192  # CPU: a fixed size, no probe
    tiny.synchronize()
    tiny.reset_peak_memory()
    assert tiny.peak_memory_bytes() == 0


def test_stats_are_snapshots_that_count_the_batches(tiny, texts):
    before = tiny.stats()
    enc = tiny.encoder.encode(*texts)
    tiny.score(enc)
    after = tiny.stats()
    assert isinstance(after, EngineStats) and after is not before
    assert after.batches > before.batches
    assert after.tokens - before.tokens == int(enc.offsets[-1]) == after.tokens_computed - before.tokens_computed
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.batches = 0


def test_a_stop_token_stops_between_batches_and_keeps_what_was_scored(tiny, texts):
    enc = tiny.encoder.encode(*texts)
    stop = StopToken()
    stop.set()
    b0 = tiny.stats().batches
    with pytest.raises(KeyboardInterrupt):
        tiny.score(enc, stop=stop)
    assert tiny.stats().batches == b0  # checked before the first batch

    small = TorchEngine(tiny.forward, tiny.encoder, _cfg(), tiny.info, token_budget=600)
    stop = StopToken()
    handed: list = []

    class Commit:
        def due(self):
            return False

        def __call__(self, idx, scores):
            handed.append((idx, scores))

    with pytest.raises(KeyboardInterrupt):
        small.score_stream([enc], on_batch=lambda pairs, tokens: stop.set(), stop=stop, commit=Commit())
    assert small.stats().batches == 1
    (idx, scores), = handed
    want = tiny.score(enc)
    assert 0 < len(idx) < len(enc) and np.abs(scores - want[idx]).max() <= TOL


def test_logits_give_the_scores_through_activate(tiny, texts):
    enc = tiny.encoder.encode(*texts)
    head = load_engine(_cfg(), logits=True).score(enc)
    assert head.shape == (len(enc), 2)
    got = activate(torch.from_numpy(head), "auto").numpy()
    assert np.abs(got - tiny.score(enc)).max() <= TOL


def test_an_oom_splits_through_the_public_forward(tiny, texts):
    """A forward that runs out of memory on batches over 1500 tokens: the engine splits them, shrinks
    its budget, counts the retries, and every score is the one of the whole batches."""
    enc = tiny.encoder.encode(*texts)

    def oom_over_1500(batch, calls):
        if len(batch.ids) > 1500:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    e = TorchEngine(FaultyForward(tiny.forward, oom_over_1500), tiny.encoder, _cfg(), tiny.info, token_budget=8192)
    got = e.score(enc)
    assert e.stats().oom_retries > 0 and e.token_budget < 8192
    assert np.abs(got - tiny.score(enc)).max() <= TOL


def test_prefix_sharing_comes_from_the_config_at_load(tmp_path, texts):
    """One model in memory, two engines over one forward: sharing on computes fewer tokens and
    gives the same scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(TINY)
    off = engine_from_model(model, tok, _cfg(model="<mem>", prefix_sharing="off"))
    on = engine_from_model(model, tok, _cfg(model="<mem>", prefix_sharing="on"), forward=off.forward)
    assert (off.info.sharing, on.info.sharing, on.info.forward) == ("off", "on", "fused")
    i, q, d = texts
    enc = off.encoder.encode(i[:6] * 4, q[:6] * 4, d[:24])  # four candidates per query
    a, b = off.score(enc), on.score(enc)
    assert np.abs(a - b).max() <= TOL
    s = on.stats()
    assert s.tokens_computed < s.tokens == int(enc.offsets[-1])
    # The fused forward holds the model's q/k/v and gate/up weights now: a second one is refused.
    with pytest.raises(ModelError, match=r"already serve an engine's fused forward; .*forward=engine.forward"):
        engine_from_model(model, tok, _cfg(model="<mem>"))


@pytest.mark.parametrize("arch", ["qwen3", "gemma"])
def test_the_transformers_forward_hands_its_kernel_to_the_attention(tmp_path, texts, arch, monkeypatch):
    """The kernel travels with each call (no flag on the model): a forward built with its own kernel
    name is the one the registered attention sees, in every layer."""
    from pipeline.bench.synthetic import build_gemma_reranker

    if arch == "qwen3":
        model = TINY
    else:
        t = real_pairs(400)
        model = str(build_gemma_reranker(tmp_path / "gemma", t.column("query").to_pylist()
                                         + t.column("document").to_pylist()))
    e = load_engine(_cfg(model=model, engine="transformers"))
    assert e.info.forward == "transformers"
    enc = e.encoder.encode(*texts)
    want = e.score(enc)
    stack = e.forward.stack
    probe = forwards.PackedDecoder("transformers",
                                   forwards.TransformersDecoder(stack.decoder, stack.layer_types, "probe"),
                                   e.forward.head_w, e.forward.head_b, torch.device("cpu"))
    seen, real = [], attention.packed_attention

    def recording(q, k, v, cu, max_len, scale, kernel, shared=None):
        seen.append(kernel)
        return real(q, k, v, cu, max_len, scale, "sdpa", shared)

    monkeypatch.setattr(attention, "packed_attention", recording)
    got = TorchEngine(probe, e.encoder, _cfg(), e.info, token_budget=8192).score(enc)
    assert seen and set(seen) == {"probe"}
    assert np.abs(got - want).max() <= TOL


def test_the_fused_and_transformers_forwards_agree(texts):
    fused, hf = load_engine(_cfg()), load_engine(_cfg(engine="transformers"))
    assert (fused.info.forward, hf.info.forward) == ("fused", "transformers")
    enc = fused.encoder.encode(*texts)
    assert np.abs(fused.score(enc) - hf.score(enc)).max() <= TOL


def test_run_reports_the_engine(tmp_path):
    from pipeline.run import run

    e = load_engine(_cfg())
    out = tmp_path / "o.parquet"
    s = run(RunConfig(inputs=(PAIRS,), output=str(out), model=TINY, device="cpu"), progress=False, scorer=e)
    st = e.stats()
    assert (s.attention, s.batches, s.oom_retries, s.batch_token_budget, s.peak_gpu_memory_bytes) == (
        "sdpa", st.batches, 0, 8192, 0)
    assert pq.read_table(out).num_rows == s.rows > 0


# -- the package's imports ------------------------------------------------------------------------

def _modules(*pkgs: str) -> dict[str, pathlib.Path]:
    out = {}
    for pkg in pkgs:
        for p in pathlib.Path(ROOT, *pkg.split(".")).glob("*.py"):
            name = f"{pkg}.{p.stem}" if p.stem != "__init__" else pkg
            out[name] = p
    return out


def test_the_engine_package_imports_no_cycle_and_no_private_name():
    """Imports inside functions count. A module imported whole counts as used as a whole."""
    mods = _modules("pipeline.engines", "pipeline.bench")
    graph, private = {}, []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
                    if a.name.startswith("_") and node.module.startswith("pipeline"):
                        private.append(f"{name}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                  and isinstance(node.value, ast.Name) and f"pipeline.engines.{node.value.id}" in mods):
                private.append(f"{name}: {node.value.id}.{node.attr}")
        graph[name] = {d for d in deps if d in mods and d != name}
    assert not private, private

    def on_a_cycle(start: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n == start:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(graph[n])
        return False

    assert not [m for m in sorted(graph) if on_a_cycle(m)]
