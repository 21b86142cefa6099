"""Image trees on disk -> the manifests the preprocess stage reads (the prepare stage).

Layouts read (data.source "imagenet" and "folder" read the same layouts; "imagenet" also the three
ILSVRC-2012 files as downloaded, and "webdataset" tar shards: pipeline/data/archives.py):
  class folders   root/train/<class>/<image>, root/val/<class>/<image>; <class> is a WNID for ImageNet.
  ILSVRC-2012 val root/val/ILSVRC2012_val_XXXXXXXX.JPEG directly in val/, labelled by the devkit's
                  ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line, in file-name order)
                  and meta.mat (ILSVRC2012_ID -> WNID of the 1,000 leaf synsets).
  digits          the embedded default: scikit-learn's load_digits() (1,797 real 8x8 handwritten digits)
                  written by this module as a class-folder tree of RGB JPEGs under <out>/images/.
Image files are recognised by extension, case-insensitively (IMAGE_EXTENSIONS); other files are ignored.
Images are referenced, never copied (except the digits, which exist nowhere else as files).

Prepared folder (what prepare writes and read_prepared reads):
  classes.json      {"root": ROOT, "classes": [NAME_OF_LABEL_0, NAME_OF_LABEL_1, ...]}
                    ROOT is the folder the manifest paths are relative to: relative to the prepared
                    folder itself ("images" for digits) or absolute (an ImageNet tree). Labels are the
                    positions of the sorted train class names.
  train.csv, val.csv  header "path,label", one image per row: path relative to ROOT with "/" separators,
                    label an int; rows sorted by label, then path. Images inside archives (ILSVRC-2012
                    as downloaded, webdataset shards: pipeline/data/archives.py) add the columns
                    "archive,offset,size": the archive relative to ROOT, the byte offset of the image's
                    data in it and its size; their path is <archive>/<member>.
  ignored.csv       only when archive members were passed over as not images: header "path,reason"
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DataParams
from pipeline.data import archives
from pipeline.data.archives import IMAGE_EXTENSIONS, Ignored, label_flat_val, read_devkit_meta
from pipeline.data.dataset import SPLITS
from pipeline.data.images import ArchiveMember
from pipeline.errors import DataError
from pipeline.storage import atomic

DIGITS_IMAGES = "images"
IGNORED_FILE = "ignored.csv"
# Fixed encoder settings: Pillow writes no timestamps, so the same params give the same bytes.
DIGITS_JPEG_QUALITY = 95


@dataclass(frozen=True, slots=True)  # slots: one per image, 1.33 million for ILSVRC-2012
class Sample:
    path: str  # relative to the dataset root, "/"-separated; for an archive member <archive>/<member>
    label: int
    archive: str | None = None  # relative to the dataset root; None for a file of a tree
    offset: int = 0  # of the member's bytes in the archive
    size: int = 0


@dataclass(frozen=True)
class PreparedDataset:
    root: Path  # absolute
    classes: list[str]
    splits: dict[str, list[Sample]]

    def image_path(self, sample: Sample) -> Path | ArchiveMember:
        if sample.archive is None:
            return self.root / sample.path
        member = sample.path[len(sample.archive) + 1 :]
        return ArchiveMember(self.root / sample.archive, member, sample.offset, sample.size)


def prepare(params: DataParams, out: Path) -> PreparedDataset:
    """Write the prepared folder for params.source at `out`, all at once (see the module docstring)."""
    if params.source == "digits":
        return _publish(out, lambda folder: _write_digits_tree(params, folder / DIGITS_IMAGES))
    root = Path(params.root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    # Read the whole tree or every archive before writing anything, so every layout error comes first.
    ignored: list[Ignored] = []
    if params.source == "webdataset":
        dataset, ignored = read_shards(params, root)
    elif params.source == "imagenet" and archives.is_ilsvrc_download(root):
        if params.val_ground_truth is not None:
            raise DataError(f"{root}: holds the ILSVRC-2012 archives, whose devkit {archives.DEVKIT} labels val; "
                            "data.val_ground_truth and data.devkit_meta are for an extracted tree: set them null")
        dataset, ignored = read_ilsvrc_archives(root)
    else:
        dataset = read_tree(root, _devkit_path(root, params.val_ground_truth), _devkit_path(root, params.devkit_meta))
    return _publish(out, lambda folder: dataset, ignored)


def read_ilsvrc_archives(root: Path) -> tuple[PreparedDataset, list[Ignored]]:
    """Index the three ILSVRC-2012 files in root (pipeline/data/archives.py) as read_tree the tree."""
    train, val, ignored = archives.ilsvrc_members(root)
    classes = sorted(train)
    return _labelled(root, classes, train, val, str(root / archives.VAL_TAR), _member_sample), ignored


def read_shards(params: DataParams, root: Path) -> tuple[PreparedDataset, list[Ignored]]:
    """Index the webdataset shards in root (pipeline/data/archives.py)."""
    by_label, ignored = archives.webdataset_members(params, root)
    classes = archives.class_names(params, root, set(by_label["train"]) | set(by_label["val"]))
    images = {split: {classes[label]: members for label, members in labels.items()} for split, labels in by_label.items()}
    return _labelled(root, classes, images["train"], images["val"], f"{root} val shards", _member_sample), ignored


def read_tree(root: Path, val_ground_truth: Path | None = None, devkit_meta: Path | None = None) -> PreparedDataset:
    """Index root/train and root/val; val may be flat when the devkit files are given."""
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    train_dir, val_dir = root / "train", root / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: missing (expected one folder per class, as in ILSVRC-2012)")
    train_images = _class_folders(train_dir)

    val_subdirs, val_loose_images = _list_folder(val_dir)
    if val_subdirs and val_loose_images:
        raise DataError(f"{val_dir}: mixes class folders with images directly in it; use one layout")
    if val_loose_images:
        if val_ground_truth is None or devkit_meta is None:
            raise DataError(
                f"{val_dir}: images lie directly in val/ (ILSVRC-2012 layout); set data.val_ground_truth "
                "and data.devkit_meta to the devkit's ground-truth file and meta.mat"
            )
        val_images = _flat_val_by_class(val_dir, val_loose_images, val_ground_truth, devkit_meta)
    elif val_subdirs:
        if val_ground_truth is not None:
            raise DataError(
                f"{val_dir}: has class folders, but data.val_ground_truth is set (it labels a flat val/ only)"
            )
        val_images = _class_folders(val_dir)
    else:
        raise DataError(f"{val_dir}: no images")
    return _labelled(root, sorted(train_images), train_images, val_images, str(val_dir),
                     lambda path, label: Sample(path.relative_to(root).as_posix(), label))


def _labelled(root: Path, classes: list[str], train: dict[str, list], val: dict[str, list], val_where: str,
              sample: Callable[[Any, int], Sample]) -> PreparedDataset:
    """The dataset of {class name: images} per split: labels are positions in `classes`; rows sorted by
    label, then path (one folder's files, or one archive's members, sort by name)."""
    label_of = {name: label for label, name in enumerate(classes)}
    for name, images in val.items():
        if name not in label_of:
            raise DataError(f"{val_where}: val class {name!r} (e.g. {images[0]}) is not among the {len(classes)} train classes")
    splits = {}
    for split, images in (("train", train), ("val", val)):
        samples = [sample(image, label_of[name]) for name, split_images in images.items() for image in split_images]
        splits[split] = sorted(samples, key=lambda row: (row.label, row.path))
    return PreparedDataset(root=root, classes=classes, splits=splits)


def _member_sample(member: ArchiveMember, label: int) -> Sample:
    archive = member.archive.name  # archives lie directly in the data root
    return Sample(f"{archive}/{member.name}", label, archive, member.offset, member.size)


def read_prepared(folder: Path) -> PreparedDataset:
    """Read what prepare wrote at `folder`."""
    for name in ("classes.json", *(f"{split}.csv" for split in SPLITS)):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: not found; run the prepare stage first")
    index = json.loads((folder / "classes.json").read_text())
    splits = {}
    for split in SPLITS:
        with (folder / f"{split}.csv").open(newline="") as manifest:
            splits[split] = [
                Sample(row["path"], int(row["label"]))
                if not row.get("archive")
                else Sample(row["path"], int(row["label"]), row["archive"], int(row["offset"]), int(row["size"]))
                for row in csv.DictReader(manifest)
            ]
    return PreparedDataset(root=(folder / index["root"]).resolve(), classes=index["classes"], splits=splits)


def _publish(out: Path, build: Callable[[Path], PreparedDataset], ignored: list[Ignored] = ()) -> PreparedDataset:
    """Build the prepared folder beside `out` and rename it into place, so that an interrupted run
    leaves nothing at `out` (a rerun clears the partial folder it left)."""
    out = out.resolve()  # so that a root inside the new folder is recognised whatever the caller's path
    with atomic.replacing_folder(out) as partial:
        dataset = build(partial)
        root = dataset.root.relative_to(partial) if dataset.root.is_relative_to(partial) else dataset.root
        (partial / "classes.json").write_text(
            json.dumps({"root": root.as_posix(), "classes": dataset.classes}, indent=1) + "\n"
        )
        for split, samples in dataset.splits.items():
            with (partial / f"{split}.csv").open("w", newline="") as manifest:
                writer = csv.writer(manifest, lineterminator="\n")
                if any(sample.archive for sample in samples):
                    writer.writerow(["path", "label", "archive", "offset", "size"])
                    writer.writerows((s.path, s.label, s.archive, s.offset, s.size) for s in samples)
                else:
                    writer.writerow(["path", "label"])
                    writer.writerows((sample.path, sample.label) for sample in samples)
        if ignored:
            with (partial / IGNORED_FILE).open("w", newline="") as listing:
                writer = csv.writer(listing, lineterminator="\n")
                writer.writerow(["path", "reason"])
                writer.writerows((item.where, item.reason) for item in ignored)
    return read_prepared(out)


def _write_digits_tree(params: DataParams, images_dir: Path) -> PreparedDataset:
    # Imported here, not at the top: every Ray worker imports this module and only the prepare stage
    # needs scikit-learn (0.8 s of CPU per process on a 2-core laptop; docs/benchmarks.md).
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_indices, val_indices = train_test_split(
        indices, test_size=params.digits_val_fraction, stratify=digits.target, random_state=params.seed
    )
    size = params.digits_image_size
    for split, split_indices in (("train", train_indices), ("val", val_indices)):
        for index in sorted(split_indices):
            class_dir = images_dir / split / f"digit_{digits.target[index]}"
            class_dir.mkdir(parents=True, exist_ok=True)
            # load_digits holds ink intensities 0..16.
            grey = np.rint(digits.images[index] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            image.save(class_dir / f"digit_{digits.target[index]}_{index:04d}.JPEG", quality=DIGITS_JPEG_QUALITY)
    return read_tree(images_dir)


def _devkit_path(root: Path, configured: str | None) -> Path | None:
    return None if configured is None else root / configured  # an absolute `configured` replaces root


def _list_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """Sub-folders and image files directly in `folder`; hidden entries skipped."""
    subdirs, images = [], []
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subdirs.append(Path(entry.path))
        elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
            images.append(Path(entry.path))
    return sorted(subdirs), sorted(images)


def _class_folders(split_dir: Path) -> dict[str, list[Path]]:
    class_dirs, _ = _list_folder(split_dir)
    if not class_dirs:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    images = {}
    for class_dir in class_dirs:
        _, images[class_dir.name] = _list_folder(class_dir)
        if not images[class_dir.name]:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{class_dir}: class folder has no images ({extensions}, any case)")
    return images


def _flat_val_by_class(
    val_dir: Path, images: list[Path], ground_truth: Path, devkit_meta: Path
) -> dict[str, list[Path]]:
    if not devkit_meta.is_file():
        raise DataError(f"{devkit_meta}: devkit meta.mat not found (data.devkit_meta)")
    wnid_of_id = read_devkit_meta(devkit_meta, str(devkit_meta))
    if not ground_truth.is_file():
        raise DataError(f"{ground_truth}: validation ground-truth file not found (data.val_ground_truth)")
    return label_flat_val(ground_truth.read_text().split(), images, wnid_of_id, str(ground_truth), str(val_dir))
