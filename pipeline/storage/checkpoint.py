"""The checkpoint: finished units as whole part objects plus one small record each.

Layout of a checkpoint directory (OUTPUT.ckpt by default):
  .rerank-batch-checkpoint  marker, written first: format, run id, state ("running"/"published")
  .rerank-batch-lock        the live run's lease (pipeline/storage/lock.py)
  fingerprint.json          what the checkpoint was made from; written once
  parts/<unit>.parquet      one finished unit's scored rows, one object written whole
  done/<unit>.json          its record (its unit id, pairs, tokens, ..., the part's bytes, rows
                            and sha256), sealed by a sha256 of its own content, written only
                            after the part: the append-only log of finished units
  partial/<unit>.<id>.parquet  pairs of a unit still in flight, scored and committed by time
                            (`_ord`, `score`, their counts in the metadata), each written whole;
                            removed once the unit's record exists

A unit is finished when its record is intact (its seal matches), names the unit of its file name,
and its part has the recorded size and sha256; anything else (a crash between the two writes, a
zero-byte or garbage file, a byte changed on disk, a part and record copied over another unit's,
an edited count) is logged and scored again. Parquet parts carry no page checksums, so only the
hash catches a changed byte; it is computed from the bytes in memory when a part is written, and
checked by reading every part once when a run resumes and once before the final write.
A unit that takes long to score commits what it has scored so far every `--commit-every`
seconds as a partial object; a rerun scores only that unit's other pairs and writes its part
and record as usual, so a stop or a crash loses at most that much scoring, whatever the window.
parts/ and done/ may be links to folders elsewhere (a checkpoint moved to a bigger disk): they are
read and written through, and cleanup deletes only unit files (named by Unit.id) in them, then
the links themselves, never the folders they point to or anything else in them.
A commit writes two small objects whatever the number of units, so its cost is O(1). Every file
operation goes through a store (pipeline/storage/local.py), so that workers in other processes can
commit given only the directory, and an object-storage store can replace the local one.
Cleanup deletes only the names above, marker last; a directory we did not mark is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.read import UNIT_ID
from pipeline.errors import CheckpointError, InputError, RerankError, first_line
from pipeline.storage.fingerprint import check_inputs, describe_mismatch, diff_fingerprints, file_fingerprint
from pipeline.storage.lock import LEASE_NAME, LocalLease
from pipeline.storage.local import LocalStore, fsync_dir
from pipeline.storage.remote import REMOTE_LEASE_NAME, RemoteLease, RemoteStore
from pipeline.storage.uri import CHECKPOINT_MARKER, is_uri

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MARKER = CHECKPOINT_MARKER  # the one name that makes a directory a checkpoint
FINGERPRINT = "fingerprint.json"
PARTIAL = "partial"  # the folder of pairs committed by time from units not yet finished
_PARTIAL_META = b"rerank_batch"  # the Parquet key of a partial's counts (JSON)
# What a run that has not yet written its marker may already have made in the directory (its
# lease, the marker's or the lease's temp file, a writability probe): anything else there
# without a marker is someone else's, whatever its name.
_BEFORE_MARKER = re.compile(r"^(%s|\.probe-[0-9a-f]{32}|\.tmp-[0-9a-f]{32}-(%s))$" % (
    "|".join(re.escape(n) for n in (LEASE_NAME, REMOTE_LEASE_NAME)),
    "|".join(re.escape(n) for n in (MARKER, LEASE_NAME, REMOTE_LEASE_NAME))))
# Temp files of the marker, the fingerprint and the lease, and writability probes: what a kill
# between a temp write and its rename leaves in the directory's root. Cleanup must remove them
# too, or the directory outlives the checkpoint.
_OUR_ROOT_LEFTOVER = re.compile(r"^(\.probe-[0-9a-f]{32}|\.tmp-[0-9a-f]{32}-(%s))$" % (
    "|".join(re.escape(n) for n in (MARKER, FINGERPRINT, LEASE_NAME, REMOTE_LEASE_NAME))))
# A unit's part or record (or its temp file): the only names cleanup deletes in parts/ and done/,
# which may be links to folders that hold other files.
_UNIT_FILE = {folder: re.compile(r"^(\.tmp-[0-9a-f]{32}-)?%s\.%s$" % (UNIT_ID, ext))
              for folder, ext in (("parts", "parquet"), ("done", "json"), ("partial", "[0-9a-f]{16}\\.parquet"))}

__all__ = ["Checkpoint", "Kept", "open_checkpoint", "fsync_dir"]


@dataclass
class Kept:
    """Pairs of one unfinished unit already scored and committed (its partial objects)."""

    ords: np.ndarray  # int64, sorted, unique: the pairs' `_ord`
    scores: np.ndarray  # float32, aligned with ords
    counts: dict = field(default_factory=dict)  # tokens, truncated, tokens_computed, seconds

    @property
    def pairs(self) -> int:
        return len(self.ords)


class Checkpoint:
    """A checkpoint directory. Constructed from the path alone, so any worker can commit parts."""

    def __init__(self, directory: str, store=None):
        self.dir = directory
        self.store = store or store_for(directory)
        self.lease: LocalLease | None = None
        self.marker: dict = {}
        self.fingerprint: dict = {}
        self.done: dict[str, dict] = {}
        self._partials: dict[str, list[str]] = {}  # unit id -> names of its partial objects

    # -- what workers call -------------------------------------------------------------------
    def commit(self, unit_id: str, table: pa.Table, info: dict) -> dict:
        """Write a unit's part whole, then its record. A kill between the two leaves an
        unrecorded part, which the next run overwrites."""
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        record = seal({**info, "unit": unit_id, "part_bytes": len(data), "part_rows": table.num_rows,
                       "part_sha256": hashlib.sha256(data).hexdigest()})
        try:
            self.store.write(f"parts/{unit_id}.parquet", data)
            self.store.write(f"done/{unit_id}.json", json.dumps(record, sort_keys=True).encode())
        except OSError as exc:
            raise RerankError(
                f"{self.dir}: cannot write a checkpoint part ({exc.strerror or exc}); free disk space "
                "or pass another --checkpoint-dir, then rerun to resume"
            ) from None
        self.done[unit_id] = record
        # The record makes the unit's partials redundant; a kill before they go leaves them to
        # the cleanup, and a rerun ignores the partials of a finished unit.
        for name in self._partials.pop(unit_id, []):
            with contextlib.suppress(OSError):
                self.store.delete(name)
        if self.lease is not None:
            self.lease.renew()
        return record

    def commit_partial(self, unit_id: str, ords: np.ndarray, scores: np.ndarray, counts: dict) -> None:
        """Write pairs of an unfinished unit (their `_ord` and score) as one object, whole."""
        table = pa.table({"_ord": pa.array(np.asarray(ords, dtype=np.int64)),
                          "score": pa.array(np.asarray(scores, dtype=np.float32))})
        table = table.replace_schema_metadata({_PARTIAL_META: json.dumps(counts, sort_keys=True).encode()})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        name = f"{PARTIAL}/{unit_id}.{uuid.uuid4().hex[:16]}.parquet"
        try:
            self.store.write(name, buf.getvalue().to_pybytes())
        except OSError as exc:
            raise RerankError(
                f"{self.dir}: cannot write a checkpoint part ({exc.strerror or exc}); free disk space "
                "or pass another --checkpoint-dir, then rerun to resume"
            ) from None
        self._partials.setdefault(unit_id, []).append(name)
        if self.lease is not None:
            self.lease.renew()

    def kept(self, unit_id: str, refresh: bool = True) -> Kept | None:
        """The committed pairs of an unfinished unit (None: none). `refresh`: list the folder
        again (another process may have written some: a pool or Ray worker that died); without
        it, the names this object listed or wrote. A damaged object is logged and ignored: its
        pairs are scored again."""
        names = list(self._partials.get(unit_id, []))
        if refresh:  # called from a prefetch thread: only this unit's entry changes
            names = sorted(set(names) | set(self._listing().get(unit_id, [])))
            if names:
                self._partials[unit_id] = names
        tables = []
        for name in names:
            try:
                t = pq.read_table(self.store.source(name))
                counts = json.loads((t.schema.metadata or {})[_PARTIAL_META])
                if t.column_names != ["_ord", "score"] or not isinstance(counts, dict):
                    raise ValueError(name)
            except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
                log.warning("%s: %s is damaged; its pairs are scored again", self.dir, name)
                continue
            tables.append((t, counts))
        if not tables:
            return None
        ords = np.concatenate([t.column("_ord").to_numpy() for t, _ in tables])
        scores = np.concatenate([t.column("score").to_numpy() for t, _ in tables]).astype(np.float32)
        ords, first = np.unique(ords, return_index=True)  # a pair committed twice (two workers) counts once
        counts = {k: sum(c.get(k, 0) for _, c in tables) for k in ("tokens", "truncated", "tokens_computed",
                                                                    "seconds")}
        if len(first) < sum(t.num_rows for t, _ in tables):  # the sums are then estimates, by pairs
            share = len(first) / sum(t.num_rows for t, _ in tables)
            counts = {k: (v * share if k == "seconds" else int(round(v * share))) for k, v in counts.items()}
        return Kept(ords, scores[first], counts)

    def kept_pairs(self, refresh: bool = True) -> int:
        """Pairs committed by time from units without a record (those a rerun does not score)."""
        if refresh:
            self._list_partials()
        return sum(k.pairs for u in list(self._partials) if u not in self.done
                   for k in [self.kept(u, refresh=False)] if k is not None)

    def holds_work(self, refresh: bool = False) -> bool:
        """Whether anything here is worth keeping: finished units, partial commits (listed again
        with `refresh`: workers write them), or a published output's record."""
        if refresh:
            with contextlib.suppress(OSError):
                self._list_partials()
        return bool(self.done or self._partials or self.state == "published")

    def _list_partials(self) -> None:
        self._partials = self._listing()

    def _listing(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name in self.store.list(PARTIAL):
            base = name.rsplit("/", 1)[1]
            parts = base.split(".")
            if base.startswith(".") or len(parts) != 3 or parts[2] != "parquet":
                continue
            found.setdefault(parts[0], []).append(name)
        return found

    def part_path(self, unit_id: str) -> str:
        return self.store.path(f"parts/{unit_id}.parquet")

    def parts(self, unit_ids) -> list[str]:
        return [self.part_path(u) for u in unit_ids]

    # -- reading state -------------------------------------------------------------------------
    def finished(self, known: dict | None = None) -> dict[str, dict]:
        """Units whose record and part are intact (see unit_fault); the others are logged and redone.
        Reads every part once (its hash). `known`: records already checked, taken as they are
        (only new records are read)."""
        done = {}
        for name in self.store.list("done"):
            base = name.rsplit("/", 1)[1]
            if base.startswith(".") or not base.endswith(".json"):
                continue
            uid = base[: -len(".json")]
            if known and uid in known:
                done[uid] = known[uid]
                continue
            try:
                rec = json.loads(self.store.read(name))
            except (OSError, ValueError):
                rec = None
            why = unit_fault(self.store, uid, rec)
            if why is None:
                done[uid] = rec
            else:
                log.warning("%s: unit %s: %s; scoring it again", self.dir, uid, why)
        return done

    def recheck(self, unit_ids) -> list[str]:
        """Check the finished units among `unit_ids` again, from their stored records (before the
        final write: a part may have changed on disk since it was written or verified; an
        executor may have added fields of its own to the record it handed back). Good units get
        their stored record in `done`; bad ones leave `done` and lose their record, so that they
        are scored again. Returns the bad ids."""
        bad = []
        for uid in unit_ids:
            if uid not in self.done:
                continue
            try:
                rec = json.loads(self.store.read(f"done/{uid}.json"))
            except (OSError, ValueError):
                rec = None
            why = unit_fault(self.store, uid, rec)
            if why is None:
                self.done[uid] = rec
                continue
            log.warning("%s: unit %s: %s; scoring it again", self.dir, uid, why)
            self.store.delete(f"done/{uid}.json")
            del self.done[uid]
            bad.append(uid)
        return bad

    def _read_json(self, name: str) -> dict | None:
        if not self.store.exists(name):
            return None
        try:
            body = json.loads(self.store.read(name))
        except (OSError, ValueError):
            body = None
        if not isinstance(body, dict):
            raise CheckpointError(f"{self.store.path(name)}: unreadable; pass --restart to start over")
        return body

    @property
    def state(self) -> str:
        return self.marker.get("state", "running")

    # -- the run's side ----------------------------------------------------------------------
    def write_marker(self, **fields) -> None:
        self.marker = {**self.marker, **fields}
        self.store.write(MARKER, json.dumps(self.marker, sort_keys=True).encode())

    def delete_ours(self, links: bool = False) -> None:
        """Delete the names we write, the marker last; strangers' files stay where they are. In
        parts/ and done/ (which may be links to folders elsewhere) only unit files go; with
        `links`, such a link goes too (the link, never its folder): --restart keeps it, so that
        the new parts land where the user moved them."""
        for folder in ("parts", "done", PARTIAL):
            for name in self.store.list(folder):
                if _UNIT_FILE[folder].match(name.rsplit("/", 1)[1]):
                    self.store.delete(name)
            self.store.remove_empty(folder, links=links)
        for name in self.store.list(""):
            if _OUR_ROOT_LEFTOVER.match(name):
                self.store.delete(name)
        self.store.delete(FINGERPRINT)
        self.store.delete(MARKER)

    def close(self, remove: bool) -> None:
        """Release the lease; with remove, delete our files and the directory if we made it."""
        created = self.marker.get("created_dir")
        if remove:
            self.delete_ours(links=True)
        if self.lease is not None:
            self.lease.release(unlink=remove or not self.store.exists(MARKER))
            self.lease = None
        if remove and created:
            self.store.remove_empty("")


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _record_digest(record: dict) -> str:
    return _digest(json.dumps({k: v for k, v in record.items() if k != "record_sha256"}, sort_keys=True))


def seal(record: dict) -> dict:
    """`record` with the sha256 of its own content, so that an edited count is caught."""
    return {**record, "record_sha256": _record_digest(record)}


def part_digest(store, name: str) -> str | None:
    """The sha256 of a stored object, read in 1 MiB pieces; None when it cannot be read."""
    h = hashlib.sha256()
    try:
        src = store.source(name)
        with (open(src, "rb") if isinstance(src, str) else src) as f:
            while True:
                piece = f.read(1 << 20)
                if not piece:
                    break
                h.update(piece)
    except OSError:
        return None
    return h.hexdigest()


def unit_fault(store, uid: str, rec) -> str | None:
    """Why unit `uid`'s record `rec` (parsed JSON) and its part cannot be trusted, or None.
    Reads the part once (its sha256)."""
    if not isinstance(rec, dict):
        return "its record is unreadable"
    if not isinstance(rec.get("record_sha256"), str) or rec["record_sha256"] != _record_digest(rec):
        return "its record is not the one written with its part (edited, or of an older version)"
    if rec.get("unit") != uid:
        return f"its record is of unit {rec.get('unit')}"
    part = f"parts/{uid}.parquet"
    size = store.size(part)
    if size is None:
        return "its part is missing"
    if size != rec.get("part_bytes") or part_digest(store, part) != rec.get("part_sha256"):
        return "its part differs from its record (the part's content changed)"
    return None


def store_for(directory: str):
    """The store of a checkpoint directory: object storage for a URI, else the local disk."""
    return RemoteStore(directory) if is_uri(directory) else LocalStore(directory)


def made_for(marker: dict, output: str) -> bool:
    """Whether a checkpoint's marker was made for `output` (a marker of a version that did not
    record its output counts as made for it): only then may a run take an existing output for
    its own."""
    return marker.get("output_path") in (None, output)


def marked_for(directory: str, output: str) -> bool:
    """Whether `directory` holds a checkpoint marker made for `output` (read before the lease)."""
    store = store_for(directory)
    try:
        marker = json.loads(store.read(MARKER)) if store.exists(MARKER) else None
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and made_for(marker, output)


def _strangers(store) -> list[str]:
    """The names in a directory without our marker that no run of ours could have made there."""
    return sorted(n for n in store.list("") if not _BEFORE_MARKER.match(n))


def _refuse_foreign(store, directory: str) -> None:
    """A directory (or prefix) that holds files but no marker of ours is someone else's."""
    if store.exists(MARKER):
        return
    strangers = _strangers(store)
    if "manifest.json" in strangers and store.exists("parts"):
        raise CheckpointError(
            f"{directory}: a checkpoint of an older rerank-batch (manifest.json), which this version cannot "
            "resume; delete that directory to start over"
        )
    if strangers:
        shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise InputError(
            f"{directory}: not a rerank-batch checkpoint and not empty (holds {shown}); pass a new or empty "
            "--checkpoint-dir (the run deletes its checkpoint when done)"
        )


def _open_remote(directory: str, run_id: str) -> tuple[Checkpoint, bool]:
    """Object storage: no folders to make or to find foreign; a prefix with objects of others
    but no marker is refused as a local directory would be; the lease is an expiring object."""
    store = RemoteStore(directory)
    existed = bool(store.list(""))
    if existed:
        _refuse_foreign(store, directory)
    ck = Checkpoint(directory, store)
    try:
        ck.lease = RemoteLease(store, REMOTE_LEASE_NAME, run_id).acquire()
    except OSError as exc:
        raise InputError(f"{directory}: cannot write the checkpoint there ({first_line(exc)}); check the bucket, "
                         "the credentials, or pass another --checkpoint-dir") from None
    return ck, existed


def _open_local(directory: str, run_id: str) -> tuple[Checkpoint, bool]:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InputError(f"{directory}: the checkpoint directory is a file; pass a directory with --checkpoint-dir")
    existed = os.path.isdir(directory)
    ck = Checkpoint(directory)
    if existed:
        _refuse_foreign(ck.store, directory)
    try:
        os.makedirs(directory, exist_ok=True)
        ck.lease = LocalLease(directory, run_id).acquire()
    except OSError as exc:
        if not existed:  # leave no half-made checkpoint (a lock file in a new directory) behind
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, LEASE_NAME))
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk, not the option: a runtime failure
            raise RerankError(f"{directory}: cannot write the checkpoint here ({exc.strerror}); free space there "
                              "or pass another --checkpoint-dir, then rerun") from None
        raise InputError(
            f"{directory}: cannot write the checkpoint here ({exc.strerror or exc}); pass a writable --checkpoint-dir"
        ) from None
    return ck, existed


def open_checkpoint(directory: str, fingerprint: dict, paths, *, restart: bool, run_id: str | None = None,
                    own_root: bool = False, output: str | None = None) -> Checkpoint:
    """Take the lease on `directory` (made and marked when absent or empty), check the fingerprint,
    and load the finished units. Refuses a non-empty directory without our marker (exit 2),
    a directory a live run holds (exit 75) and a fingerprint that differs (exit 2). `own_root`:
    the directory's name is ours (OUTPUT.ckpt), so it goes with the checkpoint once empty."""
    run_id = run_id or uuid.uuid4().hex[:12]
    new = False
    if is_uri(directory):
        ck, existed = _open_remote(directory, run_id)
    else:
        ck, existed = _open_local(directory, run_id)
    try:
        why = ck.store.is_writable()
        if why:
            raise InputError(f"{directory}: cannot write the checkpoint here ({why}); pass a writable --checkpoint-dir")
        try:
            ck.marker = ck._read_json(MARKER) or {}
        except CheckpointError:  # a damaged marker: --restart is the way out it names
            if not restart:
                raise
            ck.marker = {"damaged": True}
        earlier = []
        if restart and ck.marker:
            # The run ids of the checkpoint before, whose temp outputs the publish step removes.
            earlier = [i for i in [ck.marker.get("run_id"), *ck.marker.get("earlier_run_ids", [])]
                       if isinstance(i, str)][:16]
            ck.delete_ours()
            ck.marker = {}
        if not ck.marker:
            new = True
            ck.write_marker(format=FORMAT_VERSION, run_id=run_id, state="running", created_dir=own_root or not existed,
                            output_path=output, earlier_run_ids=earlier)
        elif ck.marker.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{directory}: a checkpoint of another rerank-batch version; pass --restart")
        ck.done = ck.finished()
        ck._list_partials()
        old = ck._read_json(FINGERPRINT)
        if old is not None and (ck.done or ck._partials or ck.state == "published"):
            diff = diff_fingerprints({k: v for k, v in old.items() if k != "inputs"}, fingerprint)
            if diff:
                raise CheckpointError(f"{directory}: {describe_mismatch(*diff)}, or pass --restart to start over")
            check_inputs(old.get("inputs", []), paths)
            ck.fingerprint = old
        else:  # nothing to lose: (re)write it, with the content hashes of the inputs
            ck.fingerprint = {**fingerprint, "inputs": [file_fingerprint(p) for p in paths]}
            ck.store.write(FINGERPRINT, json.dumps(ck.fingerprint, indent=1, sort_keys=True).encode())
            ck.done = {}
            for name in [n for names in ck._partials.values() for n in names]:  # scores of unknown origin
                ck.store.delete(name)
            ck._partials = {}
        if ck.done:
            n = len(ck.done)
            log.info("resuming: %d %s already scored in %s", n, "unit" if n == 1 else "units", directory)
    except BaseException:
        ck.close(remove=new)
        if new and (own_root or not existed):
            ck.store.remove_empty("")
        raise
    return ck
