"""What several benchmarks share: one Ray Train worker's measured rate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import ray.train
import ray.train.torch


def rate_in_one_ray_worker(loop: Callable[[dict], float], config: dict, scaling: ray.train.ScalingConfig,
                           storage: Path, name: str) -> float:
    """Images per second that loop(config) measures inside a one-worker Ray Train run."""
    result_file = storage / f"{name}.json"
    trainer = ray.train.torch.TorchTrainer(
        report_rate, train_loop_config={"loop": loop, "config": config, "result_file": str(result_file)},
        scaling_config=scaling, run_config=ray.train.RunConfig(storage_path=str(storage), name=name),
    )
    trainer.fit()
    # Result.metrics is not dependable in Ray 2.60 (it can come back None): read the worker's file.
    return json.loads(result_file.read_text())["images_per_s"]


def report_rate(loop_config: dict) -> None:
    rate = loop_config["loop"](loop_config["config"])
    Path(loop_config["result_file"]).write_text(json.dumps({"images_per_s": rate}))
    ray.train.report({"images_per_s": rate})
