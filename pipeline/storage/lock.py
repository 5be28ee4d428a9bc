"""The run's exclusive lease on a checkpoint: one live run per checkpoint, never two.

Shaped as a lease (holder + expiry renewed by the holder) so that object storage, which has no
flock, implements it as an expiring lease object (`ObjectLease`). Locally (`LocalLease`) the
truth is fcntl.flock on the lease file, held for the life of the run: the kernel drops it when
the holder dies, however it dies, so a lease left by a dead process never blocks a rerun. The
expiry written in the file is information for the operator there. A Location picks its kind
(`Location.lease`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time

from pipeline.errors import LockedError

log = logging.getLogger(__name__)

LEASE_NAME = ".rerank-batch-lock"
LEASE_SECONDS = 300


class LocalLease:
    def __init__(self, directory: str, run_id: str):
        self.path = os.path.join(directory, LEASE_NAME)
        self.run_id = run_id
        self.fd: int | None = None
        self.started = time.time()

    def acquire(self) -> "LocalLease":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockedError(
                    f"{os.path.dirname(self.path)}: another run holds this checkpoint (pid {holder.get('pid', '?')} "
                    f"on {holder.get('host', '?')}, run {holder.get('run_id', '?')}); wait for it to finish, or "
                    "pass another -o / --checkpoint-dir"
                ) from None
            # The previous holder may have unlinked the file between our open and our flock:
            # then we hold a lock on a dead inode and must take the new file's.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self.renew()
                return self
            os.close(fd)

    def renew(self) -> None:
        """Write holder and expiry (local: information; remote: what other runs obey)."""
        if self.fd is None:
            return
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                           "started": self.started, "expires": time.time() + LEASE_SECONDS}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, body, 0)

    def release(self, unlink: bool = False) -> None:
        if self.fd is None:
            return
        if unlink:  # while still holding it, so nobody else can hold the name we unlink
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)  # closes the flock
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


OBJECT_LEASE_NAME = ".rerank-batch-lease.json"
# How long a lease on object storage lasts without renewal. Short enough that a rerun after a
# killed driver waits at most this long, long enough that a renewal every third of it survives
# a slow store.
OBJECT_LEASE_SECONDS = 60
# Between writing our lease and reading it back: two runs that both found no lease and both
# wrote one see, after this pause, which write the store kept; the other backs off.
SETTLE_SECONDS = 1.0


class ObjectLease:
    """An expiring lease object on object storage (no flock there): the holder renews it from a
    thread; a lease past its expiry, or held by a dead process on this same host, is free."""

    def __init__(self, root, run_id: str, name: str = OBJECT_LEASE_NAME, seconds: float = OBJECT_LEASE_SECONDS):
        self.root, self.obj, self.run_id, self.seconds = root, root / name, run_id, seconds
        self.started = time.time()
        self.held = False
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                "started": self.started, "expires": time.time() + self.seconds}

    def _current(self) -> dict | None:
        try:
            return json.loads(self.obj.read_bytes())
        except (OSError, ValueError):
            return None

    def acquire(self) -> "ObjectLease":
        cur = self._current()
        if cur and cur.get("run_id") != self.run_id and _live(cur):
            raise LockedError(_held_message(self.root, cur))
        self.obj.write_atomic(json.dumps(self._body()).encode())
        time.sleep(SETTLE_SECONDS)
        cur = self._current()
        if not cur or cur.get("run_id") != self.run_id:
            raise LockedError(_held_message(self.root, cur or {}))
        self.held = True
        self._thread = threading.Thread(target=self._renew_loop, name="rerank-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except OSError as exc:
                log.warning("could not renew the lease %s: %s", self.obj, exc)

    def renew(self) -> None:
        # Called at every commit too: one object write per few seconds is enough (the thread
        # renews every third of the lease anyway), not one per unit.
        if self.held and time.monotonic() - self._renewed >= self.seconds / 6:
            self.obj.write_atomic(json.dumps(self._body()).encode())
            self._renewed = time.monotonic()

    def release(self, unlink: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            cur = self._current()
            if cur and cur.get("run_id") == self.run_id:
                self.obj.delete()
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


def _held_message(root, holder: dict) -> str:
    left = max(0, int(holder.get("expires", 0) - time.time()))
    return (f"{root}: another run holds this checkpoint (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, run {holder.get('run_id', '?')}; its lease expires in {left} s unless "
            "renewed); wait for it to finish, or pass another -o / --checkpoint-dir")
