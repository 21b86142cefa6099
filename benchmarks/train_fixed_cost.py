"""The fixed cost of one Ray Train run at several health-check intervals: a one-worker run whose worker
only reports, timed from TorchTrainer.fit() to its return, the intervals alternating round by round, on
a private local Ray of 2 CPUs.

    python -m benchmarks.train_fixed_cost [--intervals 2 0.25] [--rounds 4]

Ray Train's controller checks on its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
and each step of a run's start and end waits for the next check. This measures the fixed cost only; what
more frequent checks cost a training run is not in it (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline.runs.cluster import LOOPBACK

VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def report_once(config: dict) -> None:
    ray.train.report({"done": 1})


def fit_seconds(interval: float, storage: str, name: str) -> float:
    # Ray Train hands the variable from the driver to the run's controller.
    os.environ[VARIABLE] = str(interval)
    started = time.perf_counter()
    TorchTrainer(report_once, scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(storage_path=storage, name=name)).fit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", nargs="+", type=float, default=[2.0, 0.25])
    parser.add_argument("--rounds", type=int, default=4)
    arguments = parser.parse_args()
    seconds: dict[float, list[float]] = {interval: [] for interval in arguments.intervals}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address=LOOPBACK)
    try:
        with tempfile.TemporaryDirectory() as storage:
            for round_index in range(arguments.rounds):
                order = arguments.intervals if round_index % 2 == 0 else arguments.intervals[::-1]
                for interval in order:
                    seconds[interval].append(fit_seconds(interval, storage, f"run-{round_index}-{interval}"))
    finally:
        ray.shutdown()
    for interval, runs in seconds.items():
        print(json.dumps({"health_check_interval_s": interval, "median_s": round(statistics.median(runs), 2),
                          "runs_s": [round(run, 2) for run in runs]}))


if __name__ == "__main__":
    main()
