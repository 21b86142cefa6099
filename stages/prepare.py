"""prepare stage: index the image tree named by params.yaml's data section (or write the embedded
digits tree) into classes.json + train.csv + val.csv; see pipeline/image_tree.py for the formats.

    python -m stages.prepare --params params.yaml --out data/prepared
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.image_tree import prepare
from stages import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/prepared"))
    args = parser.parse_args(argv)

    def stage() -> None:
        dataset = prepare(load_params(args.params).data, args.out)
        counts = ", ".join(f"{len(samples)} {split}" for split, samples in dataset.splits.items())
        print(f"prepare: {len(dataset.classes)} classes, {counts} images -> {args.out}")

    return run_stage(stage)


if __name__ == "__main__":
    sys.exit(main())
