"""DVC stage evaluate@<model>: the trained model's validation error under every test-time protocol of
evaluate.protocols (centre crop, mirror, AlexNet's 10 crops, VGG's dense multi-scale), scored on the
cluster, with per-image scores for the ensemble, per-class errors and a confusion matrix."""

from __future__ import annotations

import sys

from stages import run_stage, stage_parser, trained_model_params


def main(argv: list[str] | None = None) -> int:
    from pipeline.drivers.evaluate import evaluate_model
    from pipeline.storage.paths import command_line_location

    parser = stage_parser(__doc__, model=True, data=True)
    parser.add_argument("--weights", required=True, help="the train stage's model.pt")
    parser.add_argument("--out", required=True, help="folder or URI for metrics.json, scores/, per_class.csv, confusion.csv")
    args = parser.parse_args(argv)

    return run_stage(lambda: evaluate_model(
        trained_model_params(args), args.model, command_line_location(args.data, "--data"),
        command_line_location(args.weights, "--weights"), command_line_location(args.out, "--out")))


if __name__ == "__main__":
    sys.exit(main())
