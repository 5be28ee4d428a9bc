"""Per-unit result parts and the manifest that records them, with a fingerprint of the run.

Layout of OUTPUT.ckpt/:
  manifest.json        fingerprint + finished units; replaced atomically after each part
  parts/<unit>.parquet one finished unit's scored rows, written to a temp name, fsynced, renamed

A part is recorded in the manifest only after it exists on disk, so a crash at any moment leaves
either a recorded, complete part or an unrecorded file that the next run overwrites.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CheckpointError, RerankError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: str, write, suffix: str = "") -> None:
    """write(tmp_path) into a temp file beside `path`, fsync it, rename it over `path`, fsync
    the directory: readers see the old file or the whole new one, never a part."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=d)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(d)


def _umask() -> int:
    try:  # Linux shows it; reading it elsewhere means setting it, racy with other threads
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, write)


def atomic_write_parquet(table: pa.Table, path: str) -> None:
    _atomic(path, lambda tmp: pq.write_table(table, tmp), suffix=".parquet")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def diff_fingerprints(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first field (dotted path) where two fingerprints differ, or None."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = diff_fingerprints(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


class Checkpoint:
    def __init__(self, directory: str, fingerprint: dict):
        self.dir = directory
        self.parts_dir = os.path.join(directory, "parts")
        self.manifest_path = os.path.join(directory, "manifest.json")
        self.fingerprint = fingerprint
        self.done: dict[str, dict] = {}

    @classmethod
    def open(cls, directory: str, fingerprint: dict, restart: bool = False) -> "Checkpoint":
        """Open the checkpoint (made on disk at the first commit); refuse one whose fingerprint differs
        from this run's."""
        ck = cls(directory, fingerprint)
        if restart and os.path.exists(directory):
            shutil.rmtree(directory)
        if os.path.exists(ck.manifest_path):
            try:
                with open(ck.manifest_path) as f:
                    manifest = json.load(f)
            except (OSError, ValueError):
                raise CheckpointError(
                    f"{ck.manifest_path}: the manifest is unreadable; pass --restart to start over"
                ) from None
            old = manifest.get("fingerprint", {})
            field = diff_fingerprints(old, fingerprint)
            if field:
                raise CheckpointError(
                    f"{directory}: the checkpoint belongs to a run with a different {field}; rerun with "
                    "the same inputs, model and options to resume, or pass --restart to start over"
                )
            ck.done = {u: info for u, info in manifest.get("units", {}).items()
                       if os.path.exists(ck.part_path(u))}
            if ck.done:
                log.info("resuming: %d units already scored in %s", len(ck.done), directory)
        return ck

    def _ensure_dirs(self) -> None:
        # Made at the first commit, so that a run that fails before scoring leaves nothing behind.
        if os.path.isdir(self.parts_dir):
            return
        try:
            os.makedirs(self.parts_dir, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"{self.dir}: cannot create the checkpoint directory ({exc.strerror}); "
                "pass a writable --checkpoint-dir"
            ) from None

    def part_path(self, unit_id: str) -> str:
        return os.path.join(self.parts_dir, f"{unit_id}.parquet")

    def commit(self, unit_id: str, table: pa.Table, info: dict) -> None:
        """Write a unit's part, then record it. Either step may be killed; neither corrupts."""
        self._ensure_dirs()
        try:
            atomic_write_parquet(table, self.part_path(unit_id))
            self.done[unit_id] = info
            self._write_manifest()
        except OSError as exc:
            self.done.pop(unit_id, None)
            raise RerankError(
                f"{self.dir}: cannot write a checkpoint part ({exc.strerror or exc}); free disk space "
                "or pass another --checkpoint-dir, then rerun to resume"
            ) from None

    def _write_manifest(self) -> None:
        body = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "units": self.done}
        atomic_write_bytes(self.manifest_path, json.dumps(body, indent=1, sort_keys=True).encode())

    def finish(self) -> None:
        """Record the fingerprint even for a run with no units (an empty input)."""
        if not os.path.exists(self.manifest_path):
            self._ensure_dirs()
            self._write_manifest()

    def parts(self, unit_ids) -> list[str]:
        return [self.part_path(u) for u in unit_ids]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- fingerprint ---------------------------------------------------------------------------------

def file_fingerprint(path: str) -> dict:
    md = pq.ParquetFile(path).metadata
    st = os.stat(path)
    footer = json.dumps(md.to_dict(), sort_keys=True, default=str).encode()
    return {
        "path": os.path.abspath(path),
        "size": st.st_size,
        "rows": md.num_rows,
        "footer_sha256": hashlib.sha256(footer).hexdigest(),
    }


def _sample_hash(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of the safetensors header and three 1 MiB samples: changes with any re-save,
    without reading 16 GB of 8B weights at every start."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            n = int.from_bytes(head, "little")
            h.update(f.read(min(n, 100 << 20)))
        for off in (0, max(0, size // 2 - chunk // 2), max(0, size - chunk)):
            f.seek(off)
            h.update(f.read(chunk))
    h.update(str(size).encode())
    return h.hexdigest()


def model_fingerprint(model: str) -> dict:
    if not os.path.isdir(model):
        return {"id": model}
    files = {}
    for name in sorted(os.listdir(model)):
        p = os.path.join(model, name)
        if not os.path.isfile(p):
            continue
        if name.endswith(".safetensors"):
            files[name] = _sample_hash(p)
        elif name.endswith((".json", ".txt", ".model")) and os.path.getsize(p) < (64 << 20):
            with open(p, "rb") as f:
                files[name] = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(model), "files": files}
