"""DVC stage train@<model>: data-parallel training of one model with Ray Train, tracked in MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.locations import command_line_location
from pipeline.training import train_model
from stages import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", required=True, help="one of params.yaml's train.models")
    parser.add_argument("--data", default="data/beton", help="folder with dataset.json, train.beton and val.beton")
    parser.add_argument("--out", required=True, help="folder or URI for model.pt, metrics.json, history.csv")
    args = parser.parse_args(argv)

    def stage() -> None:
        params = load_params(args.params)
        params.check_trained_model(args.model)
        data = command_line_location(args.data, "--data")
        out = command_line_location(args.out, "--out")
        train_model(params, args.model, data, out)

    return run_stage(stage)


if __name__ == "__main__":
    sys.exit(main())
