"""Readers for ImageNet as people hold it: the original tarballs + devkit, Kaggle's CLS-LOC
layout, and ImageFolder-style folders (docs/stages.md, "Sources", describes each).

Each reader lists the images of a split as ``Item``s: where the bytes are (a file, or a byte
range inside a tar: tar members are stored uncompressed, so an image inside
ILSVRC2012_img_train.tar is just ``offset``/``size`` in that file), the key, the WNID, and what
identifies the bytes: their sha256, or for a loose object in S3 its ETag from the listing (so
the index stage downloads nothing there). Nothing is extracted to disk; the shard stage later
reads each image by its byte range. An input that cannot be used comes back with ``reject`` set
to the reason.

The reading is planned in ``Unit``s: one per class tar, one for the val tar, one per 1,024
loose files to hash. Each is a plain picklable value, so the index stage can run them as Ray
tasks across a cluster (``read_unit``) or one after the other in its own process.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from . import storage
from .common import digest
from .errors import StageError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_MAPPING = "LOC_synset_mapping.txt"
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"
IMAGE_EXTS = (".jpeg", ".jpg", ".png")  # ImageNet's one PNG is named .JPEG; accept honest names too
LAYOUTS = ("ilsvrc-tar", "kaggle", "folder")
_WNID = re.compile(r"^n\d{8}$")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})$")


@dataclass
class Item:
    split: str
    key: str  # the file's stem: n01440764_10026, ILSVRC2012_val_00000001
    wnid: str | None
    path: str  # the file that holds the bytes (a loose image or a tar)
    offset: int  # where the image starts in ``path`` (0 for a loose file)
    size: int
    member: str  # the name inside the tar or the path below the source, for people
    sha256: str | None = None
    reject: str | None = None
    etag: str | None = None  # S3 loose objects: stands for the content, no download needed

    def as_row(self) -> dict:
        return asdict(self)

    @property
    def where(self) -> str:
        return where(self.path, self.member)


def where(path: str, member: str) -> str:
    """Where an image is, for people: the file, or the tar and the member inside it."""
    return f"{path}:{member}" if path.endswith(".tar") else path


def read_item(path: str, offset: int, size: int) -> bytes:
    """The bytes of one indexed image (a byte range, so tar members need no extraction)."""
    return storage.read_range(path, offset, size)


def _stem(name: str) -> str:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _name_problem(name: str) -> str | None:
    if not name.lower().endswith(IMAGE_EXTS):
        return f"not an image file name (expected one of {', '.join(IMAGE_EXTS)})"
    return None


def _loose_problem(path: str, rel: str) -> str | None:
    # A symlink could point anywhere on the machine (/etc/passwd, another dataset): never follow it.
    if storage.is_link(path):
        return "a symlink, not a regular file: copy the image in instead"
    return _name_problem(rel)


def _tar_entry_problem(m: tarfile.TarInfo) -> str | None:
    # Nothing is ever extracted, but a name that climbs out of the archive marks a hostile or
    # broken tar: quarantine it rather than guess what it meant.
    if m.name.startswith("/") or ".." in m.name.split("/"):
        return f"unsafe tar entry name '{m.name}' (absolute or with '..')"
    if m.issym() or m.islnk():
        return f"tar entry is a {'symlink' if m.issym() else 'hard link'} to '{m.linkname}', not an image"
    if not m.isfile():
        return "tar entry is not a regular file"
    return None


FILES_PER_UNIT = 1024  # loose files hashed per unit: a Ray task of a few seconds, not milliseconds


@dataclass(frozen=True)
class Unit:
    """Reading that fills in checksums: a class tar ("class-tar": path, offset, size, member,
    wnid), the val tar ("val-tar": path, val=(id_to_wnid, truth, wnids)) or loose files to hash
    ("files": items)."""

    kind: str
    path: str
    offset: int = 0
    size: int = 0
    member: str = ""
    wnid: str | None = None
    items: tuple = ()
    val: tuple | None = None

    @property
    def nbytes(self) -> int:
        return self.size or sum(i.size for i in self.items)


def read_unit(unit: Unit, threads: int = 16) -> list[Item]:
    """The items of one unit with their sha256 filled in (and any rejects it finds)."""
    if unit.kind == "class-tar":
        return list(_class_tar_items(unit))
    if unit.kind == "val-tar":
        return list(_val_tar_items(unit.path, *unit.val))
    return list(_hash_items(unit.items, threads))


def expand(parts: Iterable, threads: int = 16) -> Iterator[Item]:
    """Items and units -> items, reading each unit here, in order."""
    for part in parts:
        if isinstance(part, Unit):
            yield from read_unit(part, threads)
        else:
            yield part


def _chunked(items: Iterable[Item]) -> Iterator:
    """Loose items: rejects and ETag-identified ones as they are, the rest in units to hash."""
    batch: list[Item] = []
    for item in items:
        if item.reject is not None or item.etag is not None:
            yield item
            continue
        batch.append(item)
        if len(batch) >= FILES_PER_UNIT:
            yield Unit("files", batch[0].path, items=tuple(batch))
            batch = []
    if batch:
        yield Unit("files", batch[0].path, items=tuple(batch))


class Source:
    """One ImageNet copy. Subclasses fill in classes(), plan() and the files they fingerprint."""

    layout = ""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/") if storage.is_s3(root) else str(root)

    def classes(self) -> list[dict]:
        """[{'wnid', 'name'}] sorted by WNID (label = position: the torchvision convention)."""
        raise NotImplementedError

    def plan(self, split: str, wnids: set[str]) -> Iterator:
        """Every input of ``split`` whose class is in ``wnids`` (and every reject): Items known
        from listings alone and Units that read bytes to make theirs, in a fixed order."""
        raise NotImplementedError

    def items(self, split: str, wnids: set[str]) -> Iterator[Item]:
        return expand(self.plan(split, wnids), getattr(self, "threads", 16))

    def fingerprint(self) -> str:
        """A cheap digest of the source's listing (names, sizes, times): changes when files do."""
        raise NotImplementedError


def _class_tar_items(u: Unit) -> Iterator[Item]:
    """One class tar of the train tarball, streamed (one ranged GET on S3), each image hashed."""
    with storage.open_range(u.path, u.offset, u.size) as f, tarfile.open(fileobj=f, mode="r|") as inner:
        for im in inner:
            if im.isdir():
                continue
            item = Item(
                "train", _stem(im.name), u.wnid, u.path, u.offset + im.offset_data, im.size, f"{u.member}/{im.name}"
            )
            item.reject = _tar_entry_problem(im) or _name_problem(im.name)
            if item.reject is None:
                item.sha256 = hashlib.sha256(inner.extractfile(im).read()).hexdigest()
            yield item


def _val_tar_items(path: str, id_to_wnid: dict, truth: list, wnids) -> Iterator[Item]:
    """The val tarball, streamed front to back, labelled through the devkit's ground truth."""
    gt_name = "ILSVRC2012_validation_ground_truth.txt"
    seen = 0
    with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            if m.isdir():
                continue
            key = _stem(m.name)
            item = Item("val", key, None, path, m.offset_data, m.size, m.name)
            item.reject = _tar_entry_problem(m) or _name_problem(m.name)
            number = _VAL_NUMBER.match(key)
            if item.reject is None and not number:
                item.reject = "not a val image name (ILSVRC2012_val_########)"
            if item.reject:
                yield item
                continue
            seen += 1
            n = int(number.group(1))
            if n > len(truth):
                raise StageError(
                    f"{m.name} is image {n}, but {gt_name} in the devkit has only {len(truth)} "
                    f"lines: the devkit does not belong to this {VAL_TAR}."
                )
            item.wnid = id_to_wnid.get(truth[n - 1])
            if item.wnid is None:
                item.reject = f"{gt_name} line {n} names ILSVRC2012_ID {truth[n - 1]}, not a leaf class in meta.mat"
            elif item.wnid not in wnids:
                continue
            else:
                item.sha256 = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
            yield item
    if seen != len(truth):
        raise StageError(
            f"{VAL_TAR} holds {seen} val images but {gt_name} has {len(truth)} lines: "
            "they must match one to one; check that both files are complete and belong together."
        )


# --- the original tarballs --------------------------------------------------------------------
class IlsvrcTarSource(Source):
    layout = "ilsvrc-tar"

    def __init__(self, root: str):
        super().__init__(root)
        names = set(storage.list_dir(self.root))
        if DEVKIT not in names:
            raise StageError(
                f"'{storage.join(self.root, DEVKIT)}' is missing: the devkit holds the class list "
                f"(meta.mat) and the val labels. Put {DEVKIT} beside {TRAIN_TAR} and {VAL_TAR}."
            )
        self.has = {n: n in names for n in (TRAIN_TAR, VAL_TAR)}
        self._devkit = None

    def _read_devkit(self):
        if self._devkit is None:
            import scipy.io

            meta = gt = None
            with storage.open_read(storage.join(self.root, DEVKIT)) as f, tarfile.open(fileobj=f, mode="r|gz") as tf:
                for m in tf:
                    if m.name.endswith("data/meta.mat"):
                        meta = tf.extractfile(m).read()
                    elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                        gt = tf.extractfile(m).read()
            where = storage.join(self.root, DEVKIT)
            if meta is None:
                raise StageError(f"'{where}' has no data/meta.mat: is it ILSVRC2012_devkit_t12?")
            if gt is None:
                raise StageError(f"'{where}' has no data/ILSVRC2012_validation_ground_truth.txt")
            synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
            # The 1000 classes are the leaves; the file also holds internal WordNet nodes.
            leaves = [s for s in synsets if int(s["num_children"]) == 0]
            id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
            classes = sorted(
                ({"wnid": str(s["WNID"]), "name": str(s["words"])} for s in leaves), key=lambda c: c["wnid"]
            )
            truth = [int(x) for x in gt.decode().split()]
            self._devkit = classes, id_to_wnid, truth
        return self._devkit

    def classes(self) -> list[dict]:
        return self._read_devkit()[0]

    def plan(self, split: str, wnids: set[str]) -> Iterator:
        name = TRAIN_TAR if split == "train" else VAL_TAR
        if not self.has[name]:
            raise StageError(f"'{storage.join(self.root, name)}' is missing; it holds the {split} images.")
        if split == "val":
            _, id_to_wnid, truth = self._read_devkit()
            return iter([Unit("val-tar", storage.join(self.root, VAL_TAR), val=(id_to_wnid, truth, frozenset(wnids)))])
        return self._train(wnids)

    def _train(self, wnids):
        """The outer tar's member list (headers only: on S3 a small read per class tar), one unit
        per wanted class tar."""
        path = storage.join(self.root, TRAIN_TAR)
        known = {c["wnid"] for c in self.classes()}
        # Seekable (local disk, S3 in small ranges): tarfile skips each class tar's bytes.
        with storage.open_read(path, buffer=64 * 1024) as f, tarfile.open(fileobj=f, mode="r:") as outer:
            for m in outer:
                wnid = _stem(m.name)
                if m.isdir():
                    continue
                problem = _tar_entry_problem(m) or (
                    None if m.name.endswith(".tar") else "expected a per-class tar (n########.tar)"
                )
                if problem is None and wnid not in known:
                    problem = f"class '{wnid}' is not among the devkit's {len(known)} classes"
                if problem:
                    yield Item("train", _stem(m.name), None, path, m.offset_data, m.size, m.name, reject=problem)
                elif wnid in wnids:
                    yield Unit("class-tar", path, m.offset_data, m.size, m.name, wnid)

    def fingerprint(self) -> str:
        return digest([(n, storage.stat(storage.join(self.root, n))) for n in (TRAIN_TAR, VAL_TAR, DEVKIT)])


# --- loose files: ImageFolder and Kaggle -------------------------------------------------------
def _hash_items(items: Iterable[Item], threads: int) -> Iterator[Item]:
    """Fill in sha256 for loose files, reading several at once (I/O-bound; hashlib drops the GIL)."""

    def fill(item: Item) -> Item:
        if item.reject is None:
            item.sha256 = hashlib.sha256(storage.read_bytes(item.path)).hexdigest()
        return item

    batch: list[Item] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for item in items:
            batch.append(item)
            if len(batch) >= 1024:
                yield from pool.map(fill, batch)
                batch = []
        yield from pool.map(fill, batch)


def _class_folders(base: str, split: str, wnids: set[str], known: set[str]) -> Iterator[Item]:
    """Items of a ``<split>/<wnid>/...`` tree."""
    for wnid in storage.list_dir(base):
        folder = storage.join(base, wnid)
        if not storage.is_dir(folder):
            yield Item(
                split,
                _stem(wnid),
                None,
                folder,
                0,
                0,
                wnid,
                reject=f"a file directly in {split}/, expected class folders {split}/<wnid>/",
            )
            continue
        if wnid not in known:
            yield Item(split, wnid, None, folder, 0, 0, wnid, reject=f"folder '{wnid}' is not a known class")
            continue
        if wnid not in wnids:
            continue
        files = list(storage.walk_files(folder, etags=True))
        if not files:
            yield Item(split, wnid, wnid, folder, 0, 0, wnid, reject="empty class folder: no images")
        for rel, size, _, etag in files:
            path = storage.join(folder, rel)
            yield Item(
                split,
                _stem(rel),
                wnid,
                path,
                0,
                size,
                f"{split}/{wnid}/{rel}",
                reject=_loose_problem(path, rel),
                etag=etag,
            )


class FolderSource(Source):
    layout = "folder"

    def __init__(self, root: str, threads: int = 16):
        super().__init__(root)
        self.threads = threads
        if not storage.is_dir(storage.join(self.root, "train")):
            raise StageError(
                f"'{storage.join(self.root, 'train')}' is missing: the folder layout "
                "needs train/<wnid>/ folders (they define the classes)."
            )

    def classes(self) -> list[dict]:
        wnids = [
            n
            for n in storage.list_dir(storage.join(self.root, "train"))
            if storage.is_dir(storage.join(self.root, "train", n))
        ]
        # Folders carry no class names; use Kaggle's mapping file when it sits beside them.
        names = {}
        if storage.exists(storage.join(self.root, KAGGLE_MAPPING)):
            names = _read_mapping(storage.join(self.root, KAGGLE_MAPPING))
        return [{"wnid": w, "name": names.get(w, w)} for w in sorted(wnids)]

    def plan(self, split: str, wnids: set[str]) -> Iterator:
        base = storage.join(self.root, split)
        if not storage.is_dir(base):
            raise StageError(f"'{base}' is missing: expected {split}/<wnid>/ folders.")
        known = {c["wnid"] for c in self.classes()}
        return _chunked(_class_folders(base, split, wnids, known))

    def fingerprint(self) -> str:
        return digest(list(storage.walk_files(self.root)))


def _read_mapping(path: str) -> dict[str, str]:
    out = {}
    for n, line in enumerate(storage.read_bytes(path).decode().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not _WNID.match(wnid):
            raise StageError(f"{path} line {n}: '{line[:60]}' does not start with a WNID (n########)")
        out[wnid] = name
    return out


class KaggleSource(Source):
    layout = "kaggle"

    def __init__(self, root: str, threads: int = 16):
        super().__init__(root)
        self.threads = threads
        for need in (KAGGLE_MAPPING, KAGGLE_DATA):
            if not storage.exists(storage.join(self.root, need)):
                raise StageError(
                    f"'{storage.join(self.root, need)}' is missing: the Kaggle layout "
                    f"needs {KAGGLE_MAPPING} and {KAGGLE_DATA}/{{train,val}}."
                )

    def classes(self) -> list[dict]:
        mapping = _read_mapping(storage.join(self.root, KAGGLE_MAPPING))
        return [{"wnid": w, "name": mapping[w]} for w in sorted(mapping)]

    def _val_labels(self) -> dict[str, str]:
        path = storage.join(self.root, KAGGLE_VAL_CSV)
        if not storage.exists(path):
            raise StageError(f"'{path}' is missing: it holds the val labels of the Kaggle layout.")
        rows = csv.DictReader(io.StringIO(storage.read_bytes(path).decode()))
        if rows.fieldnames != ["ImageId", "PredictionString"]:
            raise StageError(f"{path}: header is {rows.fieldnames}, expected ImageId,PredictionString")
        # The first token of PredictionString is the WNID; the rest are boxes.
        return {r["ImageId"]: (r["PredictionString"] or "").split(" ")[0] for r in rows}

    def plan(self, split: str, wnids: set[str]) -> Iterator:
        base = storage.join(self.root, KAGGLE_DATA, split)
        if not storage.is_dir(base):
            raise StageError(f"'{base}' is missing; it holds the {split} images.")
        known = {c["wnid"] for c in self.classes()}
        if split == "train":
            return _chunked(_class_folders(base, split, wnids, known))
        return _chunked(self._val_items(base, wnids, known))

    def _val_items(self, base, wnids, known):
        labels = self._val_labels()
        for rel, size, _, etag in storage.walk_files(base, etags=True):
            item = Item(
                "val",
                _stem(rel),
                None,
                storage.join(base, rel),
                0,
                size,
                f"val/{rel}",
                reject=_loose_problem(storage.join(base, rel), rel),
                etag=etag,
            )
            if item.reject is None:
                item.wnid = labels.get(item.key)
                if item.wnid is None:
                    item.reject = f"no row for {item.key} in {KAGGLE_VAL_CSV}"
                elif item.wnid not in known:
                    item.reject = f"{KAGGLE_VAL_CSV} labels it '{item.wnid}', which is not in {KAGGLE_MAPPING}"
                elif item.wnid not in wnids:
                    continue
            yield item

    def fingerprint(self) -> str:
        return digest(
            [(n, storage.stat(storage.join(self.root, n))) for n in (KAGGLE_MAPPING, KAGGLE_VAL_CSV)]
            + list(storage.walk_files(storage.join(self.root, KAGGLE_DATA)))
        )


_READERS = {"ilsvrc-tar": IlsvrcTarSource, "kaggle": KaggleSource, "folder": FolderSource}


def detect(root: str) -> str:
    """Which layout ``root`` holds, from the names at its top level."""
    if not storage.exists(root):
        raise StageError(f"Source '{root}' does not exist.")
    names = set(storage.list_dir(root))
    if names & {TRAIN_TAR, VAL_TAR, DEVKIT}:
        return "ilsvrc-tar"
    if KAGGLE_MAPPING in names or "ILSVRC" in names:
        return "kaggle"
    if "train" in names:
        return "folder"
    shown = ", ".join(sorted(names)[:10]) or "nothing"
    raise StageError(
        f"No ImageNet layout found in '{root}'. Looked for: {TRAIN_TAR} / {VAL_TAR} / {DEVKIT} "
        f"(ilsvrc-tar), {KAGGLE_MAPPING} + {KAGGLE_DATA}/ (kaggle), train/<wnid>/ (folder). "
        f"Found: {shown}. Point --source at the folder that holds them, or pass --layout."
    )


def open_source(root: str, layout: str | None = None, threads: int = 16) -> Source:
    layout = layout or detect(root)
    if layout not in _READERS:
        raise StageError(f"Unknown layout '{layout}'. Expected one of: {', '.join(LAYOUTS)}.")
    cls = _READERS[layout]
    return cls(root) if cls is IlsvrcTarSource else cls(root, threads=threads)
