"""Reranking inside Python, in the style of sentence-transformers' CrossEncoder.

    from pipeline import Reranker
    reranker = Reranker("Qwen/Qwen3-Reranker-0.6B", device="cuda")
    scores = reranker.predict([("what is a cat?", "A cat is a small feline."), ...])
    hits = reranker.rank("what is a cat?", documents, top_k=3, return_documents=True)

The model loads once. Scoring runs the engine of `rerank-batch run` (pipeline.engines.score.Scorer:
length sorting, token budgets, packed batches, OOM split) over windows of `window_pairs` pairs, so
the scores equal those of `rerank-batch run` on the same pairs and options.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from pipeline.config import RunConfig
from pipeline.errors import InputError

log = logging.getLogger(__name__)

# RunConfig fields that only concern files; a Reranker takes them (same options), but they do nothing.
_FILE_FIELDS = {"inputs", "output", "query_col", "doc_col", "docs_col", "instruction_col", "top_k", "on_null",
                "checkpoint_dir", "keep_checkpoint", "restart", "overwrite"}


class Reranker:
    """A loaded reranker. `options` are RunConfig's (device, dtype, max_length, template,
    instruction, family, activation, gpu_memory_limit, max_batch_tokens, attention, engine, ...)."""

    def __init__(self, model: str = "Qwen/Qwen3-Reranker-0.6B", **options):
        from pipeline.engines.families import inspect_model
        from pipeline.engines.hub import resolve_model
        from pipeline.engines.score import Scorer

        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"Reranker() got unknown options {', '.join(unknown)}; it takes RunConfig's: "
                            f"{', '.join(sorted(known - _FILE_FIELDS - {'model'}))}")
        options = {k: v for k, v in options.items() if k not in ("inputs", "output")}
        self.config = RunConfig(inputs=(), output="", model=resolve_model(model), **options)
        self.kind = inspect_model(self.config)
        self.scorer = Scorer.load(self.config, self.kind)
        log.debug("%r: batch budget %d tokens", self, self.scorer.budget)

    @property
    def device(self):
        return self.scorer.device

    def predict(self, pairs: Sequence, *, show_progress_bar: bool = False) -> np.ndarray:
        """Scores (float32, one per pair, in input order) of (query, document) pairs or
        (query, document, instruction) triples; an instruction of None falls back to the option."""
        instructions, queries, documents = self._split(pairs)
        out = np.empty(len(queries), dtype=np.float32)
        if not len(queries):
            return out
        prog = None
        if show_progress_bar:
            from pipeline.job.progress import Progress

            prog = Progress(len(queries), bar=True)
        step = self.config.window_pairs  # the sort window of `run`: same batches, same scores
        try:
            for start in range(0, len(queries), step):
                stop = min(len(queries), start + step)
                enc = self.scorer.encoder.encode(instructions[start:stop], queries[start:stop],
                                                 documents[start:stop])
                out[start:stop] = self.scorer.score(enc, on_batch=prog.update if prog else None)
        finally:
            if prog is not None:
                prog.close()
        return out

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None,
             return_documents: bool = False, instruction: str | None = None) -> list[dict]:
        """`[{"corpus_id": i, "score": s}, ...]` best first (ties keep input order), the best
        `top_k` only when given, with `"text"` when `return_documents`."""
        if isinstance(documents, str):
            raise InputError("rank(query, documents): documents is one string; pass a list of documents")
        documents = list(documents)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"rank(top_k={top_k!r}): pass a whole number of at least 1, or None for all")
        scores = self.predict([(query, d, instruction) for d in documents])
        order = np.argsort(-scores, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        hits = []
        for i in order:
            hit = {"corpus_id": int(i), "score": float(scores[i])}
            if return_documents:
                hit["text"] = documents[i]
            hits.append(hit)
        return hits

    def _split(self, pairs) -> tuple[list[str], list[str], list[str]]:
        if isinstance(pairs, (str, bytes)) or (isinstance(pairs, tuple) and pairs and isinstance(pairs[0], str)):
            raise InputError("predict(pairs): pass a list of (query, document) pairs, not a single pair or string")
        default = self.config.instruction
        instructions, queries, documents = [], [], []
        for k, p in enumerate(pairs):
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) not in (2, 3):
                raise InputError(f"pairs[{k}]: expected (query, document) or (query, document, instruction), "
                                 f"got {type(p).__name__}")
            q, d = p[0], p[1]
            i = p[2] if len(p) == 3 else None
            for name, v in (("query", q), ("document", d)):
                if not isinstance(v, str):
                    raise InputError(f"pairs[{k}]: the {name} is {type(v).__name__}, not a string; "
                                     "give text (an empty string is a valid pair)")
            if i is not None and not isinstance(i, str):
                raise InputError(f"pairs[{k}]: the instruction is {type(i).__name__}, not a string or None")
            instructions.append(default if i is None else i)
            queries.append(q)
            documents.append(d)
        return instructions, queries, documents

    def __repr__(self) -> str:
        return (f"Reranker({self.config.model!r}, family={self.kind.family!r}, device={str(self.device)!r}, "
                f"engine={self.scorer.engine!r})")
