"""The cache's one door to storage: read bytes (whole or a range), write an object atomically,
list a folder, delete. Everything else in pipeline/cache goes through `CacheStore`, so that a
new storage layer (a local directory or an object-storage prefix behind one type) replaces this
file only.

Today it wraps the checkpoint's stores (pipeline/storage/local.py, remote.py): a local write is
temp file, fsync, rename, fsync of the folder; an object-storage write is one PUT, which appears
whole or not at all. Either way a reader sees a whole file or none.
"""

from __future__ import annotations

import os

from pipeline.storage.uri import is_uri


class CacheStore:
    """Names are relative, '/'-separated, under the cache location `root`."""

    def __init__(self, root: str):
        from pipeline.storage.local import LocalStore
        from pipeline.storage.remote import RemoteStore

        self.root = root.rstrip("/") if is_uri(root) else os.path.abspath(root)
        self.remote = is_uri(root)
        self._store = RemoteStore(self.root) if self.remote else LocalStore(self.root)

    def where(self, name: str = "") -> str:
        """The name as the user would write it (for messages)."""
        return self._store.path(name)

    def local_path(self, name: str) -> str | None:
        """A path that os.open reads, for a local store; None for object storage."""
        return None if self.remote else self._store.path(name)

    def read(self, name: str, start: int = 0, size: int | None = None) -> bytes:
        """Bytes [start, start + size) of an object (to its end when size is None)."""
        if self.remote:
            if start == 0 and size is None:
                return self._store.read(name)
            with self._store.source(name) as f:
                return f.read_at(size if size is not None else f.size() - start, start)
        with open(self._store.path(name), "rb") as f:
            if start:
                f.seek(start)
            return f.read() if size is None else f.read(size)

    def copy_to_file(self, name: str, path: str, chunk: int = 8 << 20) -> int:
        """Stream an object into a local file (written as it comes); returns its bytes."""
        n = 0
        src = self._store.source(name)
        with (open(src, "rb") if isinstance(src, str) else src) as f, open(path, "wb") as out:
            while True:
                piece = f.read(chunk)
                if not piece:
                    break
                out.write(piece)
                n += len(piece)
            out.flush()
            os.fsync(out.fileno())
        return n

    def write(self, name: str, data: bytes) -> None:
        """Write one object whole: readers see all of it or nothing."""
        self._store.write(name, data)

    def list(self, folder: str = "") -> list[str]:
        """Names directly under `folder` (files and folders), sorted."""
        return self._store.list(folder)

    def size(self, name: str) -> int | None:
        return self._store.size(name)

    def exists(self, name: str) -> bool:
        return self._store.exists(name)

    def delete(self, name: str) -> None:
        self._store.delete(name)

    def remove_empty(self, folder: str) -> None:
        self._store.remove_empty(folder)

    def is_writable(self) -> str | None:
        """None when an object can be created here, else the reason."""
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)
        return self._store.is_writable()

    def mtime(self, name: str) -> float | None:
        """When a local file was last written (seconds since the epoch); None for object storage,
        where a write leaves no temp object behind to age."""
        if self.remote:
            return None
        try:
            return os.stat(self._store.path(name)).st_mtime
        except OSError:
            return None
