"""source stage: fingerprint the archives params.yaml's data.root holds into data/source.json (what
the prepare and preprocess stages depend on); see pipeline/drivers/source.py.

    python -m stages.source --params params.yaml --out data/source.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from stages import run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_params
    from pipeline.drivers.source import run_source

    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("data/source.json"))
    args = parser.parse_args(argv)
    return run_stage(lambda: run_source(load_params(args.params), args.out))


if __name__ == "__main__":
    sys.exit(main())
