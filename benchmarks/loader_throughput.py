"""Training-loader throughput: FFCV against torchvision's ImageFolder + DataLoader on the same JPEGs.

Both run the same augmentations (RandomResizedCrop to 224, horizontal flip, ImageNet normalisation)
with the same number of CPU workers: FFCV's numba threads, DataLoader's worker processes (persistent,
and also with DataLoader's default of starting them anew every epoch). The .beton files come from the
preprocess code without resizing: once with every image stored as JPEG (quality 90, like the sources:
a like-for-like decode), once with params.yaml's default write_mode "proportion" (half stored raw, as
ffcv-imagenet writes ImageNet). Every loader gets an untimed warm-up epoch (FFCV compiles its numba
pipeline then, DataLoader starts its workers); each figure is the median over the timed epochs, so a
burst of other work on a shared machine does not decide it. PIL decode-only throughput in one process
is the reference for how fast these JPEGs decode at all.

    python -m benchmarks.loader_throughput [--tree ROOT] [--images 500] [--threads 2] [--epochs 5]

Without --tree it writes --images photo-like 400x300 JPEGs (quality 90), random crops of
scikit-learn's two sample photos, as a two-class tree in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pipeline.config import PreprocessParams
from pipeline.data.beton import preprocess
from pipeline.data.loaders import IMAGENET_MEAN, IMAGENET_STD, make_train_loader
from pipeline.data.tree import read_tree

RESOLUTION = 224
SOURCE_SIZE = (400, 300)  # width, height
JPEG_QUALITY = 90


def write_sample_tree(root: Path, count: int, seed: int = 0) -> Path:
    """root/train/<photo>/<i>.JPEG, plus one val image per photo (read_tree wants a val/ folder)."""
    rng = np.random.default_rng(seed)
    samples = load_sample_images()
    names = [Path(name).stem for name in samples.filenames]
    width, height = SOURCE_SIZE
    for index in range(count):
        which = index % len(samples.images)
        photo = samples.images[which]
        top = rng.integers(0, photo.shape[0] - height + 1)
        left = rng.integers(0, photo.shape[1] - width + 1)
        crop = photo[top : top + height, left : left + width]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        for split in ("train", "val") if index < len(names) else ("train",):
            folder = root / split / names[which]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{index:05d}.JPEG", quality=JPEG_QUALITY)
    return root


def source_parser(description: str) -> argparse.ArgumentParser:
    """Options for the images a loader benchmark reads, and how: shared by the loader benchmarks."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, help="class-folder tree with train/ and val/ (default: generated)")
    parser.add_argument("--images", type=int, default=500, help="images to generate without --tree")
    parser.add_argument("--threads", type=int, default=2, help="FFCV threads = DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser


@contextlib.contextmanager
def scratch_and_tree(args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    """A temporary folder, and the --tree given or one generated in that folder."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        yield work, args.tree or write_sample_tree(work / "tree", args.images)


def median_rate(epoch: Iterable, epochs: int) -> float:
    """Median images/s over `epochs` passes over `epoch` (batches of (images, labels)), after a warm-up pass."""
    for _ in epoch:
        pass
    rates = []
    for _ in range(epochs):
        count, started = 0, time.perf_counter()
        for images, _labels in epoch:
            count += len(images)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def beton_params(write_mode: str, threads: int) -> PreprocessParams:
    """The sources at their own size, stored as `write_mode` says (proportion: half of them raw)."""
    return PreprocessParams(
        write_mode=write_mode, max_resolution=max(SOURCE_SIZE), compress_probability=0.5, jpeg_quality=JPEG_QUALITY,
        smart_threshold=1, num_workers=threads, max_skipped_fraction=0.0, seed=0,
    )


def ffcv_rates(tree: Path, beton_dir: Path, write_mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """(loader images/s, preprocess images/s) for .beton files written with `write_mode`."""
    report = preprocess(read_tree(tree), beton_dir, beton_params(write_mode, args.threads))
    loader = make_train_loader(
        beton_dir / "train.beton", batch_size=args.batch_size, resolution=RESOLUTION, num_threads=args.threads,
        distributed=False, seed=0,
    )
    return median_rate(loader, args.epochs), report["train"]["images_per_s"]


def torchvision_rate(tree: Path, persistent_workers: bool, args: argparse.Namespace) -> float:
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(RESOLUTION),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((IMAGENET_MEAN / 255).tolist(), (IMAGENET_STD / 255).tolist()),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(tree / "train", transform=augment), batch_size=args.batch_size, shuffle=True,
        num_workers=args.threads, drop_last=True, persistent_workers=persistent_workers,
    )
    return median_rate(loader, args.epochs)


def decode_rate(tree: Path, epochs: int) -> float:
    files = sorted((tree / "train").rglob("*.JPEG"))
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        for path in files:
            with Image.open(path) as image:
                image.convert("RGB")
        rates.append(len(files) / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = source_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs after the warm-up one")
    args = parser.parse_args()

    with scratch_and_tree(args) as (work, tree):
        files = len(read_tree(tree).splits["train"])
        ffcv_jpeg, write_jpeg = ffcv_rates(tree, work / "jpg", "jpg", args)
        ffcv_proportion, write_proportion = ffcv_rates(tree, work / "proportion", "proportion", args)
        torchvision = torchvision_rate(tree, persistent_workers=True, args=args)
        torchvision_restarting = torchvision_rate(tree, persistent_workers=False, args=args)
        decode = decode_rate(tree, args.epochs)

    source = tree if args.tree else f"generated {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} q{JPEG_QUALITY}"
    print(f"\n{files} training JPEGs ({source}), batch {args.batch_size}, {args.threads} workers, "
          f"median of {args.epochs} epochs after a warm-up, {os.cpu_count()} CPUs")
    rows = [
        (f"FFCV, all stored as JPEG q{JPEG_QUALITY} ({args.threads} threads)", ffcv_jpeg),
        (f"FFCV, write_mode proportion: half stored raw ({args.threads} threads)", ffcv_proportion),
        (f"torchvision ImageFolder + DataLoader ({args.threads} persistent workers)", torchvision),
        (f"torchvision ImageFolder + DataLoader ({args.threads} workers restarted each epoch, the default)",
         torchvision_restarting),
        ("PIL decode only (1 process, no augmentation)", decode),
        ("writing the .beton, all JPEG (preprocess: check + write)", write_jpeg),
        ("writing the .beton, proportion (preprocess: check + write)", write_proportion),
    ]
    print("| what (RandomResizedCrop 224 + flip + normalize unless said) | img/s |\n|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")
    print(f"\nFFCV JPEG / torchvision: {ffcv_jpeg / torchvision:.2f}x; FFCV proportion / torchvision: "
          f"{ffcv_proportion / torchvision:.2f}x; FFCV JPEG / PIL decode: {ffcv_jpeg / decode:.2f}x")


if __name__ == "__main__":
    main()
