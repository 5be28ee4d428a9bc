"""The run's checkpoint, from open to publish, on one object (Ray Data's Datasink shape).

    sink = CheckpointSink.open(root, fingerprint, inputs, output=Output(...), restart=...)
                                   refuse a foreign folder, take the lease, write the marker,
                                   check the fingerprint, load the finished units (verified)
    sink.commit(unit, table, info) a unit's part, then its record (the done-marker), each whole
    sink.commit_group(items)       units scored together: one part and one record for them all
    sink.commit_partials(items)    pairs of units in flight, committed by time: one object
    sink.read_part(unit, columns)  a unit's rows read back through the store, checked against its
    sink.parts(units)              record; the same for the final write, one read per part
    sink.verify(units, rescore)    every record read again before the final write; rescore() the bad
    sink.finish(units, ...)        re-check the inputs, rank and write from the parts (each checked
                                   as it is read), publish, mark the checkpoint published
    sink.close(remove)             release the lease; with remove, delete our files, marker last

Workers (pool processes, Ray actors) get `sink.spec()`, a small picklable SinkSpec, and
`spec.attach()` gives them a sink without the lease that commits into the same checkpoint.
Every file operation goes through the checkpoint folder's Location (local disk or object storage).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import CheckpointError, InputError, RerankError, first_line
from pipeline.storage import checkpoint as fmt
from pipeline.storage.checkpoint import (FINGERPRINT, FORMAT_VERSION, MARKER, PARTIAL, PARTIAL_META, READABLE_FORMATS,
                                         Kept, part_name, record_name, seal)
from pipeline.storage.fingerprint import (check_inputs, describe_mismatch, diff_fingerprints, file_fingerprint,
                                          recheck_inputs)
from pipeline.storage.location import Location, location

log = logging.getLogger(__name__)


class PartsChanged(RerankError):
    """Parts that were not the bytes their records name when the final write read them."""

    def __init__(self, root, unit_ids: list[str]):
        self.unit_ids = list(unit_ids)
        super().__init__(f"{root}: the part of unit {self.unit_ids[0]} changed on disk right after it was written; "
                         "check that disk (or pass another --checkpoint-dir), then rerun the same command")


@dataclass(frozen=True)
class SinkSpec:
    """What a worker in another process needs to commit into the run's checkpoint: picklable."""

    root: str  # the checkpoint folder, a path or a URI

    def attach(self) -> "CheckpointSink":
        """A sink on the same checkpoint, without the lease (the driver holds the run's)."""
        return CheckpointSink(location(self.root))


def _encode(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def _decode(data: bytes, columns=None) -> pa.Table:
    # Through ParquetFile: pq.read_table's dataset layer imports pandas (0.2 s and more).
    return pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(columns=columns)


def _unit_rows(table: pa.Table, unit_id: str) -> tuple[pa.Table, dict]:
    """A partial object's rows and counts of one unit (an object may hold several units)."""
    meta = json.loads((table.schema.metadata or {})[PARTIAL_META])
    table = table.replace_schema_metadata(None)
    if not (isinstance(meta, dict) and "units" in meta):
        return table, meta
    start = 0
    for uid, n, counts in meta["units"]:
        if uid == unit_id:
            return table.slice(start, n), counts
        start += n
    return table.slice(0, 0), {}


def _resumed(record: dict, key: str) -> int:
    """What a record counts of the pairs an earlier run committed by time (not this run's)."""
    return int(record.get("resumed", {}).get(key, 0))


class CheckpointSink:
    """A checkpoint folder and, on the driver, the run's lease, inputs and output."""

    def __init__(self, root: Location, *, inputs=(), output=None):
        self.root = root
        self.inputs = list(inputs)  # Locations, in order (the fingerprint's)
        self.output = output  # storage.output.Output (driver only)
        self.lease = None
        self.marker: dict = {}
        self.fingerprint: dict = {}
        self.done: dict[str, dict] = {}  # unit id -> its counts (its verified record, or its entry in one)
        self._records: dict[str, dict] = {}  # the verified records, by the unit their file is named after
        self._place: dict[str, tuple[str, int, int]] = {}  # unit id -> (record/part name's unit, first row, rows)
        self._partials: dict[str, list[str]] = {}  # unit id -> names of its partial objects
        self._partial_units: dict[str, set[str]] = {}  # partial object -> its units not yet finished

    @property
    def dir(self) -> str:
        """The checkpoint folder as given (messages name it so)."""
        return self.root.uri

    def spec(self) -> SinkSpec:
        return SinkSpec(self.root.uri)

    def _at(self, name: str) -> Location:
        return self.root / name

    # -- open ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Location, fingerprint: dict, inputs, *, restart: bool, run_id: str | None = None,
             own_root: bool = False, output=None) -> "CheckpointSink":
        """Take the lease on `root` (made and marked when absent or empty), check the fingerprint,
        and load the finished units. Refuses a non-empty folder without our marker (exit 2), a
        folder a live run holds (exit 75) and a fingerprint that differs (exit 2). `own_root`: the
        folder's name is ours (OUTPUT.ckpt), so it goes with the checkpoint once empty."""
        run_id = run_id or uuid.uuid4().hex[:12]
        st = root.stat()
        if st is not None and st.kind == "file":
            raise InputError(f"{root}: the checkpoint directory is a file; pass a directory with --checkpoint-dir")
        existed = st is not None
        ck = cls(root, inputs=inputs, output=output)
        if existed:
            fmt.refuse_foreign(root)
        try:
            root.make_dirs()
            ck.lease = root.lease(run_id).acquire()
        except OSError as exc:
            if not existed:  # leave no half-made checkpoint (a lock file in a new directory) behind
                ck._remove_lock_file()
                root.remove_dir()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk, not the option: a runtime failure
                raise RerankError(f"{root}: cannot write the checkpoint here ({exc.strerror}); free space there "
                                  "or pass another --checkpoint-dir, then rerun") from None
            raise InputError(f"{root}: cannot write the checkpoint here ({exc.strerror or first_line(exc)}); "
                             "pass a writable --checkpoint-dir") from None
        new = False
        try:
            why = root.writable()
            if why:
                raise InputError(f"{root}: cannot write the checkpoint here ({why}); pass a writable --checkpoint-dir")
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
                ck.write_marker(format=FORMAT_VERSION, run_id=run_id, state="running",
                                created_dir=own_root or not existed,
                                output_path=output.key if output is not None else None, earlier_run_ids=earlier)
            elif ck.marker.get("format") not in READABLE_FORMATS:
                raise CheckpointError(f"{root}: a checkpoint of another rerank-batch version; pass --restart")
            elif ck.marker.get("format") != FORMAT_VERSION:  # from now on it may hold records of groups
                ck.write_marker(format=FORMAT_VERSION)
            ck.done = ck.finished()
            ck._list_partials()
            old = ck._read_json(FINGERPRINT)
            if old is not None and (ck.done or ck._partials or ck.state == "published"):
                diff = diff_fingerprints({k: v for k, v in old.items() if k != "inputs"}, fingerprint)
                if diff:
                    raise CheckpointError(f"{root}: {describe_mismatch(*diff)}, or pass --restart to start over")
                check_inputs(old.get("inputs", []), ck.inputs)
                ck.fingerprint = old
            else:  # nothing to lose: (re)write it, with the content hashes of the inputs
                ck.fingerprint = {**fingerprint, "inputs": [file_fingerprint(i) for i in ck.inputs]}
                ck._at(FINGERPRINT).write_atomic(json.dumps(ck.fingerprint, indent=1, sort_keys=True).encode())
                ck.done, ck._records, ck._place = {}, {}, {}
                for name in {n for names in ck._partials.values() for n in names}:  # scores of unknown origin
                    ck._at(name).delete()
                ck.delete_dedup()
                ck._partials, ck._partial_units = {}, {}
            if ck.done:
                n = len(ck.done)
                log.info("resuming: %d %s already scored in %s", n, "unit" if n == 1 else "units", root)
        except BaseException:
            ck.close(remove=new)
            if new and (own_root or not existed):
                root.remove_dir()
            raise
        return ck

    def _remove_lock_file(self) -> None:
        from pipeline.storage.lock import LEASE_NAME

        with contextlib.suppress(OSError):
            self._at(LEASE_NAME).delete()

    def _read_json(self, name: str) -> dict | None:
        loc = self._at(name)
        if not loc.exists():
            return None
        try:
            body = json.loads(loc.read_bytes())
        except (OSError, ValueError):
            body = None
        if not isinstance(body, dict):
            raise CheckpointError(f"{loc}: unreadable; pass --restart to start over")
        return body

    @property
    def state(self) -> str:
        return self.marker.get("state", "running")

    def write_marker(self, **fields) -> None:
        self.marker = {**self.marker, **fields}
        self._at(MARKER).write_atomic(json.dumps(self.marker, sort_keys=True).encode())

    # -- commits (driver and workers) ------------------------------------------------------------
    def _write(self, name: str, data: bytes) -> None:
        try:
            self._at(name).write_atomic(data)
        except OSError as exc:
            raise RerankError(
                f"{self.root}: cannot write a checkpoint part ({exc.strerror or first_line(exc)}); free disk space "
                "or pass another --checkpoint-dir, then rerun to resume"
            ) from None

    def commit(self, unit_id: str, table: pa.Table, info: dict) -> dict:
        """Write a unit's part whole, then its record. A kill between the two leaves an
        unrecorded part, which the next run overwrites. Returns the record."""
        data = _encode(table)
        record = seal({**info, "unit": unit_id, "part_bytes": len(data), "part_rows": table.num_rows,
                       "part_sha256": hashlib.sha256(data).hexdigest()})
        self._write(part_name(unit_id), data)
        self._write(record_name(unit_id), json.dumps(record, sort_keys=True).encode())
        self._install(unit_id, record)
        self._drop_partials([unit_id])
        self.renew()
        return record

    def commit_group(self, items) -> list[dict]:
        """Commit units scored together (`items`: (unit id, table, info), in input order) as one
        part and one record that lists them: two objects for the group, however many units it
        holds (many small files make groups of thousands of one-row units). One unit is an
        ordinary commit. Returns each unit's counts, as `done` holds them."""
        items = list(items)
        if len(items) == 1:
            return [self.commit(*items[0])]
        try:
            table = pa.concat_tables([t for _, t, _ in items])
        except pa.ArrowInvalid:  # parts of different column types: each its own
            return [self.commit(*item) for item in items]
        first = items[0][0]
        data = _encode(table)
        record = seal({"unit": first, "units": [{**info, "unit": uid, "rows": t.num_rows} for uid, t, info in items],
                       "part_bytes": len(data), "part_rows": table.num_rows,
                       "part_sha256": hashlib.sha256(data).hexdigest()})
        self._write(part_name(first), data)
        self._write(record_name(first), json.dumps(record, sort_keys=True).encode())
        self._install(first, record)
        self._drop_partials([uid for uid, _, _ in items])
        self.renew()
        return [self.done[uid] for uid, _, _ in items]

    def _install(self, name_uid: str, record: dict) -> None:
        """Take a verified record as the truth for the units it lists."""
        self._records[name_uid] = record
        offset = 0
        for entry in record.get("units", [record]):
            uid, rows = entry["unit"], int(entry.get("rows", record.get("part_rows", 0)))
            self.done[uid] = entry if "units" not in record else {**entry, "group": name_uid}
            self._place[uid] = (name_uid, offset, rows)
            offset += rows

    def _uninstall(self, name_uid: str) -> list[str]:
        record = self._records.pop(name_uid, None)
        uids = [e["unit"] for e in record.get("units", [record])] if record else [name_uid]
        for uid in uids:
            self.done.pop(uid, None)
            self._place.pop(uid, None)
        return uids

    def _drop_partials(self, unit_ids) -> None:
        # The record makes the units' partials redundant: an object goes once every unit it
        # holds has its record. A kill before they go leaves them to the cleanup, and a rerun
        # ignores the partials of a finished unit.
        for uid in unit_ids:
            for name in self._partials.pop(uid, []):
                left = self._partial_units.get(name, set())
                left.discard(uid)
                if not left:
                    self._partial_units.pop(name, None)
                    with contextlib.suppress(OSError):
                        self._at(name).delete()

    def landed(self, unit_id: str, record: dict) -> None:
        """A worker committed this unit (its record as the worker reported it)."""
        self._install(unit_id, record)
        self.renew()

    def renew(self) -> None:
        if self.lease is not None:
            self.lease.renew()

    def commit_partial(self, unit_id: str, ords: np.ndarray, scores: np.ndarray, counts: dict) -> None:
        """Write pairs of an unfinished unit (their `_ord` and score) as one object, whole."""
        self.commit_partials([(unit_id, ords, scores, counts)])

    def commit_partials(self, items) -> None:
        """Write the pairs scored so far of units in flight (`items`: (unit id, ords, scores,
        counts)) as one object, whole, however many units it holds. Named after the first unit;
        an object of several lists them (id, pairs, counts) in its metadata, its rows in order."""
        items = [(uid, np.asarray(o, dtype=np.int64), np.asarray(sc, dtype=np.float32), c)
                 for uid, o, sc, c in items if len(o)]
        if not items:
            return
        table = pa.table({"_ord": pa.array(np.concatenate([o for _, o, _, _ in items])),
                          "score": pa.array(np.concatenate([sc for _, _, sc, _ in items]))})
        meta = items[0][3] if len(items) == 1 else {"units": [[uid, len(o), c] for uid, o, _, c in items]}
        table = table.replace_schema_metadata({PARTIAL_META: json.dumps(meta, sort_keys=True).encode()})
        name = f"{PARTIAL}/{items[0][0]}.{uuid.uuid4().hex[:16]}.parquet"
        self._write(name, _encode(table))
        self._partial_units[name] = {uid for uid, _, _, _ in items}
        for uid, _, _, _ in items:
            self._partials.setdefault(uid, []).append(name)
        self.renew()

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
                t = _decode(self._at(name).read_bytes())
                t, counts = _unit_rows(t, unit_id)
                if t.column_names != ["_ord", "score"] or not isinstance(counts, dict):
                    raise ValueError(name)
            except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
                log.warning("%s: %s is damaged; its pairs are scored again", self.root, name)
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

    def pairs_held(self, unit_ids, partial: int | None = None) -> int:
        """Pairs of `unit_ids` in the checkpoint: finished units (nulls skipped included) and
        partial commits (`partial`, listed again when None: workers may have written some)."""
        whole = sum(self.done[u]["pairs"] + self.done[u]["skipped_null"] for u in unit_ids if u in self.done)
        return whole + (self.kept_pairs(refresh=True) if partial is None else partial)

    def totals(self, unit_ids) -> dict:
        """The summary's counts of `unit_ids` (all finished), from their verified records
        (finished/recheck)."""
        t = {"pairs_scored": 0, "tokens": 0, "truncated": 0, "skipped_null": 0, "empty_lists": 0}
        for u in unit_ids:
            info = self.done[u]
            t["pairs_scored"] += info["pairs"]
            for k in ("tokens", "truncated", "skipped_null"):
                t[k] += info[k]
            t["empty_lists"] += info.get("empty_lists", 0)
        return t

    def run_counts(self, fresh) -> dict:
        """The summary's counts of this run, from the records of the units it scored (`fresh`):
        pairs the model computed, those the cache gave and repeats scored once (a record of an
        older version, without them, counts its pairs as computed)."""
        out = {"pairs_computed": 0, "pairs_from_cache": 0, "duplicate_pairs": 0}
        for u in fresh:
            r = self.done[u]
            out["pairs_computed"] += int(r.get("computed", r["pairs"] - _resumed(r, "pairs")))
            out["pairs_from_cache"] += int(r.get("from_cache", 0))
            out["duplicate_pairs"] += int(r.get("duplicates", 0))
        return out

    def sharing_counts(self, fresh) -> dict:
        """Prefix sharing: the pairs' tokens this run scored (`fresh`: its units), and those that
        went through the model. (A unit resumed from partial commits counts only the pairs this
        run scored.)"""
        done = self.done
        return {"tokens_before_sharing": sum(done[u]["tokens"] - _resumed(done[u], "tokens") for u in fresh),
                "tokens_after_sharing": sum(done[u].get("tokens_computed", done[u]["tokens"])
                                            - _resumed(done[u], "tokens_computed") for u in fresh)}

    def chunking_counts(self, unit_ids) -> dict:
        """With --chunk-tokens: documents scored, those split into several windows, windows scored."""
        return {k: sum(self.done[u].get("chunking", {}).get(k, 0) for u in unit_ids)
                for k in ("documents", "split", "windows")}

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
        """unit id -> the partial objects that hold pairs of it (an object of several units is
        asked once, in this process, which units it holds)."""
        found: dict[str, list[str]] = {}
        for base in self._at(PARTIAL).list():
            parts = base.split(".")
            if base.startswith(".") or len(parts) != 3 or parts[2] != "parquet":
                continue
            name = f"{PARTIAL}/{base}"
            units = self._partial_units.get(name)
            if units is None:
                units = self._partial_units[name] = self._units_of_partial(name, parts[0])
            for uid in units:
                found.setdefault(uid, []).append(name)
        return found

    def _units_of_partial(self, name: str, first: str) -> set[str]:
        try:
            with self._at(name).open() as f:
                meta = json.loads((pq.ParquetFile(f).schema_arrow.metadata or {})[PARTIAL_META])
            return {u[0] for u in meta["units"]} if isinstance(meta, dict) and "units" in meta else {first}
        except (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException):
            return {first}  # kept() finds it damaged and says so

    def _read_verified(self, name_uid: str, rec: dict) -> tuple[bytes | None, str | None]:
        """The bytes of the part named after unit `name_uid`, and why they are not the ones its
        record `rec` names (None: they are)."""
        try:
            data = self._at(part_name(name_uid)).read_bytes()
        except OSError:
            data = None
        return data, fmt.part_fault(rec, data)

    def read_part(self, unit_id: str, columns=None) -> pa.Table:
        """A finished unit's rows, read through the store and checked against its record (size
        and sha256) as they are read; PartsChanged when the part is not the one committed."""
        name_uid, offset, rows = self._place[unit_id]
        data, why = self._read_verified(name_uid, self._records[name_uid])
        if why is not None:
            raise PartsChanged(self.root, [unit_id])
        return _decode(data, columns).slice(offset, rows)

    def parts(self, unit_ids) -> "UnitParts":
        return UnitParts(self, list(unit_ids))

    def verify(self, unit_ids, rescore) -> None:
        """Before the final write: read every finished unit's record again (recheck) and call
        rescore() to score the units whose record is no longer intact. The parts themselves are
        checked by the final write as it reads them (finish). A record bad again right after that
        is a runtime failure."""
        bad = self.recheck(unit_ids)
        if not bad:
            return
        rescore()
        again = self.recheck(bad)
        if again:
            raise RerankError(f"{self.dir}: the record of unit {again[0]} changed on disk right after it was "
                              "written; check that disk (or pass another --checkpoint-dir), then rerun the same "
                              "command")

    def finished(self, known: dict | None = None) -> dict[str, dict]:
        """Load the records whose record and part are intact (returned: every listed unit's
        counts); the others are logged and their units redone. Reads every part once (its hash).
        `known`: units already checked: their records are taken as they are (only new records
        are read)."""
        old = self._records
        self._records, self._place, self.done = {}, {}, {}
        for base in self._at(fmt.DONE).list():
            if base.startswith(".") or not base.endswith(".json"):
                continue
            uid = base[: -len(".json")]
            if known and uid in known and uid in old:
                self._install(uid, old[uid])
                continue
            try:
                rec = fmt.parse_json(self._at(record_name(uid)).read_bytes())
            except OSError:
                rec = None
            why = fmt.record_fault(uid, rec)
            if why is None:
                why = self._read_verified(uid, rec)[1]
            if why is None:
                self._install(uid, rec)
            else:
                log.warning("%s: unit %s: %s; scoring it again", self.root, uid, why)
        return self.done

    def recheck(self, unit_ids) -> list[str]:
        """Read the records of the finished units among `unit_ids` again (before the final write:
        a record may have changed since; an executor may have added fields of its own to the
        record it handed back). Good units get their stored record's counts in `done`; bad ones
        leave `done` and lose their record, so that they are scored again. Returns the bad ids.
        The parts are checked by the final write, as it reads them."""
        bad = []
        names = dict.fromkeys(self._place[u][0] for u in unit_ids if u in self._place)
        for name_uid in names:
            try:
                rec = fmt.parse_json(self._at(record_name(name_uid)).read_bytes())
            except OSError:
                rec = None
            why = fmt.record_fault(name_uid, rec)
            if why is None:
                self._uninstall(name_uid)
                self._install(name_uid, rec)
                continue
            bad += self.forget(name_uid, why)
        return bad

    def forget(self, unit_id: str, why: str) -> list[str]:
        """Take a finished unit back, with the units committed with it (their record goes), so
        that they are scored again. Returns their ids."""
        name_uid = self._place[unit_id][0] if unit_id in self._place else unit_id
        log.warning("%s: unit %s: %s; scoring it again", self.root, name_uid, why)
        self._at(record_name(name_uid)).delete()
        return self._uninstall(name_uid)

    # -- finish ------------------------------------------------------------------------------------
    def finish(self, unit_ids, write_file, write_dir, *, overwrite: bool, restart: bool, output_existed: bool,
               critical=contextlib.nullcontext, record: dict | None = None) -> int:
        """Re-check the inputs, write the output from the parts of `unit_ids` (in order) and put it
        in place; the marker records it as published in the same critical section. Returns the
        rows. `write_file(parts, path) -> rows` / `write_dir(parts, folder) -> files` write a file
        or a dataset at a local path from a UnitParts. Raises PartsChanged (after forgetting those
        units) when parts read back were not the ones committed: nothing is published then."""
        out = self.output
        recheck_inputs(self.fingerprint["inputs"], self.inputs)
        if not overwrite and not output_existed and out.exists():
            # Made by someone else while this run scored: replacing it needs the same --overwrite
            # that an output there at the start needed.
            raise InputError(f"{out}: the output appeared while this run was scoring; pass --overwrite to replace "
                             "it and rerun the same command (the scores are kept in the checkpoint)")
        if out.dataset:  # again now: files that someone put there while this run scored make it not ours
            out.check(self.inputs, resumable=True, overwrite=overwrite, restart=restart)
        parts = self.parts(unit_ids)

        def published(st, rows: int, **more) -> None:
            # What a rerun checks to know the output is still the one this checkpoint wrote (for
            # a dataset: size and mtime of its _SUCCESS).
            self.write_marker(state="published", output={"path": out.key, "size": st.size, "mtime_ns": st.mtime_ns,
                                                         "rows": rows, **(record or {}), **more})

        run_ids = [self.marker.get("run_id", ""), *self.marker.get("earlier_run_ids", [])]
        try:
            return out.write(lambda path: write_file(parts, path), lambda folder: write_dir(parts, folder), run_ids,
                             critical, published)
        except PartsChanged as exc:
            for uid in exc.unit_ids:
                if uid in self.done:
                    self.forget(uid, "its part differs from its record (the part's content changed)")
            raise

    def published_output(self, extra: dict) -> dict | None:
        """The record of an output this checkpoint already published, if it is still that one and
        was written with the same `extra` fields (e.g. --top-k); else the marker goes back to
        running (the output is written again from the parts) and None."""
        rec = self.marker.get("output") if self.state == "published" else None
        if not rec:
            return None
        try:
            ok = self.output.still_published(rec) and all(rec.get(k) == v for k, v in extra.items())
        except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
            ok = False
        if ok:
            return rec
        self.write_marker(state="running", output=None)
        return None

    # -- close -------------------------------------------------------------------------------------
    def delete_ours(self, links: bool = False) -> None:
        """Delete the names we write, the marker last; strangers' files stay where they are. In
        parts/ and done/ (which may be links to folders elsewhere) only unit files go; with
        `links`, such a link goes too (the link, never its folder): --restart keeps it, so that
        the new parts land where the user moved them."""
        for folder in (fmt.PARTS, fmt.DONE, PARTIAL):
            where = self._at(folder)
            for base in where.list():
                if fmt.UNIT_FILE[folder].match(base):
                    (where / base).delete()
            where.remove_dir(links=links)
        self.delete_dedup(links=links)
        for base in self.root.list():
            if fmt.OUR_ROOT_LEFTOVER.match(base):
                self._at(base).delete()
        self._at(FINGERPRINT).delete()
        self._at(MARKER).delete()

    def delete_dedup(self, links: bool = False) -> None:
        """Delete the run's dedup store: in dedup/ and its scope folders only the names the score
        cache writes, then the folders (a link, with `links`, as the link itself)."""
        dedup = self._at(fmt.DEDUP)
        for scope in dedup.list():
            if not fmt.DEDUP_SCOPE.match(scope):
                continue
            where = dedup / scope
            for base in where.list():
                if fmt.DEDUP_FILE.match(base):
                    (where / base).delete()
            where.remove_dir(links=links)
        dedup.remove_dir(links=links)

    def close(self, remove: bool) -> None:
        """Release the lease; with remove, delete our files and the folder if we made it."""
        created = self.marker.get("created_dir")
        if remove:
            self.delete_ours(links=True)
        if self.lease is not None:
            self.lease.release(unlink=remove or not self._at(MARKER).exists())
            self.lease = None
        if remove and created:
            self.root.remove_dir()


class UnitParts:
    """The rows of finished units, in order, as the final write reads them: through the
    checkpoint's store, each part checked against its record (size and sha256) as it is read,
    so the rows written are the rows committed without a separate pass that hashes every part.
    Units committed together share one part, read once for all of them.

    `read(i, columns)` gives unit i's rows; a part that fails the check is noted and its units
    read as None until `check()`, which raises PartsChanged naming them (the first pass over the
    parts finds them all); after `check()` a failing part raises at once. `reads` counts the
    part objects read and `bytes_read` their bytes."""

    def __init__(self, sink: CheckpointSink, unit_ids: list[str]):
        self.sink, self.unit_ids = sink, unit_ids
        self.bad: list[str] = []
        self.checked = False
        self.reads = 0
        self.bytes_read = 0
        self._held: tuple | None = None  # (part name's unit, columns, its table)

    def __len__(self) -> int:
        return len(self.unit_ids)

    def rows(self, i: int) -> int:
        """The rows of unit i, from its record."""
        return self.sink._place[self.unit_ids[i]][2]

    def read(self, i: int, columns=None) -> pa.Table | None:
        sink, uid = self.sink, self.unit_ids[i]
        name_uid, offset, rows = sink._place[uid]
        key = (name_uid, tuple(columns) if columns is not None else None)
        if self._held is None or self._held[:2] != key:
            data, why = sink._read_verified(name_uid, sink._records[name_uid])
            self.reads += 1
            self.bytes_read += len(data or b"")
            if why is not None:
                if self.checked:
                    raise PartsChanged(sink.root, [uid])
                self.bad.append(uid)
            self._held = (*key, _decode(data, columns) if why is None else None)
        table = self._held[2]
        if table is None:  # a part that failed its check: its units are left out until check()
            return None
        return table if (offset, rows) == (0, table.num_rows) else table.slice(offset, rows)

    def check(self) -> None:
        self.checked = True
        self._held = None
        if self.bad:
            raise PartsChanged(self.sink.root, self.bad)


class FileParts:
    """Parquet files (paths or URIs) as a part source for the final write, read through their
    Locations and not checked against any record: for benchmarks and tests that make parts
    without a checkpoint."""

    def __init__(self, paths):
        self.locs = [location(p) for p in paths]
        self.reads = 0

    def __len__(self) -> int:
        return len(self.locs)

    def rows(self, i: int) -> int:
        with self.locs[i].open() as f:
            return pq.ParquetFile(f).metadata.num_rows

    def read(self, i: int, columns=None) -> pa.Table:
        self.reads += 1
        return _decode(self.locs[i].read_bytes(), columns)


__all__ = ["CheckpointSink", "SinkSpec", "UnitParts", "FileParts", "PartsChanged"]
