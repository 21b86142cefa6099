"""Training-loader throughput with the keyed augmentation (pipeline/data/augment.py) against FFCV's own
unseeded random-resized crop and flip, on the same .beton, the same threads and batch.

Both loaders get an untimed warm-up epoch (numba compilation); then they take turns, one epoch each per
round, so a burst of other work on a shared machine hits both alike; each figure is the median over
the rounds, and the ratio is the median of the per-round ratios.

    python -m benchmarks.keyed_augmentation [--tree ROOT] [--images 500] [--threads 2] [--rounds 7]

Without --tree it writes --images photo-like 400x300 JPEGs like benchmarks/loader_throughput.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
from ffcv.transforms import RandomHorizontalFlip

from benchmarks.loader_throughput import RESOLUTION, beton_params, scratch_and_tree, source_parser
from pipeline.data.beton import preprocess
from pipeline.data.loaders import _image_pipeline, _loader, make_train_loader
from pipeline.data.tree import read_tree


def epoch_rate(loader) -> float:
    count, started = 0, time.perf_counter()
    for images, _labels in loader:
        count += len(images)
    return count / (time.perf_counter() - started)


def unseeded_loader(beton: Path, args: argparse.Namespace):
    """The training loader as it was before the keyed augmentation: FFCV's decoder and flip."""
    decoder = RandomResizedCropRGBImageDecoder((RESOLUTION, RESOLUTION), scale=(0.08, 1))
    pipeline = _image_pipeline(decoder, [RandomHorizontalFlip()], torch.device("cpu"), False, torch.float32)
    return _loader(beton, pipeline, torch.device("cpu"), args.batch_size, args.threads, False, seed=0,
                   drop_last=True)


def main() -> None:
    parser = source_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs of each loader, taking turns")
    args = parser.parse_args()

    with scratch_and_tree(args) as (work, tree):
        preprocess(read_tree(tree), work / "beton", beton_params("proportion", args.threads))
        beton = work / "beton" / "train.beton"
        loaders = {
            "FFCV's unseeded crop + flip": unseeded_loader(beton, args),
            "keyed crop + flip (pipeline/data/augment.py)": make_train_loader(
                beton, batch_size=args.batch_size, resolution=RESOLUTION, num_threads=args.threads,
                distributed=False, seed=0, crop_min_scale=0.08),
        }
        for loader in loaders.values():
            epoch_rate(loader)  # warm-up: numba compiles the pipeline
        rates = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(epoch_rate(loader))

    old, new = rates.values()
    print(f"\n{len(read_tree(tree).splits['train']) if args.tree else args.images} training images, write_mode "
          f"proportion, {RESOLUTION} px, batch {args.batch_size}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"median of {args.rounds} rounds")
    print("| loader | img/s, median | range |\n|---|---:|---:|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f} - {max(values):,.0f} |")
    ratios = [b / a for a, b in zip(old, new)]
    print(f"\nkeyed / unseeded: {statistics.median(ratios):.2f}x (per round {min(ratios):.2f} - {max(ratios):.2f})")


if __name__ == "__main__":
    main()
