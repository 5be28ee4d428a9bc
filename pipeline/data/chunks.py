"""Long documents scored as overlapping windows of their own tokens, and aggregated per row (MaxP).

A document of L tokens (tokenized alone with the model's tokenizer, no special tokens:
engines/doc_tokens.py), windows of N tokens overlapping by M (step S = N - M), has

    k = 1 + ceil(max(L - N, 0) / S)

windows; window j holds tokens [jS, jS + N), the last one clipped at L. Window j is scored as
the pair (query, decode(its ids)), through the same template, tokenizer call and truncation as any
pair; a document of one window (k = 1) is scored as its own text, so its score is that of a run
without chunking. The row's score is the best window's (`max`), the first's or their mean.

Where it happens:
  - `expand` (called by build_pairs, per unit, inside the unit's windowed read: memory follows a
    unit, never the input) turns a unit's valid rows into one scoring pair per window. The windows
    of one row share the row's instruction and query, so they are candidates of one group and the
    prefix-sharing path computes their prompt prefix once per batch, like any query's candidates.
  - `result_part` (called by pairs.result_part) aggregates the windows' scores into the row's
    `score`, `chunks` (k) and `best_chunk` (first best on ties), and keeps every window's score in
    the part's `_chunk_scores` list column, from which `--chunk-scores` is written
    (data/chunk_scores.py), also when a run resumes.
Within a unit the scored items are windows; their ids for the partial commits of a unit in flight
are their positions in the unit's expansion, which is the same in every run (same tokenizer,
same options: the fingerprint holds both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from pipeline.config import AGGREGATES, CHUNK_CLI as CLI, CHUNK_KEYWORDS as KEYWORDS  # noqa: F401 (checked there)
from pipeline.config import MIN_CHUNK_TOKENS as MIN_TOKENS, check_chunking as check_options  # noqa: F401
from pipeline.config import resolved_chunking
from pipeline.errors import InputError

# The part's column of every window's score (list<float32>, null for unscored rows).
SCORES_COLUMN = "_chunk_scores"


@dataclass(frozen=True)
class Chunking:
    tokens: int  # N
    overlap: int  # M, 0 <= M < N
    aggregate: str  # one of AGGREGATES

    @property
    def step(self) -> int:
        return self.tokens - self.overlap

    @classmethod
    def make(cls, tokens: int | None, overlap: int | None = None, aggregate: str | None = None
             ) -> "Chunking | None":
        c = resolved_chunking(tokens, overlap, aggregate)
        return None if c is None else cls(*c)

    @classmethod
    def of(cls, cfg) -> "Chunking | None":
        """The chunking a RunConfig asks for (None: documents are scored whole)."""
        return cls.make(cfg.chunk_tokens, cfg.chunk_overlap, cfg.aggregate)


def window_counts(lengths: np.ndarray, c: Chunking) -> np.ndarray:
    """k per document of `lengths` tokens: 1 + ceil(max(L - N, 0) / S)."""
    over = np.maximum(np.asarray(lengths, dtype=np.int64) - c.tokens, 0)
    return 1 + (over + c.step - 1) // c.step


@dataclass(frozen=True)
class ChunkMap:
    """Which scored windows belong to which valid row of a unit (rows in order, windows in order)."""

    chunking: Chunking
    counts: np.ndarray  # int64, k per valid row

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def starts(self) -> np.ndarray:
        """Position of each valid row's first window among the windows."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def counters(self) -> dict:
        """For the unit's record: documents scored, those split into several windows, windows."""
        return {"documents": int(len(self.counts)), "split": int((self.counts > 1).sum()), "windows": self.total}


# Documents tokenized and decoded at a time: the tokenizer hands ids back as Python lists (tens of
# bytes a token), so a unit of long documents is taken in slices, not whole.
SLICE_DOCS = 256


def expand_texts(documents: list[str], c: Chunking, doc_tokens) -> tuple[list[str], np.ndarray]:
    """The text of every window of `documents` (rows in order, windows in order) and k per document.
    A document of one window keeps its own text."""
    out: list[str] = []
    counts = []
    for s in range(0, len(documents), SLICE_DOCS):
        texts, k = _expand_slice(documents[s:s + SLICE_DOCS], c, doc_tokens)
        out.extend(texts)
        counts.append(k)
    return out, (np.concatenate(counts) if counts else np.zeros(0, np.int64))


def _expand_slice(documents: list[str], c: Chunking, doc_tokens) -> tuple[list[str], np.ndarray]:
    flat, lens = doc_tokens.tokenize(documents)
    counts = window_counts(lens, c)
    split = np.flatnonzero(counts > 1)
    if not len(split):
        return list(documents), counts
    # Windows of the split documents: starts in the flat ids, clipped stops.
    doc_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    k = counts[split]
    j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)  # window index within its document
    first = np.repeat(doc_start[split], k) + j * c.step
    last = np.repeat(doc_start[split] + lens[split], k)
    texts = doc_tokens.decode(flat, first, np.minimum(first + c.tokens, last))
    out: list[str] = []
    pos = 0
    for i, d in enumerate(documents):
        n = int(counts[i])
        if n > 1:
            out.extend(texts[pos:pos + n])
            pos += n
        else:
            out.append(d)
    return out, counts


def expand(pairs, c: Chunking, tokenizer):
    """The unit's UnitPairs with one scoring pair per window of each valid row, and its ChunkMap."""
    if tokenizer is None:
        raise ValueError("chunking needs the model's tokenizer (the encoder's)")
    from pipeline.engines.doc_tokens import for_tokenizer

    texts, counts = expand_texts(pairs.documents, c, for_tokenizer(tokenizer))
    reps = counts.tolist()
    instructions = [x for x, n in zip(pairs.instructions, reps) for _ in range(n)]
    queries = [x for x, n in zip(pairs.queries, reps) for _ in range(n)]
    return replace(pairs, instructions=instructions, queries=queries, documents=texts, chunks=ChunkMap(c, counts))


def aggregate(scores: np.ndarray, counts: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its score from its windows' (max, first or mean; float32) and its best window
    (the first of the highest-scoring ones; int32)."""
    scores = np.asarray(scores, dtype=np.float32)
    n = len(counts)
    if n == 0:
        return np.empty(0, np.float32), np.empty(0, np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    best_value = np.maximum.reduceat(scores, starts)
    local = np.arange(len(scores), dtype=np.int64) - np.repeat(starts, counts)
    hit = np.where(scores == np.repeat(best_value, counts), local, np.iinfo(np.int64).max)
    best = np.minimum.reduceat(hit, starts)
    best = np.where(best == np.iinfo(np.int64).max, 0, best).astype(np.int32)  # all NaN: the first
    if how == "max":
        row = best_value
    elif how == "first":
        row = scores[starts]
    elif how == "mean":
        row = (np.add.reduceat(scores.astype(np.float64), starts) / counts).astype(np.float32)
    else:
        raise ValueError(how)
    return row.astype(np.float32), best


def result_part(pairs, scores: np.ndarray) -> pa.Table:
    """The unit's rows with `score` (the aggregate), `chunks`, `best_chunk` and `_chunk_scores`
    (every window's score), all null where the row was not scored."""
    from pipeline.data.arrays import to_arrow

    cm = pairs.chunks
    valid = pairs.valid
    rows = pairs.table.num_rows
    row_scores, best = aggregate(scores, cm.counts, cm.chunking.aggregate)
    mask = ~valid
    any_masked = bool(mask.any())

    def full(values, dtype, type_):
        out = np.zeros(rows, dtype=dtype)
        out[valid] = values
        return to_arrow(out, type_, mask=mask if any_masked else None)

    per_row = np.zeros(rows, dtype=np.int64)
    per_row[valid] = cm.counts
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(per_row, out=offsets[1:])
    window_scores = pa.ListArray.from_arrays(to_arrow(offsets, pa.int32()), to_arrow(scores, pa.float32()),
                                             mask=to_arrow(mask, pa.bool_()) if any_masked else None)
    return (pairs.table.append_column("score", full(row_scores, np.float32, pa.float32()))
            .append_column("chunks", full(cm.counts, np.int32, pa.int32()))
            .append_column("best_chunk", full(best, np.int32, pa.int32()))
            .append_column(SCORES_COLUMN, window_scores))
