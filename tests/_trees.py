"""Small image trees in the layouts the data stages read, written for the tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # the first three ILSVRC-2012 classes


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour gradient with noise: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3) + np.stack([x, y, x + y], axis=-1) * rng.uniform(-1, 1, 3)
    noisy = base + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def write_photo(path: Path, seed: int, size: tuple[int, int] = (40, 30), **save_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(*size, seed).save(path, **({"format": "JPEG", "quality": 90} | save_options))
    return path


def class_folder_tree(root: Path, images_per_class: dict[str, dict[str, int]], size=(40, 30)) -> Path:
    """root/<split>/<class>/<class>_<i>.JPEG for {split: {class: count}}."""
    seed = 0
    for split, classes in images_per_class.items():
        for name, count in classes.items():
            for index in range(count):
                seed += 1
                write_photo(root / split / name / f"{name}_{index}.JPEG", seed, size)
    return root


def flat_val_with_devkit(root: Path, val_wnids: list[str], all_wnids: list[str],
                         size: tuple[int, int] = (40, 30)) -> tuple[Path, Path]:
    """root/val/ILSVRC2012_val_%08d.JPEG labelled val_wnids[i], plus the devkit's ground-truth file
    and meta.mat (a 'synsets' struct array; IDs 1.. are the leaves in all_wnids order, then one inner
    WordNet node with children, as in the real file). Returns (ground truth, meta.mat)."""
    for index, _ in enumerate(val_wnids, start=1):
        write_photo(root / "val" / f"ILSVRC2012_val_{index:08d}.JPEG", 1000 + index, size)
    # IDs deliberately not in sorted-WNID order, so a mapping by position would be caught.
    id_of_wnid = {wnid: len(all_wnids) - position for position, wnid in enumerate(all_wnids)}
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(all_wnids) + 1, 1), dtype=[(field, "O") for field in fields])
    for row, wnid in enumerate(all_wnids):
        synsets[row, 0] = (id_of_wnid[wnid], wnid, f"words {wnid}", "gloss", 0, np.zeros(0), 0, 1300)
    synsets[-1, 0] = (len(all_wnids) + 1, "n00001740", "entity", "gloss", len(all_wnids),
                      np.arange(1, len(all_wnids) + 1), 18, 0)
    devkit = root / "devkit"
    devkit.mkdir()
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    ground_truth = devkit / "ILSVRC2012_validation_ground_truth.txt"
    ground_truth.write_text("".join(f"{id_of_wnid[wnid]}\n" for wnid in val_wnids))
    return ground_truth, devkit / "meta.mat"


def jpeg_bytes(seed: int, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    photo(*size, seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ILSVRC-2012 as downloaded, and webdataset shards, made from an extracted tree (the same bytes).
TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in files.items():
            add_bytes(archive, name, data)
    return buffer.getvalue()


def ilsvrc_archives(tree: Path, out: Path, ground_truth: Path, meta: Path) -> Path:
    """The three files image-net.org serves, holding tree/train/<WNID>/* (a tar of per-class tars) and
    the flat tree/val/* (a flat tar), and the devkit tar.gz with meta.mat and the ground truth."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as train:
        for class_dir in sorted((tree / "train").iterdir()):
            add_bytes(train, f"{class_dir.name}.tar",
                      tar_bytes({path.name: path.read_bytes() for path in sorted(class_dir.iterdir())}))
    (out / VAL_TAR).write_bytes(tar_bytes({path.name: path.read_bytes() for path in sorted((tree / "val").iterdir())}))
    with tarfile.open(out / DEVKIT, "w:gz", format=tarfile.GNU_FORMAT) as devkit:
        add_bytes(devkit, "ILSVRC2012_devkit_t12/COPYING", b"devkit licence\n")
        add_bytes(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", meta.read_bytes())
        add_bytes(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", ground_truth.read_bytes())
    return out


def webdataset_shards(samples: dict[str, list[tuple[Path, int]]], out: Path) -> Path:
    """out/<name>.tar holding <file stem>.jpg + <file stem>.cls per (image file, label), for
    {shard name: [(file, label)]}."""
    out.mkdir(parents=True, exist_ok=True)
    for name, files in samples.items():
        members = {}
        for path, label in files:
            members[f"{path.stem}.jpg"] = path.read_bytes()
            members[f"{path.stem}.cls"] = f"{label}\n".encode()
        (out / f"{name}.tar").write_bytes(tar_bytes(members))
    return out
