"""DVC stage sweep (sweeps/dvc.yaml, apart from the main pipeline): a search over one model's training
recipe with Ray Tune and ASHA; the best recipe, every trial's curve and the errors against each searched
key as outputs, the trials as nested MLflow runs."""

from __future__ import annotations

import sys

from stages import run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_params
    from pipeline.drivers.sweep import run_sweep
    from pipeline.storage.paths import command_line_location

    parser = stage_parser(__doc__, data=True)
    parser.add_argument("--out", required=True,
                        help="folder or URI for metrics.json, best_params.yaml, curves.csv, by_key/")
    args = parser.parse_args(argv)
    return run_stage(lambda: run_sweep(load_params(args.params), command_line_location(args.data, "--data"),
                                       command_line_location(args.out, "--out")))


if __name__ == "__main__":
    sys.exit(main())
