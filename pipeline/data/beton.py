"""Prepared manifests -> FFCV .beton files and their description (the preprocess stage).

Each split becomes <out>/<split>.beton with two fields: `image`, an RGBImageField, and `label`, an
IntField (the class index of classes.json). Samples keep the manifest order, so a sequential loader
reads val in manifest order. <out>/dataset.json describes the pair (pipeline/data/dataset.py).

How a split is written: worker processes (preprocess.num_workers; null = every core) turn each file
into its finished sample with one decode (images.store_images: check, conversion to RGB, resize,
the JPEG-or-raw choice, JPEG encoding); this process takes the samples back in manifest order and
only copies their bytes into the file's pages (BetonWriter). What that keeps, where FFCV 1.0.2's own
DatasetWriter would not:
  never hangs    DatasetWriter's worker processes hang the parent when they raise (it waits on a
                 counter and never checks that they are alive). No FFCV writer process runs here: an
                 unusable file comes back as a skip and never reaches the writer, and a worker that
                 raises or dies makes the write raise here (a dead one as BrokenProcessPool).
  deterministic  DatasetWriter's processes book pages first come, first served, so with several of
                 them the byte layout follows the OS scheduler (verified: three runs, three hashes).
                 Here one writer stores the samples in order, and a sample's bytes depend only on its
                 file, its manifest position and the params: the same .beton whatever num_workers is.
  FFCV's format  BetonWriter writes the layout of DatasetWriter(num_workers=1), with RGBImageField's
                 and IntField's type ids, so FFCV's Reader and decoders read it unchanged (a test
                 compares the bytes with DatasetWriter's).
  fits a page    a sample must fit in one page, so the page is sized from max_resolution.
  bounded memory at most IN_FLIGHT_PER_WORKER tasks of CHUNK files per worker wait to be written.
  skip threshold a split stops as soon as its unusable files exceed preprocess.max_skipped_fraction of
                 its files; val is written first (ILSVRC-2012: 50,000 images against 1.28 million),
                 so a bad val fails before train is encoded.
  atomic         the .beton files and dataset.json are written to hidden partial names beside their
                 final ones; an old dataset.json is removed, the .beton files are renamed into place,
                 then dataset.json. A killed run leaves no .beton, and no dataset.json beside a set
                 that is not complete.

Report (returned by preprocess, written by the stage as JSON):
  {"train": {"files": F, "images": N, "skipped": S, "converted": C, "resized": R,
             "per_class": {class name: images}, "bytes": B, "seconds": T, "images_per_s": N / T},
   "val": {...},
   "skipped_files":   [{"split", "path", "reason"}],       paths relative to the dataset root
   "converted_files": [{"split", "path", "conversion"}]}
F files listed, N written, S skipped, C of the N converted, R of the N resized, B the .beton's size in
bytes, T the wall time of decoding, encoding, writing and hashing the split.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, closing, contextmanager, nullcontext
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.types import (
    ALLOC_TABLE_TYPE,
    CURRENT_VERSION,
    TYPE_ID_HANDLER,
    FieldDescType,
    HeaderType,
    get_metadata_type,
)
from ffcv.utils import align_to_page
from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE
from tqdm import tqdm

from pipeline.config import PreprocessParams
from pipeline.data.dataset import FILE_NAME as DATASET_FILE
from pipeline.data.dataset import SPLITS, BetonFile, Dataset, file_sha256
from pipeline.data.images import ImageCheck, ImageSource, ImageStorage, StoredImage, store_images
from pipeline.data.tree import PreparedDataset
from pipeline.errors import DataError
from pipeline.storage import atomic

# A JPEG of noise at high quality can outgrow the raw pixels; four times the raw size leaves room.
PAGE_HEADROOM = 4
# Files per task sent to a worker: enough to make the task overhead (~0.1 ms) small against the
# ~2 ms an ImageNet-sized JPEG takes, few enough to keep every worker busy to the end of a split.
CHUNK = 8
IN_FLIGHT_PER_WORKER = 4
WRITE_ORDER = ("val", "train")  # the small split first: its skip threshold fails fast
JPEG_MODE, RAW_MODE = IMAGE_MODES["jpg"], IMAGE_MODES["raw"]


def preprocess(prepared: PreparedDataset, out: Path, params: PreprocessParams) -> dict:
    """Write <out>/train.beton, <out>/val.beton and <out>/dataset.json from the prepared manifests;
    returns the report (module docstring)."""
    page_size(params)  # settings errors before any work
    checks: dict[str, list[ImageCheck]] = {}
    files: dict[str, BetonFile] = {}
    seconds: dict[str, float] = {}
    # No dataset.json beside a set that is not complete: the old one goes first, the new one is renamed
    # into place last (the contexts below are left in reverse order).
    (out / DATASET_FILE).unlink(missing_ok=True)
    for stale in out.glob(".*.partial"):  # left by a run that was killed
        stale.unlink()
    with ExitStack() as renames:
        description_partial = renames.enter_context(atomic.replacing(out / DATASET_FILE))
        partials = {split: renames.enter_context(atomic.replacing(out / f"{split}.beton")) for split in SPLITS}
        with worker_pool(params) as pool:
            for split in WRITE_ORDER:
                started = time.perf_counter()
                samples = prepared.splits[split]
                checks[split] = write_beton(
                    partials[split], [prepared.image_path(sample) for sample in samples],
                    [sample.label for sample in samples], params, pool=pool, name=split,
                )
                files[split] = BetonFile(
                    path=out / f"{split}.beton",
                    images=sum(1 for check in checks[split] if not check.skip_reason),
                    bytes=partials[split].stat().st_size,
                    sha256=file_sha256(partials[split]),
                )
                seconds[split] = time.perf_counter() - started
        Dataset(out, prepared.classes, {split: files[split] for split in SPLITS}, params.model_dump()).write(
            description_partial
        )

    report: dict = {
        split: _split_report(prepared, split, checks[split], files[split], seconds[split]) for split in SPLITS
    }
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


def write_beton(
    path: Path,
    images: Sequence[ImageSource],
    labels: Sequence[int],
    params: PreprocessParams,
    pool: ProcessPoolExecutor | None = None,
    name: str | None = None,
) -> list[ImageCheck]:
    """Write the usable files of `images`, with their labels, to `path` in order; returns every file's
    ImageCheck (skip_reason set for the files left out). Raises DataError, leaving no file at `path`,
    when the unusable files exceed preprocess.max_skipped_fraction of them or are all of them.
    `pool` comes from worker_pool (default: a pool of its own); `name` heads the messages and the
    progress bar (default: the file name)."""
    name = name or path.name
    if not images:
        raise DataError(f"{name}: no images to write")
    checks: list[ImageCheck] = []
    with (nullcontext(pool) if pool else worker_pool(params)) as workers:
        writer = BetonWriter(path, capacity=len(images), page_size=page_size(params))
        try:
            skipped = 0
            with closing(_stored_images(workers, images, params)) as stored_images:
                # A bar on a terminal only (disable=None): piped into a log, each redraw would be kept.
                bar = tqdm(stored_images, total=len(images), desc=name, unit="img", disable=None)
                for position, stored in enumerate(bar):
                    checks.append(stored.check)
                    if not stored.check.skip_reason:
                        writer.add(stored, labels[position])
                        continue
                    skipped += 1
                    if skipped > params.max_skipped_fraction * len(images):
                        raise _too_many_unusable(name, images, checks, params.max_skipped_fraction)
            if skipped == len(images):
                raise _too_many_unusable(name, images, checks, params.max_skipped_fraction)
            writer.close()
        except BrokenProcessPool as error:
            writer.discard()
            raise RuntimeError(
                f"{name}: a worker process died (killed, or out of memory?); no {path.name} was written"
            ) from error
        except BaseException:
            writer.discard()
            raise
    return checks


@contextmanager
def worker_pool(params: PreprocessParams) -> Iterator[ProcessPoolExecutor]:
    """The processes write_beton encodes images in: preprocess.num_workers, or one per core when null.
    Spawned, not forked: a fork copies locks held by the caller's threads (Ray, torch, numba), and a
    forked worker once hung the pool's shutdown in the test process that runs Ray."""
    pool = ProcessPoolExecutor(_worker_count(params), mp_context=get_context("spawn"))
    try:
        yield pool
    finally:
        # After an error the queued tasks are of no use: drop them rather than wait for them.
        pool.shutdown(wait=True, cancel_futures=True)


class BetonWriter:
    """A new .beton at `path` with the fields image (RGBImageField) and label (IntField), filled with
    samples in order, in the layout FFCV 1.0.2's DatasetWriter(num_workers=1) writes (ffcv/writer.py,
    ffcv/memory_allocator.py):
        header | field descriptors | metadata, one row per sample | zeros to a page boundary | pages |
        allocation table (sample id, file offset, size)
    A sample goes on the current page if it fits, else on a new one; every page is written whole,
    zero-padded. Room is made for `capacity` metadata rows; rows of files that were skipped stay zero
    past the last sample (Reader reads num_samples rows), so with no file skipped the bytes are
    DatasetWriter's."""

    FIELDS = {"image": RGBImageField(), "label": IntField()}

    def __init__(self, path: Path, capacity: int, page_size: int):
        self.path, self.page_size = path, page_size
        descriptors = np.zeros(len(self.FIELDS), FieldDescType)
        type_ids = {handler: type_id for type_id, handler in TYPE_ID_HANDLER.items()}
        for index, (field_name, field) in enumerate(self.FIELDS.items()):
            descriptors[index]["type_id"] = type_ids[type(field)]
            descriptors[index]["name"][: len(field_name)] = np.frombuffer(field_name.encode("ascii"), np.uint8)
            descriptors[index]["arguments"][:] = field.to_binary()[0]
        self.metadata = np.zeros(capacity, get_metadata_type(list(self.FIELDS.values())))
        self.allocations = np.zeros(capacity, ALLOC_TABLE_TYPE)
        self.metadata_start = HeaderType.itemsize + descriptors.nbytes
        self.data_start = align_to_page(self.metadata_start + self.metadata.nbytes, page_size)
        self.samples = 0
        self.page = bytearray(page_size)
        self.page_index, self.page_used = -1, 0  # no page started yet
        self.file = path.open("wb")
        self.file.write(np.zeros(1, HeaderType).tobytes())  # rewritten by close()
        self.file.write(descriptors.tobytes())

    def add(self, image: StoredImage, label: int) -> None:
        size = len(image.data)
        if size > self.page_size:
            raise ValueError(f"{self.path}: a sample of {size} bytes cannot fit a page of {self.page_size} bytes")
        if self.page_index < 0 or self.page_used + size > self.page_size:
            self._write_page()
            self.page_index, self.page_used = self.page_index + 1, 0
        offset = self.data_start + self.page_index * self.page_size + self.page_used
        self.page[self.page_used : self.page_used + size] = image.data
        self.page_used += size
        mode = JPEG_MODE if image.jpeg else RAW_MODE
        self.metadata[self.samples] = ((mode, image.width, image.height, offset), label)
        self.allocations[self.samples] = (self.samples, offset, size)
        self.samples += 1

    def close(self) -> None:
        self._write_page()
        allocation_table_offset = self.file.seek(0, os.SEEK_END)
        self.file.write(self.allocations[: self.samples].tobytes())
        header = np.zeros(1, HeaderType)
        header[0] = (CURRENT_VERSION, len(self.FIELDS), self.page_size, self.samples, allocation_table_offset)
        self.file.seek(self.metadata_start)
        self.file.write(self.metadata.tobytes())
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)

    def _write_page(self) -> None:
        if self.page_index < 0:
            return
        # Seeking past the end for the first page leaves zeros up to it, as DatasetWriter's padding.
        self.file.seek(self.data_start + self.page_index * self.page_size)
        self.file.write(memoryview(self.page)[: self.page_used])
        self.file.write(bytes(self.page_size - self.page_used))


def _stored_images(
    pool: ProcessPoolExecutor, images: Sequence[ImageSource], params: PreprocessParams
) -> Iterator[StoredImage]:
    """images.store_images over `images`, CHUNK files a task, yielded in order; at most
    IN_FLIGHT_PER_WORKER tasks per worker are pending, so memory stays bounded whatever the count."""
    storage = ImageStorage(
        max_resolution=params.max_resolution,
        short_side=params.short_side,
        write_mode=params.write_mode,
        compress_probability=params.compress_probability,
        jpeg_quality=params.jpeg_quality,
        smart_threshold=params.smart_threshold,
        seed=params.seed,
    )
    most_pending = IN_FLIGHT_PER_WORKER * _worker_count(params)
    pending: deque[Future] = deque()
    try:
        for start in range(0, len(images), CHUNK):
            pending.append(pool.submit(store_images, images[start : start + CHUNK], start, storage))
            if len(pending) >= most_pending:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _worker_count(params: PreprocessParams) -> int:
    return params.num_workers or os.cpu_count() or 1


def page_size(params: PreprocessParams) -> int:
    """A page that holds the largest image; DataError for settings FFCV cannot write with."""
    largest_sample = PAGE_HEADROOM * 3 * params.max_resolution**2
    page_size = max(MIN_PAGE_SIZE, 1 << (largest_sample - 1).bit_length())
    if page_size >= MAX_PAGE_SIZE:
        raise DataError(
            f"preprocess.max_resolution={params.max_resolution}: too large for FFCV, whose pages (which must "
            f"hold a whole image) stay below {MAX_PAGE_SIZE} bytes"
        )
    return page_size


def _too_many_unusable(
    name: str, images: Sequence[ImageSource], checks: list[ImageCheck], max_fraction: float
) -> DataError:
    """The error for a split whose unusable files passed the threshold among the first len(checks)."""
    unusable = [(image, check.skip_reason) for image, check in zip(images, checks) if check.skip_reason]
    examples = "; ".join(f"{image}: {reason}" for image, reason in unusable[:5])
    if len(checks) == len(images):
        counted = f"{len(unusable)} of {len(images)} files cannot be used ({len(unusable) / len(images):.2%})"
    else:
        counted = f"at least {len(unusable)} of {len(images)} files cannot be used (found in the first {len(checks)})"
    return DataError(
        f"{name}: {counted}, above preprocess.max_skipped_fraction={max_fraction}; nothing was written. "
        f"First: {examples}"
    )


def _split_report(
    prepared: PreparedDataset, split: str, checks: list[ImageCheck], beton: BetonFile, seconds: float
) -> dict:
    kept = [(sample, check) for sample, check in zip(prepared.splits[split], checks) if not check.skip_reason]
    per_class = Counter(prepared.classes[sample.label] for sample, _ in kept)
    return {
        "files": len(checks),
        "images": len(kept),
        "skipped": len(checks) - len(kept),
        "converted": sum(1 for _, check in kept if check.conversion),
        "resized": sum(1 for _, check in kept if check.resized_from),
        "per_class": {class_name: per_class[class_name] for class_name in prepared.classes},
        "bytes": beton.bytes,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(kept) / seconds, 1),
    }
