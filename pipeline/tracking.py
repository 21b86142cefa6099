"""MLflow bookkeeping: which store, an experiment made once however many stages start at once, runs
found again by their run name, and final statuses that tell the truth.

The store is mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the SQLite file mlflow.db in the
project's home (pipeline/storage/paths.py), by absolute path, with artifacts in the home's mlartifacts/.
SQLite takes one writer at a time, so one process writes at a time: the driver before and after
training, rank 0 of a training run while it trains, the ensemble driver for its members. With several
Ray nodes the store must be a tracking server (pipeline/runs/cluster.py refuses a file store then).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import filelock
import mlflow
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, RunStatus
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import read_mlflow_creds
from requests.exceptions import RequestException
from sqlalchemy.exc import SQLAlchemyError

from pipeline.config import PROJECT_ROOT, MlflowParams
from pipeline.data.dataset import Dataset
from pipeline.errors import InputError
from pipeline.storage.location import Location
from pipeline.storage.paths import HOME_VARIABLE, project_home

RUN_NAME_TAG = "run_name"
# The metric whose logged steps say which epochs a run has in the store.
EPOCH_METRIC = "val_top1_error"
# MLflow's tag on a dataset input saying what the run used it for (mlflow.log_input's `context`).
DATASET_CONTEXT_TAG = "mlflow.data.context"
# MLflow's SQL schema keeps a dataset's digest in 36 characters (VARCHAR(36), which PostgreSQL enforces):
# the SHA-256's first 32 hex digits (128 bits) go there, the whole hash into the dataset's profile.
DIGEST_CHARS = 32
FILE_STORE_SCHEMES = ("sqlite", "file")
STORE_LOCK_TIMEOUT_S = 120
HEALTH_TIMEOUT_S = 10
# Where MLflow's clients read a tracking server's user and password (mlflow.utils.credentials); the
# README's cluster walk-through writes the file on every node.
CREDENTIALS_FILE = "~/.mlflow/credentials"
CREDENTIALS_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Columns of MLflow 3's SQL schema that hold artifact locations (read off a store with a logged and
# registered model): they are rewritten when the project folder has moved.
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"))

RunState = Literal["new", "unfinished", "finished"]


class TrackingStoreError(InputError):
    """The MLflow store cannot be reached or written; the message names it and the setting to change."""


@dataclass(frozen=True)
class Store:
    uri: str
    client: MlflowClient
    experiment_id: str


@dataclass(frozen=True)
class Run:
    id: str
    state: RunState


@dataclass(frozen=True)
class TrackingTarget:
    """Where a training run's rank 0 logs its epochs and system metrics while it trains."""

    uri: str
    run_id: str
    system_metrics: bool


def is_file_store(uri: str) -> bool:
    return uri.split(":", 1)[0] in FILE_STORE_SCHEMES or "://" not in uri


def tracking_uri(params: MlflowParams, environ: Mapping[str, str] = os.environ,
                 code_root: Path = PROJECT_ROOT) -> str:
    uri = params.tracking_uri or environ.get("MLFLOW_TRACKING_URI")
    if uri is None or (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")):
        home = project_home(environ, code_root)
        if home is None:
            raise TrackingStoreError(
                "mlflow.tracking_uri: no store is set and this stage runs in the copy of the project that "
                "`ray job submit --working-dir` made, which Ray deletes: set mlflow.tracking_uri or "
                f"MLFLOW_TRACKING_URI (a tracking server), or {HOME_VARIABLE} to the project folder"
            )
        relative = "mlflow.db" if uri is None else uri.removeprefix("sqlite:///")
        return f"sqlite:///{home / relative}"
    _refuse_credentials_in(uri)
    return uri


def _refuse_credentials_in(uri: str) -> None:
    """A password in the URI would be copied wherever the URI goes: the runs' params, the console, DVC's
    params. MLflow reads it from the credentials file or the environment instead."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        raise TrackingStoreError(
            f"mlflow.tracking_uri / MLFLOW_TRACKING_URI {bare}: holds a user name or password, which would be "
            f"logged with the runs; give the bare URI and put them in {CREDENTIALS_FILE} (README: a tracking "
            "server only the team can write to)")


def open_store(params: MlflowParams, environ: Mapping[str, str] = os.environ, code_root: Path = PROJECT_ROOT) -> Store:
    """The store with the experiment ready, before any worker starts. Stages starting at once against
    a new SQLite file take turns (a lock file beside it): MLflow's schema set-up and experiment
    creation are not safe to race. A server makes the experiment once and the loser reads it back."""
    uri = tracking_uri(params, environ, code_root)
    with _translated_errors(uri):
        _check_server(uri, params.experiment)
        with _store_lock(uri):
            client = MlflowClient(uri)  # builds the store, which sets up a new SQLite file's schema
            artifacts = _default_artifacts(uri, environ, code_root)
            experiment = _experiment_id(client, params.experiment, artifacts)
            if artifacts is not None:
                _relocate_artifacts(uri, client.get_experiment(experiment).artifact_location, artifacts)
        return Store(uri, client, experiment)


def _default_artifacts(uri: str, environ: Mapping[str, str], code_root: Path) -> str | None:
    """The home's mlartifacts/ for the home's own SQLite store (MLflow would pick the current folder)."""
    home = project_home(environ, code_root)
    if home is not None and uri == f"sqlite:///{home / 'mlflow.db'}":
        return (home / "mlartifacts").as_uri()
    return None


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _relocate_artifacts(uri: str, current: str, wanted: str) -> None:
    """A project moved or copied with its mlflow.db still points its artifacts at the old folder, where
    new models would land (or fail to): rewrite those locations to the home's mlartifacts/."""
    if current == wanted or not current.startswith("file://"):
        return
    with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"))) as database, database:
        for table, column in ARTIFACT_COLUMNS:
            database.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                             (wanted, len(current) + 1, len(current), current))
    print(f"MLflow: the project moved; artifact locations {current} -> {wanted}")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{database}.lock", timeout=STORE_LOCK_TIMEOUT_S):
        yield


def _check_server(uri: str, experiment: str) -> None:
    """A server that is down would be retried by MLflow for minutes; one probe says it at once. A second
    one, with the credentials MLflow's client would send, tells missing or wrong ones apart."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
            response.read()
    except OSError as error:
        raise TrackingStoreError(f"MLflow tracking server {uri}: not reachable ({error}); start it, or set "
                                 "mlflow.tracking_uri / MLFLOW_TRACKING_URI to one that runs") from None
    _check_credentials(uri, experiment)


def _check_credentials(uri: str, experiment: str) -> None:
    credentials = read_mlflow_creds()
    query = urllib.parse.urlencode({"experiment_name": experiment})
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}")
    if credentials.username is not None and credentials.password is not None:
        pair = f"{credentials.username}:{credentials.password}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
    try:
        # MLflow's own wait: a server checks a password with a deliberately slow hash, slower still when busy.
        with urllib.request.urlopen(request, timeout=MLFLOW_HTTP_REQUEST_TIMEOUT.get()) as response:
            response.read()
    except urllib.error.HTTPError as error:
        origin = "$" + CREDENTIALS_VARIABLES[0] if os.environ.get(CREDENTIALS_VARIABLES[0]) else CREDENTIALS_FILE
        if error.code == 401 and credentials.username is None:
            raise TrackingStoreError(
                f"MLflow tracking server {uri}: asks for a user name and password, and this machine has none; put "
                f"them in {CREDENTIALS_FILE} (README: a tracking server only the team can write to)") from None
        if error.code == 401:
            raise TrackingStoreError(f"MLflow tracking server {uri}: refused user {credentials.username!r} "
                                     f"(from {origin}): wrong user name or password") from None
        if error.code == 403:
            raise TrackingStoreError(f"MLflow tracking server {uri}: user {credentials.username!r} (from {origin}) "
                                     f"may not read experiment {experiment!r}; ask the server's admin for EDIT "
                                     "permission on it") from None
        # 404: the experiment does not exist yet, and open_store makes it.


@contextlib.contextmanager
def _translated_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except TrackingStoreError:
        raise
    # MLflow, SQLAlchemy, sqlite3 and requests each report an unusable store in their own way.
    except (MlflowException, OSError, filelock.Timeout, sqlite3.Error, SQLAlchemyError, RequestException) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrackingStoreError(f"MLflow store {uri}: cannot be written ({reason}); set mlflow.tracking_uri "
                                 "or MLFLOW_TRACKING_URI to a store this machine can write") from error


def find_run(store: Store, run_name: str) -> Run | None:
    """The newest MLflow run of this training, if the store has one."""
    runs = store.client.search_runs([store.experiment_id], filter_string=f"tags.{RUN_NAME_TAG} = '{run_name}'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    finished = runs[0].info.status == RunStatus.to_string(RunStatus.FINISHED)
    return Run(runs[0].info.run_id, "finished" if finished else "unfinished")


def open_run(store: Store, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any], *,
             reuse_finished: bool) -> Run:
    """The store's run for this training. An unfinished one (a SIGKILL leaves RUNNING, a failure or
    Ctrl-C FAILED or KILLED) is continued; a finished one is returned as it is when `reuse_finished`
    (the run store still has its result), else the training starts again in a new run with tags and params."""
    with _translated_errors(store.uri):
        found = find_run(store, run_name)
        if found and found.state == "unfinished":
            store.client.update_run(found.id, status=RunStatus.to_string(RunStatus.RUNNING))
            return found
        if found and reuse_finished:
            return found
        tags = {RUN_NAME_TAG: run_name, "git_commit": git_commit(), **tags}
        run_id = store.client.create_run(store.experiment_id, run_name=run_name, tags=tags).info.run_id
        log_params(store.client, run_id, params)
        return Run(run_id, "new")


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


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    flat = flatten(params)
    client.log_batch(run_id, params=[mlflow.entities.Param(key, str(value)) for key, value in flat.items()])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """One round trip for all of an epoch's metrics (the SQLite store is locked once, not per metric)."""
    timestamp = mlflow.utils.time.get_current_time_millis()
    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(key, float(value), timestamp, step) for key, value in metrics.items()],
    )


def logged_epochs(client: MlflowClient, run_id: str) -> set[int]:
    """The history's epoch numbers (from 0) the run has."""
    return {metric.step - epoch_step(0) for metric in client.get_metric_history(run_id, EPOCH_METRIC)}


def log_history(client: MlflowClient, run_id: str, history: Iterable[Mapping[str, float]]) -> None:
    """The epochs of `history` the run does not have yet, one step each: a run resumed from its
    checkpoints into a new or other store starts with the epochs already done, none twice."""
    have = logged_epochs(client, run_id)
    for row in history:
        if row["epoch"] not in have:
            log_metrics(client, run_id, {k: v for k, v in row.items() if k != "epoch"}, step=epoch_step(int(row["epoch"])))


def epoch_step(epoch: int) -> int:
    """The MLflow step of a history row: the epoch's number as the console says it ("epoch 1/3" is step 1);
    the run store's history counts from 0."""
    return epoch + 1


class BetonDataset(MetaDataset):
    """One .beton file as an MLflow dataset: named by the data source and split, its digest the file's
    SHA-256, its source where it lies (a path or a URI), its profile the image and class counts."""

    def __init__(self, location: str, name: str, sha256: str, images: int, classes: int):
        with warnings.catch_warnings():  # a file:// path matches two of MLflow's sources, which agree
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(location)
        super().__init__(source, name=name, digest=sha256[:DIGEST_CHARS])
        self._profile = {"images": images, "classes": classes, "sha256": sha256}

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def data_inputs(data: Location, dataset: Dataset, source_name: str,
                splits: Iterable[str] = ("train", "val")) -> list[DatasetInput]:
    """The .beton files of `dataset` (read from `data`) as MLflow dataset inputs, their split as context."""
    return [
        DatasetInput(BetonDataset(str(data / beton.path.name), f"{source_name}-{split}", beton.sha256, beton.images,
                                  dataset.num_classes)._to_mlflow_entity(), tags=[InputTag(DATASET_CONTEXT_TAG, split)])
        for split, beton in dataset.files.items() if split in splits
    ]


def log_data_inputs(client: MlflowClient, run_id: str, inputs: list[DatasetInput]) -> None:
    """Skips what the run has already (a resumed or re-evaluated run would list its data twice)."""
    have = {(i.dataset.name, i.dataset.digest) for i in client.get_run(run_id).inputs.dataset_inputs}
    new = [i for i in inputs if (i.dataset.name, i.dataset.digest) not in have]
    if new:
        client.log_inputs(run_id, datasets=new)


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


def log_model(uri: str, run_id: str, model: torch.nn.Module, dataset: Dataset,
              resolution: int) -> mlflow.models.model.ModelInfo:
    """MLflow's pt2 format: an exported graph that loads without this project's code or pickle, with the
    class names and the validation transform as metadata, so `predict` needs nothing else."""
    # Imported here: the transform brings OpenCV and Pillow, which the training workers (they import
    # this module to log their epochs) never use.
    from pipeline.data.transforms import ValTransform

    mlflow.set_tracking_uri(uri)
    transform = ValTransform.for_data(dataset.preprocess, resolution)
    # A batch of 2: torch.export fixes size-1 dimensions, and the batch must stay free.
    example = torch.zeros(2, 3, transform.resolution, transform.resolution).numpy()
    with mlflow.start_run(run_id=run_id):
        # Explicit requirements: inferring them imports and probes the whole venv (slow, and noisy).
        return mlflow.pytorch.log_model(
            model.eval(), name="model", input_example=example, serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={"classes": dataset.classes, "transform": transform.metadata()},
        )
