"""rerank-batch's library. `from pipeline import Reranker` for scoring inside Python; `pipeline.run.run`
for Parquet in, ranked Parquet out. Submodules import torch and transformers only when used, so
`import pipeline.config` stays light."""

__all__ = ["Reranker"]


def __getattr__(name):
    if name == "Reranker":
        from pipeline.reranker import Reranker

        return Reranker
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
