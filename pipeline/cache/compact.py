"""Merging a scope's files: fewer files to ask per lookup, one entry per key, bounded memory.

Every committed unit adds one file (its new scores), so files pile up; each file is one more
key range and filter to check for every lookup. A *run* is what one write or one merge made (its
files share a run id; a merge's output is cut by key range into files of at most PART entries,
which never overlap). Runs are grouped in tiers by size, ×FANOUT apart; when a tier holds FANOUT
runs, the process that just wrote merges them into one run of the next tier (size-tiered, as in
Cassandra's STCS): each entry is rewritten about log_8(entries / 16k) times in all, and a scope
holds at most (FANOUT - 1) runs per tier. Merges of more than AUTO_MAX entries are left to
`rerank-batch cache prune`, which merges everything (and drops entries by model or age).

A merge reads its inputs one key range at a time (PART entries at most in memory), keeps one
entry per key (the oldest: later runs of the same pair agree to the parity bound, and the
oldest is what earlier readers were already given), writes every output file (atomically), and
only then deletes its inputs. A reader that listed an input before the delete keeps reading it
(an open file) or lists again; a kill in between leaves the same entries twice, which the next
merge folds. Two processes that merge the same inputs at once both write complete outputs:
wasted work, never a lost or wrong entry. An input found damaged is left out (and reported).
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np

from pipeline.cache import segment
from pipeline.cache.segment import Damaged

log = logging.getLogger(__name__)

FANOUT = 8
TIER0 = 16384  # entries of a tier-0 run at most (a unit's new scores)
AUTO_MAX = 8 << 20  # entries a merge triggered by a write may read; bigger ones wait for prune
# Entries per output file, and per key range held in memory during a merge: a range costs about
# 240 bytes an entry at its peak (the inputs' blocks, the masked and concatenated columns, the
# sort and the encoded file), so 512k entries keep a merge near 130 MB whatever the total, where
# 2M entries took 500 MB. More files per merged run cost lookups little: the files of one run cut
# the key space, and a lookup checks each file's key range before its filter.
PART = 1 << 19


def file_name(created_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if created_ms is None else created_ms
    return f"{ms:013d}-{uuid.uuid4().hex[:16]}.rbc"


def tier(entries: int) -> int:
    """0 below FANOUT * TIER0 entries, then one more for every factor FANOUT."""
    t, size = 0, TIER0 * FANOUT
    while entries >= size:
        t, size = t + 1, size * FANOUT
    return t


def runs(headers) -> dict[bytes, list]:
    out: dict[bytes, list] = {}
    for h in headers:
        out.setdefault(h.run, []).append(h)
    return out


def due(headers, limit: int = AUTO_MAX) -> list[str]:
    """The files of the runs to merge now (the lowest full tier within `limit`), or []."""
    by_tier: dict[int, list[list]] = {}
    for files in runs(headers).values():
        by_tier.setdefault(tier(sum(h.n for h in files)), []).append(files)
    for t in sorted(by_tier):
        group = by_tier[t]
        if len(group) >= FANOUT and sum(h.n for files in group for h in files) <= limit:
            return sorted(h.name for files in group for h in files)
    return []


def _bounds(headers, parts: int) -> list[int]:
    """`parts` - 1 cut points over the key space (hi), from the fences of the inputs, so that
    the ranges hold about equal numbers of entries."""
    if parts <= 1:
        return []
    fences = np.sort(np.concatenate([h.fences for h in headers]))
    q = np.quantile(np.arange(len(fences)), np.linspace(0, 1, parts + 1)[1:-1]).astype(np.int64)
    return sorted(set(int(fences[i]) for i in q))


def _blocks_in(h, a: int | None, b: int | None) -> np.ndarray:
    """Blocks of file `h` that may hold keys with a <= hi < b (None: unbounded)."""
    first = 0 if a is None else max(0, int(np.searchsorted(h.fences, np.uint64(a), side="left")) - 1)
    last = h.nblocks if b is None else int(np.searchsorted(h.fences, np.uint64(b), side="left"))
    return np.arange(first, max(first, last), dtype=np.int64)


def merge(files, names: list[str], store, scope: bytes, keep_after: int | None = None) -> dict:
    """Merge the files `names` of a ScopeFiles into one run; delete them once it is written.
    `keep_after`: drop entries written before this time (unix seconds). Returns counts."""
    headers = [files.headers[n] for n in names if n in files.headers]
    total = sum(h.n for h in headers)
    out = {"inputs": len(headers), "entries_in": total, "entries_out": 0, "dropped_old": 0, "outputs": 0}
    if not headers:
        return out
    bounds = _bounds(headers, max(1, -(-total // PART)))
    ranges = list(zip([None, *bounds], [*bounds, None]))
    run = uuid.uuid4().bytes
    written: list[str] = []
    try:
        for a, b in ranges:
            cols = []
            for h in headers:
                try:
                    hi, lo, sc, tm = files.read_blocks(h.name, _blocks_in(h, a, b))
                except Damaged as exc:
                    files.damaged(h.name, exc)
                    raise
                m = np.ones(len(hi), dtype=bool)
                if a is not None:
                    m &= hi >= np.uint64(a)
                if b is not None:
                    m &= hi < np.uint64(b)
                cols.append((hi[m], lo[m], sc[m], tm[m]))
            hi, lo, sc, tm = (np.concatenate([c[i] for c in cols]) for i in range(4))
            order = np.lexsort((tm, lo, hi))
            hi, lo, sc, tm = hi[order], lo[order], sc[order], tm[order]
            first = np.ones(len(hi), dtype=bool)
            first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
            if keep_after is not None:
                young = tm >= np.uint32(keep_after)
                out["dropped_old"] += int(np.count_nonzero(first & ~young))
                first &= young
            hi, lo, sc, tm = hi[first], lo[first], sc[first], tm[first]
            if not len(hi):
                continue
            name = file_name()
            data = segment.encode(hi, lo, sc, tm, scope=scope, run=run, run_entries=total, created=int(time.time()))
            store.write(f"{files.folder}/{name}", data)
            written.append(name)
            files.add(name, data)
            out["entries_out"] += len(hi)
    except (Damaged, OSError):
        # Leave the inputs as they are; our outputs hold only copies of their entries.
        for name in written:
            try:
                store.delete(f"{files.folder}/{name}")
            except OSError:
                pass
            files.drop(name)
        raise
    for h in headers:
        store.delete(f"{files.folder}/{h.name}")
        files.drop(h.name)
    out["outputs"] = len(written)
    return out


def verify(files, name: str, step: int = 1 << 14) -> bool:
    """Read and check every block of a file, a slice at a time; False (reported, dropped) when damaged."""
    h = files.headers[name]
    try:
        for a in range(0, h.nblocks, step):
            files.read_blocks(name, np.arange(a, min(h.nblocks, a + step), dtype=np.int64))
    except Damaged as exc:
        files.damaged(name, exc)
        return False
    finally:
        files.release()
    return True


def merge_all(files, store, scope: bytes, keep_after: int | None = None) -> dict:
    """Merge every readable file of the scope into one run (prune's compaction). With
    `keep_after`, files written wholly before it are deleted unread and the others lose their
    older entries. Damaged inputs are left out (reported by the reader), and the merge goes on
    without them; a scope already one run with nothing to drop is left as it is."""
    res = {"inputs": 0, "entries_in": 0, "entries_out": 0, "dropped_old": 0, "outputs": 0}
    if keep_after is not None:
        for h in [h for h in files.headers.values() if h.max_time < keep_after]:
            store.delete(f"{files.folder}/{h.name}")
            files.drop(h.name)
            res["dropped_old"] += h.n
    while True:
        headers = list(files.headers.values())
        if len(runs(headers)) <= 1 and (keep_after is None or all(h.min_time >= keep_after for h in headers)):
            for h in headers:  # nothing to merge: still read every block once, to find damage
                verify(files, h.name)
            return res
        try:
            got = merge(files, sorted(h.name for h in headers), store, scope, keep_after)
        except Damaged:
            continue  # the reader dropped the damaged file: merge the others
        got["dropped_old"] += res["dropped_old"]
        return got


__all__ = ["merge", "merge_all", "due", "tier", "file_name", "FANOUT", "AUTO_MAX", "PART"]
