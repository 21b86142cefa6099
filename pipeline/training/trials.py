"""Several training runs at once as Ray Tune trials: the ensemble's members and a sweep's trials.

A trial only drives a TorchTrainer, whose workers hold the CPUs/GPUs in a placement group of their own.
A trial asking for any CPU would leave a 2-CPU machine short of a 2-worker run for good; Tune refuses an
empty request, so a trial asks for a little (logical) memory instead.
"""

from __future__ import annotations

import math

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
