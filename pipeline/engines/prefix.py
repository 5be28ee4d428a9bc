"""Share each query's prompt prefix across its candidates: grouping, packing, batch layout.

Every candidate of one query begins with the same ids (template prefix, instruction, query). A
group is the pairs of one (instruction, query) in the pairs being planned; its shared prefix is
the longest common prefix of the members' token ids, so it is exact by construction (byte-level
BPE may merge across the query/document seam: the ids decide where the prefix ends, never the
text). At least one token of each candidate stays its own: the scored last position.

A packed batch holds, per group, [prefix][rest of cand 1][rest of cand 2]...: the prefix is
computed once per batch the group lands in. Every block is one attention sequence: a prefix
block attends causally to itself; a candidate's rest attends to its group's prefix block and
causally to itself (keys [prefix, rest], causal aligned to the end of the keys), with RoPE
positions continuing after the prefix, exactly as in the unshared sequence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

# auto (where resolve.sharing_mode lets it run): share where it saves at least this fraction of the
# tokens being planned.
AUTO_MIN_SAVING = 0.2
# Keys per batch (what the gathered K/V hold) at most this many times the token budget.
KV_FACTOR = 4


def group_keys(instructions, queries) -> np.ndarray:
    """One int64 key per pair: equal (instruction, query) get equal keys, in every process (the
    plan orders groups by key, and a resumed run must pack, hence round, as the first did). A
    hash collision only puts two queries in one group, whose common prefix of ids is then
    shorter: still exact."""
    memo: dict = {}
    out = np.empty(len(queries), dtype=np.int64)
    for n, pair in enumerate(zip(instructions, queries)):
        k = memo.get(pair)
        if k is None:
            i, q = pair
            text = f"{len(str(i))}:{i}\x00{q}".encode("utf-8", "surrogatepass")
            k = memo[pair] = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)
        out[n] = k
    return out


def prefix_lengths(ids: np.ndarray, offsets: np.ndarray, pool: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Shared-prefix length of each pair of `pool` (0 for a group of one): the longest common
    prefix of its group's ids, capped so each candidate keeps at least its last token."""
    out = np.zeros(len(pool), dtype=np.int64)
    if len(pool) < 2:
        return out
    k = keys[pool]
    order = np.argsort(k, kind="stable")
    ks = k[order]
    heads = np.r_[0, np.flatnonzero(np.diff(ks)) + 1]
    sizes = np.diff(np.r_[heads, len(ks)])
    for a, m in zip(heads[sizes > 1].tolist(), sizes[sizes > 1].tolist()):  # groups of one share nothing
        run = order[a:a + m]
        members = pool[run]
        starts, ends = offsets[members], offsets[members + 1]
        p = int((ends - starts).min()) - 1
        if p > 0:
            # One (members x p) comparison with the first member's ids; the prefix ends at the
            # first column where any member differs.
            block = ids[starts[:, None] + np.arange(p)]
            differs = (block != block[0]).any(0)
            if differs.any():
                p = int(np.argmax(differs))
        out[run] = p
    return out


def saving(lengths: np.ndarray, plen: np.ndarray, pkeys: np.ndarray) -> int:
    """Tokens saved by sharing: each group's prefix counted once instead of once per member."""
    shared = plen > 0
    if not shared.any():
        return 0
    firsts = np.unique(pkeys[shared], return_index=True)[1]
    return int(plen[shared].sum() - plen[shared][firsts].sum())


def plan_shared(lengths: np.ndarray, plen: np.ndarray, pkeys: np.ndarray, budget: int) -> list[np.ndarray]:
    """Batches (positions into the pool arrays) of at most `budget` computed tokens, groups
    kept together and in a row; a group larger than the room left is split at the batch edge and
    its prefix computed again in the next batch. Biggest groups first, as plan_batches."""
    order = np.argsort(pkeys, kind="stable")
    bounds = np.flatnonzero(np.diff(pkeys[order])) + 1
    groups = np.split(order, bounds) if len(order) else []
    cost = [int(plen[g[0]] + (lengths[g] - plen[g]).sum()) for g in groups]
    batches, current, used, kv = [], [], 0, 0
    for gi in np.argsort(-np.asarray(cost, dtype=np.int64), kind="stable"):
        g = groups[gi]
        p = int(plen[g[0]])
        opened = False
        for i in g:
            rest = int(lengths[i]) - p
            add = rest + (0 if opened else p)
            add_kv = rest + p + (0 if opened else p)
            if current and (used + add > budget or kv + add_kv > KV_FACTOR * budget):
                batches.append(np.asarray(current, dtype=np.int64))
                current, used, kv, opened = [], 0, 0, False
                add, add_kv = rest + p, rest + 2 * p
            current.append(i)
            used += add
            kv += add_kv
            opened = True
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


@dataclass
class SharedBatch:
    """A packed batch with shared prefixes: query rows, and the key rows each block reads."""

    ids: np.ndarray  # (T,) token ids actually computed
    pos: np.ndarray  # (T,) RoPE positions (true positions in each pair's unshared sequence)
    cu_q: np.ndarray  # (B+1,) block boundaries in the query rows
    cu_k: np.ndarray  # (B+1,) block boundaries in the gathered key rows
    kv_idx: np.ndarray  # (Tk,) query row of each gathered key row
    last: np.ndarray  # (n,) query row of each pair's scored last token, in batch order
    unshared_tokens: int

    @property
    def pairs(self) -> int:
        return len(self.last)

    @property
    def area(self) -> int:
        """Sum over blocks of 2*lq*lk - lq^2: the causal score entries, doubled (as L^2)."""
        lq, lk = np.diff(self.cu_q), np.diff(self.cu_k)
        return int((2 * lq * lk - lq * lq).sum())


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n)."""
    total = int(lens.sum())
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    return np.repeat(starts - cu[:-1], lens) + np.arange(total, dtype=np.int64)


def gather_shared(ids: np.ndarray, offsets: np.ndarray, idx: np.ndarray, plen: np.ndarray,
                  pkeys: np.ndarray) -> SharedBatch:
    """Lay out pairs `idx` (groups in a row) with prefix lengths `plen` and group keys `pkeys`
    (both per pair of idx)."""
    n = len(idx)
    s = offsets[idx]
    L = offsets[idx + 1] - s
    p = plen.astype(np.int64)
    first = np.ones(n, dtype=bool)
    first[1:] = pkeys[1:] != pkeys[:-1]
    pre_len = np.where(first, p, 0)
    rest_len = L - p
    # Blocks in order: [prefix of pair 0 (maybe empty)], rest 0, [prefix 1], rest 1, ...
    blk_src = np.stack([s, s + p], 1).reshape(-1)
    blk_len = np.stack([pre_len, rest_len], 1).reshape(-1)
    blk_pos = np.stack([np.zeros(n, np.int64), p], 1).reshape(-1)
    q_start = np.zeros(2 * n + 1, dtype=np.int64)
    np.cumsum(blk_len, out=q_start[1:])
    flat_src = _ranges(blk_src, blk_len)
    pos = _ranges(blk_pos, blk_len)
    # The query row where each pair's group prefix starts (the run's first pair's prefix block).
    pre_row = q_start[0:2 * n:2]
    run_first = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    grp_pre = pre_row[run_first]
    rest_row = q_start[1:2 * n:2]
    # Key pieces: prefix block -> itself; rest block -> its group's prefix, then itself.
    kv_start = np.stack([pre_row, grp_pre, rest_row], 1).reshape(-1)
    kv_len = np.stack([pre_len, p, rest_len], 1).reshape(-1)
    kv_idx = _ranges(kv_start, kv_len)
    keep = blk_len > 0
    lq = blk_len[keep]
    lk = np.stack([pre_len, p + rest_len], 1).reshape(-1)[keep]
    cu_q = np.zeros(len(lq) + 1, dtype=np.int64)
    np.cumsum(lq, out=cu_q[1:])
    cu_k = np.zeros(len(lk) + 1, dtype=np.int64)
    np.cumsum(lk, out=cu_k[1:])
    return SharedBatch(ids[flat_src], pos, cu_q, cu_k, kv_idx, rest_row + rest_len - 1, int(L.sum()))
