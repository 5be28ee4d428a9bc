"""The final rank, in two streaming passes over the parts (write.py drives them).

Pass 1 (`build_index`): one narrow scan of the parts that indexes the query groups. A group is
identified by two 64-bit hashes of its key (query_id, or (instruction, query)), so the index
holds no strings: about 40 bytes per group once built, about 220 at the peak of building it
(measured), whatever the key's length. Two hashes with different seeds make a 128-bit id; the
second pass still checks that every row of a group has the same key and stops with an error if
two keys ever collide, so a collision can never merge two queries silently. For each group the
index keeps its first input position (`_ord`), its number of rows, and whether its rows are one
contiguous run of the parts in order.

Pass 2 (`contiguous`, `spill`, `buckets`, `merge`): stream the parts in order and emit ranked
rows in output order. Output order: groups by first appearance (g), then best score first, ties
and null scores in input order (nulls last, null rank). With the parts in input order, a group
whose rows form one contiguous run ("contiguous", the usual case: input sorted or nested by
query) is complete when its run ends, and such groups come in g order: they are ranked straight
from the stream, holding one chunk. Rows of the other groups ("scattered") are first spilled to
Arrow files in buckets of consecutive g (one pass), then each bucket is read back, ranked and
merged with the stream by g. Memory: the group index, one chunk or one bucket (sized by the
memory budget), and the largest group. Disk: the spill holds only scattered rows, and each
bucket is deleted once written, so the spill and the output together never exceed about one
copy of the parts.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.data.arrays import to_arrow, to_numpy
from pipeline.errors import RerankError

# -- pass 1: the group index --------------------------------------------------------------------

SEEDS = (0x5EED_0001, 0x5EED_0002)


def key_frame(table: pa.Table, keys: list[str], fill: dict[str, str]) -> pl.DataFrame:
    """The group-key columns as polars, a null instruction filled with the default one (it
    joins the default's group)."""
    df = pl.from_arrow(table.select(keys))
    if isinstance(df, pl.Series):
        df = df.to_frame()
    if fill:
        df = df.with_columns(pl.col(c).fill_null(v) for c, v in fill.items())
    return df


def key_hashes(keys: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return tuple(keys.hash_rows(seed=s).to_numpy() for s in SEEDS)


@dataclass
class GroupIndex:
    """The groups in output order (g = 0..G-1, by first appearance), and a lookup from hashes."""

    n: np.ndarray  # rows per group, by g
    scattered: np.ndarray  # bool per g: rows not one contiguous run of the stream
    _h1: np.ndarray  # sorted by (h1, h2)
    _h2: np.ndarray
    _g: np.ndarray  # g of each sorted entry

    @property
    def groups(self) -> int:
        return len(self.n)

    def lookup(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """g of each row's hashes (every row's hashes are in the index: it was built from them)."""
        idx = np.searchsorted(self._h1, h1)
        todo = np.flatnonzero(self._h2[idx] != h2)
        # Equal h1 of different groups (about G²/2^65, so rare) sit next to each other: step on.
        while todo.size:
            idx[todo] += 1
            todo = todo[self._h2[idx[todo]] != h2[todo]]
        return self._g[idx]


def _merge(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(frames).group_by("h1", "h2").agg(
        pl.col("first").min(), pl.col("pmin").min(), pl.col("pmax").max(), pl.col("n").sum())


def build_index(tables, keys: list[str], fill: dict[str, str]) -> GroupIndex:
    """Scan the parts' keys and `_ord` once, from `tables` (the parts' rows in order, in chunks:
    write.part_tables); memory is O(groups) plus one chunk."""
    merged: pl.DataFrame | None = None
    pending: list[pl.DataFrame] = []
    pending_rows = 0
    offset = 0
    last_ord = -1
    in_order = True  # parts in input order, each sorted: then the stream is in first-appearance order
    for t in tables:
        if not t.num_rows:
            continue
        ords = to_numpy(t.column("_ord"))
        if in_order and (ords[0] <= last_ord or (np.diff(ords) <= 0).any()):
            in_order = False
        last_ord = int(ords[-1])
        h1, h2 = key_hashes(key_frame(t, keys, fill))
        part = pl.DataFrame({"h1": h1, "h2": h2, "first": ords,
                             "p": np.arange(offset, offset + t.num_rows, dtype=np.int64)})
        agg = part.group_by("h1", "h2").agg(
            first=pl.col("first").min(), pmin=pl.col("p").min(), pmax=pl.col("p").max(),
            n=pl.len().cast(pl.Int64))
        pending.append(agg)
        pending_rows += agg.height
        offset += t.num_rows
        # Fold the per-part tables into one when they outgrow it: memory stays O(groups).
        if pending_rows > max(1 << 20, 2 * (merged.height if merged is not None else 0)):
            merged = _merge(([merged] if merged is not None else []) + pending)
            pending, pending_rows = [], 0
    if pending:
        merged = _merge(([merged] if merged is not None else []) + pending)
    if merged is None:
        e = np.zeros(0, np.uint64)
        return GroupIndex(np.zeros(0, np.int64), np.zeros(0, bool), e, e, np.zeros(0, np.int64))
    merged = merged.sort("first")
    n = merged["n"].to_numpy()
    scattered = (merged["pmax"] - merged["pmin"] + 1 != merged["n"]).to_numpy()
    if not in_order:
        scattered[:] = True
    h1, h2 = merged["h1"].to_numpy(), merged["h2"].to_numpy()
    by_hash = np.lexsort((h2, h1))
    return GroupIndex(n, scattered, h1[by_hash], h2[by_hash], by_hash.astype(np.int64))


# -- pass 2: rank from the stream, spill and merge the scattered groups -------------------------

MAX_BUCKETS = 256  # open spill files at once
SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")  # about half the parts' size, fast to read

Ranked = tuple[pa.Table, np.ndarray]  # complete groups, ranked, and each row's g (non-decreasing)


class Ranker:
    """Ranks tables of complete groups and checks that each group holds one key."""

    def __init__(self, keys: list[str], fill: dict[str, str], names: list[str], top_k: int | None):
        self.keys, self.fill, self.names, self.top_k = keys, fill, names, top_k

    def __call__(self, table: pa.Table, g: np.ndarray) -> Ranked:
        n = table.num_rows
        narrow = pl.DataFrame({"_g": g, "score": pl.from_arrow(table.column("score")),
                               "_ord": to_numpy(table.column("_ord")),
                               "_i": np.arange(n, dtype=np.int64)})
        narrow = narrow.sort(["_g", "score", "_ord"], descending=[False, True, False], nulls_last=True)
        perm = narrow["_i"].to_numpy()
        gs = narrow["_g"].to_numpy()
        same = gs[1:] == gs[:-1]
        self._check_keys(table.select(self.keys).take(to_arrow(perm)), same)  # keys only: no payload copy
        idx = np.arange(n, dtype=np.int64)
        starts = np.maximum.accumulate(np.where(np.r_[True, ~same], idx, 0)) if n else idx
        rank = (idx - starts + 1).astype(np.int32)
        null = narrow["score"].is_null().to_numpy()
        if self.top_k is not None:
            keep = ~null & (rank <= self.top_k)
            perm, gs, rank, null = perm[keep], gs[keep], rank[keep], null[keep]
        out = table.select(self.names).take(to_arrow(perm))
        out = out.append_column("rank", to_arrow(rank, pa.int32(), mask=null))
        return out, gs

    def _check_keys(self, sorted_table: pa.Table, same: np.ndarray) -> None:
        if not same.any():
            return
        kf = key_frame(sorted_table, self.keys, self.fill)
        differs = np.zeros(len(same), bool)
        for c in kf.columns:
            col = kf[c]
            differs |= col.slice(1).ne_missing(col.slice(0, len(col) - 1)).to_numpy()
        if (differs & same).any():
            raise RerankError(
                f"two query keys of columns {self.keys} share a 128-bit hash; please report it "
                "(the output was not written)")


def _groups(t: pa.Table, index: GroupIndex, keys, fill) -> np.ndarray:
    return index.lookup(*key_hashes(key_frame(t, keys, fill)))


def contiguous(tables, index: GroupIndex, keys, fill, rank: Ranker, chunk_rows: int) -> Iterator[Ranked]:
    """The contiguous groups, from the stream of the parts' rows (`tables`, in order), in chunks
    of complete groups."""
    held_tables: list[pa.Table] = []
    gs: list[np.ndarray] = []
    held = 0
    for t in tables:
        g = _groups(t, index, keys, fill)
        keep = ~index.scattered[g]
        if not keep.all():
            t, g = t.filter(to_arrow(keep, pa.bool_())), g[keep]
        if not len(g):
            continue
        held_tables.append(t)
        gs.append(g)
        held += len(g)
        if held < chunk_rows:
            continue
        t, g = pa.concat_tables(held_tables), np.concatenate(gs)
        # Rows come in g order; the last group may go on in the next part.
        last = g[-1]
        cut = len(g) if len(g) - np.searchsorted(g, last) == index.n[last] else int(np.searchsorted(g, last))
        if cut:
            yield rank(t.slice(0, cut), g[:cut])
        held_tables, gs, held = [t.slice(cut)], [g[cut:]], len(g) - cut
    if held:
        yield rank(pa.concat_tables(held_tables), np.concatenate(gs))


def spill(tables, index: GroupIndex, keys, fill, spill_dir: str, bucket_rows: int, buffer_bytes: int) -> list[str]:
    """Write the scattered rows of the stream (`tables`, the parts' rows in order) into bucket
    files of consecutive g; return them in g order."""
    sc = np.flatnonzero(index.scattered)
    rows = index.n[sc]
    bucket_rows = max(bucket_rows, -(-int(rows.sum()) // MAX_BUCKETS))
    bucket_of = np.full(index.groups, -1, np.int64)
    bucket_of[sc] = (np.cumsum(rows) - rows) // bucket_rows
    paths = [os.path.join(spill_dir, f"bucket-{b:05d}.arrow") for b in range(int(bucket_of.max()) + 1)]
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    buffers: dict[int, list[pa.Table]] = defaultdict(list)
    buffered = 0

    def flush():
        for b, pieces in buffers.items():
            # One record batch per bucket and flush: batches of a few rows compress badly and
            # cost a fixed overhead each, to write and to read back.
            t = pa.concat_tables(pieces).combine_chunks()
            if b not in writers:
                writers[b] = pa.ipc.new_stream(paths[b], t.schema, options=SPILL_OPTIONS)
            writers[b].write_table(t)
        buffers.clear()

    try:
        for t in tables:
            g = _groups(t, index, keys, fill)
            mask = index.scattered[g]
            if not mask.any():
                continue
            b = bucket_of[g[mask]]
            order = np.argsort(b, kind="stable")
            # One take puts the part's scattered rows in bucket order; the buckets are slices.
            rows = np.flatnonzero(mask)[order]
            t = t.take(to_arrow(rows)).append_column("_g", to_arrow(g[rows]))
            b = b[order]
            bounds = np.r_[0, np.flatnonzero(np.diff(b)) + 1, len(b)]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                buffers[int(b[lo])].append(t.slice(lo, hi - lo))
            buffered += t.nbytes
            if buffered > buffer_bytes:
                flush()
                buffered = 0
        flush()
    finally:
        for w in writers.values():
            w.close()
    return [p for p in paths if os.path.exists(p)]


def buckets(paths: list[str], rank: Ranker) -> Iterator[Ranked]:
    """The scattered groups, one bucket at a time; each bucket file is deleted once read."""
    for path in paths:
        with pa.ipc.open_stream(path) as reader:
            t = reader.read_all()
        os.unlink(path)
        g = to_numpy(t.column("_g"))
        yield rank(t.drop_columns(["_g"]), g)


def _next(it: Iterator[Ranked]) -> Ranked | None:
    """The next non-empty item (--top-k can leave a table of null-score groups empty)."""
    for item in it:
        if len(item[1]):
            return item
    return None


def merge(a: Iterator[Ranked], b: Iterator[Ranked]) -> Iterator[Ranked]:
    """Merge two streams of complete groups, each in g order and with no g in common, by g."""
    ha, hb = _next(a), _next(b)
    while ha is not None and hb is not None:
        if ha[1][0] > hb[1][0]:
            a, b, ha, hb = b, a, hb, ha
        (ta, ga), gb0 = ha, hb[1][0]
        cut = int(np.searchsorted(ga, gb0))
        yield ta.slice(0, cut), ga[:cut]
        ha = (ta.slice(cut), ga[cut:]) if cut < len(ga) else _next(a)
    for head, rest in ((ha, a), (hb, b)):
        while head is not None:
            yield head
            head = _next(rest)
