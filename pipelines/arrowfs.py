"""Ray Train's checkpoint storage on S3: a pyarrow filesystem whose every request goes through
``storage``'s boto3 layer.

Ray Train reads and writes checkpoints through a pyarrow filesystem. pyarrow's own
S3FileSystem signs with credentials that the AWS C++ SDK under it keeps until they expire: a
key revoked before then (the answer to a leak) would fail every checkpoint upload for as long
as an hour. Through ``storage``, a refused request reads the node's credential chain afresh
and is retried once, like every other S3 request of the project, under one set of retry and
endpoint settings.

The handler holds no client and no credentials: it is pickled to every worker, and each
process resolves the AWS credential chain of its own node. A file written here is spooled to
local disk and uploaded whole on close, so a copy that fails midway leaves no object behind.
"""

from __future__ import annotations

import io
import tempfile

from pyarrow import PythonFile
from pyarrow import fs as pafs

from . import storage


def filesystem(url: str):
    """(pyarrow filesystem, path) for Ray Train's storage at ``url``; (None, url) for a local
    path, which Ray Train opens itself."""
    if not storage.is_s3(url):
        return None, url
    return pafs.PyFileSystem(S3Handler()), str(url)[len("s3://") :].rstrip("/")


def _url(path: str) -> str:
    return "s3://" + path.strip("/")


def _is_bucket(path: str) -> bool:
    return "/" not in path.strip("/")


class S3Handler(pafs.FileSystemHandler):
    """pyarrow's filesystem calls, on paths of the form ``bucket/key``, answered by ``storage``.
    S3 has no folders: a folder is there while some object's key starts with its path and a
    slash, so creating one is nothing and deleting one deletes what is under it."""

    def __eq__(self, other) -> bool:
        return isinstance(other, S3Handler)

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(S3Handler)

    def get_type_name(self) -> str:
        return "s3"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        return [self._info(p) for p in paths]

    def _info(self, path: str) -> pafs.FileInfo:
        st = None if _is_bucket(path) else storage.stat(_url(path))
        if st is not None:
            return pafs.FileInfo(path, pafs.FileType.File, size=st[0], mtime_ns=st[1])
        if _is_bucket(path) or storage.is_dir(_url(path)):
            return pafs.FileInfo(path, pafs.FileType.Directory)
        return pafs.FileInfo(path, pafs.FileType.NotFound)

    def get_file_info_selector(self, selector):
        base = selector.base_dir.strip("/")
        files = list(storage.walk_files(_url(base)))
        if not files and not _is_bucket(base):
            if storage.stat(_url(base)) is not None:
                raise NotADirectoryError(base)
            if not selector.allow_not_found:
                raise FileNotFoundError(base)
        infos, folders = [], set()
        for rel, size, mtime_ns in files:
            parts = rel.split("/")
            if not selector.recursive and len(parts) > 1:
                folders.add(parts[0])
                continue
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            infos.append(pafs.FileInfo(f"{base}/{rel}", pafs.FileType.File, size=size, mtime_ns=mtime_ns))
        return infos + [pafs.FileInfo(f"{base}/{d}", pafs.FileType.Directory) for d in sorted(folders)]

    def create_dir(self, path: str, recursive: bool) -> None:
        pass  # a folder appears with its first object

    def delete_dir(self, path: str) -> None:
        storage.remove_tree(_url(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        if not storage.remove_tree(_url(path)) and not missing_dir_ok and not _is_bucket(path):
            raise FileNotFoundError(path)

    def delete_root_dir_contents(self) -> None:
        raise PermissionError("refusing to empty every bucket of the S3 store")

    def delete_file(self, path: str) -> None:
        if storage.stat(_url(path)) is None:
            raise FileNotFoundError(path)
        storage.remove(_url(path))

    def copy_file(self, src: str, dest: str) -> None:
        with storage.open_read(_url(src)) as f:
            storage.upload(_url(dest), f)

    def move(self, src: str, dest: str) -> None:
        self.copy_file(src, dest)  # S3 has no rename
        storage.remove(_url(src))

    def open_input_stream(self, path: str):
        return PythonFile(storage.open_read(_url(path)), mode="r")

    def open_input_file(self, path: str):
        return self.open_input_stream(path)

    def open_output_stream(self, path: str, metadata):
        return PythonFile(_Upload(_url(path)), mode="w")

    def open_append_stream(self, path: str, metadata):
        raise OSError(f"s3://{path}: S3 objects cannot be appended to")


class _Upload(io.RawIOBase):
    """A file on its way to S3: spooled to a local temporary file and uploaded on ``close()``.
    One dropped unclosed (a copy that failed midway) uploads nothing."""

    def __init__(self, url: str):
        self.url, self.spool = url, tempfile.TemporaryFile()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.spool.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.spool.flush()
            storage.upload(self.url, self.spool)
        finally:
            self.spool.close()
            super().close()

    def __del__(self) -> None:
        self.spool.close()  # never close(): only an explicit close makes the object
