"""DVC stage ensemble: N members trained side by side with Ray Tune, combined and tracked in MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.ensemble import run_ensemble
from stages import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/beton"), help="folder with train.beton and val.beton")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, error_curve.csv, members.json")
    args = parser.parse_args(argv)
    return run_stage(lambda: run_ensemble(load_params(args.params), args.data, args.out))


if __name__ == "__main__":
    sys.exit(main())
