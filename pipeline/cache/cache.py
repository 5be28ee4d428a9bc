"""The score cache of a run: look a unit's pairs up before scoring, add its new scores after.

Layout of a cache location (a local directory or an object-storage prefix):
  .rerank-batch-cache        marker: this location is a cache (written at first use)
  <scope>/scope.json         what the scope's scores depend on (key.py), for `cache stats`
  <scope>/<ms>-<id>.rbc      immutable files of sorted keys and scores (segment.py)

Any number of runs, workers and hosts may read and write one cache at once: a file is written
whole under a name no one else uses, then only read, until a merge (compact.py) replaces it by
files holding the same entries. Failures of the cache never fail a run: a file that cannot be
read, or a location that cannot be written, is reported once and its pairs are scored.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
import weakref

import numpy as np

from pipeline.cache import compact, segment
from pipeline.cache.index import SCOPE_RE, ScopeFiles
from pipeline.cache.key import Scope, make_scope
from pipeline.cache.segment import Damaged
from pipeline.cache.store import CacheStore
from pipeline.errors import InputError, first_line

log = logging.getLogger(__name__)

MARKER = ".rerank-batch-cache"
FORMAT = 1
SCOPE_FILE = "scope.json"


def marker_ok(store: CacheStore) -> bool:
    try:
        body = json.loads(store.read(MARKER))
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("format") == FORMAT


def prepare(location: str) -> CacheStore:
    """Check a cache location before a run (exit 2 when it cannot be one): made and marked when
    new or empty; refused when it holds files but no marker of ours, or cannot be written."""
    store = CacheStore(location)
    if store.kind() == "file":
        raise InputError(f"--cache {location}: is a file; pass a directory (or an object-storage prefix)")
    missing = store.folder_missing()
    if missing is not None:
        raise InputError(f"--cache {location}: the directory {missing} does not exist; "
                         "create it or pass another --cache")
    names = store.list("")
    if store.exists(MARKER):
        if not marker_ok(store):
            raise InputError(f"--cache {location}: its marker {MARKER} is unreadable or of another version; pass "
                             "another --cache (or delete that folder to start a new cache)")
        return store
    if names:
        shown = ", ".join(n for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise InputError(f"--cache {location}: not a rerank-batch cache and not empty (holds {shown}); pass a new "
                         "or empty directory or prefix")
    try:
        why = store.writable()
    except OSError as exc:
        why = exc.strerror or first_line(exc)
    if why:
        raise InputError(f"--cache {location}: cannot write there ({why}); pass a --cache where you can write")
    store.write(MARKER, json.dumps({"format": FORMAT, "what": "rerank-batch score cache"}).encode())
    return store


class PairCache:
    """One scope of a cache, in one process: `lookup` and `add`, both thread-safe."""

    def __init__(self, location, scope: Scope, private: bool = False):
        """`private`: the run's own dedup store (pipeline/cache/runwide.py) in its checkpoint:
        object-storage files are mirrored in a temporary folder removed at close (the store goes
        with the checkpoint), and close() says nothing."""
        self.location, self.scope, self.private = location, scope, private
        self.store = CacheStore(location)
        self._mirror = tempfile.mkdtemp(prefix="rerank-batch-dedup-") if private and \
            self.store.local_path() is None else None
        if self._mirror is not None:  # also when close() is never called (a Ray actor's process ends)
            weakref.finalize(self, shutil.rmtree, self._mirror, True)
        self.files = ScopeFiles(self.store, scope.id, scope.hex, mirror=self._mirror)
        self.can_write = True
        self._warned: set[str] = set()
        self.stats = {"lookups": 0, "hits": 0, "added": 0, "files_written": 0, "merges": 0, "lookup_seconds": 0.0,
                      "add_seconds": 0.0}

    def _warn_once(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("cache %s: could not %s (%s); the run goes on and scores what the cache cannot give",
                        self.store.where(), what, first_line(exc))

    def lookup(self, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, scores) of keys; an unreachable store finds nothing."""
        t0 = time.perf_counter()
        try:
            self.files.refresh()
            found, scores = self.files.lookup(hi, lo)
        except OSError as exc:
            self._warn_once("read it", exc)
            found, scores = np.zeros(len(hi), dtype=bool), np.zeros(len(hi), dtype=np.float32)
        self.stats["lookups"] += len(hi)
        self.stats["hits"] += int(found.sum())
        self.stats["lookup_seconds"] += time.perf_counter() - t0
        return found, scores

    def add(self, hi: np.ndarray, lo: np.ndarray, scores: np.ndarray) -> None:
        """Write the new scores of a unit as one file (then merge files if a tier is full)."""
        if not self.can_write or not len(hi):
            return
        t0 = time.perf_counter()
        order = np.lexsort((lo, hi))
        hi, lo, scores = hi[order], lo[order], np.asarray(scores, np.float32)[order]
        first = np.ones(len(hi), dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        hi, lo, scores = hi[first], lo[first], scores[first]
        now = int(time.time())
        data = segment.encode(hi, lo, scores, np.full(len(hi), now, np.uint32), scope=self.scope.id,
                              run=uuid.uuid4().bytes, run_entries=len(hi), created=now)
        name = compact.file_name()
        try:
            if SCOPE_FILE not in self.files.listed and not self.private:  # for `cache stats`
                self.store.write(f"{self.scope.hex}/{SCOPE_FILE}", json.dumps(
                    {"scope": self.scope.hex, **self.scope.fields, "label": self.scope.label,
                     "created": now}, indent=1, sort_keys=True).encode())
                self.files.listed.add(SCOPE_FILE)
            self.store.write(f"{self.scope.hex}/{name}", data)
        except OSError as exc:
            self._warn_once("add scores to it", exc)
            self.can_write = False
            return
        self.files.add(name, data)
        self.stats["added"] += len(hi)
        self.stats["files_written"] += 1
        self._merge_if_due()
        self.stats["add_seconds"] += time.perf_counter() - t0

    def _merge_if_due(self) -> None:
        with self.files.lock:
            names = compact.due(self.files.headers.values())
            if not names:
                return
            try:
                compact.merge(self.files, names, self.store, self.scope.id)
                self.stats["merges"] += 1
            except Damaged:
                pass  # reported; the next write tries again without it
            except OSError as exc:
                log.debug("cache merge skipped: %s", first_line(exc))

    def close(self) -> None:
        st = self.stats
        if (st["lookups"] or st["added"]) and not self.private:
            log.info("cache %s: %d of %d pairs looked up were there; %d new scores added in %d file(s), %d merge(s)",
                     self.store.where(), st["hits"], st["lookups"], st["added"], st["files_written"], st["merges"])
        self.files.close()
        if self._mirror is not None:
            shutil.rmtree(self._mirror, ignore_errors=True)
            self._mirror = None


def open_cache(cfg, engine) -> PairCache | None:
    """The cache of `cfg.cache` for the scope of the engine's scores (its model kind and dtype
    as loaded: pipeline/engines/engine.py, EngineInfo); None without a cache. close() it."""
    if not cfg.cache:
        return None
    return PairCache(cfg.cache, make_scope(cfg, engine.info.kind, engine.info.dtype))


def scopes(store: CacheStore) -> list[str]:
    return [n.rsplit("/", 1)[-1] for n in store.list("") if SCOPE_RE.match(n.rsplit("/", 1)[-1])]
