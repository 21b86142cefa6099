"""DVC stage train@<model>: data-parallel training of one model with Ray Train, tracked in MLflow."""

from __future__ import annotations

import sys

from stages import run_stage, stage_parser, trained_model_params


def main(argv: list[str] | None = None) -> int:
    from pipeline.drivers.train import train_model
    from pipeline.storage.paths import command_line_location

    parser = stage_parser(__doc__, model=True, data=True)
    parser.add_argument("--out", required=True,
                        help="folder or URI for model.pt, metrics.json, report.json, history.csv, steps.csv")
    args = parser.parse_args(argv)

    return run_stage(lambda: train_model(
        trained_model_params(args), args.model, command_line_location(args.data, "--data"),
        command_line_location(args.out, "--out")))


if __name__ == "__main__":
    sys.exit(main())
