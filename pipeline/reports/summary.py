"""The results of the last `dvc repro` on one screen: what `make run` ends with.

    python -m pipeline.reports.summary [--params params.yaml] [--root .]

One row per model of train.models (its training speed and last validation error, then its error under
each evaluate protocol, top-1 / top-5), the data, and the ensemble, in 160 columns (110 with the four
protocols; an ensemble that includes many models makes its first line longer). It
reads the metrics files the stages wrote (dvc.yaml); a stage that has not run shows as missing.
Every figure is in `dvc metrics show --json`, the detail in the stages' report files and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import Params, load_params

PAIR = "{:.4f} {:.4f}"  # top-1 and top-5 error in one column


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def model_table(params: Params, root: Path) -> list[str]:
    protocols = params.evaluate.protocols
    header = f"{'model':16}{'img/s':>8}  {'last epoch':>14}" + "".join(f"  {p:>15}" for p in protocols)
    lines = [header, f"{'':16}{'':>8}  {'top-1  top-5':>14}" + "".join(f"  {'top-1  top-5':>15}" for _ in protocols)]
    for model in params.train.models:
        trained = (read(root / f"outputs/train/{model}/metrics.json") or {}).get(model)
        evaluated = (read(root / f"outputs/evaluate/{model}/metrics.json") or {}).get(model)
        if trained is None:
            lines.append(f"{model:16}  (not trained: dvc repro train@{model})")
            continue
        row = (f"{model:16}{trained['steady_images_per_s']:>8.1f}  "
               f"{PAIR.format(trained['val_top1_error'], trained['val_top5_error']):>14}")
        for protocol in protocols:
            if evaluated is None or f"{protocol}_top1_error" not in evaluated:
                row += f"  {'-':>15}"
            else:
                row += f"  {PAIR.format(evaluated[f'{protocol}_top1_error'], evaluated[f'{protocol}_top5_error']):>15}"
        lines.append(row)
    return lines


def data_line(root: Path) -> str:
    report = read(root / "reports/preprocess.json")
    if report is None:
        return "data: not preprocessed (dvc repro preprocess)"
    return "data: " + ", ".join(f"{split} {counts['images']} images ({counts['skipped']} skipped)"
                                for split, counts in report.items())


def ensemble_lines(params: Params, root: Path) -> list[str]:
    metrics = read(root / "outputs/ensemble/metrics.json")
    if metrics is None:
        return ["ensemble: not run (dvc repro ensemble)"]
    included = f" + {', '.join(params.ensemble.include)}" if params.ensemble.include else ""
    return [f"ensemble of {metrics['members']} x {params.ensemble.model}{included} "
            f"(protocol {params.ensemble.protocol}, {params.ensemble.combine} averaging)",
            f"  top-1 {metrics['ensemble_top1_error']:.4f}, top-5 {metrics['ensemble_top5_error']:.4f}; "
            f"mean member top-1 {metrics['member_top1_error_mean']:.4f} +- {metrics['member_top1_error_std']:.4f} "
            f"(the seeds' spread); "
            f"gain over it {metrics['gain_top1']:.4f} top-1, {metrics['gain_top5']:.4f} top-5"]


def summary(params: Params, root: Path) -> str:
    lines = [data_line(root), "", *model_table(params, root), "", *ensemble_lines(params, root), "",
             "Every figure: dvc metrics show --json; curves: dvc plots show; runs: the MLflow UI (README)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--root", type=Path, default=Path("."), help="the project whose outputs are read")
    args = parser.parse_args(argv)
    print(summary(load_params(args.params), args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
