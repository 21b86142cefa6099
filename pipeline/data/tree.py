"""Image trees on disk -> the manifests the preprocess stage reads (the prepare stage).

Layouts read (data.source "imagenet" and "folder" read the same layouts):
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
                    label an int; rows sorted by label, then path.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from pipeline.config import DataParams
from pipeline.data.dataset import SPLITS
from pipeline.errors import DataError
from pipeline.storage import atomic

# torchvision's ImageFolder list; compared lower-case so ImageNet's ".JPEG" matches.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
DIGITS_IMAGES = "images"
# Fixed encoder settings: Pillow writes no timestamps, so the same params give the same bytes.
DIGITS_JPEG_QUALITY = 95


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root, "/"-separated
    label: int


@dataclass(frozen=True)
class PreparedDataset:
    root: Path  # absolute
    classes: list[str]
    splits: dict[str, list[Sample]]

    def image_path(self, sample: Sample) -> Path:
        return self.root / sample.path


def prepare(params: DataParams, out: Path) -> PreparedDataset:
    """Write the prepared folder for params.source at `out`, all at once (see the module docstring)."""
    if params.source == "digits":
        return _publish(out, lambda folder: _write_digits_tree(params, folder / DIGITS_IMAGES))
    root = Path(params.root).resolve()
    # Read the whole tree before writing anything, so every layout error comes first.
    dataset = read_tree(root, _devkit_path(root, params.val_ground_truth), _devkit_path(root, params.devkit_meta))
    return _publish(out, lambda folder: dataset)


def read_tree(root: Path, val_ground_truth: Path | None = None, devkit_meta: Path | None = None) -> PreparedDataset:
    """Index root/train and root/val; val may be flat when the devkit files are given."""
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    train_dir, val_dir = root / "train", root / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: missing (expected one folder per class, as in ILSVRC-2012)")
    train_images = _class_folders(train_dir)
    classes = sorted(train_images)
    label_of = {name: label for label, name in enumerate(classes)}

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
    for name, paths in val_images.items():
        if name not in label_of:
            raise DataError(
                f"{val_dir}: val class {name!r} (e.g. {paths[0]}) is not among the {len(classes)} train classes"
            )

    splits = {}
    for split, images in (("train", train_images), ("val", val_images)):
        splits[split] = [
            Sample(path.relative_to(root).as_posix(), label_of[name])
            for name in sorted(images, key=label_of.__getitem__)
            for path in sorted(images[name])
        ]
    return PreparedDataset(root=root, classes=classes, splits=splits)


def read_prepared(folder: Path) -> PreparedDataset:
    """Read what prepare wrote at `folder`."""
    for name in ("classes.json", *(f"{split}.csv" for split in SPLITS)):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: not found; run the prepare stage first")
    index = json.loads((folder / "classes.json").read_text())
    splits = {}
    for split in SPLITS:
        with (folder / f"{split}.csv").open(newline="") as manifest:
            splits[split] = [Sample(row["path"], int(row["label"])) for row in csv.DictReader(manifest)]
    return PreparedDataset(root=(folder / index["root"]).resolve(), classes=index["classes"], splits=splits)


def _publish(out: Path, build: Callable[[Path], PreparedDataset]) -> PreparedDataset:
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
                writer.writerow(["path", "label"])
                writer.writerows((sample.path, sample.label) for sample in samples)
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
    """Label ILSVRC2012_val_*.JPEG as torchvision.datasets.ImageNet does: the ground-truth file's
    n-th line holds the ILSVRC2012_ID of the n-th image in file-name order; meta.mat maps IDs to WNIDs."""
    wnid_of_id = _read_devkit_meta(devkit_meta)
    if not ground_truth.is_file():
        raise DataError(f"{ground_truth}: validation ground-truth file not found (data.val_ground_truth)")
    ids = ground_truth.read_text().split()
    if len(ids) != len(images):
        raise DataError(
            f"{ground_truth}: {len(ids)} labels, but {val_dir} holds {len(images)} images; "
            "the file needs one ILSVRC2012_ID per image, in file-name order"
        )
    by_class: dict[str, list[Path]] = {}
    for line_number, (ilsvrc_id, image) in enumerate(zip(ids, images), start=1):
        if not ilsvrc_id.isdigit() or int(ilsvrc_id) not in wnid_of_id:
            raise DataError(
                f"{ground_truth}:{line_number}: {ilsvrc_id!r} is not an ILSVRC2012_ID of a leaf synset in {devkit_meta}"
            )
        by_class.setdefault(wnid_of_id[int(ilsvrc_id)], []).append(image)
    return by_class


def _read_devkit_meta(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise DataError(f"{path}: devkit meta.mat not found (data.devkit_meta)")
    try:
        synsets = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
        # The 1,000 ILSVRC classes are the leaves; inner WordNet nodes have children.
        return {
            int(ilsvrc_id): str(wnid)
            for ilsvrc_id, wnid, children in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"])
            if int(children) == 0
        }
    except (scipy.io.matlab.MatReadError, ValueError, KeyError, TypeError, IndexError) as error:
        raise DataError(
            f"{path}: not a devkit meta.mat (a 'synsets' struct with ILSVRC2012_ID, WNID, num_children): {error}"
        ) from None
