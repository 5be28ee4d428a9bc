"""The run's exclusive lease on a checkpoint: one live run per checkpoint, never two.

Shaped as a lease (holder + expiry renewed by the holder) so that object storage, which has no
flock, can implement it as an expiring lease object. Locally the truth is fcntl.flock on the
lease file, held for the life of the run: the kernel drops it when the holder dies, however it
dies, so a lease left by a dead process never blocks a rerun. The expiry written in the file is
information for the operator here.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from pipeline.errors import LockedError

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
