"""What rank 0 says while a run trains: progress lines within an epoch and a line per epoch on the
console, and (when the run has an MLflow target) the epochs, the step loss and system metrics in MLflow.
Other ranks say nothing, so the store has one writer while training."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

import mlflow
import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from pipeline.tracking import TrackingTarget, log_history, log_metrics

# Points of the training loss curve per epoch (steps.csv, train_loss_step in MLflow): enough to see the
# loss move within an epoch, few enough for a 90-epoch ImageNet run (1,800 rows).
STEP_POINTS_PER_EPOCH = 20
# step: the global step (1-based); epoch: the epochs done at that step (0.5 = half of the first).
STEP_COLUMNS = ["step", "epoch", "train_loss"]


class RankZeroLog:
    def __init__(self, label: str, epochs: int, steps: int, images_per_step: int, every_s: float,
                 target: TrackingTarget | None):
        self.label, self.epochs, self.steps, self.images_per_step = label, epochs, steps, images_per_step
        self.every_s, self.target = every_s, target
        self.point_every = max(1, steps // STEP_POINTS_PER_EPOCH)
        self.points: list[dict] = []  # the loss curve within epochs: STEP_COLUMNS
        self.client, self.monitor = None, None
        if target is not None:
            mlflow.set_tracking_uri(target.uri)
            self.client = mlflow.MlflowClient(target.uri)
            if target.system_metrics:
                # The run's status stays the driver's business: the monitor only samples.
                self.monitor = SystemMetricsMonitor(target.run_id)
                self.monitor.start()

    def resumed(self, history: list[dict], points: list[dict]) -> None:
        """A run resumed into a new or other MLflow store starts with the epochs its checkpoint has done."""
        self.points = list(points)
        if self.client:
            log_history(self.client, self.target.run_id, history)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.started = self.shown_at = time.perf_counter()
        self.point_loss_sum, self.point_seen = 0.0, 0

    def step(self, step: int, seen: int, loss_sum: torch.Tensor) -> None:
        """Every every_s seconds a line: the step, the images/s of all workers, the epoch's ETA and rank
        0's loss so far. Every 1/STEP_POINTS_PER_EPOCH of the epoch a point of the loss curve. Reading the
        loss waits for the GPU, so it is read only then."""
        now = time.perf_counter()
        line_due = now - self.shown_at >= self.every_s
        point_due = step % self.point_every == 0
        if not (line_due or point_due):
            return
        total = loss_sum.item()
        if point_due:
            self.add_point(step, seen, total)
        if line_due:
            elapsed = now - self.started
            eta = elapsed / step * (self.steps - step)
            say(f"{self.label} epoch {self.epoch + 1}/{self.epochs} step {step}/{self.steps} "
                f"{step * self.images_per_step / elapsed:.0f} img/s ETA {eta // 60:.0f}m{eta % 60:02.0f}s "
                f"loss so far {total / seen:.4g}")
            self.shown_at = now

    def add_point(self, step: int, seen: int, total: float) -> None:
        """The mean loss of rank 0's steps since the last point, at the global step: kept for steps.csv
        (it travels in the checkpoints) and logged to MLflow as train_loss_step."""
        global_step = self.epoch * self.steps + step
        loss = (total - self.point_loss_sum) / (seen - self.point_seen)
        self.points.append({"step": global_step, "epoch": round(global_step / self.steps, 4), "train_loss": loss})
        if self.client:
            log_metrics(self.client, self.target.run_id, {"train_loss_step": loss}, step=global_step)
        self.point_loss_sum, self.point_seen = total, seen

    def epoch_done(self, history: list[dict]) -> None:
        metrics: Mapping[str, float] = {key: value for key, value in history[-1].items() if key != "epoch"}
        say(f"{self.label} epoch {self.epoch + 1}/{self.epochs} " +
            " ".join(f"{key}={value:.4g}" for key, value in metrics.items()))
        if self.client:
            # Skips an epoch the store has: one logged just before a failure and then trained again.
            log_history(self.client, self.target.run_id, history[-1:])

    def close(self) -> None:
        if self.monitor:
            self.monitor.finish()


class Silent(RankZeroLog):
    """The log of the ranks other than 0."""

    def __init__(self):
        self.client, self.monitor, self.points = None, None, []

    def resumed(self, history: list[dict], points: list[dict]) -> None: ...
    def start_epoch(self, epoch: int) -> None: ...
    def step(self, step: int, seen: int, loss_sum: torch.Tensor) -> None: ...
    def epoch_done(self, history: list[dict]) -> None: ...


def quiet_ray_console() -> None:
    """Ray Train logs an INFO record on every worker's console for each report (the whole
    TrainingReport: every metric and the checkpoint's path) and each checkpoint. Its warnings and
    errors still show, and its log files in the Ray session's logs/train/ keep everything."""
    for handler in logging.getLogger("ray.train").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def say(line: str) -> None:
    # Ray Train replaces print in its workers with one that logs the line and, since Ray wraps the
    # worker's sys.stdout, prints it as well: every line would show twice. The process's own stdout,
    # which Ray forwards to the driver, shows it once.
    print(line, file=sys.__stdout__, flush=True)
