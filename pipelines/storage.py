"""One small layer over where bytes live: local paths and ``s3://bucket/prefix`` URLs.

Every stage reads and writes through these functions, so pointing a ROOT or SRC at S3 is
configuration, not code. S3 settings are the standard AWS ones (``AWS_ENDPOINT_URL`` for
S3-compatible stores, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_PROFILE``), read by boto3 itself.

Writes are atomic: a reader never sees a half-written file under its final name. Locally:
a hidden temp file in the same folder, fsync, rename. On S3: the bytes are staged in a local
temp file and uploaded in one PUT, or as a multipart upload that S3 makes visible only when
it completes; a killed writer leaves nothing under the final key.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import IO

from .errors import StageError

TMP_MARK = ".tmp-"  # temp files are hidden (leading dot) and carry this mark, so a cleanup finds them
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # larger objects upload in parts, retried part by part
READ_BUFFER = 8 * 1024 * 1024  # sequential S3 reads fetch 8 MB ranges: few requests, little memory


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def join(root: str, *parts: str) -> str:
    root = str(root)
    if is_s3(root):
        return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return str(Path(root, *parts))


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


# --- S3 ---------------------------------------------------------------------------------------
_clients: dict[tuple, object] = {}
_requests: dict[str, int] = {}  # S3 API calls this process made, by operation (GetObject, ...)


def request_counts() -> dict[str, int]:
    """How many S3 requests of each kind this process has sent so far (every attempt, retries
    included): the shard stage reports its GETs per image from the difference."""
    return dict(_requests)


def _count(event_name: str, **_) -> None:
    op = event_name.rsplit(".", 1)[-1]  # before-send.s3.GetObject: one per attempt sent
    _requests[op] = _requests.get(op, 0) + 1


def s3_client():
    """One boto3 client per process (clients are not fork-safe: loader workers make their own)."""
    # Per process, and per the settings that pick the store and the identity (tests, and a job
    # that changes them, get a client that follows)
    pid = (os.getpid(), *(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID")))
    if pid not in _clients:
        import logging

        import boto3
        from botocore.config import Config

        # botocore says at INFO where each client's endpoint came from (AWS_ENDPOINT_URL): a
        # line per training worker and loader process in a job's output, which says nothing new.
        logging.getLogger("botocore.configprovider").setLevel(logging.WARNING)

        # 'adaptive' retries transient errors and throttling with backoff (boto3's retry modes).
        client = boto3.session.Session().client(
            "s3",
            config=Config(
                retries={"max_attempts": 10, "mode": "adaptive"},
                connect_timeout=10,
                read_timeout=60,
                # the shard stage fetches several ranges of a source at once
                max_pool_connections=32,
            ),
        )
        client.meta.events.register("before-send.s3.*", _count)
        _clients[pid] = client
    return _clients[pid]


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = str(url)[len("s3://") :].partition("/")
    if not bucket:
        raise StageError(f"'{url}' names no bucket: expected s3://bucket/prefix")
    return bucket, key.strip("/")


def check_url(url: str) -> None:
    """A usable location, before any work: an s3:// URL names a bucket."""
    if is_s3(url):
        _split(url)
    elif not str(url).strip():
        raise StageError("An empty path was given: pass a folder or s3://bucket/prefix.")


# S3's answers to credentials it does not accept: rotated, revoked or expired keys among them
REFUSED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "TokenRefreshRequired")


def _explained(fn):
    """Turn S3 failures into errors that name the URL, the endpoint and the fix (never a secret).
    A refusal of the credentials is retried once with a client that reads the credential chain
    afresh: a key revoked at once (the answer to a leak) is then replaced by the one the node's
    profile or role hands out now, instead of failing every request until the old one expires."""

    @wraps(fn)
    def wrapper(url, *args, **kwargs):
        if not is_s3(url):
            return fn(url, *args, **kwargs)
        for last in (False, True):
            try:
                return fn(url, *args, **kwargs)
            except Exception as e:
                if last or not _refused(e):
                    explained = _explain(e, url)
                    if explained is e:
                        raise
                    raise explained from None
                _clients.clear()  # the next client resolves the credentials anew

    return wrapper


def _refused(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and e.response.get("Error", {}).get("Code", "") in (*REFUSED, "403", "Forbidden")


def _key_hint() -> str:
    """The access key in use, by its last 4 characters (an ID, never the secret), for errors."""
    try:
        key = s3_client()._get_credentials().access_key
        return f"the key ending {key[-4:]}"
    except Exception:  # noqa: BLE001 - no key to name
        return "the credentials found"


def _explain(e: Exception, url: str) -> Exception:
    """A StageError naming what went wrong and the fix, or ``e`` itself when there is none to give."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    if isinstance(e, NoCredentialsError):
        return StageError(
            f"No S3 credentials for '{url}': set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
        )
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if _refused(e):
            return StageError(
                f"S3 at {endpoint} refused the credentials for '{url}' ({code}; {_key_hint()}, read afresh once): "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy."
            )
        if code in ("NoSuchBucket",):
            return StageError(f"Bucket of '{url}' does not exist at {endpoint}: create it first.")
    if isinstance(e, BotoCoreError) and ("Could not connect" in str(e) or "Connect timeout" in str(e)):
        return StageError(f"Cannot reach S3 at {endpoint} for '{url}': is the server up and AWS_ENDPOINT_URL right?")
    return e


def _head(url: str) -> dict | None:
    from botocore.exceptions import ClientError

    bucket, key = _split(url)
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _list(url: str, delimiter: bool):
    """Pages of list_objects_v2 under ``url`` treated as a folder."""
    bucket, key = _split(url)
    prefix = f"{key}/" if key else ""
    kwargs = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": "/"} if delimiter else {})}
    for page in s3_client().get_paginator("list_objects_v2").paginate(**kwargs):
        yield prefix, page


class _S3Reader(io.RawIOBase):
    """A seekable, read-only S3 object: each read is a ranged GET (wrapped in a large buffer)."""

    def __init__(self, url: str):
        self.url = url
        self.bucket, self.key = _split(url)
        head = _head(url)
        if head is None:
            raise FileNotFoundError(url)
        self.size, self.pos = head["ContentLength"], 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        body = read_range(self.url, self.pos, n)  # a refused key is read afresh here too: reads can be long
        buf[:n] = body
        self.pos += n
        return n


# --- the interface ----------------------------------------------------------------------------
@_explained
def exists(url: str) -> bool:
    if not is_s3(url):
        return Path(url).exists()
    return _head(url) is not None or is_dir(url)


@_explained
def is_dir(url: str) -> bool:
    if not is_s3(url):
        return Path(url).is_dir()
    for _, page in _list(url, delimiter=True):
        return bool(page.get("Contents") or page.get("CommonPrefixes"))
    return False


def is_link(url: str) -> bool:
    """A local symlink (S3 has none)."""
    return not is_s3(url) and os.path.islink(url)


@_explained
def stat(url: str) -> tuple[int, int] | None:
    """(size in bytes, modification time in ns), or None when missing."""
    if not is_s3(url):
        try:
            st = Path(url).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns
    head = _head(url)
    if head is None:
        return None
    return head["ContentLength"], int(head["LastModified"].timestamp() * 1e9)


@_explained
def list_dir(url: str) -> list[str]:
    """Names directly under ``url`` (files and folders), sorted; [] when missing."""
    if not is_s3(url):
        p = Path(url)
        return sorted(os.listdir(p)) if p.is_dir() else []
    names = set()
    for prefix, page in _list(url, delimiter=True):
        names |= {o["Key"][len(prefix) :] for o in page.get("Contents", [])}
        names |= {p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])}
    return sorted(n for n in names if n)


@_explained
def walk_files(url: str, etags: bool = False) -> Iterator[tuple]:
    """(path relative to url, size, mtime_ns) of every file below url, in sorted order; with
    ``etags``, a fourth field: the S3 object's ETag from the listing (None for local files)."""
    if not is_s3(url):
        files = _walk_local(Path(url))
        return (f + (None,) for f in files) if etags else files
    found = []  # listed eagerly, so S3 errors surface here, explained
    for prefix, page in _list(url, delimiter=False):
        found += [
            (o["Key"][len(prefix) :], o["Size"], int(o["LastModified"].timestamp() * 1e9))
            + ((o["ETag"].strip('"'),) if etags else ())
            for o in page.get("Contents", [])
            if not o["Key"].endswith("/")
        ]
    return iter(sorted(found))


def _walk_local(base: Path) -> Iterator[tuple[str, int, int]]:
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath, name)
            st = full.lstat()
            yield str(full.relative_to(base)), st.st_size, st.st_mtime_ns


@_explained
def open_read(url: str, buffer: int = READ_BUFFER) -> IO[bytes]:
    """A seekable binary file; on S3 it fetches ``buffer``-sized ranges as it goes (streams, no
    local copy). A small buffer suits reading headers here and there (a tar's member list)."""
    if not is_s3(url):
        return open(url, "rb")
    return io.BufferedReader(_S3Reader(url), buffer_size=buffer)


class _Slice(io.RawIOBase):
    """``size`` bytes of a local file from ``offset``, read front to back."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.f.readinto(memoryview(buf)[: min(len(buf), self.left)]) if self.left > 0 else 0
        self.left -= n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


@_explained
def open_range(url: str, offset: int, size: int) -> IO[bytes]:
    """A byte range as a stream to read front to back: on S3 one GET, its body streamed (a class
    tar of 140 MB is one request and never held whole in memory)."""
    if not is_s3(url):
        f = open(url, "rb")
        f.seek(offset)
        return io.BufferedReader(_Slice(f, size), buffer_size=1 << 20)
    bucket, key = _split(url)
    body = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")["Body"]
    return io.BufferedReader(_Body(body), buffer_size=1 << 20)


class _Body(io.RawIOBase):
    """A botocore streaming body as a raw stream (so it can be buffered and closed)."""

    def __init__(self, body):
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.body.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


@_explained
def read_bytes(url: str) -> bytes:
    if not is_s3(url):
        return Path(url).read_bytes()
    bucket, key = _split(url)
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


@_explained
def read_range(url: str, offset: int, size: int) -> bytes:
    if size == 0:
        return b""
    if is_s3(url):
        bucket, key = _split(url)
        data = (
            s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")["Body"].read()
        )
    else:
        with open(url, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    if len(data) != size:
        raise OSError(
            f"{url}: expected {size} bytes at offset {offset}, got {len(data)}; "
            "the source changed since it was indexed: rerun the index stage"
        )
    return data


def read_json(url: str):
    return json.loads(read_bytes(url))


@contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """Yield a file to write; it appears under ``url`` only if the block ends without error."""
    if is_s3(url):
        with tempfile.TemporaryFile() as f:
            yield f
            f.flush()
            upload(url, f)
        return
    final = Path(url)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@_explained
def upload(url: str, f) -> None:
    """The file object ``f``, from its start, as the S3 object ``url``: one PUT, or parts retried
    one by one; the object appears only when the whole has arrived."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = _split(url)
    f.seek(0)  # from the start again when a refused first try is retried
    s3_client().upload_fileobj(
        _Lent(f),
        bucket,
        key,
        Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD),
    )


class _Lent:
    """A file lent to boto3, which closes the file it uploads, failed or not: its owner closes
    it, and a retry reads it again."""

    def __init__(self, f):
        self.f = f

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        pass


def write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url) as f:
        f.write(data)


def write_if_changed(url: str, data: bytes) -> bool:
    """Write unless ``url`` already holds exactly ``data``: a rerun that changes nothing touches nothing."""
    st = stat(url)
    if st is not None and st[0] == len(data) and read_bytes(url) == data:
        return False
    write_bytes(url, data)
    return True


@_explained
def write_if_absent(url: str, data: bytes) -> bool:
    """Create ``url`` with ``data`` only if nothing is there; False if something is. Exclusive:
    a hard link on a local disk, ``If-None-Match: *`` on S3 (the store refuses a second create)."""
    if is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = _split(url)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise
        return True
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under a temporary name, then linked to its name (link refuses an existing
    # one): a reader never sees the file half-written, even if this process dies mid-write.
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


@_explained
def read_versioned(url: str) -> tuple[bytes, str] | None:
    """(bytes, version) of ``url``, or None if it is absent. The version changes with every write:
    the ETag on S3; on a local disk the file's inode and change time (writes here are renames
    of new files)."""
    if is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = _split(url)
        try:
            r = s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return r["Body"].read(), r["ETag"]
    try:
        with open(url, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), f"{st.st_ino}:{st.st_ctime_ns}"
    except FileNotFoundError:
        return None


@_explained
def replace_if(url: str, data: bytes, version: str) -> str | None:
    """Replace ``url`` with ``data`` only if it is still at ``version`` (compare-and-swap); the new
    version, or None if another writer changed or removed it first. S3: ``If-Match`` on the ETag
    (the store refuses a stale one). Local disk: under an exclusive lock on a hidden
    ``.NAME.lock`` beside it, so that of two processes replacing one version only the first does."""
    if is_s3(url):
        from botocore.exceptions import ClientError

        bucket, key = _split(url)
        try:
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return None
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
    import fcntl

    lock_path = Path(url).with_name(f".{Path(url).name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = read_versioned(url)
        if now is None or now[1] != version:
            return None
        write_bytes(url, data)
        return read_versioned(url)[1]


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def write_json(url: str, obj) -> None:
    write_bytes(url, json_bytes(obj))


@_explained
def remove(url: str) -> None:
    if not is_s3(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = _split(url)
    s3_client().delete_object(Bucket=bucket, Key=key)


@_explained
def remove_tree(url: str) -> int:
    """Delete ``url`` and everything below it; how many files went. Missing is not an error."""
    if not is_s3(url):
        import shutil

        n = sum(len(files) for _, _, files in os.walk(url))
        shutil.rmtree(url, ignore_errors=True)
        return n
    (bucket, key), n = _split(url), 0
    for _, page in _list(url, delimiter=False):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]  # a page holds at most 1000, as delete takes
        if keys:
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            n += len(keys)
    # Stores with real folders (SeaweedFS) keep an emptied one as a "key/" marker object
    s3_client().delete_object(Bucket=bucket, Key=key + "/")
    return n


def remove_stale_temps(url: str) -> int:
    """Delete temp files a killed writer left in folder ``url``; returns how many.

    S3 needs none: an interrupted upload never becomes an object (S3's lifecycle rule
    AbortIncompleteMultipartUpload reclaims the parts of an abandoned multipart upload)."""
    if is_s3(url):
        return 0
    n = 0
    for name in list_dir(url):
        if name.startswith(".") and TMP_MARK in name:
            remove(join(url, name))
            n += 1
    return n
