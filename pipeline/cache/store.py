"""The cache's one door to storage: read bytes (whole or a range), write a file atomically, list
a folder, delete. Everything else in pipeline/cache goes through `CacheStore`, which goes through
a `Location` (pipeline/storage/location.py) only: a local directory and an object-storage prefix
are the same to it.

`Location.write_atomic` is temp file, fsync, rename, fsync of the folder on a local disk, and one
PUT on object storage, which appears whole or not at all: either way a reader sees a whole file
or none.
"""

from __future__ import annotations

import os

from pipeline.storage.location import Location, location


class CacheStore:
    """Names are relative, '/'-separated, under the cache location `root` (a path or a URI)."""

    def __init__(self, root: str | Location):
        self.loc = location(root)

    def _at(self, name: str) -> Location:
        return self.loc / name if name else self.loc

    @property
    def key(self) -> str:
        """The location itself (an absolute path or the URI): equal keys are one cache."""
        return self.loc.key

    def where(self, name: str = "") -> str:
        """The name as the user would write it (for messages)."""
        return str(self._at(name))

    def local_path(self, name: str = "") -> str | None:
        """A path that os.open reads (a file can be mapped there); None on object storage."""
        return self._at(name).local_path

    def read(self, name: str, start: int = 0, size: int | None = None) -> bytes:
        """Bytes [start, start + size) of a file (to its end when size is None)."""
        at = self._at(name)
        if start == 0 and size is None:
            return at.read_bytes()
        with at.open() as f:
            return f.read_at(size if size is not None else f.size() - start, start)

    def copy_to_file(self, name: str, path: str, chunk: int = 8 << 20) -> int:
        """Stream a file into a local file (written as it comes); returns its bytes."""
        n = 0
        with self._at(name).open_stream() as f, open(path, "wb") as out:
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
        """Write one file whole: readers see all of it or nothing."""
        self._at(name).write_atomic(data)

    def list(self, folder: str = "") -> list[str]:
        """Names directly under `folder` (files and folders), sorted, as names under the root
        (`folder/name`)."""
        names = self._at(folder).list()
        return [f"{folder.strip('/')}/{n}" for n in names] if folder else names

    def kind(self, name: str = "") -> str:
        """"file", "dir" or "none"."""
        return self._at(name).kind()

    def size(self, name: str) -> int | None:
        st = self._at(name).stat()
        return st.size if st is not None and st.kind == "file" else None

    def exists(self, name: str) -> bool:
        return self._at(name).exists()

    def delete(self, name: str) -> None:
        self._at(name).delete()

    def remove_empty(self, folder: str) -> None:
        self._at(folder).remove_dir()

    def folder_missing(self) -> str | None:
        """The folder the root would go in, where it is missing (a local parent directory that does
        not exist); None when the root can be made."""
        parent = self.loc.parent
        return str(parent) if parent.folder_missing() else None

    def writable(self) -> str | None:
        """None when a file can be created here (the folder is made if absent), else the reason."""
        self.loc.make_dirs()
        return self.loc.writable()

    def mtime(self, name: str) -> float | None:
        """When a file was last written (seconds since the epoch); None when it is gone."""
        st = self._at(name).stat()
        return st.mtime_ns / 1e9 if st is not None else None
