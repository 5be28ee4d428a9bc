"""The checkpoint's format: names, records and parts, and the checks that decide what to trust.

Layout of a checkpoint directory (OUTPUT.ckpt by default):
  .rerank-batch-checkpoint  marker, written first: format, run id, state ("running"/"published")
  .rerank-batch-lock        the live run's lease (pipeline/storage/lock.py)
  fingerprint.json          what the checkpoint was made from; written once
  parts/<unit>.parquet      one finished unit's scored rows, one object written whole
  done/<unit>.json          its record (its unit id, pairs, tokens, ..., the part's bytes, rows
                            and sha256), sealed by a sha256 of its own content, written only
                            after the part: the append-only log of finished units
                            Units scored together (many small files make thousands of one-row
                            units) are committed together: one part holds their rows in order
                            and one record, named after the first, lists them ("units": each
                            one's id, rows and counts), so a commit writes two objects whatever
                            the number of units in it
  partial/<unit>.<id>.parquet  pairs of a unit still in flight, scored and committed by time
                            (`_ord`, `score`, their counts in the metadata), each written whole;
                            removed once the unit's record exists
  dedup/<scope>/...         the run's exact-dedup store: the scores of the finished units' texts,
                            in the score cache's format (pipeline/cache/runwide.py), so that a
                            repeat in a later unit, worker or resumed run is not scored again.
                            Not a record of anything: losing it costs scoring, never a score

A unit is finished when its record is intact (its seal matches), names the unit of its file name,
and its part has the recorded size and sha256; anything else (a crash between the two writes, a
zero-byte or garbage file, a byte changed on disk, a part and record copied over another unit's,
an edited count) is logged and scored again. Parquet parts carry no page checksums, so only the
hash catches a changed byte; it is computed from the bytes in memory when a part is written, and
checked whenever a part is read back: when a run resumes, and by the final write as it reads the
parts (pipeline/storage/sink.py).
parts/ and done/ may be links to folders elsewhere (a checkpoint moved to a bigger disk): they are
read and written through, and cleanup deletes only unit files (named by Unit.id) in them, then
the links themselves, never the folders they point to or anything else in them; in dedup/, only
the names the score cache writes (scope folders, their files and temp files). A directory we
did not mark is never touched.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import CheckpointError, InputError
from pipeline.storage.lock import LEASE_NAME, OBJECT_LEASE_NAME

FORMAT_VERSION = 3  # 3: a record may list several units committed together (one part for them all)
READABLE_FORMATS = (2, 3)  # 2: one unit per record, which 3 also writes
MARKER = ".rerank-batch-checkpoint"  # the one name that makes a directory a checkpoint
FINGERPRINT = "fingerprint.json"
PARTS, DONE, PARTIAL = "parts", "done", "partial"  # PARTIAL: pairs committed by time from units not yet finished
DEDUP = "dedup"  # the run's exact-dedup store (a score cache's scope folders: pipeline/cache/runwide.py)
PARTIAL_META = b"rerank_batch"  # the Parquet key of a partial's counts (JSON)
# Every name Unit.id makes (and no other): the checkpoint deletes only files named like this.
UNIT_ID = r"[0-9]{5,}-[0-9]{12,}-[0-9]{12,}"
# What a run that has not yet written its marker may already have made in the directory (its
# lease, the marker's or the lease's temp file, a writability probe): anything else there
# without a marker is someone else's, whatever its name.
_BEFORE_MARKER = re.compile(r"^(%s|\.probe-[0-9a-f]{32}|\.tmp-[0-9a-f]{32}-(%s))$" % (
    "|".join(re.escape(n) for n in (LEASE_NAME, OBJECT_LEASE_NAME)),
    "|".join(re.escape(n) for n in (MARKER, LEASE_NAME, OBJECT_LEASE_NAME))))
# Temp files of the marker, the fingerprint and the lease, and writability probes: what a kill
# between a temp write and its rename leaves in the directory's root. Cleanup must remove them
# too, or the directory outlives the checkpoint.
OUR_ROOT_LEFTOVER = re.compile(r"^(\.probe-[0-9a-f]{32}|\.tmp-[0-9a-f]{32}-(%s))$" % (
    "|".join(re.escape(n) for n in (MARKER, FINGERPRINT, LEASE_NAME, OBJECT_LEASE_NAME))))
# A unit's part or record (or its temp file): the only names cleanup deletes in parts/ and done/,
# which may be links to folders that hold other files.
UNIT_FILE = {folder: re.compile(r"^(\.tmp-[0-9a-f]{32}-)?%s\.%s$" % (UNIT_ID, ext))
             for folder, ext in ((PARTS, "parquet"), (DONE, "json"), (PARTIAL, "[0-9a-f]{16}\\.parquet"))}


# The names the score cache writes in dedup/ (pipeline/cache/index.py FILE_RE, cache.py): a
# scope folder, and in it its files, scope.json and their temp files. Cleanup deletes only these.
DEDUP_SCOPE = re.compile(r"^[0-9a-f]{32}$")
DEDUP_FILE = re.compile(r"^(\.tmp-[0-9a-f]{32}-)?([0-9]{13}-[0-9a-f]{16}\.rbc|scope\.json)$")


def part_name(unit_id: str) -> str:
    return f"{PARTS}/{unit_id}.parquet"


def record_name(unit_id: str) -> str:
    return f"{DONE}/{unit_id}.json"


@dataclass
class Kept:
    """Pairs of one unfinished unit already scored and committed (its partial objects)."""

    ords: np.ndarray  # int64, sorted, unique: the pairs' `_ord`
    scores: np.ndarray  # float32, aligned with ords
    counts: dict = field(default_factory=dict)  # tokens, truncated, tokens_computed, seconds

    @property
    def pairs(self) -> int:
        return len(self.ords)


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _record_digest(record: dict) -> str:
    return _digest(json.dumps({k: v for k, v in record.items() if k != "record_sha256"}, sort_keys=True))


def seal(record: dict) -> dict:
    """`record` with the sha256 of its own content, so that an edited count is caught."""
    return {**record, "record_sha256": _record_digest(record)}


def part_digest(data: bytes) -> str:
    """The sha256 of a part's bytes as read back (what its record must name)."""
    return hashlib.sha256(data).hexdigest()


def record_fault(uid: str, rec) -> str | None:
    """Why unit `uid`'s record `rec` (parsed JSON) cannot be trusted, or None."""
    if not isinstance(rec, dict):
        return "its record is unreadable"
    if not isinstance(rec.get("record_sha256"), str) or rec["record_sha256"] != _record_digest(rec):
        return "its record is not the one written with its part (edited, or of an older version)"
    if rec.get("unit") != uid:
        return f"its record is of unit {rec.get('unit')}"
    units = rec.get("units")
    if units is not None and not (
            isinstance(units, list) and units and all(isinstance(e, dict) and isinstance(e.get("unit"), str)
                                                      and isinstance(e.get("rows"), int) for e in units)
            and units[0]["unit"] == uid and sum(e["rows"] for e in units) == rec.get("part_rows")):
        return "its record's list of units is not the one written with its part"
    return None


def part_fault(rec: dict, data: bytes | None) -> str | None:
    """Why the part bytes `data` (None: missing) are not the ones `rec` recorded, or None."""
    if data is None:
        return "its part is missing"
    if len(data) != rec.get("part_bytes") or part_digest(data) != rec.get("part_sha256"):
        return "its part differs from its record (the part's content changed)"
    return None


def parse_json(data: bytes | None):
    try:
        return json.loads(data) if data is not None else None
    except ValueError:
        return None


def strangers(root) -> list[str]:
    """The names in a directory without our marker that no run of ours could have made there."""
    return sorted(n for n in root.list() if not _BEFORE_MARKER.match(n))


def refuse_foreign(root) -> None:
    """A directory (or prefix) that holds files but no marker of ours is someone else's."""
    if (root / MARKER).exists():
        return
    found = strangers(root)
    if "manifest.json" in found and (root / PARTS).exists():
        raise CheckpointError(
            f"{root}: a checkpoint of an older rerank-batch (manifest.json), which this version cannot "
            "resume; delete that directory to start over"
        )
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise InputError(
            f"{root}: not a rerank-batch checkpoint and not empty (holds {shown}); pass a new or empty "
            "--checkpoint-dir (the run deletes its checkpoint when done)"
        )


def made_for(marker: dict, output_key: str) -> bool:
    """Whether a checkpoint's marker was made for the output of key `output_key` (a marker of a
    version that did not record its output counts as made for it): only then may a run take an
    existing output for its own."""
    return marker.get("output_path") in (None, output_key)


def marked_for(root, output_key: str) -> bool:
    """Whether the folder `root` (a Location) holds a checkpoint marker made for this output
    (read before the lease)."""
    try:
        marker = json.loads((root / MARKER).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and made_for(marker, output_key)


__all__ = ["Kept", "MARKER", "UNIT_ID", "seal", "record_fault", "part_fault", "made_for", "marked_for",
           "refuse_foreign"]
