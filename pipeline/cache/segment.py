"""One cache file: sorted (key, score, time) entries in checksummed blocks, written once, never changed.

Layout (little-endian):

    header   magic "RBCACHE1", sizes, the scope it belongs to, its run (see compact.py),
             fences (the first key's `hi` of every block), one checksum per block, a Bloom filter
             over the query part of the keys, and a BLAKE2b-128 of all of the above
    body     blocks of BLOCK entries (the last may be shorter); block j holds, for its b entries,
             hi u64[b], lo u64[b], score f32[b], time u32[b]: 24 bytes an entry

A key is two u64 (pipeline/cache/key.py): `hi` = 32 bits of the query's hash, then 32 bits of the
pair's; `lo` = 64 more bits of the pair's. Entries are sorted by (hi, lo), so the documents of one
query lie together and a lookup reads one block or two per query it finds, not one per pair.

A reader keeps only the header in memory (16 bytes a block and the filter: about 0.13 byte an
entry, plus 1.25 bytes per query in the file), and reads the blocks a lookup needs. A block is
trusted only when its checksum matches; a header only when its BLAKE2b does and the file has the
size it announces. Anything else raises `Damaged`, and the caller skips the whole file.
The block checksum is computed by NumPy over many blocks at once (a 64-bit mix of every word,
weighted by its position): it is for damage (bit flips, truncation, zeroed or foreign bytes),
not against an adversary who can write the cache, who could as well write wrong scores.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"RBCACHE1"
VERSION = 1
BLOCK = 64  # entries per block: 1.5 KiB read per key found; 16 bytes of header per block
ENTRY = 24  # bytes: hi u64, lo u64, score f32, time u32
BLOOM_BITS_PER_QUERY = 10  # about 1% false positives with BLOOM_K probes
BLOOM_K = 6
# magic, header bytes, version, block, blocks, bloom bytes, bloom probes, entries, run entries,
# created (unix s), min hi, max hi, min time, max time, scope (16), run (16)
_FIXED = struct.Struct("<8sIIIIIIQQQQQII16s16s")
FIXED = _FIXED.size

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_G1 = np.uint64(0x9E3779B97F4A7C15)
_G2 = np.uint64(0xC2B2AE3D27D4EB4F)


class Damaged(Exception):
    """A cache file whose bytes are not what was written (truncated, changed, not ours)."""


def _mix(w: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise: a bijection of u64 that spreads every bit."""
    w = w ^ (w >> np.uint64(30))
    w = w * _M1
    w = w ^ (w >> np.uint64(27))
    w = w * _M2
    return w ^ (w >> np.uint64(31))


def block_checksums(words: np.ndarray) -> np.ndarray:
    """One u64 per row of `words` (rows of u64 words, one block a row): the sum of f(w_i) * (2i+1)
    with f(w) = x ^ (x >> 32), x = w * G1, a bijection of u64 (odd multiplier, then an xor-shift).
    A changed word changes its row's sum (odd weights are invertible mod 2^64); two changed words
    cancel only if their changes agree in a way bit flips, zeroed or foreign bytes do not make."""
    weights = np.arange(1, 2 * words.shape[1], 2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = words * _G1
        x ^= x >> np.uint64(32)
        x *= weights
        return x.sum(axis=1, dtype=np.uint64)


def bloom_positions(q32: np.ndarray, nbits: int, k: int = BLOOM_K) -> np.ndarray:
    """(k, len(q32)) bit positions for query hashes `q32` (u64 holding 32 bits) in a filter of
    `nbits` (a power of two) bits: double hashing over two multiplicative mixes."""
    shift = np.uint64(64 - int(nbits).bit_length() + 1)
    with np.errstate(over="ignore"):
        h1 = _mix(q32 * _G1)
        h2 = _mix(q32 * _G2) | np.uint64(1)
        return np.stack([(h1 + np.uint64(i) * h2) >> shift for i in range(k)]) if nbits > 1 else \
            np.zeros((k, len(q32)), dtype=np.uint64)


def build_bloom(q32: np.ndarray) -> bytes:
    distinct = np.unique(q32)
    nbits = 64
    while nbits < BLOOM_BITS_PER_QUERY * len(distinct):
        nbits *= 2
    bits = np.zeros(nbits, dtype=bool)
    bits[bloom_positions(distinct, nbits).ravel().astype(np.int64)] = True
    return np.packbits(bits, bitorder="little").tobytes()


def bloom_check(bloom: np.ndarray, q32: np.ndarray, k: int = BLOOM_K) -> np.ndarray:
    """Which of `q32` may be in the file (no false negatives)."""
    nbits = len(bloom) * 8
    pos = bloom_positions(q32, nbits, k).astype(np.int64)
    hit = (bloom[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1
    return hit.all(axis=0)


def encode(hi: np.ndarray, lo: np.ndarray, score: np.ndarray, when: np.ndarray, *, scope: bytes, run: bytes,
           run_entries: int, created: int) -> bytes:
    """The bytes of a file of these entries, which must be sorted by (hi, lo) and unique."""
    n = len(hi)
    if n == 0:
        raise ValueError("a cache file holds at least one entry")
    hi, lo = np.ascontiguousarray(hi, np.uint64), np.ascontiguousarray(lo, np.uint64)
    score, when = np.ascontiguousarray(score, np.float32), np.ascontiguousarray(when, np.uint32)
    nblocks = -(-n // BLOCK)
    body = bytearray()
    sums = np.empty(nblocks, dtype=np.uint64)
    full = n // BLOCK
    if full:
        rows = np.concatenate([hi[:full * BLOCK].reshape(full, BLOCK).view(np.uint8),
                               lo[:full * BLOCK].reshape(full, BLOCK).view(np.uint8),
                               score[:full * BLOCK].reshape(full, BLOCK).view(np.uint8),
                               when[:full * BLOCK].reshape(full, BLOCK).view(np.uint8)], axis=1)
        sums[:full] = block_checksums(rows.view(np.uint64))
        body += rows.tobytes()
    if full < nblocks:
        s = slice(full * BLOCK, n)
        last = b"".join(a[s].tobytes() for a in (hi, lo, score, when))
        sums[full] = block_checksums(np.frombuffer(last, dtype=np.uint64)[None, :])[0]
        body += last
    fences = hi[::BLOCK].copy()
    bloom = build_bloom(hi >> np.uint64(32))
    var = fences.tobytes() + sums.tobytes() + bloom
    header_bytes = FIXED + len(var) + 16
    fixed = _FIXED.pack(MAGIC, header_bytes, VERSION, BLOCK, nblocks, len(bloom), BLOOM_K, n, run_entries, created,
                        int(hi[0]), int(hi[-1]), int(when.min()), int(when.max()), scope, run)
    head = fixed + var
    return head + hashlib.blake2b(head, digest_size=16).digest() + bytes(body)


@dataclass
class Header:
    """What a reader keeps of a file: enough to find the blocks a key can be in."""

    name: str
    size: int  # bytes of the whole file
    header_bytes: int
    block: int
    n: int
    nblocks: int
    created: int
    run_entries: int
    min_hi: int
    max_hi: int
    min_time: int
    max_time: int
    scope: bytes
    run: bytes
    fences: np.ndarray  # u64[nblocks]
    sums: np.ndarray  # u64[nblocks]
    bloom: np.ndarray  # u8
    k: int = BLOOM_K  # probes of the filter

    def may_hold(self, qhi: np.ndarray) -> np.ndarray:
        """Which keys (by hi) may be in the file: within its range and passed by its filter."""
        m = (qhi >= np.uint64(self.min_hi)) & (qhi <= np.uint64(self.max_hi))
        if m.any():
            m[m] = bloom_check(self.bloom, qhi[m] >> np.uint64(32), self.k)
        return m

    @property
    def memory(self) -> int:
        return self.fences.nbytes + self.sums.nbytes + self.bloom.nbytes

    def block_span(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(byte offset, entries) of blocks `j`."""
        start = self.header_bytes + j.astype(np.int64) * (self.block * ENTRY)
        count = np.minimum(self.block, self.n - j.astype(np.int64) * self.block)
        return start, count


def header_size(first: bytes) -> int:
    """The header's length from its first FIXED bytes (Damaged when they are not ours)."""
    if len(first) < FIXED or first[:8] != MAGIC:
        raise Damaged("not a rerank-batch cache file")
    return struct.unpack_from("<I", first, 8)[0]


def decode_header(name: str, head: bytes, size: int) -> Header:
    """Parse and check a header (`head`: at least its header_bytes); `size`: the file's bytes."""
    hb = header_size(head)
    if len(head) < hb:
        raise Damaged("truncated header")
    f = _FIXED.unpack_from(head, 0)
    (_, _, version, block, nblocks, bloom_bytes, k, n, run_entries, created, min_hi, max_hi, min_time, max_time,
     scope, run) = f
    if version != VERSION:
        raise Damaged(f"format version {version}, not {VERSION}")
    if hashlib.blake2b(head[:hb - 16], digest_size=16).digest() != head[hb - 16:hb]:
        raise Damaged("header checksum mismatch")
    if block < 1 or k < 1 or nblocks != -(-n // block) or hb != FIXED + 16 * nblocks + bloom_bytes + 16 or \
            bloom_bytes < 8 or bloom_bytes & (bloom_bytes - 1):
        raise Damaged("inconsistent header")
    if size != hb + ENTRY * n:
        raise Damaged(f"{size} bytes, not the {hb + ENTRY * n} its header announces (truncated or appended to)")
    off = FIXED
    fences = np.frombuffer(head, dtype=np.uint64, count=nblocks, offset=off).copy()
    sums = np.frombuffer(head, dtype=np.uint64, count=nblocks, offset=off + 8 * nblocks).copy()
    bloom = np.frombuffer(head, dtype=np.uint8, count=bloom_bytes, offset=off + 16 * nblocks).copy()
    return Header(name, size, hb, block, n, nblocks, created, run_entries, min_hi, max_hi, min_time, max_time,
                  scope, run, fences, sums, bloom, k)


def parse_blocks(h: Header, blocks: np.ndarray, data: bytes) -> tuple[np.ndarray, ...]:
    """Entries (hi, lo, score, time) of blocks `blocks` (ascending, distinct), read as one
    buffer `data` in that order; Damaged when a checksum does not match."""
    _, counts = h.block_span(blocks)
    if len(data) != int(counts.sum()) * ENTRY:
        raise Damaged("short read")
    nfull = int(np.count_nonzero(counts == h.block))
    buf = np.frombuffer(data, dtype=np.uint8)
    row = h.block * ENTRY
    return parse_rows(h, blocks, buf[:nfull * row].reshape(nfull, row), data[nfull * row:])


def parse_rows(h: Header, blocks: np.ndarray, rows: np.ndarray, tail: bytes) -> tuple[np.ndarray, ...]:
    """Entries of `blocks`: the full ones as `rows` (one block a row of bytes), then the file's
    last, shorter block as `tail` when it is among them; Damaged when a checksum does not match."""
    nfull = len(rows)
    parts = []
    if nfull:
        if not np.array_equal(block_checksums(rows.view(np.uint64)), h.sums[blocks[:nfull]]):
            raise Damaged("block checksum mismatch")
        b = h.block
        parts.append((rows[:, :8 * b].copy().view(np.uint64).ravel(), rows[:, 8 * b:16 * b].copy().view(np.uint64).ravel(),
                      rows[:, 16 * b:20 * b].copy().view(np.float32).ravel(),
                      rows[:, 20 * b:24 * b].copy().view(np.uint32).ravel()))
    if nfull < len(blocks):
        c = h.n - (h.nblocks - 1) * h.block
        if len(tail) != c * ENTRY:
            raise Damaged("short read")
        t = np.frombuffer(tail, dtype=np.uint8)
        if block_checksums(t.view(np.uint64)[None, :])[0] != h.sums[blocks[-1]]:
            raise Damaged("block checksum mismatch")
        parts.append((t[:8 * c].view(np.uint64), t[8 * c:16 * c].view(np.uint64),
                      t[16 * c:20 * c].view(np.float32), t[20 * c:24 * c].view(np.uint32)))
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return (np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.float32), np.empty(0, np.uint32))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def candidate_blocks(h: Header, qhi: np.ndarray) -> np.ndarray:
    """The blocks (ascending, distinct) that may hold keys whose hi is in `qhi`: the block whose
    range covers each, and the one before when a block starts with exactly that hi (equal `hi`
    may run across the boundary)."""
    first = np.searchsorted(h.fences, qhi, side="left") - 1
    last = np.searchsorted(h.fences, qhi, side="right") - 1
    first = np.maximum(first, 0)
    ok = last >= 0
    first, last = first[ok], last[ok]
    if not len(first):
        return np.empty(0, dtype=np.int64)
    span = last - first + 1
    if (span == 1).all():
        return np.unique(first)
    idx = np.repeat(first, span) + (np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span))
    return np.unique(idx)


def find(hi: np.ndarray, lo: np.ndarray, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
    """Index into (hi, lo) (sorted by (hi, lo)) of each query key, -1 where absent."""
    left = np.searchsorted(hi, qhi, side="left")
    right = np.searchsorted(hi, qhi, side="right")
    out = np.full(len(qhi), -1, dtype=np.int64)
    one = right - left == 1
    i = left[one]
    out[np.flatnonzero(one)[lo[i] == qlo[one]]] = i[lo[i] == qlo[one]]
    for k in np.flatnonzero(right - left > 1):  # equal hi: rare (32 bits of a pair hash within a query)
        run = lo[left[k]:right[k]]
        j = np.searchsorted(run, qlo[k])
        if j < len(run) and run[j] == qlo[k]:
            out[k] = left[k] + j
    return out
