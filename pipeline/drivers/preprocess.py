"""The preprocess stage: every image of the prepared manifests decoded, checked and encoded into
<out>/train.beton and <out>/val.beton, described by <out>/dataset.json, with a JSON report (every
count, every skipped or converted file; pipeline/data/beton.py has the details) and, for DVC, the few
figures runs are compared by (images, skipped, images/s per split)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.data.beton import preprocess
from pipeline.data.dataset import SPLITS
from pipeline.data.tree import read_prepared
from pipeline.storage import atomic


# The report's figures that `dvc metrics show` and `dvc exp show` put side by side; per-class counts and
# file lists would be columns by the dozen.
METRIC_KEYS = ("images", "skipped", "images_per_s")


def run_preprocess(params: Params, prepared: Path, out: Path, report_path: Path, metrics_path: Path | None = None
                   ) -> None:
    report = preprocess(read_prepared(prepared), out, params.preprocess)
    atomic.write_text(report_path, json.dumps(report, indent=2) + "\n")
    if metrics_path:
        metrics = {split: {key: report[split][key] for key in METRIC_KEYS} for split in SPLITS}
        atomic.write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    for split in SPLITS:
        counts = report[split]
        print(f"preprocess: {split}: {counts['images']} images ({counts['skipped']} skipped, "
              f"{counts['converted']} converted, {counts['resized']} resized), "
              f"{counts['bytes'] / 2**20:.1f} MiB, {counts['images_per_s']:.0f} img/s")
