"""`rerank-batch cache stats|prune`: what a cache holds, and removing entries from it.

Both refuse a location without the cache's marker, and touch only names the cache writes (scope
folders of 32 hex digits, their scope.json, files named like `<ms>-<id>.rbc`, and the temp files
of local writes that a kill left behind). Running runs may go on meanwhile: prune merges the files
it listed and deletes them only once their entries are written again; files written after its
listing are left alone.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time

from pipeline.cache import compact, segment
from pipeline.cache.cache import MARKER, SCOPE_FILE, marker_ok, scopes
from pipeline.cache.index import FILE_RE, ScopeFiles
from pipeline.cache.key import model_identity
from pipeline.cache.store import CacheStore
from pipeline.errors import InputError

log = logging.getLogger(__name__)

STALE_TEMP_S = 3600  # a local temp file this old is a killed writer's, not one being written
_TEMP_RE = re.compile(r"^\.tmp-[0-9a-f]{32}-([0-9]{13}-[0-9a-f]{16}\.rbc|scope\.json)$")


def open_store(location: str) -> CacheStore:
    store = CacheStore(location)
    if not store.exists(MARKER) or not marker_ok(store):
        raise InputError(f"{location}: not a rerank-batch cache (no readable {MARKER}); check the location "
                         "(a run makes one with --cache)")
    return store


def _scope_json(store: CacheStore, scope: str) -> dict:
    try:
        body = json.loads(store.read(f"{scope}/{SCOPE_FILE}"))
        return body if isinstance(body, dict) else {}
    except (OSError, ValueError):
        return {}


def _file_header(store: CacheStore, name: str):
    size = store.size(name)
    first = store.read(name, 0, segment.FIXED)
    hb = segment.header_size(first)
    return segment.decode_header(name, store.read(name, 0, hb), size if size is not None else -1)


def stats(location: str) -> dict:
    """Per scope (model, options): files, entries, bytes, oldest and newest entry; damaged files."""
    store = open_store(location)
    out = {"location": store.where(), "models": [], "files": 0, "entries": 0, "bytes": 0, "damaged": 0}
    for scope in scopes(store):
        desc = _scope_json(store, scope)
        row = {"scope": scope, "model": desc.get("label", {}).get("name", "?"),
               "model_path": desc.get("label", {}).get("path", "?"), "dtype": desc.get("dtype", "?"),
               "family": desc.get("family", "?"), "max_length": desc.get("max_length"),
               "files": 0, "entries": 0, "bytes": 0, "damaged": 0, "oldest": None, "newest": None}
        for name in store.list(scope):
            if not FILE_RE.match(name.rsplit("/", 1)[-1]):
                continue
            try:
                h = _file_header(store, name)
            except (segment.Damaged, OSError):
                row["damaged"] += 1
                continue
            row["files"] += 1
            row["entries"] += h.n
            row["bytes"] += h.size
            row["oldest"] = h.min_time if row["oldest"] is None else min(row["oldest"], h.min_time)
            row["newest"] = h.max_time if row["newest"] is None else max(row["newest"], h.max_time)
        out["models"].append(row)
        for k in ("files", "entries", "bytes", "damaged"):
            out[k] += row[k]
    return out


def parse_when(text: str, now: float | None = None) -> int:
    """--older-than: a date (2026-01-31), a local date and time (2026-01-31T12:00), or an age
    (30d, 12h, 90m); unix seconds."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([dhm])\s*", text)
    if m:
        return int(now - float(m.group(1)) * {"d": 86400, "h": 3600, "m": 60}[m.group(2)])
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"--older-than {text!r}: not a date or an age; write it like 2026-01-31, "
                         "2026-01-31T12:00 or 30d") from None
    return int(when.timestamp())


def _matches(spec: str, scope: str, desc: dict) -> bool:
    label = desc.get("label", {})
    if os.path.isdir(spec):
        if label.get("path") == os.path.abspath(spec):
            return True
        try:
            return desc.get("model_files") == model_identity(spec)
        except InputError:
            return False
    name = label.get("name", "")
    return (spec in (name, label.get("path"), os.path.abspath(spec)) or name.startswith(spec + "@")
            or (len(spec) >= 8 and scope.startswith(spec.lower())))


def _delete_scope(store: CacheStore, scope: str) -> int:
    """Our files of a scope, scope.json last, then the folder if empty; returns entries removed."""
    entries = 0
    for name in store.list(scope):
        base = name.rsplit("/", 1)[-1]
        if FILE_RE.match(base):
            try:
                entries += _file_header(store, name).n
            except (segment.Damaged, OSError):
                pass
            store.delete(name)
        elif _TEMP_RE.match(base):
            store.delete(name)
    store.delete(f"{scope}/{SCOPE_FILE}")
    store.remove_empty(scope)
    return entries


def prune(location: str, models=(), older_than: int | None = None) -> dict:
    """Remove the scopes of `models`, entries written before `older_than` (unix seconds), damaged
    files and stale temp files; merge each remaining scope's files into one run."""
    store = open_store(location)
    out = {"location": store.where(), "models_removed": [], "entries_removed": 0, "entries_old": 0,
           "damaged_removed": 0, "files_before": 0, "files_after": 0, "entries_after": 0}
    matched = set()
    for scope in scopes(store):
        desc = _scope_json(store, scope)
        hit = [m for m in models if _matches(m, scope, desc)]
        if hit:
            matched.update(hit)
            out["entries_removed"] += _delete_scope(store, scope)
            out["models_removed"].append({"scope": scope, "model": desc.get("label", {}).get("name", "?"),
                                          "dtype": desc.get("dtype", "?")})
            continue
        files = ScopeFiles(store, bytes.fromhex(scope), scope)
        try:
            files.refresh()
            out["files_before"] += len(files.headers) + len(files.bad)
            res = compact.merge_all(files, store, bytes.fromhex(scope), keep_after=older_than)
            for name in sorted(files.bad):
                try:
                    store.delete(f"{scope}/{name}")
                except IsADirectoryError:  # not a file of ours: someone else's folder, left as it is
                    log.warning("%s is a folder, not a cache file; it is left in place, and runs skip it",
                                store.where(f"{scope}/{name}"))
                    continue
                out["damaged_removed"] += 1
            out["entries_old"] += res["dropped_old"]
            for name in store.list(scope):
                base = name.rsplit("/", 1)[-1]
                if _TEMP_RE.match(base) and (time.time() - (store.mtime(name) or time.time())) > STALE_TEMP_S:
                    store.delete(name)
            files.refresh()
            out["files_after"] += len(files.headers)
            out["entries_after"] += sum(h.n for h in files.headers.values())
            if not files.headers:  # every entry was old: the scope goes
                _delete_scope(store, scope)
        finally:
            files.close()
    missing = [m for m in models if m not in matched]
    if missing:
        raise InputError(f"--model {missing[0]}: no model in the cache {store.where()} matches it; "
                         "`rerank-batch cache stats` lists them")
    return out
