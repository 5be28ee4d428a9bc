"""Object storage behind the checkpoint store's verbs, and the run's lease there.

What the commit protocol needs maps onto object storage directly: an object written by one PUT
(or a completed multipart upload) appears whole or not at all, so "write to a temp name and
rename" becomes "write the object"; there are no folders, so listing is by prefix; and with no
flock, the lease is an object that its holder renews and that expires.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from pipeline.storage.local import probe_writable
from pipeline.storage.uri import drop_folder_marker, join, resolve

log = logging.getLogger(__name__)


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
        drop_folder_marker(self.fs, self._key(name).rsplit("/", 1)[0])

    def remove_empty(self, prefix: str, links: bool = False) -> None:
        """Object storage has no folders (nor links): a folder-marker object left there goes."""
        drop_folder_marker(self.fs, self._key(prefix))

    def is_writable(self) -> str | None:
        return probe_writable(self)


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
