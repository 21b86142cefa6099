"""The preprocess stage: every kind of bad image converted or skipped without hanging, the skip
threshold, the short-side resize, byte-identical .beton files in FFCV's own layout, dataset.json, and
no .beton left behind by a killed run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from ffcv.fields import IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.writer import DatasetWriter
from PIL import Image

from pipeline.config import DataParams, PreprocessParams
from pipeline.data.beton import preprocess, worker_pool, write_beton
from pipeline.data.dataset import Dataset
from pipeline.data.images import load_rgb
from pipeline.data.tree import prepare, read_tree
from pipeline.errors import DataError
from tests._trees import WNIDS, class_folder_tree, jpeg_bytes, write_photo
from tests.conftest import run_stage, start_stage, write_params_dict

MAX_RESOLUTION = 64


def preprocess_params(params_dict: dict, **changes) -> PreprocessParams:
    return PreprocessParams.model_validate(
        params_dict["preprocess"] | {"max_resolution": MAX_RESOLUTION, "num_workers": 2} | changes
    )


def stored_pixels(beton: Path, index: int) -> np.ndarray:
    """The raw pixels FFCV stored for sample `index` (written with write_mode "raw")."""
    image = Reader(str(beton)).metadata["f0"][index]  # f0: the image field
    assert image["mode"] == 1, "expected a raw (not JPEG) sample"
    count = int(image["height"]) * int(image["width"]) * 3
    pixels = np.fromfile(beton, dtype=np.uint8, count=count, offset=int(image["data_ptr"]))
    return pixels.reshape(int(image["height"]), int(image["width"]), 3)


def stored_labels(beton: Path) -> list[int]:
    return Reader(str(beton)).metadata["f1"].tolist()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_odd_images(folder: Path) -> dict[str, tuple[str, object]]:
    """One file per kind the checker must handle: name -> ("converted", expected RGB pixel) or
    ("skipped", words of the reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    size = (40, 30)
    Image.new("L", size, 77).save(folder / "grey.JPEG", quality=100)
    Image.new("CMYK", size, (0, 255, 255, 0)).save(folder / "cmyk.JPEG", quality=100)
    Image.new("RGBA", size, (10, 200, 30, 128)).save(folder / "rgba.png")
    Image.new("RGB", size, (250, 40, 90)).quantize(4).save(folder / "palette.png")
    Image.fromarray(np.full(size[::-1], 40_000, np.uint16)).save(folder / "sixteen_bit.png")
    Image.new("RGB", size, (12, 34, 56)).save(folder / "png_named.JPEG", format="PNG")
    (folder / "truncated.JPEG").write_bytes(jpeg_bytes(1)[:400])
    (folder / "zero_bytes.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_text("this is not an image\n")
    rng = np.random.default_rng(0)
    (folder / "garbage.JPEG").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (folder / "jpeg_header_garbage.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 2000, np.uint8).tobytes())
    return {
        "grey.JPEG": ("converted", (77, 77, 77)),
        "cmyk.JPEG": ("converted", (255, 0, 0)),
        "rgba.png": ("converted", (10, 200, 30)),
        "palette.png": ("converted", (250, 40, 90)),
        "sixteen_bit.png": ("converted", (155, 155, 155)),  # 40000 // 257
        "png_named.JPEG": ("converted", (12, 34, 56)),
        "truncated.JPEG": ("skipped", "cannot be decoded"),
        "zero_bytes.JPEG": ("skipped", "empty file"),
        "text.JPEG": ("skipped", "not an image"),
        "garbage.JPEG": ("skipped", "not an image"),
        "jpeg_header_garbage.JPEG": ("skipped", "cannot be decoded"),
    }


@pytest.mark.timeout(120)
def test_odd_images_are_converted_or_skipped_and_reported(tmp_path, params_dict):
    root = class_folder_tree(tmp_path / "tree", {"train": {WNIDS[0]: 3, WNIDS[1]: 2}, "val": {WNIDS[0]: 2}})
    odd = write_odd_images(root / "train" / WNIDS[1])
    write_photo(root / "train" / WNIDS[0] / "large.JPEG", 5, size=(300, 120))
    prepared = read_tree(root)
    out = tmp_path / "beton"

    report = preprocess(prepared, out, preprocess_params(params_dict, write_mode="raw", max_skipped_fraction=0.5))

    train = report["train"]
    skipped = {kind: reason for kind, (outcome, reason) in odd.items() if outcome == "skipped"}
    converted = {kind: rgb for kind, (outcome, rgb) in odd.items() if outcome == "converted"}
    assert (train["files"], train["images"], train["skipped"]) == (17, 17 - len(skipped), len(skipped))
    assert (train["converted"], train["resized"]) == (len(converted), 1)
    assert train["per_class"] == {WNIDS[0]: 4, WNIDS[1]: 2 + len(converted)}
    assert train["bytes"] == (out / "train.beton").stat().st_size
    assert report["val"]["images"] == 2 and report["val"]["per_class"] == {WNIDS[0]: 2, WNIDS[1]: 0}
    reasons = {Path(entry["path"]).name: entry["reason"] for entry in report["skipped_files"]}
    assert reasons.keys() == skipped.keys()
    for name, words in skipped.items():
        assert words in reasons[name], reasons[name]
    conversions = {Path(entry["path"]).name: entry["conversion"] for entry in report["converted_files"]}
    assert conversions.keys() == converted.keys()
    assert "PNG data named .JPEG" in conversions["png_named.JPEG"]
    assert "CMYK" in conversions["cmyk.JPEG"] and "16-bit" in conversions["sixteen_bit.png"]

    # What FFCV stored: every kept image as RGB uint8, the large one shrunk to the long side exactly.
    kept = [s for s in prepared.splits["train"] if Path(s.path).name not in skipped]
    beton = out / "train.beton"
    assert stored_labels(beton) == [s.label for s in kept]
    for index, sample in enumerate(kept):
        pixels = stored_pixels(beton, index)
        name = Path(sample.path).name
        if name == "large.JPEG":
            assert pixels.shape == (26, MAX_RESOLUTION, 3)  # 120 * 64 / 300 = 25.6
        elif name in converted:
            assert pixels.shape == (30, 40, 3)
            assert np.abs(pixels.astype(int) - converted[name]).max() <= 2, name
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train.beton", "val.beton"]


@pytest.mark.timeout(60)
def test_too_many_unusable_files_fail_the_split_and_write_nothing(tmp_path, params_dict):
    root = class_folder_tree(tmp_path / "tree", {"train": {WNIDS[0]: 4}, "val": {WNIDS[0]: 3}})
    (root / "val" / WNIDS[0] / "broken.JPEG").write_bytes(b"")
    out = tmp_path / "beton"

    # val is written first and stops at its first file (broken.JPEG sorts first): 1 > 0.2 * 4.
    with pytest.raises(DataError, match=r"^val: at least 1 of 4 files cannot be used \(found in the first 1\), "
                                        r"above preprocess.max_skipped_fraction=0.2; nothing .*broken.JPEG"):
        preprocess(read_tree(root), out, preprocess_params(params_dict, max_skipped_fraction=0.2))
    assert not out.exists() or not list(out.iterdir())

    # A split that would end up empty fails whatever the threshold.
    for image in (root / "val" / WNIDS[0]).glob(f"{WNIDS[0]}_*"):
        image.write_text("not an image")
    with pytest.raises(DataError, match=r"^val: 4 of 4 files"):
        preprocess(read_tree(root), out, preprocess_params(params_dict, max_skipped_fraction=1.0))


@pytest.mark.timeout(60)
def test_an_unusable_file_given_straight_to_write_beton_is_skipped_or_an_error_never_a_hang(tmp_path, params_dict):
    good = write_photo(tmp_path / "good.JPEG", 1)
    (tmp_path / "changed.JPEG").write_bytes(b"no longer an image")  # as if it changed after prepare listed it
    images, beton = [good, tmp_path / "changed.JPEG", good], tmp_path / "out.beton"

    checks = write_beton(beton, images, [0, 1, 2], preprocess_params(params_dict, max_skipped_fraction=0.5))
    assert [bool(check.skip_reason) for check in checks] == [False, True, False]
    assert stored_labels(beton) == [0, 2]

    with pytest.raises(DataError, match="changed.JPEG: not an image"):
        write_beton(beton, images, [0, 1, 2], preprocess_params(params_dict, max_skipped_fraction=0.01))
    assert not beton.exists()


def spawned_children() -> set[int]:
    """PIDs of this process's children that multiprocessing spawned (worker pools)."""
    pids = set()
    for child in psutil.Process().children():
        try:
            if "multiprocessing.spawn" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:  # it exited meanwhile
            pass
    return pids


@pytest.mark.timeout(90)
def test_a_worker_process_that_dies_is_an_error_not_a_hang(tmp_path, params_dict):
    images = [write_photo(tmp_path / f"{index}.JPEG", index, size=(320, 240)) for index in range(40)]
    params = preprocess_params(params_dict, max_resolution=320)
    beton = tmp_path / "out.beton"
    before = spawned_children()

    with worker_pool(params) as pool, ThreadPoolExecutor(1) as caller:
        # Pass the 40 images 20 times: the write lasts long enough to kill a worker in the middle.
        writing = caller.submit(write_beton, beton, images * 20, list(range(800)), params, pool)
        deadline = time.monotonic() + 60
        while not (spawned_children() - before) and not writing.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = spawned_children() - before
        assert workers, "no worker process appeared"
        os.kill(min(workers), signal.SIGKILL)
        with pytest.raises(RuntimeError, match="a worker process died"):
            writing.result(timeout=60)
    assert not beton.exists()


@pytest.mark.timeout(120)
def test_beton_bytes_depend_only_on_inputs_and_params(tmp_path, params_dict):
    data = params_dict["data"] | {"digits_image_size": 32}

    prepared = prepare(DataParams.model_validate(data), tmp_path / "prepared")
    params = preprocess_params(params_dict, write_mode="proportion", compress_probability=0.5, seed=7)

    # Different worker counts change only the scheduling, never the bytes; null means every core.
    preprocess(prepared, tmp_path / "first", params)
    preprocess(prepared, tmp_path / "second", params.model_copy(update={"num_workers": 1}))
    preprocess(prepared, tmp_path / "every_core", params.model_copy(update={"num_workers": None}))
    preprocess(prepared, tmp_path / "other_seed", params.model_copy(update={"seed": 8}))

    for split in ("train", "val"):
        runs = ("first", "second", "every_core", "other_seed")
        hashes = {run: sha256(tmp_path / run / f"{split}.beton") for run in runs}
        assert hashes["first"] == hashes["second"] == hashes["every_core"] != hashes["other_seed"]
    modes = Reader(str(tmp_path / "first" / "train.beton")).metadata["f0"]["mode"]
    assert 0.4 < (modes == 0).mean() < 0.6  # mode 0 = JPEG, drawn with compress_probability


def preprocess_arguments(tmp_path: Path, params_dict: dict, prepared: Path, out: Path) -> list[str]:
    return ["--params", str(write_params_dict(tmp_path, params_dict)), "--prepared", str(prepared), "--out", str(out),
            "--report", str(tmp_path / "report.json")]


@pytest.mark.timeout(180)
def test_killed_stage_leaves_no_beton_and_a_rerun_succeeds(tmp_path, params_dict):
    # Enough large photos that writing train.beton takes a few seconds.
    root = class_folder_tree(tmp_path / "tree", {"train": {WNIDS[0]: 150, WNIDS[1]: 150}, "val": {WNIDS[0]: 4}},
                             size=(320, 240))
    prepare_params = params_dict["data"] | {"source": "folder", "root": str(root)}

    prepare(DataParams.model_validate(prepare_params), tmp_path / "prepared")
    params_dict["preprocess"] |= {"write_mode": "jpg", "max_resolution": 320, "num_workers": 2}
    out = tmp_path / "beton"

    # Its own session, so the kill reaches the worker processes too.
    arguments = preprocess_arguments(tmp_path, params_dict, tmp_path / "prepared", out)
    stage = start_stage("preprocess", *arguments, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(partial.stat().st_size for partial in out.glob(".train.beton.*.partial")) and stage.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(stage.pid, signal.SIGKILL)
    stage.wait()
    assert stage.returncode == -signal.SIGKILL, "the stage finished before it could be killed mid-write"
    assert not any((out / name).exists() for name in ("train.beton", "val.beton", "dataset.json"))
    assert not (tmp_path / "report.json").exists()

    run_stage("preprocess", *arguments)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train.beton", "val.beton"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["train"]["images"] == 300 and report["val"]["images"] == 4
    assert len(stored_labels(out / "train.beton")) == 300


@pytest.mark.timeout(60)
def test_page_size_grows_with_max_resolution(tmp_path, params_dict):
    # 1,700 x 1,700 x 3 raw bytes do not fit FFCV's default 8 MiB page, where the writer would hang.
    large = tmp_path / "large.png"
    Image.fromarray(np.tile(np.arange(1700, dtype=np.uint8)[:, None, None], (1, 1700, 3))).save(large)
    params = preprocess_params(params_dict, write_mode="raw", max_resolution=1700)
    write_beton(tmp_path / "large.beton", [large], [0], params)
    assert stored_pixels(tmp_path / "large.beton", 0).shape == (1700, 1700, 3)

    with pytest.raises(DataError, match="preprocess.max_resolution=30000"):
        write_beton(tmp_path / "huge.beton", [large], [0], preprocess_params(params_dict, max_resolution=30_000))


@pytest.mark.timeout(60)
def test_short_side_resizes_up_or_down_and_the_long_side_stays_capped(tmp_path, params_dict):
    sizes = {"photo": (500, 375), "small": (200, 150), "panorama": (1000, 100), "portrait": (375, 500)}
    images = [write_photo(tmp_path / f"{name}.JPEG", seed, size) for seed, (name, size) in enumerate(sizes.items())]
    params = preprocess_params(params_dict, write_mode="raw", max_resolution=512, short_side=256)

    write_beton(tmp_path / "out.beton", images, [0, 1, 2, 3], params)

    stored = [stored_pixels(tmp_path / "out.beton", index) for index in range(len(images))]
    # (width, height): 500 * 256 / 375 = 341.3; the panorama's long side would be 2,560, so it is capped.
    assert [(pixels.shape[1], pixels.shape[0]) for pixels in stored] == [(341, 256), (341, 256), (512, 51), (256, 341)]
    # load_rgb gives exactly the stored pixels (what a prediction on a new image must see).
    for path, pixels in zip(images, stored):
        assert np.array_equal(load_rgb(path, max_resolution=512, short_side=256)[0], pixels)
    checks = [load_rgb(path, 512, 256)[1] for path in images]
    assert [check.resized_from for check in checks] == list(sizes.values())

    # Without short_side only images over max_resolution shrink, so the long side is exact.
    shapes = [load_rgb(path, 400)[0].shape for path in images]
    assert shapes == [(300, 400, 3), (150, 200, 3), (40, 400, 3), (400, 300, 3)]

    with pytest.raises(ValueError, match="short_side=300 exceeds preprocess.max_resolution=256"):
        preprocess_params(params_dict, max_resolution=256, short_side=300)


class PixelsOfLoadRgb:
    """What FFCV's own DatasetWriter is fed to compare with: load_rgb's pixels, the global np.random
    seeded per sample as image_check seeds its write_mode "proportion" draw."""

    def __init__(self, images: list[Path], params: PreprocessParams):
        self.images, self.params = images, params

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        np.random.seed([self.params.seed, index])
        return load_rgb(self.images[index], self.params.max_resolution, self.params.short_side)[0], index


@pytest.mark.timeout(60)
def test_the_beton_is_byte_for_byte_what_ffcvs_own_writer_writes(tmp_path, params_dict):
    # Sizes that fill pages unevenly (page: 2 MiB; a 120 x 90 raw sample is 32 kB) and need resizing.
    images = [write_photo(tmp_path / f"{index}.JPEG", index, size=(100 + index % 7 * 13, 70 + index % 5 * 11))
              for index in range(90)]
    params = preprocess_params(params_dict, write_mode="proportion", max_resolution=120, short_side=90, seed=3)
    fields = {
        "image": RGBImageField(write_mode="proportion", max_resolution=120, jpeg_quality=params.jpeg_quality,
                               compress_probability=params.compress_probability),
        "label": IntField(),
    }
    ffcv_beton = tmp_path / "ffcv.beton"
    writer = DatasetWriter(str(ffcv_beton), fields, page_size=2 << 20, num_workers=1)
    writer.from_indexed_dataset(PixelsOfLoadRgb(images, params))

    write_beton(tmp_path / "ours.beton", images, list(range(len(images))), params)

    assert sha256(tmp_path / "ours.beton") == sha256(ffcv_beton)
    modes = Reader(str(ffcv_beton)).metadata["f0"]["mode"]
    assert 0 < modes.sum() < len(images)  # both raw and JPEG samples compared


@pytest.mark.timeout(60)
def test_dataset_json_describes_the_betons_and_keeps_classes_with_no_image(tmp_path, params_dict):
    root = class_folder_tree(tmp_path / "tree", {"train": {WNIDS[0]: 3, WNIDS[1]: 2}, "val": {WNIDS[0]: 2}})
    (root / "train" / WNIDS[2]).mkdir()
    (root / "train" / WNIDS[2] / "only.JPEG").write_bytes(b"")  # the class's only image is unusable
    prepared = read_tree(root)
    params = preprocess_params(params_dict, max_skipped_fraction=0.5)

    preprocess(prepared, tmp_path / "beton", params)

    dataset = Dataset.read(tmp_path / "beton")
    assert dataset.classes == prepared.classes == WNIDS and dataset.num_classes == 3
    assert dataset.preprocess == params.model_dump()
    for split, images in (("train", 5), ("val", 2)):
        beton = dataset.files[split]
        assert beton.path == tmp_path / "beton" / f"{split}.beton"
        assert (beton.images, beton.bytes, beton.sha256) == (images, beton.path.stat().st_size, sha256(beton.path))
        assert len(stored_labels(beton.path)) == images
    written = json.loads((tmp_path / "beton" / "dataset.json").read_text())
    assert written["format"] == 1 and written["splits"]["val"]["file"] == "val.beton"

