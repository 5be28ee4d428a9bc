"""Object storage (s3://, gs://, hdfs://, anything pyarrow.fs resolves) behind the checkpoint
store's verbs, plus the run's lease there.

pyarrow.fs does the I/O; credentials and endpoint come from the usual environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ...). What the
commit protocol needs maps onto object storage directly: an object written by one PUT (or a
completed multipart upload) appears whole or not at all, so "write to a temp name and rename"
becomes "write the object"; there are no folders, so listing is by prefix.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import uuid

log = logging.getLogger(__name__)


def is_uri(path: str) -> bool:
    """True for a URI that pyarrow.fs resolves (s3://, gs://, hdfs://, ...), false for a path."""
    return "://" in str(path) and not str(path).startswith("file://")


@functools.lru_cache(maxsize=32)
def _filesystem(scheme_and_host: str):
    from pyarrow import fs as pafs

    fs, _ = pafs.FileSystem.from_uri(scheme_and_host + "/")
    return fs


def resolve(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI; one cached client per bucket or host."""
    import pyarrow as pa

    scheme, rest = uri.split("://", 1)
    host = rest.split("/", 1)[0]
    try:
        fs = _filesystem(f"{scheme}://{host}")
        # s3 and gs paths are "bucket/key"; other schemes say themselves where the path starts.
        path = rest if scheme in ("s3", "gs", "gcs") else __import__("pyarrow.fs").fs.FileSystem.from_uri(uri)[1]
    except (OSError, ValueError, pa.ArrowException) as exc:
        from pipeline.errors import InputError, first_line

        raise InputError(f"{uri}: cannot open this location ({first_line(exc)}); check the URI and the "
                         "credentials in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    return fs, path.rstrip("/")


def join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *[n.strip("/") for n in names if n]])


class RemoteStore:
    """The checkpoint store's verbs (see storage.LocalStore) on object storage, rooted at a URI."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.base = resolve(self.root)

    def path(self, name: str) -> str:
        return join(self.root, name) if name else self.root

    def _key(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def write(self, name: str, data: bytes) -> None:
        # One object, one upload: it appears whole when the stream is closed, never in part.
        with self.fs.open_output_stream(self._key(name)) as f:
            f.write(data)

    def source(self, name: str):
        return self.fs.open_input_file(self._key(name))

    def read(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._key(name)) as f:
            return f.read()

    def size(self, name: str) -> int | None:
        from pyarrow import fs as pafs

        info = self.fs.get_file_info(self._key(name))
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, name: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self._key(name)).type != pafs.FileType.NotFound

    def list(self, prefix: str) -> list[str]:
        from pyarrow import fs as pafs

        sel = pafs.FileSelector(self._key(prefix), allow_not_found=True, recursive=False)
        base = self._key(prefix).rstrip("/") + "/"
        out = []
        for info in self.fs.get_file_info(sel):
            rel = info.path[len(base):] if info.path.startswith(base) else info.base_name
            out.append(f"{prefix}/{rel}" if prefix else rel)
        return sorted(out)

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._key(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
                raise

    def remove_empty(self, prefix: str) -> None:
        """Object storage has no folders; an empty "directory" marker, if any, goes with it."""
        from pyarrow import fs as pafs

        try:
            if self.fs.get_file_info(self._key(prefix)).type == pafs.FileType.Directory and not self.list(prefix):
                self.fs.delete_dir(self._key(prefix))
        except OSError:
            pass

    def is_writable(self) -> str | None:
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.write(probe, b"")
            self.delete(probe)
        except OSError as exc:
            return str(exc).splitlines()[0][:200]
        return None


REMOTE_LEASE_NAME = ".rerank-batch-lease.json"
# How long a lease on object storage lasts without renewal. Short enough that a rerun after a
# killed driver waits at most this long, long enough that a renewal every third of it survives
# a slow store.
REMOTE_LEASE_SECONDS = 60
# Between writing our lease and reading it back: two runs that both found no lease and both
# wrote one see, after this pause, which write the store kept; the other backs off.
SETTLE_SECONDS = 1.0


class RemoteLease:
    """An expiring lease object on object storage (no flock there): the holder renews it from a
    thread; a lease past its expiry, or held by a dead process on this same host, is free."""

    def __init__(self, store: RemoteStore, name: str, run_id: str, seconds: float = REMOTE_LEASE_SECONDS):
        self.store, self.name, self.run_id, self.seconds = store, name, run_id, seconds
        self.started = time.time()
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                "started": self.started, "expires": time.time() + self.seconds}

    def _current(self) -> dict | None:
        try:
            return json.loads(self.store.read(self.name))
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RemoteLease":
        from pipeline.errors import LockedError

        cur = self._current()
        if cur and cur.get("run_id") != self.run_id and _live(cur):
            raise LockedError(_held_message(self.store.root, cur))
        self.store.write(self.name, json.dumps(self._body()).encode())
        time.sleep(SETTLE_SECONDS)
        cur = self._current()
        if not cur or cur.get("run_id") != self.run_id:
            raise LockedError(_held_message(self.store.root, cur or {}))
        self.held = True
        self._thread = threading.Thread(target=self._renew_loop, name="rerank-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except OSError as exc:
                log.warning("could not renew the lease %s: %s", self.store.path(self.name), exc)

    def renew(self) -> None:
        if self.held:
            self.store.write(self.name, json.dumps(self._body()).encode())

    def release(self, unlink: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            cur = self._current()
            if cur and cur.get("run_id") == self.run_id:
                self.store.delete(self.name)
        self.held = False


def _live(holder: dict) -> bool:
    if holder.get("expires", 0) < time.time():
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except (ProcessLookupError, ValueError):
            return False  # its holder died on this host: no need to wait for the expiry
        except PermissionError:
            return True
    return True


def _held_message(root: str, holder: dict) -> str:
    left = max(0, int(holder.get("expires", 0) - time.time()))
    return (f"{root}: another run holds this checkpoint (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, run {holder.get('run_id', '?')}; its lease expires in {left} s unless "
            "renewed); wait for it to finish, or pass another -o / --checkpoint-dir")


# -- inputs and outputs by URI ------------------------------------------------------------------

def expand(spec: str) -> list[str]:
    """A URI of one object, a prefix (its *.parquet, sorted, like a local directory) or a glob
    (*, ?, [...] in the key, ** across folders): the matching objects as URIs."""
    from pyarrow import fs as pafs

    from pipeline.errors import InputError

    scheme, rest = spec.split("://", 1)
    fs, path = resolve(spec)
    root = f"{scheme}://"
    if any(ch in path for ch in "*?["):
        fixed = path[: min(path.index(ch) for ch in "*?[" if ch in path)]
        base = fixed.rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        rx = _glob_regex(path)
        found = sorted(root + i.path for i in infos if i.type == pafs.FileType.File and rx.fullmatch(i.path))
        if not found:
            raise InputError(f"{spec}: no object matches this pattern; check the glob")
        return found
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [spec]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        found = sorted(root + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        if not found:
            raise InputError(f"{spec}: the prefix holds no *.parquet object; pass an object or another prefix")
        return found
    raise InputError(f"{spec}: no such object or prefix; check the URI (and AWS_ENDPOINT_URL for a non-AWS store)")


def _glob_regex(pattern: str):
    """Shell glob semantics on keys, as glob.glob(recursive=True) has them on paths: * and ? stay
    within one folder, **/ spans any number of folders."""
    import re

    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def open_input(uri: str):
    """A seekable file for pyarrow.parquet.ParquetFile (reads ranges, never the whole object)."""
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def stat(uri: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of an object, or None when it does not exist."""
    from pyarrow import fs as pafs

    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return int(info.size), int(mtime)


def kind(uri: str) -> str:
    """"file", "dir" or "none" for a URI."""
    from pyarrow import fs as pafs

    fs, path = resolve(uri)
    t = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "none")


def publish(local_path: str, uri: str) -> None:
    """Copy a finished local file to `uri`: a temp object first, then moved to the final key, so
    readers of `uri` see the old object or the whole new one (a kill mid-upload leaves no
    object there: an upload appears only when it completes)."""
    from pyarrow import fs as pafs

    fs, path = resolve(uri)
    tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.partial"
    try:
        pafs.copy_files(local_path, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def read_part(path: str, columns):
    """A small Parquet file (a checkpoint part: one unit), local or in object storage, read whole."""
    import pyarrow.parquet as pq

    if is_uri(path):
        with open_input(path) as f:
            return pq.read_table(f, columns=columns, pre_buffer=False)
    return pq.read_table(path, columns=columns, pre_buffer=False)


def part_rows(path: str) -> int:
    import pyarrow.parquet as pq

    if is_uri(path):
        with open_input(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return pq.ParquetFile(path).metadata.num_rows
