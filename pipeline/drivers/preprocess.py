"""The preprocess stage: every image of the prepared manifests decoded, checked and encoded into
<out>/train.beton and <out>/val.beton, described by <out>/dataset.json, with a JSON report (a DVC
metric); pipeline/data/beton.py has the details."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.data.beton import preprocess
from pipeline.data.dataset import SPLITS
from pipeline.data.tree import read_prepared
from pipeline.storage import atomic


def run_preprocess(params: Params, prepared: Path, out: Path, report_path: Path) -> None:
    report = preprocess(read_prepared(prepared), out, params.preprocess)
    atomic.write_text(report_path, json.dumps(report, indent=2) + "\n")
    for split in SPLITS:
        counts = report[split]
        print(f"preprocess: {split}: {counts['images']} images ({counts['skipped']} skipped, "
              f"{counts['converted']} converted, {counts['resized']} resized), "
              f"{counts['bytes'] / 2**20:.1f} MiB, {counts['images_per_s']:.0f} img/s")
