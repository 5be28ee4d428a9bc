"""On the GPU: `Reranker.predict` and `rerank-batch run` give the same bf16 CUDA scores on the
real data when their batch budgets agree (the budget decides the batches, and in bf16 the batch
a pair shares changes its score in the last bits)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cpu_conftest import shared
from pipeline import Reranker
from pipeline.config import RunConfig
from pipeline.run import run


def test_reranker_equals_run_on_cuda(tied_model, tmp_path):
    t = pa.concat_tables([pq.read_table(shared(f"{n}.long.parquet")).slice(0, 1500)
                          for n in ("ARC-Challenge", "physicaliqa", "spartqa")])
    inp, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(t, inp)
    opts = dict(device="cuda", max_batch_tokens=16384, window_pairs=2048)
    summary = run(RunConfig(inputs=str(inp), output=str(out), model=tied_model, **opts), progress=False)
    o = pq.read_table(out)
    want = dict(zip(o.column("doc_id").to_pylist(), o.column("score").to_numpy()))
    rr = Reranker(tied_model, **opts)
    assert rr.scorer.token_budget == summary.batch_token_budget
    got = rr.predict(list(zip(t.column("query").to_pylist(), t.column("document").to_pylist(),
                              t.column("instruction").to_pylist())))
    ref = np.array([want[k] for k in t.column("doc_id").to_pylist()], dtype=np.float32)
    diff = float(np.abs(got - ref).max())
    print("reranker vs run on cuda, max abs diff", diff, "pairs", len(ref), "device", rr.device)
    assert diff <= 1e-6
