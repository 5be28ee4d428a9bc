"""First pass of the final rank: one narrow scan of the parts that indexes the query groups.

A group is identified by two 64-bit hashes of its key (query_id, or (instruction, query)), so
the index holds no strings: about 40 bytes per group once built, about 220 at the peak of
building it (measured), whatever the key's length. Two hashes with different seeds make a 128-bit id; the second pass still checks that
every row of a group has the same key and stops with an error if two keys ever collide, so a
collision can never merge two queries silently.

For each group the index keeps its first input position (`_ord`), its number of rows, and
whether its rows are one contiguous run of the parts in order: those are ranked straight from
the stream, only the others ("scattered") are spilled and reordered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.data.arrays import to_numpy

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
