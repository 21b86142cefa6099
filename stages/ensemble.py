"""DVC stage ensemble: N members trained side by side with Ray Tune, scored on the cluster, combined
with the evaluated scores of the models in ensemble.include, tracked in MLflow, and set beside the
papers' figures."""

from __future__ import annotations

import sys

from stages import run_stage, stage_parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_params
    from pipeline.drivers.ensemble import run_ensemble
    from pipeline.storage.paths import command_line_location

    parser = stage_parser(__doc__, data=True)
    parser.add_argument("--evaluations", default="outputs/evaluate",
                        help="the evaluate stage's outputs: <model>/metrics.json and <model>/scores/")
    parser.add_argument("--out", required=True,
                        help="folder or URI for metrics.json, report.json, error_curve.csv, members.json, papers.md")
    args = parser.parse_args(argv)
    return run_stage(lambda: run_ensemble(
        load_params(args.params), command_line_location(args.data, "--data"),
        command_line_location(args.evaluations, "--evaluations"), command_line_location(args.out, "--out")))


if __name__ == "__main__":
    sys.exit(main())
