"""One place where a run reads or writes: a local path or an object-storage URI, behind one type.

`location(path_or_uri)` picks the implementation once; every stat, open, list, atomic write,
publish and delete of inputs, checkpoint parts and records, and outputs goes through the
`Location` it returns, so nothing outside this package asks which kind of store it has.

    loc.stat() -> Stat | None            kind ("file"/"dir"), size, mtime_ns; None: nothing there
    loc.exists() -> bool                 anything there (a dangling link too)
    loc.open() / loc.open_stream(gzip)   random access (Parquet footers, ranges) / a sequential stream
    loc.read_bytes() -> bytes
    loc.list(kind=None) -> [name]        names directly under a folder, sorted
    loc.glob(pattern) -> [Location]      files under a folder matching a shell glob (** spans folders)
    loc.write_atomic(data)               readers see the old content or all of the new, never a part
    loc.staged(tag) -> local path        a temp file to write a large result destined for loc, then
    loc.publish(staged) -> Stat            put in place atomically (rename locally; upload + move remotely)
    loc.delete(); loc.remove_dir(links)  one file (a link itself, never its target); an empty folder
    loc.writable() -> str | None         None when a file can be made in this folder, else why not
    loc.lease(name, run_id)              the run's exclusive lease on this folder (pipeline/storage/lock.py)

Locally an atomic write is: a temp name beside the target, fsync, rename, fsync the folder
(`_put_in_place`, the one place that does it). On object storage an object written by one PUT
appears whole or not at all; a large staged file is uploaded under a temp key and moved onto its
key (one CopyObject), or, above S3's 5 GiB copy limit, uploaded to the key by boto3's multipart
upload, which S3 shows only once complete.
"""

from __future__ import annotations

import contextlib
import glob as globmod
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

from pipeline.storage import uri as _uri


@dataclass(frozen=True)
class Stat:
    kind: str  # "file" or "dir"
    size: int
    mtime_ns: int


MAGIC = "*?["  # what makes a path a glob


def is_glob(spec: str) -> bool:
    return any(ch in str(spec) for ch in MAGIC)


def location(path) -> "Location":
    """The Location of a local path (str or os.PathLike) or of a URI that pyarrow.fs resolves
    (s3://, gs://, hdfs://, ...; file:// is a local path)."""
    if isinstance(path, Location):
        return path
    text = os.fspath(path)
    if _uri.is_uri(text):
        return ObjectLocation(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return LocalLocation(text)


class Location:
    """A file or folder. `uri` is the path or URI as given (what messages show); `key` names the
    place itself (an absolute path, or the URI), so equal keys are one place."""

    uri: str
    # How messages name things here and the fix they propose (the wording differs, the checks do not).
    FILE, AN_FILE, A_FILE, FOLDER = "file", "a file", "a file path", "directory"
    CHECK = "check the path"
    WRITABLE_FIX = "pass an -o in a writable directory"
    SPACE_FIX = "free space in {}"

    # -- naming --------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        raise NotImplementedError

    @property
    def real_key(self) -> str:
        """The key with links resolved: two names of one file compare equal."""
        return self.key

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        raise NotImplementedError

    @property
    def local_path(self) -> str | None:
        """A path that the os module and open() reach (None: object storage)."""
        return None

    @property
    def clean(self) -> str:
        """The path or URI as given, tidied (`a/./b/` -> `a/b`): where names built beside it start."""
        return self.uri.rstrip("/")

    def __truediv__(self, name: str) -> "Location":
        raise NotImplementedError

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and type(other) is type(self) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def inside(self, folder: "Location") -> bool:
        """This place lies under `folder` (by name, or with links resolved)."""
        return type(folder) is type(self) and any(
            mine.startswith(theirs.rstrip("/") + "/")
            for mine, theirs in ((self.key, folder.key), (self.real_key, folder.real_key)))

    # -- reading -------------------------------------------------------------------------------
    def stat(self) -> Stat | None:
        raise NotImplementedError

    def kind(self) -> str:
        """"file", "dir" or "none"."""
        st = self.stat()
        return st.kind if st is not None else "none"

    def exists(self) -> bool:
        raise NotImplementedError

    def open(self):
        """A seekable binary file (pyarrow NativeFile) for ranged reads; the caller closes it."""
        raise NotImplementedError

    def open_stream(self, gzip: bool = False):
        """The bytes from the start, decompressed with `gzip`."""
        raise NotImplementedError

    def read_bytes(self) -> bytes:
        raise NotImplementedError

    def list(self, kind: str | None = None) -> list[str]:
        """Names directly under this folder (ours and strangers'), sorted; with `kind` ("file" or
        "dir") only those. Empty when there is no folder."""
        raise NotImplementedError

    def glob(self, pattern: str) -> list["Location"]:
        """Files under this folder whose path relative to it matches the shell glob `pattern`
        (*, ?, [...] within one folder, **/ across folders), sorted."""
        raise NotImplementedError

    # -- writing -------------------------------------------------------------------------------
    def write_atomic(self, data: bytes) -> None:
        """Write the whole content: readers see the old one, all of the new one, or none."""
        raise NotImplementedError

    @contextlib.contextmanager
    def staged(self, tag: str = ""):
        """A local path where a large result destined for this place is written before `publish`;
        whatever is left there at the end of the block is removed. Locally a hidden name beside
        the target (`.NAME.TAG-xxxxxxxx.partial`, see `remove_staged`); for object storage a
        temp file in TMPDIR."""
        raise NotImplementedError
        yield  # pragma: no cover

    def publish(self, staged: str) -> Stat:
        """Put the finished file `staged` (from `staged()`) in place atomically; its Stat there."""
        raise NotImplementedError

    def remove_staged(self, tags, ours=lambda name: False) -> None:
        """Remove what `staged(tag)` / `staged_dir(tag)` of these tags left beside this place (a
        killed run's): a staged file; in a staged folder, the files for which `ours(name)` holds."""

    def delete(self) -> None:
        """Delete one file or object; a link itself, never its target. Absent is no error."""
        raise NotImplementedError

    def remove_dir(self, links: bool = False) -> None:
        """Remove this folder if empty. A link in its place is never followed: with `links` the
        link goes (never the folder it points to), else it stays."""
        raise NotImplementedError

    def make_dirs(self) -> None:
        """Make this folder (and those above) where folders exist."""

    def folder_missing(self) -> bool:
        """This folder would have to be made before a file goes in it (never on object storage,
        which has no folders)."""
        return False

    def writable(self) -> str | None:
        """None when a new file can be made in this folder, else the reason in one short line."""
        raise NotImplementedError

    def lease(self, run_id: str):
        """This folder's exclusive lease for run `run_id` (not yet acquired)."""
        raise NotImplementedError

    # -- folders of files (a dataset output) ---------------------------------------------------
    @contextlib.contextmanager
    def staged_dir(self, tag: str = ""):
        """A local folder to write a dataset destined for this folder into, before `publish_dir`."""
        raise NotImplementedError
        yield  # pragma: no cover

    def publish_dir(self, staged: str, names: list[str], marker: str, body: bytes, ours, tag: str) -> None:
        """Put the files `names` of the finished folder `staged` in place of this folder's, and
        the marker file `marker` (content `body`) last; files of an older version for which
        `ours(name)` holds go, anything else is never touched."""
        raise NotImplementedError


# -- the local disk -------------------------------------------------------------------------------

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


def _put_in_place(tmp: str, dst: str, f=None) -> None:
    """The local atomic write's last steps: the temp file's bytes to disk, renamed over `dst`,
    the rename to disk. `f`: the temp file still open for writing (saves an open)."""
    if f is not None:
        f.flush()
        os.fsync(f.fileno())
    else:
        with open(tmp, "rb+") as g:
            os.fsync(g.fileno())
    os.replace(tmp, dst)
    fsync_dir(os.path.dirname(dst) or ".")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class LocalLocation(Location):

    def __init__(self, path: str):
        self.uri = path
        self.path = path or "."
        self._real: str | None = None

    @property
    def key(self) -> str:
        return os.path.abspath(self.path)

    @property
    def real_key(self) -> str:
        # Asked of every input more than once while planning (dedup, output checks): once each.
        if self._real is None:
            self._real = os.path.realpath(self.path)
        return self._real

    @property
    def name(self) -> str:
        return os.path.basename(self.key)

    @property
    def parent(self) -> "LocalLocation":
        return LocalLocation(os.path.dirname(self.key))

    @property
    def local_path(self) -> str:
        return self.path

    @property
    def clean(self) -> str:
        return os.path.normpath(self.uri) if self.uri else "."

    def __truediv__(self, name: str) -> "LocalLocation":
        return LocalLocation(os.path.join(self.uri, *name.split("/")) if name else self.uri)

    def __reduce__(self):
        return LocalLocation, (self.uri,)

    def stat(self) -> Stat | None:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        import stat as stmod

        return Stat("dir" if stmod.S_ISDIR(st.st_mode) else "file", st.st_size, st.st_mtime_ns)

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def is_link(self) -> bool:
        return os.path.islink(self.path)

    def open(self):
        import pyarrow as pa

        return pa.OSFile(self.path, "r")

    def open_stream(self, gzip: bool = False):
        from pyarrow import fs as pafs

        return pafs.LocalFileSystem().open_input_stream(self.key, compression="gzip" if gzip else None)

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def list(self, kind: str | None = None) -> list[str]:
        try:
            with os.scandir(self.path) as it:
                if kind is None:
                    return sorted(e.name for e in it)
                want = (lambda e: e.is_file()) if kind == "file" else (lambda e: e.is_dir())
                return sorted(e.name for e in it if want(e))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def glob(self, pattern: str) -> list["LocalLocation"]:
        spec = os.path.join(self.uri, pattern) if self.uri else pattern
        return [LocalLocation(p) for p in sorted(globmod.glob(spec, recursive=True)) if os.path.isfile(p)]

    def write_atomic(self, data: bytes) -> None:
        d = os.path.dirname(self.key)
        os.makedirs(d, exist_ok=True)
        # A name unique to this writer (workers write beside each other), that cleanup knows.
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{self.name}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                _put_in_place(tmp, self.key, f)
        except BaseException:
            _unlink(tmp)
            raise

    def _stems(self, tags) -> tuple[str, ...]:
        # The name's length stays under the file system's 255 bytes whatever the output's.
        base = self.name.encode()[:180].decode(errors="ignore")
        return tuple(f".{base}.{t}-" for t in tags)

    @contextlib.contextmanager
    def staged(self, tag: str = ""):
        (stem,) = self._stems([tag])
        tmp = os.path.join(os.path.dirname(self.key), f"{stem}{uuid.uuid4().hex[:8]}.partial")
        try:
            yield tmp
        finally:
            _unlink(tmp)

    def publish(self, staged: str) -> Stat:
        _put_in_place(staged, self.key)
        return self.stat()

    def remove_staged(self, tags, ours=lambda name: False) -> None:
        stems = self._stems(tags)
        parent = os.path.dirname(self.key)
        for name in self.parent.list():
            if name.startswith(stems) and name.endswith((".partial", ".old")):
                p = os.path.join(parent, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    _delete_tree_of_ours(p, ours)
                else:
                    _unlink(p)

    def delete(self) -> None:
        _unlink(self.path)

    def remove_dir(self, links: bool = False) -> None:
        try:
            if os.path.islink(self.path):
                if links:
                    os.unlink(self.path)
            else:
                os.rmdir(self.path)
        except OSError:
            pass

    def make_dirs(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def folder_missing(self) -> bool:
        return not os.path.isdir(self.path)

    def writable(self) -> str | None:
        # os.access says yes to root on read-only file systems; a real file is the test (and an
        # unnamed one: a kill leaves nothing behind).
        try:
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            return exc.strerror or str(exc).splitlines()[0][:200]
        return None

    def lease(self, run_id: str):
        from pipeline.storage.lock import LocalLease

        return LocalLease(self.path, run_id)

    @contextlib.contextmanager
    def staged_dir(self, tag: str = ""):
        (stem,) = self._stems([tag])
        tmp = os.path.join(os.path.dirname(self.key), f"{stem}{uuid.uuid4().hex[:8]}.partial")
        os.mkdir(tmp)
        try:
            yield tmp
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def publish_dir(self, staged: str, names: list[str], marker: str, body: bytes, ours, tag: str) -> None:
        # Every file is in the temp folder, which is renamed into place: the path shows the old
        # folder, the whole new one or (between the two renames) nothing. An older one of ours
        # is first renamed aside, then deleted.
        (LocalLocation(staged) / marker).write_atomic(body)
        for n in names:
            with open(os.path.join(staged, n), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(staged)
        out, parent = self.key, os.path.dirname(self.key)
        aside = None
        # A link is set aside whatever it points to (a folder cannot be renamed onto a link).
        if os.path.islink(out) or (os.path.isdir(out) and os.listdir(out)):
            (stem,) = self._stems([tag])
            aside = os.path.join(parent, f"{stem}{uuid.uuid4().hex[:8]}.old")
            os.replace(out, aside)
        os.replace(staged, out)  # onto an absent or empty folder
        fsync_dir(parent)
        if os.path.islink(aside or ""):  # the link goes and what it points to stays, as with a file output's link
            _unlink(aside)
        elif aside is not None:
            _delete_tree_of_ours(aside, lambda n: ours(n) or n == marker)


def _delete_tree_of_ours(directory: str, ours) -> None:
    """Delete the files of a local folder of ours whose names `ours` accepts, then the folder if
    that left it empty."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for n in names:
        if ours(n):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, n))
    with contextlib.suppress(OSError):
        os.rmdir(directory)


# -- object storage ---------------------------------------------------------------------------------

TEMPORARY = "_temporary"  # where a folder's files wait before they are moved into place (Spark's name)


class ObjectLocation(Location):
    """A key or prefix on a file system that pyarrow.fs resolves (s3://, gs://, hdfs://, ...).
    There are no folders (a prefix with objects under it counts as one) and no links; listing is
    by prefix; credentials and endpoint come from the usual environment (AWS_ENDPOINT_URL, ...)."""

    FILE, AN_FILE, A_FILE, FOLDER = "object", "an object", "an object key", "prefix"
    CHECK = "check the URI (and AWS_ENDPOINT_URL for a non-AWS store)"
    WRITABLE_FIX = "check the bucket and the credentials"
    SPACE_FIX = "check the bucket and the local temp space (TMPDIR)"

    def __init__(self, uri: str, fs=None, path: str | None = None):
        self.uri = uri
        self._fs, self._path = fs, path

    def _resolved(self):
        if self._fs is None:
            self._fs, self._path = _uri.resolve(self.uri)
        return self._fs, self._path

    @property
    def fs(self):
        return self._resolved()[0]

    @property
    def fs_path(self) -> str:
        return self._resolved()[1]

    @property
    def key(self) -> str:
        return self.uri.rstrip("/")

    @property
    def parent(self) -> "ObjectLocation":
        fs, path = self._resolved()
        return ObjectLocation(self.key.rsplit("/", 1)[0], fs, path.rsplit("/", 1)[0])

    def __truediv__(self, name: str) -> "ObjectLocation":
        if not name:
            return self
        fs, path = self._resolved()
        return ObjectLocation(_uri.join(self.key, name), fs, f"{path}/{name.strip('/')}")

    def __reduce__(self):  # the file system is resolved again where it is unpickled
        return ObjectLocation, (self.uri,)

    def _info(self):
        return self.fs.get_file_info(self.fs_path)

    def stat(self) -> Stat | None:
        from pyarrow import fs as pafs

        info = self._info()
        if info.type == pafs.FileType.File:
            return Stat("file", int(info.size), int(info.mtime_ns or 0))
        if info.type == pafs.FileType.Directory:
            return Stat("dir", 0, 0)
        return None

    def exists(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_link(self) -> bool:
        return False

    def open(self):
        return self.fs.open_input_file(self.fs_path)

    def open_stream(self, gzip: bool = False):
        return self.fs.open_input_stream(self.fs_path, compression="gzip" if gzip else None)

    def read_bytes(self) -> bytes:
        # compression=None: pyarrow would otherwise decompress by the name's extension (.gz).
        with self.fs.open_input_stream(self.fs_path, compression=None) as f:
            return f.read()

    def list(self, kind: str | None = None) -> list[str]:
        from pyarrow import fs as pafs

        sel = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=False)
        base = self.fs_path.rstrip("/") + "/"
        want = {None: None, "file": pafs.FileType.File, "dir": pafs.FileType.Directory}[kind]
        out = []
        for info in self.fs.get_file_info(sel):
            if want is not None and info.type != want:
                continue
            out.append(info.path[len(base):] if info.path.startswith(base) else info.base_name)
        return sorted(out)

    def glob(self, pattern: str) -> list["ObjectLocation"]:
        from pyarrow import fs as pafs

        fs, path = self._resolved()
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        rx = _uri.glob_regex(pattern)
        base = path.rstrip("/") + "/"
        found = []
        for i in infos:
            if i.type == pafs.FileType.File and i.path.startswith(base) and rx.fullmatch(i.path[len(base):]):
                rel = i.path[len(base):]
                found.append(ObjectLocation(_uri.join(self.key, rel), fs, i.path))
        return sorted(found, key=lambda loc: loc.key)

    def write_atomic(self, data: bytes) -> None:
        # One object, one upload: it appears whole when the stream is closed, never in part.
        with self.fs.open_output_stream(self.fs_path) as f:
            f.write(data)

    @contextlib.contextmanager
    def staged(self, tag: str = ""):
        d = tempfile.mkdtemp(prefix="rerank-batch-")
        try:
            yield os.path.join(d, self.name)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def publish(self, staged: str) -> Stat:
        _uri.publish(staged, self.key)
        return self.stat()

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.fs_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
                raise
        _uri.drop_folder_marker(self.fs, self.fs_path.rsplit("/", 1)[0])

    def remove_dir(self, links: bool = False) -> None:
        """No folders (nor links) here: a folder-marker object left in their place goes."""
        _uri.drop_folder_marker(self.fs, self.fs_path)

    def writable(self) -> str | None:
        probe = self / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_atomic(b"")
            probe.delete()
        except OSError as exc:
            return exc.strerror or str(exc).splitlines()[0][:200]
        return None

    def lease(self, run_id: str):
        from pipeline.storage.lock import ObjectLease

        return ObjectLease(self, run_id)

    @contextlib.contextmanager
    def staged_dir(self, tag: str = ""):
        d = tempfile.mkdtemp(prefix="rerank-batch-")
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def publish_dir(self, staged: str, names: list[str], marker: str, body: bytes, ours, tag: str) -> None:
        # No rename of a prefix: the files are uploaded under _temporary/<tag>/ (a name readers
        # skip), the old marker goes, the files are moved into place, stale files of an older
        # version go, and the marker comes last: readers take the prefix as complete only when
        # the marker is there (Spark's _SUCCESS convention).
        temp = self / TEMPORARY / tag
        for n in names:
            (temp / n).publish(os.path.join(staged, n))
        (self / marker).delete()  # from here until the end, readers see no complete folder
        fs = self.fs
        for n in names:
            fs.move((temp / n).fs_path, (self / n).fs_path)
        keep = set(names)
        for n in self.list("file"):
            if ours(n) and n not in keep:
                (self / n).delete()
        (self / marker).write_atomic(body)
        self.remove_temporary(ours)

    def remove_temporary(self, ours) -> None:
        """What is left under _temporary/ of our uploads (a killed publish's)."""
        tmp = self / TEMPORARY
        for run in tmp.list():
            for n in (tmp / run).list():
                if ours(n):
                    (tmp / run / n).delete()
            (tmp / run).remove_dir()
        tmp.remove_dir()

    def remove_staged(self, tags, ours=lambda name: False) -> None:
        return None  # staged files live in TMPDIR; a killed publish's uploads: remove_temporary


def write_atomic(path, data: bytes) -> None:
    """Write `data` to a path or URI atomically (see Location.write_atomic)."""
    location(path).write_atomic(data)


__all__ = ["Location", "LocalLocation", "ObjectLocation", "Stat", "location", "is_glob", "fsync_dir", "write_atomic"]
