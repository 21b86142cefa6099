"""Preprocess throughput: the stage's writer (pipeline/data/beton.py write_beton) against FFCV's own
DatasetWriter on the same ImageNet-shaped JPEGs, with the same fields and the same worker count.

Both store RGBImageField(write_mode "proportion", compress_probability 0.5, jpeg_quality 90,
max_resolution 256) and an IntField label. FFCV's DatasetWriter(num_workers=N) is fed by a plain
indexed dataset that opens each file with PIL; the stage's writer uses N worker processes (decode,
check, resize, encode) and one in-order writer. The two alternate within each round (the first
goes second in the next round), so a burst of other work on a shared machine hits both; figures are
medians over the rounds, with their range. The stage's worker pool is started and warmed before the
timed rounds, as a stage run starts it once for both splits; DatasetWriter forks its processes
inside its timed call (milliseconds). A third run writes the same JPEGs read from a tar of per-class
tars (ILSVRC2012_img_train.tar's layout) by offset, as the stage does with ImageNet as downloaded. A
fourth row writes the papers' preparation (short side 256,
long side up to 512), which stores larger images: not like for like, for the record.

Then, once, the costs that bound the scaling: one image's decode + check + resize + encode in one
process (what each worker spends), the writing process's CPU per image during a write (receiving the
samples and copying them into pages: the serial part), the rate that writing process sustains when
the workers have almost nothing to do (tiny images enlarged to 90 kB raw samples), BetonWriter's copy
rate on samples already in memory, the .beton's size per image, and SHA-256 over the file
(dataset.json records it).

    python -m benchmarks.preprocess_throughput [--classes 200] [--per-class 9] [--workers 1 2] [--rounds 3]

It writes --classes x --per-class photo-like 500x375 JPEGs (quality 90): random 4:3 crops of
scikit-learn's two sample photos, rescaled to 500x375 and flipped at random, in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
from PIL import Image
from sklearn.datasets import load_sample_images

from pipeline.config import PreprocessParams
from pipeline.data.beton import CHUNK, BetonWriter, page_size, worker_pool, write_beton
from pipeline.data.archives import train_members
from pipeline.data.dataset import file_sha256
from pipeline.data.images import ArchiveMember, ImageStorage, store_images

SOURCE_SIZE = (500, 375)  # width, height: a common ILSVRC-2012 shape
JPEG_QUALITY = 90
MAX_RESOLUTION = 256
PAPERS = "stage, papers' short side 256"
ARCHIVE = "stage, from the archive"


def write_photos(folder: Path, classes: int, per_class: int, seed: int = 0) -> list[Path]:
    """folder/<class>/<i>.JPEG: random 4:3 crops of the sample photos (at 60-100% of the largest
    such crop), rescaled to SOURCE_SIZE, half of them flipped."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    width, height = SOURCE_SIZE
    paths = []
    for label in range(classes):
        (folder / f"class_{label:04d}").mkdir(parents=True)
        for index in range(per_class):
            photo = photos[rng.integers(len(photos))]
            crop_height = int(min(photo.shape[0], photo.shape[1] * height / width) * rng.uniform(0.6, 1.0))
            crop_width = crop_height * width // height
            top = rng.integers(0, photo.shape[0] - crop_height + 1)
            left = rng.integers(0, photo.shape[1] - crop_width + 1)
            crop = photo[top : top + crop_height, left : left + crop_width]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            pixels = cv2.resize(np.ascontiguousarray(crop), SOURCE_SIZE, interpolation=cv2.INTER_AREA)
            paths.append(folder / f"class_{label:04d}" / f"{index}.JPEG")
            Image.fromarray(pixels).save(paths[-1], quality=JPEG_QUALITY)
    return paths


def write_train_archive(path: Path, paths: list[Path]) -> list[ArchiveMember]:
    """The photos as ILSVRC2012_img_train.tar holds its images (a tar of per-class tars, written
    class by class through a temporary inner tar, deleted after); returns them as indexed, in the
    order of `paths`."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as outer:
        for class_dir in sorted({image.parent for image in paths}):
            inner = path.with_name(f"{class_dir.name}.tar")
            with tarfile.open(inner, "w", format=tarfile.GNU_FORMAT) as class_tar:
                for image in sorted(class_dir.iterdir()):
                    class_tar.add(image, arcname=image.name)
            outer.add(inner, arcname=inner.name)
            inner.unlink()
    by_name = {member.name: member for members in train_members(path, []).values() for member in members}
    return [by_name[f"{image.parent.name}.tar/{image.name}"] for image in paths]


class PilImages:
    """The indexed dataset FFCV's writer reads: (PIL RGB image, label), opened and converted as
    torchvision's ImageFolder loader does."""

    def __init__(self, paths: list[Path], labels: list[int]):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), self.labels[index]


def stage_params(workers: int, **changes: object) -> PreprocessParams:
    settings = dict(
        write_mode="proportion", max_resolution=MAX_RESOLUTION, compress_probability=0.5, jpeg_quality=JPEG_QUALITY,
        smart_threshold=1, num_workers=workers, max_skipped_fraction=0.0, seed=0,
    )
    return PreprocessParams(**(settings | changes))


def ffcv_write(beton: Path, paths: list[Path], labels: list[int], workers: int) -> None:
    fields = {
        "image": RGBImageField(write_mode="proportion", max_resolution=MAX_RESOLUTION, jpeg_quality=JPEG_QUALITY,
                               compress_probability=0.5),
        "label": IntField(),
    }
    writer = DatasetWriter(str(beton), fields, page_size=page_size(stage_params(workers)), num_workers=workers)
    writer.from_indexed_dataset(PilImages(paths, labels))


def start_workers(pool: ProcessPoolExecutor, beton: Path, paths: list[Path], labels: list[int],
                  params: PreprocessParams) -> None:
    """Starts every worker of `pool` with a short write (ProcessPoolExecutor starts them on demand)."""
    count = 2 * CHUNK * params.num_workers
    write_beton(beton, paths[:count], labels[:count], params, pool=pool)


def timed(write: Callable[[], object], beton: Path) -> float:
    """Seconds one write of `beton` takes; the file is removed afterwards."""
    started = time.perf_counter()
    write()
    seconds = time.perf_counter() - started
    beton.unlink()
    return seconds


def compare(paths: list[Path], members: list[ArchiveMember], labels: list[int], workers: int, rounds: int,
            scratch: Path) -> dict[str, list[float]]:
    """images/s of each writer in each round, alternating which of the first two goes first; the
    stage reads the same JPEGs once as files and once from the train archive."""
    beton = scratch / "out.beton"
    like_for_like, papers = stage_params(workers), stage_params(workers, short_side=256, max_resolution=512)
    with worker_pool(like_for_like) as pool:
        start_workers(pool, beton, paths, labels, like_for_like)
        runs = {
            "stage": lambda: write_beton(beton, paths, labels, like_for_like, pool=pool),
            "ffcv": lambda: ffcv_write(beton, paths, labels, workers),
            ARCHIVE: lambda: write_beton(beton, members, labels, like_for_like, pool=pool),
            PAPERS: lambda: write_beton(beton, paths, labels, papers, pool=pool),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for round_index in range(rounds):
            for name in names if round_index % 2 == 0 else [names[1], names[0], *names[2:]]:
                rates[name].append(len(paths) / timed(runs[name], beton))
                print(f"  {workers} worker(s), round {round_index + 1}, {name}: {rates[name][-1]:,.0f} img/s",
                      flush=True)
    return rates


def costs(paths: list[Path], labels: list[int], workers: int, scratch: Path) -> dict[str, float]:
    """The per-image costs that bound the scaling (module docstring)."""
    params = stage_params(workers)
    storage = ImageStorage(
        max_resolution=params.max_resolution, short_side=None, write_mode=params.write_mode,
        compress_probability=params.compress_probability, jpeg_quality=params.jpeg_quality,
        smart_threshold=params.smart_threshold, seed=params.seed,
    )
    started = time.process_time()
    stored = store_images(paths, 0, storage)
    worker_ms = (time.process_time() - started) / len(paths) * 1e3

    beton = scratch / "costs.beton"
    started = time.perf_counter()
    writer = BetonWriter(beton, capacity=len(stored), page_size=page_size(params))
    for image, label in zip(stored, labels):
        writer.add(image, label)
    writer.close()
    copy_seconds = time.perf_counter() - started
    size = beton.stat().st_size
    started = time.perf_counter()
    file_sha256(beton)
    hash_seconds = time.perf_counter() - started
    beton.unlink()

    with worker_pool(params) as pool:
        start_workers(pool, beton, paths, labels, params)
        started = time.process_time()
        write_beton(beton, paths, labels, params, pool=pool)
        writer_ms = (time.process_time() - started) / len(paths) * 1e3

        # A 4x3 PNG enlarged to 200x150 and stored raw (90 kB, about an average sample above): the
        # workers' share is tiny, so this is the rate the in-order writer sustains on its own.
        tiny = scratch / "tiny.png"
        Image.new("RGB", (4, 3), (200, 100, 50)).save(tiny)
        ceiling_params = stage_params(workers, write_mode="raw", short_side=150)
        started = time.perf_counter()
        write_beton(beton, [tiny] * len(paths) * 2, labels * 2, ceiling_params, pool=pool)
        ceiling_seconds = time.perf_counter() - started
        ceiling_bytes = beton.stat().st_size
    beton.unlink()
    return {
        "worker_ms": worker_ms,
        "writer_cpu_ms": writer_ms,
        "ceiling_images_per_s": 2 * len(paths) / ceiling_seconds,
        "ceiling_mb_per_s": ceiling_bytes / ceiling_seconds / 1e6,
        "copy_images_per_s": len(stored) / copy_seconds,
        "copy_mb_per_s": size / copy_seconds / 1e6,
        "bytes_per_image": size / len(stored),
        "hash_mb_per_s": size / hash_seconds / 1e6,
    }


def summary(rates: list[float]) -> str:
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f} - {max(rates):,.0f})"


def ratio(ours: list[float], theirs: list[float]) -> str:
    """Median (range) of the per-round ratios."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f} - {max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=9)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare at")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        paths = write_photos(scratch / "photos", args.classes, args.per_class)
        labels = [label for label in range(args.classes) for _ in range(args.per_class)]
        members = write_train_archive(scratch / "ILSVRC2012_img_train.tar", paths)
        results = {workers: compare(paths, members, labels, workers, args.rounds, scratch) for workers in args.workers}
        measured = costs(paths, labels, max(args.workers), scratch)

    print(f"\n{len(paths)} photo-like {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} q{JPEG_QUALITY} JPEGs in {args.classes} "
          f"classes; proportion 0.5, q{JPEG_QUALITY}, max_resolution {MAX_RESOLUTION}; median (range) of "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs\n")
    print("| workers | stage img/s | FFCV DatasetWriter img/s | stage / FFCV | stage from the archive img/s | "
          "archive / files | stage, short side 256 img/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for workers, rates in results.items():
        print(f"| {workers} | {summary(rates['stage'])} | {summary(rates['ffcv'])} | "
              f"{ratio(rates['stage'], rates['ffcv'])} | {summary(rates[ARCHIVE])} | "
              f"{ratio(rates[ARCHIVE], rates['stage'])} | {summary(rates[PAPERS])} |")
    print(f"\nper image, one worker process (decode + check + resize + encode): {measured['worker_ms']:.2f} ms CPU"
          f"\nper image, the writing process during a {max(args.workers)}-worker write (receive + copy): "
          f"{measured['writer_cpu_ms']:.3f} ms CPU"
          f"\nthe in-order writer's own ceiling ({max(args.workers)} workers on tiny images, 90 kB raw samples): "
          f"{measured['ceiling_images_per_s']:,.0f} img/s, {measured['ceiling_mb_per_s']:,.0f} MB/s"
          f"\nBetonWriter alone on samples in memory: {measured['copy_images_per_s']:,.0f} img/s, "
          f"{measured['copy_mb_per_s']:,.0f} MB/s; {measured['bytes_per_image'] / 1e3:.0f} kB per image stored"
          f"\nSHA-256 of the .beton: {measured['hash_mb_per_s']:,.0f} MB/s")


if __name__ == "__main__":
    main()
