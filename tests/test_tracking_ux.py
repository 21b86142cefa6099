"""What a user meets in MLflow: the data each run read as dataset inputs, epochs at their numbers, the
ensemble's run linked to the model it registered; a basic-auth tracking server that refuses missing or
wrong credentials before any training and takes the right ones, which never show in runs or logs; two
stages' private Rays at once, on loopback, without each other's tracebacks."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import MlflowParams, PROJECT_ROOT
from pipeline.data.dataset import Dataset
from tests.cluster import mlflow_server
from tests.conftest import (
    ENSEMBLE_MEMBERS, FAST_MODEL, stage_command, steps, training_overrides, without_ray_address, write_params,
)

ADMIN_PASSWORD = "admin-password-for-the-tests"
PIPELINE_USER, PIPELINE_PASSWORD = "pipeline", "pipeline-password-for-the-tests"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def pipeline_runs(lenet5_pipeline):
    """The shared small pipeline's MLflow runs (tests/conftest.py: lenet5_pipeline)."""
    client = MlflowClient(lenet5_pipeline["params"].mlflow.tracking_uri)
    return lenet5_pipeline | {"client": client,
                              "runs": client.search_runs([client.get_experiment_by_name("tests").experiment_id])}


def run_of(runs, stage: str):
    """The stage's one top-level run."""
    [run] = [run for run in runs if run.data.tags.get("dvc_stage") == stage and "mlflow.parentRunId" not in run.data.tags]
    return run


def assert_lists_the_data(run, betons: Path, source: str) -> None:
    dataset = Dataset.read(betons)
    listed = {next(tag.value for tag in i.tags if tag.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert sorted(listed) == ["train", "val"] and len(run.inputs.dataset_inputs) == 2, "each file once"
    for split, entry in listed.items():
        beton = dataset.files[split]
        assert entry.name == f"{source}-{split}"
        assert entry.digest == beton.sha256[:32] and json.loads(entry.source) == {"uri": str(betons / f"{split}.beton")}
        assert json.loads(entry.profile) == {"images": beton.images, "classes": 10, "sha256": beton.sha256}


@pytest.mark.slow
def test_training_and_evaluation_list_their_data_and_log_epochs_at_their_numbers(pipeline_runs, digits_betons):
    client, runs = pipeline_runs["client"], pipeline_runs["runs"]
    trained = run_of(runs, f"train@{FAST_MODEL}")
    # The evaluation joined the training run and listed its val file again: it shows once.
    assert "center_top1_error" in trained.data.metrics
    assert_lists_the_data(trained, digits_betons, pipeline_runs["params"].data.source)
    assert steps(client, trained.info.run_id, "val_top1_error") == [1, 2], "the console's epoch 1/2 and 2/2"


@pytest.mark.slow
def test_the_ensemble_lists_its_data_and_links_the_best_model_it_registered(pipeline_runs, digits_betons):
    client, runs, summary = pipeline_runs["client"], pipeline_runs["runs"], pipeline_runs["summary"]
    parent = run_of(runs, "ensemble")
    members = {run.info.run_name: run for run in runs
               if run.data.tags.get("dvc_stage") == "ensemble" and "mlflow.parentRunId" in run.data.tags}
    assert sorted(members) == [f"member-{i}" for i in range(ENSEMBLE_MEMBERS)]
    for run in (parent, *members.values()):
        assert_lists_the_data(run, digits_betons, pipeline_runs["params"].data.source)
    name = pipeline_runs["params"].mlflow.registered_model
    best = client.get_model_version_by_alias(name, "best")
    assert parent.data.tags["registered_model"] == f"{name}/{best.version}"
    # Registered from its logged model (models:/m-ID), which the parent run lists as its output.
    model_id = best.source.removeprefix("models:/")
    assert [output.model_id for output in parent.outputs.model_outputs] == [model_id]
    # The version is the logged model of the run that trained the best of the models combined.
    source = client.get_logged_model(model_id).source_run_id
    assert best.run_id == source
    expected = parent.data.tags["registered_model_is"]
    assert summary["model_top1_error"][expected] == min(summary["model_top1_error"].values())
    trained_by = (members[expected.replace("_", "-")] if expected.startswith("member_")
                  else run_of(runs, f"train@{expected}"))
    assert source == trained_by.info.run_id


def test_credentials_in_the_tracking_uri_are_refused_without_repeating_them():
    params = MlflowParams(tracking_uri="http://pipeline:s3cret@mlflow.example:5000", experiment="x",
                          log_model=False, system_metrics=False, registered_model="m")
    with pytest.raises(tracking.TrackingStoreError) as refused:
        tracking.tracking_uri(params, {})
    assert "s3cret" not in str(refused.value) and "http://mlflow.example:5000" in str(refused.value)
    assert "~/.mlflow/credentials" in str(refused.value)


# --- a basic-auth tracking server on loopback -------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The README's server: basic authentication, the admin's password set, one user for the pipeline."""
    folder = tmp_path_factory.mktemp("auth-server")
    (folder / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = without_ray_address() | {"MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
                                   "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-secret-key-for-the-tests",
                                   "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    server = mlflow_server(folder, env, basic_auth=True)
    request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/users/create", method="POST",
                                     data=json.dumps({"username": PIPELINE_USER, "password": PIPELINE_PASSWORD}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": basic("admin", ADMIN_PASSWORD)})
    urllib.request.urlopen(request, timeout=30).read()
    yield server
    server.stop()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def stage_home(folder: Path, password: str | None) -> dict:
    """A HOME with MLflow's credentials file for the pipeline's user (none when password is None), and
    the environment of a stage that starts its own Ray."""
    home = folder / "home"
    home.mkdir(parents=True)
    if password is not None:
        (home / ".mlflow").mkdir()
        (home / ".mlflow" / "credentials").write_text(
            f"[mlflow]\nmlflow_tracking_username = {PIPELINE_USER}\nmlflow_tracking_password = {password}\n")
    env = without_ray_address() | {"HOME": str(home)}
    for name in tracking.CREDENTIALS_VARIABLES + ("MLFLOW_TRACKING_URI",):
        env.pop(name, None)
    return env


def train_arguments(folder: Path, server_url: str, betons: Path, seed: int = 0) -> list[str]:
    # One worker each: two stages at once on 2 cores, and what is tested is their Rays, not data parallelism.
    overrides = training_overrides(folder, ray={"num_workers": 1}, epochs=1, seed=seed)
    overrides["mlflow"]["tracking_uri"] = server_url
    params, _ = write_params(folder, overrides)
    return stage_command("train", "--params", str(params), "--model", FAST_MODEL, "--data", str(betons),
                         "--out", str(folder / "out"))


@pytest.mark.slow
def test_missing_or_wrong_credentials_stop_the_stage_in_one_line_before_training(auth_server, tmp_path,
                                                                                 digits_betons):
    for case, password, expected in [
        ("missing", None, f"error: MLflow tracking server {auth_server.url}: asks for a user name and password, "
                          "and this machine has none; put them in ~/.mlflow/credentials"),
        ("wrong", "not-the-password", f"error: MLflow tracking server {auth_server.url}: refused user "
                                      f"'{PIPELINE_USER}' (from ~/.mlflow/credentials): wrong user name or password"),
    ]:
        folder = tmp_path / case
        result = subprocess.run(train_arguments(folder, auth_server.url, digits_betons), cwd=PROJECT_ROOT,
                                env=stage_home(folder, password), capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(expected), result.stderr
        assert not (folder / "ray_results").exists() and not (folder / "out").exists(), "nothing trained"


def listening_addresses(root: psutil.Process) -> set[str]:
    """Where Ray's processes under `root` listen. Not the training workers: torch's TCPStore (rank 0's
    rendezvous for the process group, which Ray Train sets up) listens on every interface, and torch takes
    no address for it to bind."""
    try:
        family = {process.pid for process in root.children(recursive=True)
                  if "RayTrainWorker" not in " ".join(process.cmdline())} | {root.pid}
    except psutil.NoSuchProcess:
        return set()
    return {connection.laddr.ip for connection in psutil.net_connections("inet")
            if connection.status == psutil.CONN_LISTEN and connection.pid in family}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_stages_at_once_log_with_the_credentials_file_on_private_loopback_rays(auth_server, tmp_path,
                                                                                   digits_betons, monkeypatch):
    stages = []
    for seed, name in enumerate(("first", "second")):
        folder = tmp_path / name
        # Seeds of their own: the same run name would make the second stage continue the first's run.
        command = train_arguments(folder, auth_server.url, digits_betons, seed=seed)
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=stage_home(folder, PIPELINE_PASSWORD), text=True,
                                   stdout=(folder / "stage.log").open("w"), stderr=subprocess.STDOUT)
        stages.append((process, folder / "stage.log"))
    listening: set[str] = set()
    while any(process.poll() is None for process, _ in stages):
        for process, _ in stages:
            listening |= listening_addresses(psutil.Process(process.pid)) if process.poll() is None else set()
        time.sleep(0.5)
    outputs = [log.read_text() for _, log in stages]
    for (process, _), output in zip(stages, outputs):
        assert process.returncode == 0, output
        assert "Found multiple active Ray instances" not in output, "the other stage's Ray confused this one's"
        assert PIPELINE_PASSWORD not in output
    assert listening and listening <= LOOPBACK, f"a private Ray listened on {listening - LOOPBACK}"

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    client = MlflowClient(auth_server.url)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 2 and {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        recorded = json.dumps([run.data.params, run.data.tags])
        assert PIPELINE_PASSWORD not in recorded and ADMIN_PASSWORD not in recorded
