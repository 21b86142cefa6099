"""DVC stage ensemble: N members trained side by side with Ray Tune, scored on the cluster, combined
with the evaluated scores of the models in ensemble.include, tracked in MLflow, and set beside the
papers' figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.ensemble import run_ensemble
from pipeline.locations import command_line_location
from stages import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", default="data/beton", help="folder with dataset.json, train.beton and val.beton")
    parser.add_argument("--evaluations", default="outputs/evaluate",
                        help="the evaluate stage's outputs: <model>/metrics.json and <model>/scores/")
    parser.add_argument("--out", required=True,
                        help="folder or URI for metrics.json, error_curve.csv, members.json, papers.md")
    args = parser.parse_args(argv)
    return run_stage(lambda: run_ensemble(
        load_params(args.params), command_line_location(args.data, "--data"),
        command_line_location(args.evaluations, "--evaluations"), command_line_location(args.out, "--out")))


if __name__ == "__main__":
    sys.exit(main())
