"""preprocess stage: decode, check and encode every image of the prepared manifests into the FFCV
files <out>/train.beton and <out>/val.beton, described by <out>/dataset.json, with a JSON report
(a DVC metric); see pipeline/beton.py.

    python -m stages.preprocess --params params.yaml --prepared data/prepared --out data/beton \\
        --report reports/preprocess.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stages import run_stage


def main(argv: list[str] | None = None) -> int:
    # Imported here, not above: the stage's worker processes are spawned, and a spawned process
    # imports the main module (this one) again; FFCV and the rest would cost each worker seconds.
    from pipeline.beton import preprocess
    from pipeline.config import load_params
    from pipeline.image_tree import SPLITS, read_prepared

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("data/beton"))
    parser.add_argument("--report", type=Path, default=Path("reports/preprocess.json"))
    args = parser.parse_args(argv)

    def stage() -> None:
        params = load_params(args.params)
        report = preprocess(read_prepared(args.prepared), args.out, params.preprocess)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        partial = args.report.with_name(f".{args.report.name}.partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(partial, args.report)
        for split in SPLITS:
            counts = report[split]
            print(
                f"preprocess: {split}: {counts['images']} images ({counts['skipped']} skipped, "
                f"{counts['converted']} converted, {counts['resized']} resized), "
                f"{counts['bytes'] / 2**20:.1f} MiB, {counts['images_per_s']:.0f} img/s"
            )

    return run_stage(stage)


if __name__ == "__main__":
    sys.exit(main())
