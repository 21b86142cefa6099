"""ImageNet as downloaded (a tar of per-class tars, a flat val tar, the devkit tar.gz) and webdataset
shards as the data root: the betons equal those of the extracted tree, no image file is written on the
way, DVC sees a replaced archive without hashing it, and every bad archive is one line naming it."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import DataParams
from pipeline.data.archives import IMAGE_EXTENSIONS, fingerprint
from pipeline.data.beton import preprocess
from pipeline.data.tree import prepare, read_prepared
from pipeline.errors import DataError
from tests._trees import (
    DEVKIT,
    TRAIN_TAR,
    VAL_TAR,
    WNIDS,
    add_bytes,
    class_folder_tree,
    flat_val_with_devkit,
    ilsvrc_archives,
    jpeg_bytes,
    tar_bytes,
    webdataset_shards,
)
from tests.conftest import clean_copy, ran, without_ray_address, write_params

VAL_WNIDS = [WNIDS[index % 3] for index in range(7)]
GROUND_TRUTH = "devkit/ILSVRC2012_validation_ground_truth.txt"
PREPROCESS = {"max_resolution": 32, "num_workers": 2, "max_skipped_fraction": 0.2, "write_mode": "proportion"}


def special_files(class_dirs: list[Path]) -> None:
    """What the real train archive holds besides plain RGB JPEGs: CMYK JPEGs, a PNG named .JPEG; and a
    corrupt JPEG and a stray text file, which the rules skip (and list) or pass over."""
    Image.new("CMYK", (36, 28), (0, 255, 255, 0)).save(class_dirs[0] / f"{class_dirs[0].name}_cmyk.JPEG", quality=95)
    png = io.BytesIO()
    Image.new("RGB", (30, 40), (10, 200, 30)).save(png, format="PNG")
    (class_dirs[1] / f"{class_dirs[1].name}_png.JPEG").write_bytes(png.getvalue())
    (class_dirs[2] / f"{class_dirs[2].name}_bad.JPEG").write_bytes(jpeg_bytes(7)[:300])
    (class_dirs[2] / "README.txt").write_text("not an image\n")


def betons(data: dict, folder: Path) -> tuple[dict, dict]:
    """(sha256 of each split's .beton, the report) written by the real prepare and preprocess."""
    _, params = write_params(folder, {"data": data, "preprocess": PREPROCESS})
    prepared = prepare(params.data, folder / "prepared")
    report = preprocess(prepared, folder / "beton", params.preprocess)
    digests = {split: hashlib.sha256((folder / "beton" / f"{split}.beton").read_bytes()).hexdigest()
               for split in ("train", "val")}
    return digests, report


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> dict:
    """An extracted ILSVRC-2012-shaped tree (flat val + devkit), the same images as the three files
    image-net.org serves and as webdataset shards, and the betons of the tree."""
    base = tmp_path_factory.mktemp("imagenet")
    tree = class_folder_tree(base / "tree", {"train": {wnid: 4 for wnid in WNIDS}})
    special_files(sorted((tree / "train").iterdir()))
    ground_truth, meta = flat_val_with_devkit(tree, VAL_WNIDS, WNIDS)
    archives = ilsvrc_archives(tree, base / "download", ground_truth, meta)
    tree_data = {"source": "imagenet", "root": str(tree), "val_ground_truth": GROUND_TRUTH,
                 "devkit_meta": "devkit/meta.mat"}
    tree_betons, tree_report = betons(tree_data, base / "from-tree")
    return {"base": base, "tree": tree, "archives": archives, "betons": tree_betons, "report": tree_report}


def data_params(root: Path, source: str = "imagenet") -> DataParams:
    return DataParams.model_validate({"source": source, "root": str(root), "val_ground_truth": None,
                                      "devkit_meta": None, "digits_image_size": 80, "digits_val_fraction": 0.2,
                                      "seed": 0})


def replace_last_val_image(root: Path) -> None:
    """The val archive replaced by one of the same size and modification time, one pixel byte apart."""
    path = root / VAL_TAR
    with tarfile.open(path) as val:
        last = val.getmembers()[-1]
    status, data = path.stat(), bytearray(path.read_bytes())
    data[last.offset_data + last.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def reasons(report: dict, key: str, field: str) -> list[tuple[str, str, str]]:
    """(split, file name, reason) of the report's skipped or converted files, wherever they lie."""
    return sorted((row["split"], Path(row["path"]).stem, row[field].split(" named ")[0]) for row in report[key])


def test_betons_from_the_archives_equal_those_of_the_extracted_tree(download, tmp_path):
    digests, report = betons({"source": "imagenet", "root": str(download["archives"])}, tmp_path)
    assert digests == download["betons"]
    tree_report = download["report"]
    assert report["train"]["images"] == tree_report["train"]["images"] == 3 * 4 + 2
    assert reasons(report, "skipped_files", "reason") == reasons(tree_report, "skipped_files", "reason")
    assert [row[1] for row in reasons(report, "skipped_files", "reason")] == [f"{WNIDS[2]}_bad"]
    assert reasons(report, "converted_files", "conversion") == reasons(tree_report, "converted_files", "conversion")
    prepared = read_prepared(tmp_path / "prepared")
    member = next(sample for sample in prepared.splits["train"] if sample.path.endswith("_png.JPEG"))
    assert (member.archive, member.path) == (TRAIN_TAR, f"{TRAIN_TAR}/{WNIDS[1]}.tar/{WNIDS[1]}_png.JPEG")
    ignored = (tmp_path / "prepared" / "ignored.csv").read_text().splitlines()
    assert ignored[1:] == [f"{download['archives'] / TRAIN_TAR}:{WNIDS[2]}.tar/README.txt,not an image file (by its extension)"]


def test_webdataset_shards_give_the_same_betons(download, tmp_path):
    tree = read_prepared(download["base"] / "from-tree" / "prepared")
    files = {split: [(tree.image_path(sample), sample.label) for sample in samples]
             for split, samples in tree.splits.items()}
    # Class 2 in a shard of its own: a split spread over several shards, read in name order.
    shards = webdataset_shards({
        "imagenet-train-0000": [item for item in files["train"] if item[1] < 2],
        "imagenet-train-0001": [item for item in files["train"] if item[1] == 2],
        "imagenet-validation-00": files["val"],
    }, tmp_path / "shards")
    (shards / "classes.txt").write_text("\n".join(tree.classes) + "\n")
    digests, report = betons({"source": "webdataset", "root": str(shards), "class_names": "classes.txt"},
                             tmp_path / "out")
    assert digests == download["betons"]
    assert report["val"]["per_class"] == download["report"]["val"]["per_class"]


def test_fingerprint_notices_a_replaced_archive_of_the_same_size_and_time(download, tmp_path):
    root = shutil.copytree(download["archives"], tmp_path / "download")
    params = data_params(root)
    before = fingerprint(params)
    assert [entry["name"] for entry in before["archives"]] == [TRAIN_TAR, VAL_TAR, DEVKIT]
    assert fingerprint(params) == before
    replace_last_val_image(root)
    after = fingerprint(params)
    assert after != before and after["archives"][0] == before["archives"][0]


def copy_download(download: dict, folder: Path) -> Path:
    return shutil.copytree(download["archives"], folder / "download")


def inner_tars(root: Path) -> dict[str, bytes]:
    with tarfile.open(root / TRAIN_TAR) as train:
        return {member.name: train.extractfile(member).read() for member in train}


def write_train(root: Path, members: dict[str, bytes]) -> None:
    (root / TRAIN_TAR).write_bytes(tar_bytes(members))


def truncated_train(root: Path) -> str:
    data = (root / TRAIN_TAR).read_bytes()
    (root / TRAIN_TAR).write_bytes(data[: len(data) // 2])
    return TRAIN_TAR


def corrupt_inner_tar(root: Path) -> str:
    members = inner_tars(root)
    inner = members[f"{WNIDS[1]}.tar"]
    with tarfile.open(fileobj=io.BytesIO(inner)) as class_tar:
        second = class_tar.getmembers()[1].offset
    members[f"{WNIDS[1]}.tar"] = inner[:second] + b"\x7f" * 512 + inner[second + 512:]
    write_train(root, members)
    return f"{WNIDS[1]}.tar"


def flat_train(root: Path) -> str:
    write_train(root, {"n01440764_1.JPEG": jpeg_bytes(1), "n01440764_2.JPEG": jpeg_bytes(2)})
    return "n01440764_1.JPEG is not a per-class tar"


def val_in_folders(root: Path) -> str:
    (root / VAL_TAR).write_bytes(tar_bytes({"n01440764/ILSVRC2012_val_00000001.JPEG": jpeg_bytes(1)}))
    return "lies in a folder"


def val_count_mismatch(root: Path) -> str:
    with tarfile.open(root / VAL_TAR) as val:
        members = {member.name: val.extractfile(member).read() for member in val}
    members.pop(sorted(members)[-1])
    (root / VAL_TAR).write_bytes(tar_bytes(members))
    return f"7 labels, but {root / VAL_TAR} holds 6 images"


def missing_devkit(root: Path) -> str:
    (root / DEVKIT).unlink()
    return f"{DEVKIT}: not found"


def devkit_without_meta(root: Path) -> str:
    with tarfile.open(root / DEVKIT, "w:gz") as devkit:
        add_bytes(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"1\n")
    return "no data/meta.mat in it"


def devkit_not_gzip(root: Path) -> str:
    (root / DEVKIT).write_bytes(b"<html>404</html>")
    return f"{DEVKIT}: not a readable tar.gz"


def meta_not_a_mat_file(root: Path) -> str:
    with tarfile.open(root / DEVKIT, "w:gz") as devkit:
        add_bytes(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", b"not MATLAB")
        add_bytes(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"1\n")
    return "data/meta.mat: not a devkit meta.mat"


@pytest.mark.parametrize("damage", [truncated_train, corrupt_inner_tar, flat_train, val_in_folders,
                                    val_count_mismatch, missing_devkit, devkit_without_meta, devkit_not_gzip,
                                    meta_not_a_mat_file])
def test_a_bad_archive_is_one_line_naming_it_and_nothing_is_written(download, tmp_path, damage):
    root = copy_download(download, tmp_path)
    expected = damage(root)
    params = data_params(root)
    with pytest.raises(DataError) as error:
        prepare(params, tmp_path / "prepared")
    message = str(error.value)
    assert expected in message and "\n" not in message and str(root) in message
    assert not (tmp_path / "prepared").exists()


def test_a_webdataset_sample_without_a_label_is_named(tmp_path):
    (tmp_path / "train-0.tar").write_bytes(tar_bytes({"a.jpg": jpeg_bytes(1), "a.cls": b"0", "b.jpg": jpeg_bytes(2)}))
    (tmp_path / "val-0.tar").write_bytes(tar_bytes({"c.jpg": jpeg_bytes(3), "c.cls": b"0"}))
    params = data_params(tmp_path, source="webdataset")
    with pytest.raises(DataError, match=r"train-0.tar: sample b has no .cls label"):
        prepare(params, tmp_path / "prepared")


def image_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS]


def dvc(repo: Path, *arguments: str, env: dict) -> str:
    result = subprocess.run(["dvc", *arguments], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"dvc {' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_dvc_runs_the_data_stages_from_the_archives_and_sees_one_replaced(download, tmp_path):
    root = copy_download(download, tmp_path)
    repo = clean_copy(tmp_path / "repo", {"data": {"source": "imagenet", "root": str(root)}, "preprocess": PREPROCESS})
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = without_ray_address() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                                   "TMPDIR": str(scratch)}
    assert ran(dvc(repo, "repro", "preprocess", env=env)) == {"source", "prepare", "preprocess"}
    for split, digest in download["betons"].items():
        assert hashlib.sha256((repo / "data" / "beton" / f"{split}.beton").read_bytes()).hexdigest() == digest
    # Not a single image file written on the way, in the project or in the temporary folder.
    assert image_files(repo) == [] and image_files(scratch) == [] and image_files(root) == []
    assert ran(dvc(repo, "repro", "preprocess", env=env)) == {"source"}

    replace_last_val_image(root)
    assert ran(dvc(repo, "repro", "preprocess", env=env)) == {"source", "prepare", "preprocess"}


def test_shard_settings_belong_to_the_webdataset_source():
    with pytest.raises(ValueError, match="data.train_shards is for data.source webdataset, not 'imagenet'"):
        DataParams.model_validate(data_params("/data").model_dump() | {"train_shards": "*-train-*.tar"})


def test_the_archives_with_devkit_keys_set_are_refused(download, tmp_path):
    params = DataParams.model_validate(data_params(download["archives"]).model_dump() | {
        "val_ground_truth": GROUND_TRUTH, "devkit_meta": "devkit/meta.mat"})
    with pytest.raises(DataError, match="for an extracted tree: set them null"):
        prepare(params, tmp_path / "prepared")
