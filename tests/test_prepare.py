"""The prepare stage on small trees in the ILSVRC-2012 layouts, on the embedded digits, and on every
layout error it must report before doing any work."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import DataParams
from pipeline.data.tree import prepare, read_prepared
from pipeline.errors import DataError
from tests._trees import WNIDS, class_folder_tree, flat_val_with_devkit, write_photo
from tests.conftest import start_stage, write_params_dict


def data_params(params_dict: dict, **changes) -> DataParams:
    return DataParams.model_validate(params_dict["data"] | changes)


def manifest(folder: Path, split: str) -> list[tuple[str, int]]:
    with (folder / f"{split}.csv").open(newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["path", "label"]
    return [(path, int(label)) for path, label in rows[1:]]


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_class_folder_tree_is_indexed_in_place(tmp_path, params_dict):
    root = class_folder_tree(
        tmp_path / "ilsvrc", {"train": {WNIDS[2]: 2, WNIDS[0]: 3, WNIDS[1]: 1}, "val": {WNIDS[0]: 1, WNIDS[2]: 2}}
    )
    # Extensions in any case are images; other files and hidden files are not.
    write_photo(root / "train" / WNIDS[1] / "lower.jpeg", 7)
    write_photo(root / "train" / WNIDS[1] / "upper.PNG", 8, format="PNG")
    (root / "train" / WNIDS[1] / "notes.txt").write_text("not an image")
    write_photo(root / "train" / WNIDS[1] / ".hidden.JPEG", 9)
    out = tmp_path / "prepared"

    dataset = prepare(data_params(params_dict, source="imagenet", root=str(root)), out)

    index = json.loads((out / "classes.json").read_text())
    assert index == {"root": str(root.resolve()), "classes": sorted(WNIDS)}
    assert manifest(out, "train") == [
        (f"train/{WNIDS[0]}/{WNIDS[0]}_0.JPEG", 0),
        (f"train/{WNIDS[0]}/{WNIDS[0]}_1.JPEG", 0),
        (f"train/{WNIDS[0]}/{WNIDS[0]}_2.JPEG", 0),
        (f"train/{WNIDS[1]}/lower.jpeg", 1),
        (f"train/{WNIDS[1]}/{WNIDS[1]}_0.JPEG", 1),
        (f"train/{WNIDS[1]}/upper.PNG", 1),
        (f"train/{WNIDS[2]}/{WNIDS[2]}_0.JPEG", 2),
        (f"train/{WNIDS[2]}/{WNIDS[2]}_1.JPEG", 2),
    ]
    assert manifest(out, "val") == [
        (f"val/{WNIDS[0]}/{WNIDS[0]}_0.JPEG", 0),
        (f"val/{WNIDS[2]}/{WNIDS[2]}_0.JPEG", 2),
        (f"val/{WNIDS[2]}/{WNIDS[2]}_1.JPEG", 2),
    ]
    # Images are referenced, not copied.
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "train.csv", "val.csv"]
    assert all(dataset.image_path(sample).is_file() for sample in dataset.splits["train"])
    assert read_prepared(out) == dataset


def test_flat_ilsvrc_val_is_labelled_from_the_devkit(tmp_path, params_dict):
    root = class_folder_tree(tmp_path / "ilsvrc", {"train": {wnid: 1 for wnid in WNIDS}})
    val_wnids = [WNIDS[2], WNIDS[0], WNIDS[2], WNIDS[1], WNIDS[0]]
    ground_truth, meta = flat_val_with_devkit(root, val_wnids, WNIDS)
    out = tmp_path / "prepared"

    # Devkit paths may be given relative to the root.
    params = data_params(
        params_dict, source="imagenet", root=str(root), val_ground_truth=str(ground_truth.relative_to(root)),
        devkit_meta=str(meta),
    )
    prepare(params, out)

    expected = sorted(
        ((f"val/ILSVRC2012_val_{i:08d}.JPEG", WNIDS.index(wnid)) for i, wnid in enumerate(val_wnids, start=1)),
        key=lambda row: (row[1], row[0]),
    )
    assert manifest(out, "val") == expected


def test_digits_default_is_a_deterministic_imagenet_style_tree(tmp_path, params_dict):
    params = data_params(params_dict, source="digits", digits_image_size=48, digits_val_fraction=0.2, seed=3)

    first = prepare(params, tmp_path / "first")
    prepare(params, tmp_path / "second")

    assert tree_digest(tmp_path / "first") == tree_digest(tmp_path / "second")
    assert first.classes == [f"digit_{d}" for d in range(10)]
    assert first.root == (tmp_path / "first" / "images").resolve()
    assert json.loads((tmp_path / "first" / "classes.json").read_text())["root"] == "images"
    train, val = first.splits["train"], first.splits["val"]
    assert (len(train), len(val)) == (1437, 360)  # load_digits has 1,797 images
    assert len({Path(s.path).name for s in train + val}) == 1797  # each digit in one split only
    # Stratified: every class holds out ~20 % of its images.
    for label in range(10):
        in_train = sum(s.label == label for s in train)
        in_val = sum(s.label == label for s in val)
        assert abs(in_val / (in_train + in_val) - 0.2) < 0.02
    sample = train[0]
    assert sample.path.startswith("train/digit_0/") and sample.path.endswith(".JPEG")
    with Image.open(first.image_path(sample)) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))

    # Another seed draws another split.
    other = prepare(data_params(params_dict, source="digits", digits_image_size=48, seed=4), tmp_path / "other")
    assert {s.path for s in other.splits["val"]} != {s.path for s in val}


def build_error_case(case: str, tmp_path: Path) -> tuple[dict, str]:
    """A broken tree for `case`; returns (data params changes, the path the error must name)."""
    root = tmp_path / "ilsvrc"
    if case == "missing root":
        return {"root": str(root)}, str(root)
    class_folder_tree(root, {"train": {WNIDS[0]: 1, WNIDS[1]: 1}, "val": {WNIDS[0]: 1}})
    if case in ("missing train", "missing val"):
        split_dir = root / case.split()[1]
        shutil.rmtree(split_dir)
        return {"root": str(root)}, str(split_dir)
    if case == "empty class folder":
        (root / "train" / WNIDS[2]).mkdir()
        (root / "train" / WNIDS[2] / "readme.txt").write_text("no images here")
        return {"root": str(root)}, str(root / "train" / WNIDS[2])
    if case == "val class unknown to train":
        write_photo(root / "val" / "n99999999" / "a.JPEG", 5)
        return {"root": str(root)}, "n99999999"
    if case == "no images at all in val":
        (root / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").unlink()
        (root / "val" / WNIDS[0]).rmdir()
        return {"root": str(root)}, str(root / "val")
    if case == "no class folders in train":
        for path in (root / "train").rglob("*.JPEG"):
            path.rename(root / "train" / path.name)
        for folder in (root / "train").iterdir():
            if folder.is_dir():
                folder.rmdir()
        return {"root": str(root)}, str(root / "train")
    (root / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").unlink()
    (root / "val" / WNIDS[0]).rmdir()
    ground_truth, meta = flat_val_with_devkit(root, [WNIDS[0], WNIDS[1]], WNIDS)
    devkit = {"val_ground_truth": str(ground_truth), "devkit_meta": str(meta)}
    if case == "ground truth too short":
        ground_truth.write_text(ground_truth.read_text().splitlines()[0] + "\n")
        return {"root": str(root)} | devkit, str(ground_truth)
    if case == "ground truth id unknown":
        ground_truth.write_text("1\n999\n")
        return {"root": str(root)} | devkit, f"{ground_truth}:2"
    if case == "flat val without devkit":
        return {"root": str(root)}, str(root / "val")
    if case == "missing meta.mat":
        meta.unlink()
        return {"root": str(root)} | devkit, str(meta)
    raise AssertionError(case)


ERROR_CASES = [
    "missing root",
    "missing train",
    "missing val",
    "empty class folder",
    "val class unknown to train",
    "no images at all in val",
    "no class folders in train",
    "ground truth too short",
    "ground truth id unknown",
    "flat val without devkit",
    "missing meta.mat",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_layout_errors_name_the_path_and_write_nothing(case, tmp_path, params_dict):
    changes, named_path = build_error_case(case, tmp_path)
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=re.escape(named_path)):
        prepare(data_params(params_dict, source="imagenet", **changes), out)
    assert not out.exists()
    assert not list(tmp_path.glob(".prepared*"))


def prepare_params(tmp_path: Path, params_dict: dict, **data_changes) -> Path:
    params_dict["data"] |= data_changes
    return write_params_dict(tmp_path, params_dict)


def start_prepare(params: Path, out: Path) -> subprocess.Popen:
    return start_stage("prepare", "--params", str(params), "--out", str(out), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)


@pytest.mark.timeout(60)
def test_stage_reports_input_errors_in_one_line_with_status_2(tmp_path, params_dict):
    params_dict["data"]["digits_image_size"] = "large"
    stage = start_prepare(prepare_params(tmp_path, params_dict), tmp_path / "out")
    _, stderr = stage.communicate()
    assert stage.returncode == 2
    assert "data.digits_image_size" in stderr and "Traceback" not in stderr

    params = prepare_params(tmp_path, params_dict, digits_image_size=96, source="folder", root=str(tmp_path / "nowhere"))
    stage = start_prepare(params, tmp_path / "out")
    _, stderr = stage.communicate()
    assert stage.returncode == 2
    assert str(tmp_path / "nowhere") in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_killed_stage_leaves_nothing_at_the_output_and_reruns(tmp_path, params_dict):
    params = prepare_params(tmp_path, params_dict, digits_image_size=128)
    out = tmp_path / "prepared"
    stage = start_prepare(params, out)
    partial_images = tmp_path / ".prepared.partial" / "images"
    deadline = time.monotonic() + 30
    while not partial_images.exists() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(stage.pid, signal.SIGKILL)
    stage.wait()
    assert stage.returncode == -signal.SIGKILL, "the stage finished before it could be killed mid-write"
    assert not out.exists()

    rerun = start_prepare(params, out)
    rerun.communicate()
    assert rerun.returncode == 0
    assert len(manifest(out, "train")) == 1437
    assert not (tmp_path / ".prepared.partial").exists()
