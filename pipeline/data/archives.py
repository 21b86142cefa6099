"""ImageNet as it is downloaded, and webdataset shards -> the prepare stage's manifests, without
extracting a file: every image is indexed by its archive, the byte offset of its data and its size,
and the preprocess stage's workers read those bytes with os.pread (pipeline/data/images.py).

ILSVRC-2012 archives (data.source "imagenet", data.root holding the three files as downloaded):
  ILSVRC2012_img_train.tar        a tar of per-class tars <WNID>.tar, each holding that class's JPEGs;
                                  a member's offset is its data's position in the outer file (the inner
                                  tar's data offset plus the member's offset inside the inner tar)
  ILSVRC2012_img_val.tar          a flat tar of ILSVRC2012_val_XXXXXXXX.JPEG
  ILSVRC2012_devkit_t12.tar.gz    <top>/data/meta.mat and <top>/data/ILSVRC2012_validation_ground_truth.txt
                                  label the val images as an extracted flat val/ (pipeline/data/tree.py)
The samples, labels and order are those of the extracted tree: classes are the sorted WNIDs, members
are images by the tree's extension rule (IMAGE_EXTENSIONS), rows sorted by label then name.

Webdataset shards (data.source "webdataset"): data.root holds .tar shards; data.train_shards and
data.val_shards are glob patterns relative to it (default: names holding "train" and "val"). A sample is
the members sharing a key (the member name up to the first dot of its base name): one image
(<key>.jpg, .jpeg, .png...) and <key>.cls, the label as a decimal integer. Class names come from
data.class_names (one per line, line i naming label i) or are the labels written out ("0", "1", ...).

Members that are not images (by extension) are not samples: they are listed in the prepared folder's
ignored.csv and counted by the stage, as an extracted tree's stray files are passed over. A member
with an image's name whose bytes are not an image is a sample, skipped and listed by the preprocess
stage, as a bad file of a tree is. Any archive that cannot be read as the layout above (truncated, a
corrupt inner tar, a missing or wrong devkit, a ground truth of another count, another layout) is a
DataError naming the file, and the member where there is one, before anything is written.

Fingerprint (the DVC stage `source`, data/source.json): per archive its name, size, mtime_ns and the
SHA-256 of its first and last FINGERPRINT_BLOCK bytes, so that DVC never hashes the 145 GB to notice
that an archive was replaced, and notices it even when size and time were kept (README, "Using ImageNet").
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

import scipy.io

from pipeline.config import DataParams
from pipeline.data.images import ArchiveMember as Member
from pipeline.errors import DataError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
ILSVRC_ARCHIVES = (TRAIN_TAR, VAL_TAR, DEVKIT)
# torchvision's ImageFolder list; compared lower-case so ImageNet's ".JPEG" matches.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
DEVKIT_META = "data/meta.mat"
DEVKIT_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEFAULT_SHARDS = {"train": "*train*.tar", "val": "*val*.tar"}
FINGERPRINT_BLOCK = 1 << 20
Image = TypeVar("Image")  # a file of a tree or a member of an archive


@dataclass(frozen=True)
class Ignored:
    where: str  # archive/member
    reason: str


def is_ilsvrc_download(root: Path) -> bool:
    """root holds any of the three archives and no extracted train/ (then every archive is required)."""
    return not (root / "train").is_dir() and any((root / name).exists() for name in ILSVRC_ARCHIVES)


def ilsvrc_members(root: Path) -> tuple[dict[str, list[Member]], dict[str, list[Member]], list[Ignored]]:
    """(train images by WNID, val images by WNID, ignored members) of the three archives in root."""
    missing = [name for name in ILSVRC_ARCHIVES if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root / missing[0]}: not found; an ILSVRC-2012 data root holds {', '.join(ILSVRC_ARCHIVES)}")
    meta, ground_truth = _devkit_files(root / DEVKIT)
    wnid_of_id = read_devkit_meta(io.BytesIO(meta), f"{root / DEVKIT}:{DEVKIT_META}")
    ignored: list[Ignored] = []
    train = train_members(root / TRAIN_TAR, ignored)
    val_images = [member for member in _flat_members(root / VAL_TAR, ignored)]
    val_images.sort(key=lambda member: member.name)
    ids = ground_truth.decode("ascii", "replace").split()
    val = label_flat_val(ids, val_images, wnid_of_id, f"{root / DEVKIT}:{DEVKIT_GROUND_TRUTH}", str(root / VAL_TAR))
    return train, val, ignored


def read_devkit_meta(source: Path | BinaryIO, where: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the 1,000 leaf synsets in a devkit meta.mat (a file, or its bytes)."""
    try:
        synsets = scipy.io.loadmat(source, squeeze_me=True)["synsets"]
        # The 1,000 ILSVRC classes are the leaves; inner WordNet nodes have children.
        return {
            int(ilsvrc_id): str(wnid)
            for ilsvrc_id, wnid, children in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"])
            if int(children) == 0
        }
    except (scipy.io.matlab.MatReadError, ValueError, KeyError, TypeError, IndexError) as error:
        raise DataError(
            f"{where}: not a devkit meta.mat (a 'synsets' struct with ILSVRC2012_ID, WNID, num_children): {error}"
        ) from None


def label_flat_val(
    ids: list[str], images: Sequence[Image], wnid_of_id: dict[int, str], ground_truth: str, val: str
) -> dict[str, list[Image]]:
    """Label ILSVRC2012_val_*.JPEG as torchvision.datasets.ImageNet does: the ground-truth file's n-th
    line holds the ILSVRC2012_ID of the n-th image in file-name order; meta.mat maps IDs to WNIDs."""
    if len(ids) != len(images):
        raise DataError(
            f"{ground_truth}: {len(ids)} labels, but {val} holds {len(images)} images; "
            "the file needs one ILSVRC2012_ID per image, in file-name order"
        )
    by_class: dict[str, list[Image]] = {}
    for line_number, (ilsvrc_id, image) in enumerate(zip(ids, images), start=1):
        if not ilsvrc_id.isdigit() or int(ilsvrc_id) not in wnid_of_id:
            raise DataError(
                f"{ground_truth}:{line_number}: {ilsvrc_id!r} is not an ILSVRC2012_ID of a leaf synset in the devkit's meta.mat"
            )
        by_class.setdefault(wnid_of_id[int(ilsvrc_id)], []).append(image)
    return by_class


def webdataset_members(params: DataParams, root: Path) -> tuple[dict[str, dict[int, list[Member]]], list[Ignored]]:
    """({split: {label: images}}, ignored members) of the shards data.train_shards/val_shards name."""
    shards = {split: _shards(root, pattern or DEFAULT_SHARDS[split], split)
              for split, pattern in (("train", params.train_shards), ("val", params.val_shards))}
    both = set(shards["train"]) & set(shards["val"])
    if both:
        raise DataError(f"{sorted(both)[0]}: matches both data.train_shards and data.val_shards")
    ignored: list[Ignored] = []
    by_label: dict[str, dict[int, list[Member]]] = {}
    for split, paths in shards.items():
        by_label[split] = {}
        for path in paths:
            for label, member in _shard_samples(path, ignored):
                by_label[split].setdefault(label, []).append(member)
    return by_label, ignored


def class_names(params: DataParams, root: Path, labels: set[int]) -> list[str]:
    """The names of labels 0.. for webdataset shards: data.class_names' lines, or the labels themselves."""
    if params.class_names is None:
        return [str(label) for label in range(max(labels) + 1)]
    path = root / params.class_names
    if not path.is_file():
        raise DataError(f"{path}: class names file not found (data.class_names)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if max(labels) >= len(names):
        raise DataError(f"{path}: names {len(names)} classes, but the shards hold label {max(labels)}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a class name appears twice")
    return names


def fingerprint(params: DataParams) -> dict:
    """What data/source.json records of data.root's archives (module docstring); nothing for a tree
    or the digits, whose files DVC does not see either."""
    root = Path(params.root).resolve() if params.root else None
    if root is None or not root.is_dir():
        return {"source": params.source, "archives": []}
    if params.source == "webdataset":
        names = sorted({path.name for split in ("train", "val") for path in _shards(
            root, getattr(params, f"{split}_shards") or DEFAULT_SHARDS[split], split, required=False)})
    elif params.source == "imagenet" and is_ilsvrc_download(root):
        names = [name for name in ILSVRC_ARCHIVES if (root / name).is_file()]
    else:
        names = []
    return {"source": params.source, "archives": [_file_fingerprint(root / name) for name in names]}


def _file_fingerprint(path: Path) -> dict:
    status = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as file:
        digest.update(file.read(FINGERPRINT_BLOCK))
        file.seek(max(0, status.st_size - FINGERPRINT_BLOCK))
        digest.update(file.read(FINGERPRINT_BLOCK))
    return {"name": path.name, "size": status.st_size, "mtime_ns": status.st_mtime_ns,
            "head_tail_sha256": digest.hexdigest()}


class _Window:
    """The bytes [start, start + size) of an open file, as the seekable file object tarfile reads;
    an inner tar read through it cannot run into the next member of the outer one."""

    def __init__(self, fd: int, start: int, size: int):
        self.fd, self.start, self.size, self.position = fd, start, size, 0

    def read(self, count: int = -1) -> bytes:
        count = self.size - self.position if count < 0 else min(count, self.size - self.position)
        data = os.pread(self.fd, max(count, 0), self.start + self.position)
        self.position += len(data)
        return data

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        self.position = position + {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        return self.position

    def tell(self) -> int:
        return self.position


def _tar_members(window: _Window, where: str) -> list[tarfile.TarInfo]:
    """Every member of the tar in `window`; DataError when it is not a whole, readable tar. tarfile
    stops without a word at a corrupt header after the first, so the end-of-archive marker (a zero
    block) is checked where it stopped."""
    try:
        with tarfile.open(fileobj=window, mode="r:") as tar:  # type: ignore[call-overload]
            members = tar.getmembers()
            end = tar.offset
    except tarfile.ReadError as error:
        raise DataError(f"{where}: not a whole, readable tar ({error}): a truncated or damaged download?") from None
    for member in members:
        if member.offset_data + member.size > window.size:
            raise DataError(f"{where}: truncated in member {member.name} ({window.size} bytes)")
    window.seek(end)
    if window.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        after = f"after member {members[-1].name}" if members else "at its start"
        raise DataError(f"{where}: truncated or corrupt {after} (byte {end} of {window.size}): no end-of-archive block")
    return members


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def train_members(path: Path, ignored: list[Ignored]) -> dict[str, list[Member]]:
    """The images of each per-class tar in the ILSVRC-2012 train archive at `path`, by WNID, sorted by name."""
    by_class: dict[str, list[Member]] = {}
    with path.open("rb") as file:
        fd = file.fileno()
        for inner in _tar_members(_Window(fd, 0, os.fstat(fd).st_size), str(path)):
            if not inner.isfile() or not inner.name.endswith(".tar") or "/" in inner.name:
                raise DataError(
                    f"{path}: member {inner.name} is not a per-class tar; the train archive as downloaded holds "
                    "one <WNID>.tar per class (extract another layout and set data.root to the tree)"
                )
            wnid = inner.name[: -len(".tar")]
            images = by_class[wnid] = []
            where = f"{path}:{inner.name}"
            for member in _tar_members(_Window(fd, inner.offset_data, inner.size), where):
                if member.isfile() and _is_image_name(member.name):
                    images.append(Member(path, f"{inner.name}/{member.name}", inner.offset_data + member.offset_data,
                                         member.size))
                elif not member.isdir():
                    ignored.append(Ignored(f"{where}/{member.name}", "not an image file (by its extension)"))
            if not images:
                raise DataError(f"{where}: class tar holds no images")
            images.sort(key=lambda member: member.name)
    if not by_class:
        raise DataError(f"{path}: holds no per-class tars")
    return by_class


def _flat_members(path: Path, ignored: list[Ignored]) -> Iterator[Member]:
    with path.open("rb") as file:
        fd = file.fileno()
        members = _tar_members(_Window(fd, 0, os.fstat(fd).st_size), str(path))
    for member in members:
        if member.isdir():
            continue
        if member.isfile() and _is_image_name(member.name):
            if "/" in member.name.strip("./"):
                raise DataError(f"{path}: member {member.name} lies in a folder; the val archive as downloaded is flat")
            yield Member(path, member.name, member.offset_data, member.size)
        else:
            ignored.append(Ignored(f"{path}:{member.name}", "not an image file (by its extension)"))


def _devkit_files(path: Path) -> tuple[bytes, bytes]:
    """The bytes of meta.mat and of the validation ground truth in the devkit tar.gz."""
    wanted = {DEVKIT_META: b"", DEVKIT_GROUND_TRUTH: b""}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                for suffix in wanted:
                    if member.isfile() and (member.name == suffix or member.name.endswith("/" + suffix)):
                        wanted[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataError(f"{path}: not a readable tar.gz devkit ({type(error).__name__}: {error})") from None
    for suffix, data in wanted.items():
        if not data:
            raise DataError(f"{path}: no {suffix} in it; is it the ILSVRC-2012 devkit (ILSVRC2012_devkit_t12)?")
    return wanted[DEVKIT_META], wanted[DEVKIT_GROUND_TRUTH]


def _shards(root: Path, pattern: str, split: str, required: bool = True) -> list[Path]:
    paths = sorted(path for path in root.iterdir() if path.is_file() and fnmatch.fnmatch(path.name, pattern))
    if not paths and required:
        raise DataError(f"{root}: no {split} shards match {pattern!r} (data.{split}_shards)")
    return paths


def _shard_samples(path: Path, ignored: list[Ignored]) -> Iterator[tuple[int, Member]]:
    """(label, image) of each sample of one shard, in member order."""
    with path.open("rb") as file:
        fd = file.fileno()
        members = _tar_members(_Window(fd, 0, os.fstat(fd).st_size), str(path))
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in members:
            if member.isfile():
                folder, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")
                samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[extension.lower()] = member
        for key, fields in samples.items():
            images = [member for extension, member in fields.items() if _is_image_name(f"x.{extension}")]
            if not images:
                ignored.extend(Ignored(f"{path}:{member.name}", "no image in its sample") for member in fields.values())
                continue
            if len(images) > 1 or "cls" not in fields:
                problem = "more than one image" if len(images) > 1 else "no .cls label"
                raise DataError(f"{path}: sample {key} has {problem} (expected <key>.jpg|jpeg|png + <key>.cls)")
            label_text = os.pread(fd, fields["cls"].size, fields["cls"].offset_data).strip()
            if not label_text.isdigit():
                raise DataError(f"{path}: {fields['cls'].name} holds {label_text[:20]!r}, not a class index")
            yield int(label_text), Member(path, images[0].name, images[0].offset_data, images[0].size)
