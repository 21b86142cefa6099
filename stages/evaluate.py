"""DVC stage evaluate@<model>: the trained model's validation error under every test-time protocol of
evaluate.protocols (centre crop, mirror, AlexNet's 10 crops, VGG's dense multi-scale), scored on the
cluster, with per-image scores for the ensemble, per-class errors and a confusion matrix."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.evaluation import evaluate_model
from pipeline.locations import command_line_location
from stages import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", required=True, help="one of params.yaml's train.models")
    parser.add_argument("--data", default="data/beton", help="folder with dataset.json, train.beton and val.beton")
    parser.add_argument("--weights", required=True, help="the train stage's model.pt")
    parser.add_argument("--out", required=True, help="folder or URI for metrics.json, scores/, per_class.csv, confusion.csv")
    args = parser.parse_args(argv)

    def stage() -> None:
        params = load_params(args.params)
        params.check_trained_model(args.model)
        evaluate_model(params, args.model, command_line_location(args.data, "--data"),
                       command_line_location(args.weights, "--weights"), command_line_location(args.out, "--out"))

    return run_stage(stage)


if __name__ == "__main__":
    sys.exit(main())
