"""Prepared manifests -> FFCV .beton files (the preprocess stage).

Each split becomes <out>/<split>.beton with two fields: `image`, an RGBImageField written with the
preprocess params, and `label`, an IntField (the class index of classes.json). Samples keep the
manifest order, so a sequential loader reads val in manifest order.

How the FFCV 1.0.2 writer is kept honest:
  never hangs   its worker processes hang the parent when they raise, so every file is fully
                decoded and checked first (image_check, in num_workers processes); the writer then
                only gets arrays it can store, and a file that changed since its check becomes a
                placeholder plus an error after the write instead of an exception in the worker.
  deterministic DatasetWriter's processes book file pages first come, first served, so with several
                of them the byte layout follows the OS scheduler (verified: three runs, three hashes).
                One writer process stores the samples in order, fed by num_workers decoding
                threads; write_mode "proportion" draws np.random.rand() once per image inside that
                process right after __getitem__, which seeds np.random from (seed, index) first.
  fits a page   a sample must fit in one page, so the page is sized from max_resolution.
  atomic        both files are written to hidden partial names beside their final ones and renamed
                into place together once both are complete; a killed run leaves no .beton behind.

Report (returned by preprocess, written by the stage as JSON):
  {"train": {"files": F, "images": N, "skipped": S, "converted": C, "resized": R,
             "per_class": {class name: images}, "bytes": B, "seconds": T, "images_per_s": N / T},
   "val": {...},
   "skipped_files":   [{"split", "path", "reason"}],       paths relative to the dataset root
   "converted_files": [{"split", "path", "conversion"}]}
F files listed, N written, S skipped, C of the N converted, R of the N shrunk to max_resolution,
B the .beton's size in bytes, T the wall time of checking and writing the split.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE, DatasetWriter

from pipeline.config import PreprocessParams
from pipeline.image_check import check_images, load_rgb
from pipeline.image_tree import SPLITS, DataError, PreparedDataset

# A JPEG of noise at high quality can outgrow the raw pixels; four times the raw size leaves room.
PAGE_HEADROOM = 4
READ_AHEAD_PER_THREAD = 4


def preprocess(prepared: PreparedDataset, out: Path, params: PreprocessParams) -> dict:
    """Check every image of both splits, then write <out>/train.beton and <out>/val.beton."""
    _page_size(params)  # settings errors before any work
    checks, seconds = {}, {}
    for split in SPLITS:
        started = time.perf_counter()
        paths = [prepared.image_path(sample) for sample in prepared.splits[split]]
        checks[split] = check_images(paths, params.max_resolution, params.num_workers, f"checking {split}")
        seconds[split] = time.perf_counter() - started
    for split in SPLITS:
        _enforce_skip_limit(split, prepared, checks[split], params.max_skipped_fraction)

    out.mkdir(parents=True, exist_ok=True)
    partials = {split: out / f".{split}.beton.partial" for split in SPLITS}
    report: dict = {}
    try:
        for split in SPLITS:
            usable = [sample for sample, check in zip(prepared.splits[split], checks[split]) if not check.skip_reason]
            started = time.perf_counter()
            write_beton(
                partials[split],
                [prepared.image_path(sample) for sample in usable],
                [sample.label for sample in usable],
                params,
            )
            seconds[split] += time.perf_counter() - started
            report[split] = _split_report(prepared, usable, checks[split], partials[split].stat().st_size, seconds[split])
        for split in SPLITS:
            os.replace(partials[split], out / f"{split}.beton")
    finally:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
    report["skipped_files"] = [
        {"split": split, "path": sample.path, "reason": check.skip_reason}
        for split in SPLITS
        for sample, check in zip(prepared.splits[split], checks[split])
        if check.skip_reason
    ]
    report["converted_files"] = [
        {"split": split, "path": sample.path, "conversion": check.conversion}
        for split in SPLITS
        for sample, check in zip(prepared.splits[split], checks[split])
        if check.conversion and not check.skip_reason
    ]
    return report


def write_beton(path: Path, images: Sequence[Path], labels: Sequence[int], params: PreprocessParams) -> None:
    """Write `images` (checked with image_check beforehand) and their labels to `path`, in order."""
    if not images:
        raise DataError(f"{path}: no images to write")
    page_size = _page_size(params)
    dataset = _CheckedImages(images, labels, params)
    fields = {
        "image": RGBImageField(
            write_mode=params.write_mode,
            max_resolution=params.max_resolution,
            smart_threshold=params.smart_threshold,
            jpeg_quality=params.jpeg_quality,
            compress_probability=params.compress_probability,
        ),
        "label": IntField(),
    }
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=1)
    writer.from_indexed_dataset(dataset)
    if dataset.failures.value:
        path.unlink(missing_ok=True)
        raise DataError(
            f"{images[dataset.first_failure.value]}: could not be decoded while writing {path.name} although it "
            f"passed its check (changed on disk?); {dataset.failures.value} such image(s); run the stage again"
        )


class _CheckedImages:
    """The indexable dataset DatasetWriter reads: (pixels, label) of checked images, decoded a few
    samples ahead by threads (Pillow and OpenCV release the GIL while decoding and resizing)."""

    def __init__(self, images: Sequence[Path], labels: Sequence[int], params: PreprocessParams):
        self.images, self.labels = images, labels
        self.max_resolution, self.seed, self.threads = params.max_resolution, params.seed, params.num_workers
        # Shared with the parent: the writer runs this object in a forked process.
        self.failures = multiprocessing.Value(ctypes.c_int64, 0)
        self.first_failure = multiprocessing.Value(ctypes.c_int64, -1)
        self._executor: ThreadPoolExecutor | None = None  # started in the writer process on first use
        self._loading: dict[int, Future] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads)
        for ahead in range(index, min(index + self.threads * READ_AHEAD_PER_THREAD, len(self))):
            if ahead not in self._loading:
                self._loading[ahead] = self._executor.submit(self._pixels, ahead)
        pixels = self._loading.pop(index).result()
        np.random.seed([self.seed, index])  # the one draw of write_mode "proportion" for this image
        return pixels, self.labels[index]

    def _pixels(self, index: int) -> np.ndarray:
        try:
            return load_rgb(self.images[index], self.max_resolution)[0]
        # Anything raised here would hang the writer; a failure is counted and reported after it.
        except Exception:  # noqa: BLE001
            with self.failures.get_lock():
                self.failures.value += 1
                if self.first_failure.value < 0:
                    self.first_failure.value = index
            return np.zeros((1, 1, 3), np.uint8)


def _page_size(params: PreprocessParams) -> int:
    """A page that holds the largest image; DataError for settings FFCV cannot write with."""
    largest_sample = PAGE_HEADROOM * 3 * params.max_resolution**2
    page_size = max(MIN_PAGE_SIZE, 1 << (largest_sample - 1).bit_length())
    if page_size >= MAX_PAGE_SIZE:
        raise DataError(
            f"preprocess.max_resolution={params.max_resolution}: too large for FFCV, whose pages (which must "
            f"hold a whole image) stay below {MAX_PAGE_SIZE} bytes"
        )
    return page_size


def _enforce_skip_limit(split: str, prepared: PreparedDataset, checks: list, max_fraction: float) -> None:
    skipped = [(sample, check) for sample, check in zip(prepared.splits[split], checks) if check.skip_reason]
    if len(skipped) == len(checks) or len(skipped) > max_fraction * len(checks):
        examples = "; ".join(f"{sample.path}: {check.skip_reason}" for sample, check in skipped[:5])
        raise DataError(
            f"{split}: {len(skipped)} of {len(checks)} files cannot be used ({len(skipped) / len(checks):.2%}), "
            f"above preprocess.max_skipped_fraction={max_fraction}; nothing was written. First: {examples}"
        )


def _split_report(prepared: PreparedDataset, usable: list, checks: list, size: int, seconds: float) -> dict:
    per_class = Counter(prepared.classes[sample.label] for sample in usable)
    kept = [check for check in checks if not check.skip_reason]
    return {
        "files": len(checks),
        "images": len(usable),
        "skipped": len(checks) - len(usable),
        "converted": sum(1 for check in kept if check.conversion),
        "resized": sum(1 for check in kept if check.resized_from),
        "per_class": {name: per_class[name] for name in prepared.classes},
        "bytes": size,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(usable) / seconds, 1),
    }
