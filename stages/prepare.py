"""prepare stage: index the image tree named by params.yaml's data section (or write the embedded
digits tree) into classes.json + train.csv + val.csv; see pipeline/data/tree.py for the formats.

    python -m stages.prepare --params params.yaml --out data/prepared
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_params
    from pipeline.drivers.prepare import run_prepare

    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("data/prepared"))
    args = parser.parse_args(argv)
    return run_stage(lambda: run_prepare(load_params(args.params), args.out))


if __name__ == "__main__":
    sys.exit(main())
