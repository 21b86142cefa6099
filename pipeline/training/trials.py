"""Several training runs at once as Ray Tune trials: the ensemble's members and a sweep's trials.

A trial only drives a TorchTrainer, whose workers hold the CPUs/GPUs in a placement group of their own.
A trial asking for any CPU would leave a 2-CPU machine short of a 2-worker run for good; Tune refuses an
empty request, so a trial asks for a little (logical) memory instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import ray
from ray import tune

from pipeline.config import RayParams
from pipeline.runs.store import RunStore

TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}


def max_concurrent_runs(params: RayParams, workers_per_run: int, cap: int | None) -> int:
    """As many runs at once as the cluster has CPUs (or GPUs) for their workers, at most `cap`."""
    resource, per_worker = ("GPU", 1.0) if params.use_gpu else ("CPU", params.cpus_per_worker)
    available = ray.cluster_resources().get(resource, 0)
    fits = max(1, math.floor(available / (per_worker * workers_per_run)))
    return min(fits, cap or fits)


def trials_run_config(name: str, runs: RunStore, progress: tune.Callback | None = None) -> tune.RunConfig:
    """Tune's own records go beside the runs, in the run store. With a `progress` callback, it says how the
    trials go instead of Tune's status tables (verbose=0 leaves only Tune's opening box)."""
    return tune.RunConfig(name=name, storage_path=runs.root.path, storage_filesystem=runs.root.filesystem,
                          verbose=0 if progress else 1, callbacks=[progress] if progress else None)


class TrialProgress(tune.Callback):
    """In place of Tune's status tables (one every 30 s, and a box per trial): a line each time a trial
    starts, ends or fails, with the counts. Trials that a scheduler stops end like finished ones."""

    def __init__(self, label: str, total: int, describe: Callable[[dict], str]):
        self.label, self.total, self.describe, self.started = label, total, describe, time.monotonic()
        self.running, self.ended, self.failed = set(), set(), set()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self.say(trial, "started")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self.ended.add(trial.trial_id)
        self.say(trial, "ended")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self.failed.add(trial.trial_id)
        self.say(trial, "FAILED")

    def say(self, trial, event: str) -> None:
        elapsed = time.monotonic() - self.started
        failed = f", {len(self.failed)} failed" if self.failed else ""
        print(f"{self.label}: {self.describe(trial.config)} {event}; {len(self.ended)}/{self.total} done, "
              f"{len(self.running)} running{failed} ({elapsed // 60:.0f}m{elapsed % 60:02.0f}s)", flush=True)
