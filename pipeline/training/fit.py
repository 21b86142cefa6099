"""One training run fitted with Ray Train, in its folder of the run store.

Fitting a run name whose folder holds checkpoints resumes it: Ray Train V2 reads its snapshot there and
hands the last checkpoint to the workers (pipeline/training/worker.py loads it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import ray.train
import torch
from ray.train import UserCallback
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2.api.exceptions import ControllerError

from pipeline.config import RayParams
from pipeline.errors import ExplainedFailure
from pipeline.runs.cluster import START_TIMEOUT_VARIABLE, capacity_wait
from pipeline.runs.store import CHECKPOINT_FILE, RunResult, RunStore
from pipeline.training.job import TrainJob
from pipeline.training.worker import train_worker


class CapacityTimeout(ExplainedFailure):
    """The cluster had no room for the run's workers within ray.capacity_timeout_s."""


def fit(job: TrainJob, runs: RunStore, params: RayParams, callbacks: Sequence[UserCallback] = ()) -> RunResult:
    """Trains (or resumes) the run; `callbacks` see each epoch's report (a sweep passes Tune's)."""
    start_timeout, start_failures = capacity_wait(params)
    # Ray Train hands this variable from the driver to its controller.
    os.environ[START_TIMEOUT_VARIABLE] = str(start_timeout)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.spec.num_workers,
            use_gpu=params.use_gpu,
            resources_per_worker={"CPU": params.cpus_per_worker} | ({"GPU": 1} if params.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=job.spec.name,
            storage_path=runs.root.path,
            storage_filesystem=runs.root.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=params.max_failures,
                                                   controller_failure_limit=start_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=params.checkpoints_to_keep),
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
    except ControllerError as error:
        if isinstance(error.controller_failure, WorkerGroupStartupTimeoutError):
            raise CapacityTimeout(
                f"{job.spec.name}: the cluster had no room for {job.spec.num_workers} worker(s) within "
                f"ray.capacity_timeout_s={params.capacity_timeout_s:g} s (a node was lost and not replaced?); its "
                f"checkpoints are kept in {runs.record(job.spec.name).folder}: run the stage again to resume"
            ) from error
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training {job.spec.name} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return RunResult.from_state(state)
