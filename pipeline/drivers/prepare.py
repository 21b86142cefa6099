"""The prepare stage: index the image tree named by the data section (or write the embedded digits tree)
into classes.json + train.csv + val.csv (pipeline/data/tree.py has the formats)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params
from pipeline.data.tree import prepare


def run_prepare(params: Params, out: Path) -> None:
    dataset = prepare(params.data, out)
    counts = ", ".join(f"{len(samples)} {split}" for split, samples in dataset.splits.items())
    print(f"prepare: {len(dataset.classes)} classes, {counts} images -> {out}")
