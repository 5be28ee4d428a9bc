"""The files of one scope as a reader sees them: their headers in memory, their blocks on disk.

`ScopeFiles.refresh()` lists the scope's folder (one listing a unit) and reads the header of each
file it has not seen (files never change, so a header read once stays true); files gone from the
listing (merged by a compaction) are dropped. `lookup(hi, lo)` asks each file only for the keys
its key range and filter let through, and reads only the blocks those can be in.

Object storage: a file is copied whole into a local mirror the first time it is needed (the
user's cache folder, kept across runs, so a nightly run downloads only what is new), and read
there like a local file. A damaged file (see segment.Damaged) is skipped and reported once per
process; its pairs are scored again.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import stat
import tempfile
import threading

import numpy as np

from pipeline.cache import segment
from pipeline.cache.segment import Damaged, Header
from pipeline.runtime import user_cache

log = logging.getLogger(__name__)

# Every file name the cache writes in a scope folder (creation time in ms, a random id).
FILE_RE = re.compile(r"^[0-9]{13}-[0-9a-f]{16}\.rbc$")
SCOPE_RE = re.compile(r"^[0-9a-f]{32}$")
_reported: set[tuple[str, str]] = set()  # (where, name) of damaged files already logged
_reported_lock = threading.Lock()


def report_damaged(where: str, name: str, why: object) -> None:
    """One warning per damaged file and process."""
    with _reported_lock:
        if (where, name) in _reported:
            return
        _reported.add((where, name))
    log.warning("cache file %s is damaged (%s); it is skipped and its pairs are scored again "
                "(`rerank-batch cache prune` removes it)", where, why)


def mirror_dir(root: str) -> str:
    """Where copies of an object-storage cache's files live on this host."""
    tag = hashlib.blake2b(root.encode(), digest_size=8).hexdigest()
    d = user_cache.usable(user_cache.path("cache-mirror", tag))
    return d or tempfile.mkdtemp(prefix="rerank-batch-cache-")


def _put_local(path: str, data: bytes) -> None:
    """A mirror copy, whole or absent (temp name, rename); no fsync: a lost copy is fetched again."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ScopeFiles:
    """A reader (and the writers' registry) of one scope folder of a cache."""

    def __init__(self, store, scope: bytes, folder: str, mirror: str | None = None):
        self.store, self.scope, self.folder = store, scope, folder
        self.headers: dict[str, Header] = {}
        self.listed: set[str] = set()  # every name in the folder at the last listing
        self.fds: dict[str, int] = {}
        self.maps: dict[str, mmap.mmap] = {}
        self.bad: set[str] = set()
        # Files are mapped where they lie when they lie on a local disk; else a local copy is.
        # (`mirror`: another folder for them, e.g. a run's own, removed when it ends.)
        self.mirror = (mirror or mirror_dir(store.key)) if store.local_path() is None else None
        self.lock = threading.RLock()
        self.blocks_read = 0
        self.bytes_read = 0

    # -- files ---------------------------------------------------------------------------------
    def _mirror_path(self, name: str) -> str:
        return os.path.join(self.mirror, self.folder, name)

    def _local(self, name: str) -> str:
        """A local path of the file: itself, or (object storage) its mirror copy, fetched if absent."""
        if self.mirror is None:
            return self.store.local_path(f"{self.folder}/{name}")
        path = self._mirror_path(name)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
            try:
                self.store.copy_to_file(f"{self.folder}/{name}", tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return path

    def _open(self, name: str, data: bytes | None = None) -> Header:
        """Read and check a file's header; keep the file open for block reads. `data`: its bytes,
        when this process just wrote it (an object-storage file goes into the mirror as is)."""
        if data is not None and self.mirror is not None:
            _put_local(self._mirror_path(name), data)
        fd = os.open(self._local(name), os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # a folder opens too, and its reads fail with EISDIR
                raise Damaged("it is not a regular file")
            size = st.st_size
            first = os.pread(fd, segment.FIXED, 0)
            hb = segment.header_size(first)
            h = segment.decode_header(name, os.pread(fd, hb, 0), size)
            if h.scope != self.scope:
                raise Damaged("it belongs to another scope (moved or copied there)")
        except BaseException:
            os.close(fd)
            raise
        self.fds[name] = fd
        self.headers[name] = h
        return h

    def drop(self, name: str) -> None:
        self.headers.pop(name, None)
        mm = self.maps.pop(name, None)
        if mm is not None:
            mm.close()
        fd = self.fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def damaged(self, name: str, why) -> None:
        self.bad.add(name)
        self.drop(name)
        if self.mirror:  # the copy may be what is damaged: the next process fetches it again
            try:
                os.unlink(self._mirror_path(name))
            except OSError:
                pass
        report_damaged(self.store.where(f"{self.folder}/{name}"), name, why)

    def refresh(self) -> None:
        """List the folder; read the headers of new files, forget those that are gone."""
        with self.lock:
            self.listed = {n.rsplit("/", 1)[-1] for n in self.store.list(self.folder)}
            names = {n for n in self.listed if FILE_RE.match(n)}
            for gone in [n for n in self.headers if n not in names]:
                self.drop(gone)
            for name in sorted(names - set(self.headers) - self.bad):
                try:
                    try:
                        self._open(name)
                    except Damaged:
                        if not self.mirror:
                            raise
                        os.unlink(self._mirror_path(name))  # a bad copy, maybe: fetch it once more
                        self._open(name)
                except Damaged as exc:
                    self.damaged(name, exc)
                except FileNotFoundError:
                    continue  # merged away between the listing and now
            if self.mirror:
                self._trim_mirror(names)

    def _trim_mirror(self, names: set[str]) -> None:
        d = os.path.join(self.mirror, self.folder)
        try:
            here = os.listdir(d)
        except OSError:
            return
        for n in here:
            if FILE_RE.match(n) and n not in names:
                try:
                    os.unlink(os.path.join(d, n))
                except OSError:
                    pass

    def add(self, name: str, data: bytes) -> None:
        """Register a file this process just wrote (so later units of the run find its keys)."""
        with self.lock:
            try:
                self._open(name, data)
            except (Damaged, OSError) as exc:
                log.debug("could not register %s: %s", name, exc)

    def close(self) -> None:
        with self.lock:
            for name in list(self.fds):
                self.drop(name)

    # -- reading -------------------------------------------------------------------------------
    def read_blocks(self, name: str, blocks: np.ndarray) -> tuple[np.ndarray, ...]:
        """Entries of `blocks` (ascending, distinct) of a file, checked; Damaged otherwise.

        The file is mapped, and the blocks are gathered by one NumPy take: no call per block.
        Its size is checked first, because a mapped file cut shorter under us would end the
        process (SIGBUS) where a read would only come back short; ours are never rewritten in
        place, so that takes someone copying over them (`cp` truncates) exactly now."""
        h, fd = self.headers[name], self.fds[name]
        if not len(blocks):
            return (np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.float32), np.empty(0, np.uint32))
        if os.fstat(fd).st_size != h.size:
            raise Damaged(f"its size changed to {os.fstat(fd).st_size} bytes while in use")
        mm = self.maps.get(name)
        if mm is None:
            mm = self.maps[name] = mmap.mmap(fd, h.size, access=mmap.ACCESS_READ)
        row = h.block * segment.ENTRY
        nfull = h.n // h.block
        full = blocks[blocks < nfull]
        rows = np.empty((0, row), dtype=np.uint8)
        if len(full):
            body = np.frombuffer(mm, dtype=np.uint8, count=nfull * row, offset=h.header_bytes).reshape(nfull, row)
            rows = body[full]  # a copy: nothing refers to the mapping afterwards
            del body
        tail = mm[h.header_bytes + nfull * row:h.size] if blocks[-1] >= nfull else b""
        self.blocks_read += len(blocks)
        self.bytes_read += rows.nbytes + len(tail)
        return segment.parse_rows(h, blocks, rows, tail)

    def release(self, name: str | None = None) -> None:
        """Let go of the mapped pages read so far (of one file, or all): they stay in the page
        cache, not in our RSS."""
        for mm in [self.maps.get(name)] if name is not None else list(self.maps.values()):
            if mm is None:
                continue
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass

    def lookup(self, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, scores) for keys (hi, lo). A key in several files (written by runs that ran at
        once, not yet merged) takes the score of the first file by name (the oldest)."""
        n = len(hi)
        found = np.zeros(n, dtype=bool)
        scores = np.zeros(n, dtype=np.float32)
        order = np.argsort(hi, kind="stable")  # sorted keys: searches walk the arrays in order
        hi, lo = hi[order], lo[order]
        with self.lock:
            for name in sorted(self.headers):
                todo = np.flatnonzero(~found)
                if not len(todo):
                    break
                h = self.headers[name]
                cand = todo[h.may_hold(hi[todo])]
                if not len(cand):
                    continue
                try:
                    bhi, blo, bsc, _ = self.read_blocks(name, segment.candidate_blocks(h, hi[cand]))
                except Damaged as exc:
                    self.damaged(name, exc)
                    continue
                finally:
                    self.release(name)
                idx = segment.find(bhi, blo, hi[cand], lo[cand])
                ok = idx >= 0
                found[cand[ok]] = True
                scores[cand[ok]] = bsc[idx[ok]]
        out_found, out_scores = np.empty_like(found), np.empty_like(scores)
        out_found[order], out_scores[order] = found, scores
        return out_found, out_scores

    @property
    def memory(self) -> int:
        """Bytes of headers held (fences, checksums, filters)."""
        return sum(h.memory for h in self.headers.values())
