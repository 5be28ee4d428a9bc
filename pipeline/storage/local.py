"""Every file operation of a checkpoint, behind a few methods of one class.

The checkpoint logic (pipeline/storage/checkpoint.py) never calls os or open itself: it writes whole
objects, reads them, lists a prefix, deletes names and asks whether one exists. Those five
verbs exist on object storage too (pyarrow.fs / s3: a PUT is atomic, there is no rename and no
directory), so a remote store can implement this class without touching the commit protocol.
Names are relative, '/'-separated keys under the store's root.
"""

from __future__ import annotations

import os
import uuid


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


def probe_writable(store) -> str | None:
    """None when an object can be created at the store's root (local or remote), else the
    reason, one short line for the error message."""
    probe = f".probe-{uuid.uuid4().hex}"
    try:
        store.write(probe, b"")
        store.delete(probe)
    except OSError as exc:
        return exc.strerror or str(exc).splitlines()[0][:200]
    return None


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class LocalStore:
    """A checkpoint store on a local (or mounted) file system, rooted at `root`."""

    def __init__(self, root: str):
        self.root = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/")) if name else self.root

    def write(self, name: str, data: bytes) -> None:
        """Write one object whole: readers see the old one, the whole new one, or none.
        A temp name unique to this writer, fsync, rename, fsync the directory."""
        dst = self.path(name)
        d = os.path.dirname(dst)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(dst)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        except BaseException:
            _unlink(tmp)
            raise
        fsync_dir(d)

    def source(self, name: str):
        """What pyarrow.parquet reads the object from (a path here, an open file remotely)."""
        return self.path(name)

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    def size(self, name: str) -> int | None:
        try:
            return os.path.getsize(self.path(name))
        except OSError:
            return None

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path(name))

    def list(self, prefix: str) -> list[str]:
        """Names directly under the folder `prefix` (ours and strangers'), sorted."""
        d = self.path(prefix)
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(f"{prefix}/{n}" if prefix else n for n in names)

    def delete(self, name: str) -> None:
        _unlink(self.path(name))

    def remove_empty(self, prefix: str, links: bool = False) -> None:
        """Drop an empty folder. A link in its place is never followed: with `links` the link
        goes (never the folder it points to), else it stays."""
        path = self.path(prefix)
        try:
            if os.path.islink(path):
                if links and prefix:
                    os.unlink(path)
            else:
                os.rmdir(path)
        except OSError:
            pass

    def is_writable(self) -> str | None:
        return probe_writable(self)
