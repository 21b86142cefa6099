"""preprocess stage: decode, check and encode every image of the prepared manifests into the FFCV
files <out>/train.beton and <out>/val.beton, described by <out>/dataset.json, with a JSON report and
(with --metrics) the figures DVC compares; see pipeline/data/beton.py.

    python -m stages.preprocess --params params.yaml --prepared data/prepared --out data/beton \\
        --report reports/preprocess-detail.json --metrics reports/preprocess.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    # Every stage imports its driver here, not above: the preprocess stage's worker processes are
    # spawned, and a spawned process imports the main module (this one) again; FFCV and the rest would
    # cost each worker seconds.
    from pipeline.config import load_params
    from pipeline.drivers.preprocess import run_preprocess

    parser = stage_parser(__doc__)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("data/beton"))
    parser.add_argument("--report", type=Path, default=Path("reports/preprocess-detail.json"))
    parser.add_argument("--metrics", type=Path, help="where to write the figures DVC compares (none if not given)")
    args = parser.parse_args(argv)
    return run_stage(lambda: run_preprocess(load_params(args.params), args.prepared, args.out, args.report,
                                            args.metrics))


if __name__ == "__main__":
    sys.exit(main())
