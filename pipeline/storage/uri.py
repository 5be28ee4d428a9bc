"""Object storage through pyarrow.fs (s3://, gs://, hdfs://, ...): the functions behind
storage.location.ObjectLocation, which is how the rest of the code reaches them.

pyarrow.fs does the I/O; credentials and endpoint come from the usual environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ...). Globs
match keys like paths, and a finished file is published so that its key shows the old object or
the whole new one.
"""

from __future__ import annotations

import functools
import uuid


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

        if isinstance(exc, OSError) and unreachable(exc):  # e.g. the bucket's region asked of a network
            raise  # that is down: a runtime failure like any later request's, not a wrong URI
        raise InputError(f"{uri}: cannot open this location ({first_line(exc)}); check the URI and the "
                         "credentials in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)") from None
    return fs, path.rstrip("/")


# How pyarrow's S3 client says that the endpoint did not answer (curl's connect and DNS failures).
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't connect", "Could not resolve host")


def unreachable(exc: BaseException) -> bool:
    """True when `exc` says the store could not be reached (not that the URI or credentials are wrong)."""
    text = str(exc)
    return any(marker in text for marker in _UNREACHABLE)


def join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *[n.strip("/") for n in names if n]])


def glob_regex(pattern: str):
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


# S3's CopyObject copies at most 5 GiB in one request, and pyarrow's move is one CopyObject; its
# uploads also use 10 MiB parts, of which S3 takes 10,000 (98 GiB). A larger S3 output is
# uploaded by boto3 (the `s3` extra) straight to its key, in parts sized to fit.
S3_COPY_LIMIT = 5 * 2**30
S3_MAX_PARTS = 10_000
S3_MIN_PART = 64 * 2**20
CHUNK = 16 * 2**20


@functools.lru_cache(maxsize=1)
def _s3_client():
    """A boto3 S3 client (endpoint and credentials from the environment pyarrow reads), or None
    without boto3."""
    try:
        import boto3
    except ImportError:
        return None
    return boto3.client("s3")


def drop_folder_marker(fs, folder: str) -> None:
    """Remove the empty "folder/" object that pyarrow's S3 file system writes into `folder`
    (bucket/key) after every delete or move there, to keep the folder visible: a run must leave
    none behind. Objects under the folder stay. Without boto3 only an empty folder's marker can
    go (through pyarrow, which then marks the parent: the walk goes up)."""
    from pyarrow import fs as pafs

    folder = folder.strip("/")
    if fs.type_name != "s3" or "/" not in folder:  # a bucket is not a marker
        return
    client = _s3_client()
    try:
        if client is not None:
            bucket, key = folder.split("/", 1)
            client.delete_object(Bucket=bucket, Key=key + "/")
            return
        while "/" in folder and fs.get_file_info(folder).type == pafs.FileType.Directory and \
                not fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            fs.delete_dir(folder)
            folder = folder.rsplit("/", 1)[0]
    except Exception as exc:  # botocore's errors are not OSErrors; a marker left is no failure
        import logging

        logging.getLogger(__name__).debug("could not remove the folder marker %s/: %s", folder, exc)


class OutputUnpublished(OSError):
    """The output could not be put in place; what was at its key is unchanged."""


def _upload(local_path: str, fs, path: str) -> None:
    """Stream a local file to `path` and close the stream ourselves: its close raises a failed
    part or completion, which pyarrow's copy_files drops. On an error the stream is closed first
    (S3's then completes an upload with what it was sent) and the caller deletes the object."""
    out = fs.open_output_stream(path)
    try:
        with open(local_path, "rb") as f:
            while chunk := f.read(CHUNK):
                out.write(chunk)
    except BaseException:
        try:
            out.close()
        except Exception:
            pass
        raise
    out.close()


def _s3_upload_whole(local_path: str, path: str, size: int, uri: str) -> None:
    """Upload to the key itself through boto3's managed transfer: S3 shows a multipart upload
    only once it completes, and s3transfer aborts it on any error (a local read error too), so
    the key shows the old object or the whole new one. Credentials and endpoint come from the
    same environment pyarrow reads."""
    try:
        import boto3
        from boto3.s3.transfer import TransferConfig
    except ImportError:
        raise OutputUnpublished(
            f"{uri}: the output is {size / 2**30:.1f} GiB, more than S3's 5 GiB copy limit; publishing it needs "
            "boto3: pip install 'rerank-batch[s3]' (or boto3)") from None
    part = max(S3_MIN_PART, -(-size // (S3_MAX_PARTS - 1)))
    bucket, key = path.split("/", 1)
    try:
        boto3.client("s3").upload_file(local_path, bucket, key,
                                       Config=TransferConfig(multipart_threshold=part, multipart_chunksize=part))
    except Exception as exc:  # botocore's and s3transfer's errors are not OSErrors
        from pipeline.errors import first_line

        raise OutputUnpublished(f"{uri}: {first_line(exc)}") from None


def publish(local_path: str, uri: str) -> None:
    """Copy a finished local file to `uri` so that readers of `uri` see the old object or the
    whole new one: uploaded to a temp object, then moved onto the key (an S3 output above the
    copy limit: _s3_upload_whole). A kill mid-upload leaves no new object at the key. Checked
    after: the key holds as many bytes as the file."""
    import os

    fs, path = resolve(uri)
    size = os.path.getsize(local_path)
    if fs.type_name == "s3" and size > S3_COPY_LIMIT:
        _s3_upload_whole(local_path, path, size, uri)
    else:
        tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.partial"
        try:
            _upload(local_path, fs, tmp)
            fs.move(tmp, path)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise
        finally:
            drop_folder_marker(fs, path.rsplit("/", 1)[0])
    got = fs.get_file_info(path).size
    if got != size:
        raise OutputUnpublished(f"{uri}: the uploaded object has {got} bytes, not the output's {size}")
