"""MLflow bookkeeping: where the store is, and runs whose final status tells the truth.

SQLite, the embedded default store, takes one writer at a time, so the project keeps to one writer
per moment: the driver before and after training, rank 0 of a single training run while it trains,
and the ensemble driver alone for the member runs (see pipeline/ensemble.py).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT, MlflowParams

RUN_NAME_TAG = "ray_run_name"


def tracking_uri(params: MlflowParams, environ: Mapping[str, str]) -> str:
    """params, else $MLFLOW_TRACKING_URI, else the project's SQLite file by absolute path, because DVC
    experiments and Ray jobs run from other folders and a relative sqlite:/// would follow them."""
    return params.tracking_uri or environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """Created before any worker starts, so workers never race to create it."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    # With the SQLite store MLflow would put artifacts under the current folder; pin them to the project.
    artifacts = (PROJECT_ROOT / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
    return client.create_experiment(name, artifact_location=artifacts)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.01}} -> {"train.lr": 0.01}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def unfinished_run(client: MlflowClient, experiment: str, ray_run_name: str) -> str | None:
    """The run a previous attempt at the same training left unfinished (SIGKILL leaves RUNNING;
    a failure or Ctrl-C leaves FAILED or KILLED): the attempt that resumes its checkpoint continues it."""
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.{RUN_NAME_TAG} = '{ray_run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs and runs[0].info.status != RunStatus.to_string(RunStatus.FINISHED):
        return runs[0].info.run_id
    return None


def resume_or_create_run(
    client: MlflowClient, experiment: str, ray_run_name: str, tags: Mapping[str, str], params: Mapping[str, Any]
) -> tuple[str, bool]:
    """(run id, whether it resumes an unfinished run). A new run gets the tags and the flattened params."""
    run_id = unfinished_run(client, experiment, ray_run_name)
    if run_id:
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id, True
    tags = {RUN_NAME_TAG: ray_run_name, "git_commit": git_commit(), **tags}
    run_id = client.create_run(experiment, run_name=ray_run_name, tags=tags).info.run_id
    log_params(client, run_id, params)
    return run_id, False


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    flat = flatten(params)
    client.log_batch(run_id, params=[mlflow.entities.Param(key, str(value)) for key, value in flat.items()])


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run is closed as KILLED like a Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"received signal {signum}")


@contextlib.contextmanager
def closed_with_true_status(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Marks the run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (any exception) when the block ends.

    MLflow's own exit handler would call a crashed run FINISHED, hence the explicit status here.
    Python lets only the main thread set signal handlers; elsewhere SIGTERM keeps its default."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """One round trip for all of an epoch's metrics (the SQLite store is locked once, not per metric)."""
    timestamp = mlflow.utils.time.get_current_time_millis()
    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(key, float(value), timestamp, step) for key, value in metrics.items()],
    )
