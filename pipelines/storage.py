"""One small layer over where bytes live: local paths now, ``s3://`` URLs with the S3 issue.

Every stage reads and writes through these functions, so pointing a ROOT or SRC at another
store is a change here and nowhere else. Writes are atomic: a reader never sees a half-written
file under its final name (temp file in the same folder + fsync + rename).
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

TMP_MARK = ".tmp-"  # temp files are hidden (leading dot) and carry this mark, so a cleanup finds them


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def _local(url: str) -> Path:
    if is_s3(url):
        # The S3 issue (#4) fills this in behind the same functions; until then say so plainly.
        raise NotImplementedError(
            f"'{url}': s3:// locations are not supported yet; use a local path for now.")
    return Path(url)


def join(root: str, *parts: str) -> str:
    root = str(root)
    if is_s3(root):
        return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(root, *parts))


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def exists(url: str) -> bool:
    return _local(url).exists()


def is_dir(url: str) -> bool:
    return _local(url).is_dir()


def stat(url: str) -> tuple[int, int] | None:
    """(size in bytes, modification time in ns), or None when missing."""
    try:
        st = _local(url).stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def list_dir(url: str) -> list[str]:
    """Names directly under ``url`` (files and folders), sorted; [] when missing."""
    p = _local(url)
    if not p.is_dir():
        return []
    return sorted(os.listdir(p))


def walk_files(url: str) -> Iterator[tuple[str, int, int]]:
    """(path relative to url, size, mtime_ns) of every file below url, in sorted order."""
    base = _local(url)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath, name)
            st = full.lstat()
            yield str(full.relative_to(base)), st.st_size, st.st_mtime_ns


def open_read(url: str) -> IO[bytes]:
    return open(_local(url), "rb")


def read_bytes(url: str) -> bytes:
    return _local(url).read_bytes()


def read_range(url: str, offset: int, size: int) -> bytes:
    with open(_local(url), "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{url}: expected {size} bytes at offset {offset}, got {len(data)}; "
                      "the source changed since it was indexed: rerun the index stage")
    return data


def read_json(url: str):
    return json.loads(read_bytes(url))


@contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """Yield a file to write; it appears under ``url`` only if the block ends without error."""
    final = _local(url)
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


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def write_json(url: str, obj) -> None:
    write_bytes(url, json_bytes(obj))


def remove(url: str) -> None:
    _local(url).unlink(missing_ok=True)


def remove_stale_temps(url: str) -> int:
    """Delete temp files a killed writer left in folder ``url``; returns how many."""
    n = 0
    for name in list_dir(url):
        if name.startswith(".") and TMP_MARK in name:
            remove(join(url, name))
            n += 1
    return n
