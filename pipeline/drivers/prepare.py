"""The prepare stage: index the images named by the data section (a tree, the ILSVRC-2012 archives as
downloaded, webdataset shards; or write the embedded digits tree) into classes.json + train.csv +
val.csv (pipeline/data/tree.py has the formats)."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.config import Params
from pipeline.data.tree import IGNORED_FILE, prepare


def run_prepare(params: Params, out: Path) -> None:
    dataset = prepare(params.data, out)
    counts = ", ".join(f"{len(samples)} {split}" for split, samples in dataset.splits.items())
    print(f"prepare: {len(dataset.classes)} classes, {counts} images -> {out}")
    if (out / IGNORED_FILE).is_file():
        with (out / IGNORED_FILE).open(newline="") as listing:
            ignored = list(csv.DictReader(listing))
        print(f"prepare: {len(ignored)} archive members are not images, passed over (listed in "
              f"{out / IGNORED_FILE}), e.g. {ignored[0]['path']}")
