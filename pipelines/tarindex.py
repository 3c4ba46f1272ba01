"""The sample index of a shard: where each sample's bytes lie inside its tar.

    ROOT/shards/train/train-000000.tar        the samples ({key}.jpg + {key}.cls each)
    ROOT/shards/train/train-000000.idx.json   {"format": 1, "tar": "train-000000.tar",
                                               "checksum": "sha256:<the tar's>", "samples": n,
                                               "keys": [...], "labels": [...],
                                               "offsets": [...], "sizes": [...]}

A sample's ``offset`` is where its first tar header starts and ``size`` runs to the end of its
last member's padding, so samples i..j of a shard are the single byte range
[offsets[i], offsets[j] + sizes[j]): one seek on a local disk, one ranged GET on S3, and the
bytes parse as tar members on their own. The shard stage writes the index with the tar; for
shards made before it existed, a shard rerun scans the tar and writes it, re-encoding nothing.
"""

from __future__ import annotations

import hashlib
import tarfile

from . import storage

FORMAT = 1
SUFFIX = ".idx.json"
BLOCK = tarfile.BLOCKSIZE  # 512: tar headers and member padding


def index_url(tar_url: str) -> str:
    """The index beside a shard: train-000000.tar -> train-000000.idx.json."""
    if not tar_url.endswith(".tar"):
        raise ValueError(f"'{tar_url}' is not a .tar shard")
    return tar_url[: -len(".tar")] + SUFFIX


def sample_of(member_name: str) -> tuple[str, str]:
    """(key, extension) of a member, webdataset's way: the key is everything before the
    basename's first dot."""
    slash = member_name.rfind("/") + 1
    dot = member_name.find(".", slash)
    return (member_name, "") if dot < 0 else (member_name[:dot], member_name[dot + 1 :])


class Builder:
    """Collects (key, label, offset, size) while a shard is written or scanned."""

    def __init__(self):
        self.keys, self.labels, self.offsets, self.sizes = [], [], [], []

    def add(self, key: str, label: int, start: int, end: int) -> None:
        self.keys.append(key)
        self.labels.append(int(label))
        self.offsets.append(int(start))
        self.sizes.append(int(end - start))

    def document(self, tar_name: str, checksum: str) -> dict:
        return {
            "format": FORMAT,
            "tar": tar_name,
            "checksum": checksum,
            "samples": len(self.keys),
            "keys": self.keys,
            "labels": self.labels,
            "offsets": self.offsets,
            "sizes": self.sizes,
        }


class _Hashing:
    """A file read through, its sha256 taken as it goes: a scan hashes the bytes it reads."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def checksum(self) -> str:
        while self.read(1 << 22):  # the end-of-archive blocks and the rest
            pass
        return f"sha256:{self.sha.hexdigest()}"


def scan(tar_url: str) -> dict:
    """The index of an existing shard, from its tar headers (one sequential read, nothing
    decoded), with the checksum of the bytes it read: whoever keeps it compares that with the
    manifest's, so an index never vouches for bytes nobody checked. A damaged header raises
    tarfile.ReadError."""
    b = Builder()
    key, label, start, end = None, None, 0, 0
    with storage.open_read(tar_url) as f:
        hashing = _Hashing(f)
        with tarfile.open(fileobj=hashing, mode="r|") as tar:
            for m in tar:
                k, ext = sample_of(m.name)
                if k != key:
                    if key is not None:
                        b.add(key, label, start, end)
                    key, label, start = k, None, m.offset
                if ext == "cls":
                    label = int(tar.extractfile(m).read())
                end = m.offset_data + -(-m.size // BLOCK) * BLOCK
        checksum = hashing.checksum()
    if key is not None:
        b.add(key, label, start, end)
    if any(lab is None for lab in b.labels):
        raise ValueError(f"{tar_url}: a sample has no .cls member; not a shard of this project")
    return b.document(storage.basename(tar_url), checksum)


def write(tar_url: str, doc: dict) -> None:
    storage.write_bytes(index_url(tar_url), storage.json_bytes(doc))


def read(tar_url: str) -> dict | None:
    url = index_url(tar_url)
    return storage.read_json(url) if storage.exists(url) else None


def _member(header: bytes) -> tuple[str, int]:
    info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")  # raises on a damaged header
    return info.name, info.size


def _plain_member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a regular file's ustar header with an intact checksum: what the shard
    stage writes, read in a few microseconds rather than TarInfo.frombuf's ~16 (two members a
    sample, on the training loader's path). None for anything else, which tarfile then parses
    (or rejects, naming the problem)."""
    if header[156] not in b"0\0" or header[345] or header[124] & 0x80:  # type, ustar prefix, base-256 size
        return None
    try:
        checksum, size = (int(header[a:b].split(b"\0", 1)[0].strip() or b"0", 8) for a, b in ((148, 156), (124, 136)))
    except ValueError:
        return None
    if checksum != 256 + sum(header[:148]) + sum(header[156:]):
        return None
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), size


def parse_run(buf: bytes, url: str = "") -> list[tuple[str, bytes, int]]:
    """A byte range of a shard (whole samples) -> [(key, jpg bytes, label)] in order."""
    out, at, n = [], 0, len(buf)
    key, jpg, label = None, None, None
    while at + BLOCK <= n:
        header = buf[at : at + BLOCK]
        if header == bytes(BLOCK):  # end-of-archive padding
            break
        name, size = _plain_member(header) or _member(header)
        data = buf[at + BLOCK : at + BLOCK + size]
        at += BLOCK + -(-size // BLOCK) * BLOCK
        k, ext = sample_of(name)
        if k != key:
            if key is not None:
                out.append((key, jpg, label))
            key, jpg, label = k, None, None
        if ext == "jpg":
            jpg = data
        elif ext == "cls":
            label = int(data)
    if key is not None:
        out.append((key, jpg, label))
    if any(j is None or lab is None for _, j, lab in out):
        raise ValueError(
            f"{url}: a sample in the byte range lacks its .jpg or .cls: the sample index does "
            "not match the shard; rerun the shard stage"
        )
    return out
