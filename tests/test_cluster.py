"""A real multi-node Ray cluster on this machine: two raylets on loopback (a head and a worker node, one
CPU each, so a two-worker run spans both), an MLflow tracking server and an S3-compatible server.
The nodes share this machine's filesystem, which would hide a file written to the wrong place, so the
tests check where every file goes: the tracking server, the declared storage, the declared outputs.
The last tests kill the worker node, as when a machine dies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT
from pipeline.runs import RAY_SNAPSHOT, RESULT_MARKER, RESULT_WEIGHTS
from pipeline.storage import Location
from tests.cluster import LocalCluster, mlflow_server, s3_server, wait_until
from tests.conftest import FAST_MODEL, FAST_RESOLUTION, clean_copy, training_overrides, write_params

S3_KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
LONG_RUN_EPOCHS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = LocalCluster.start(tmp_path_factory.mktemp("cluster-home"))
    try:
        started.add_node("worker")
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory, cluster):
    server = mlflow_server(tmp_path_factory.mktemp("tracking"), cluster.env)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory, cluster):
    server = s3_server(tmp_path_factory.mktemp("s3"), cluster.env | S3_KEYS)
    yield server.url.removeprefix("http://")
    server.stop()


def s3_uri(endpoint: str, path: str) -> str:
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1&allow_bucket_creation=true"


def run_stage(cluster: LocalCluster, stage: str, *arguments: str, env: dict | None = None,
              timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *arguments], cwd=PROJECT_ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env=cluster.env | {"RAY_ADDRESS": cluster.address} | (env or {}))


def train_workers(cluster: LocalCluster) -> dict[str, str]:
    """Every Ray Train worker that has run on the cluster, by actor id, with its node (the state API keeps
    finished actors)."""
    listed = subprocess.run(["ray", "list", "actors", "--address", cluster.dashboard, "--filter",
                             "class_name=RayTrainWorker", "--format", "json", "--limit", "1000"],
                            env=cluster.env, capture_output=True, text=True, timeout=60, check=True)
    if listed.stdout.startswith("No resource"):  # the CLI's answer when there is no such actor yet
        return {}
    return {actor["actor_id"]: actor["node_id"] for actor in json.loads(listed.stdout)}


def nodes_of_new_workers(cluster: LocalCluster, before: dict[str, str]) -> set[str]:
    return {node for actor, node in train_workers(cluster).items() if actor not in before}


def tracked(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def epochs_logged(uri: str, run_id: str) -> list[int]:
    return sorted(metric.step for metric in MlflowClient(uri).get_metric_history(run_id, "val_top1_error"))


def test_a_file_tracking_store_is_refused_with_several_nodes(cluster, tmp_path, digits_betons):
    params, _ = write_params(tmp_path, training_overrides(tmp_path))
    result = run_stage(cluster, "train", "--params", str(params), "--model", FAST_MODEL, "--data", str(digits_betons),
                       "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the cluster has 2 nodes, and the MLflow store sqlite:///" in result.stderr
    assert "run an MLflow tracking server" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "out").exists()


def test_train_stage_spans_both_nodes_with_s3_storage(cluster, tracking, s3, tmp_path, digits_betons):
    """One worker per node; data, run store and outputs in an S3 bucket; metrics at the tracking server."""
    bucket = Location.parse(s3_uri(s3, "pipeline"), S3_KEYS)
    bucket.make_dirs()
    for name in ("dataset.json", "train.beton", "val.beton"):
        (bucket / "beton" / name).write_bytes((digits_betons / name).read_bytes())
    overrides = training_overrides(tmp_path, epochs=3)
    overrides["ray"] |= {"storage_path": s3_uri(s3, "pipeline/runs"), "local_data_cache": str(tmp_path / "cache")}
    overrides["mlflow"] |= {"tracking_uri": tracking, "experiment": "s3"}
    params, _ = write_params(tmp_path, overrides)
    before = train_workers(cluster)

    result = run_stage(cluster, "train", "--params", str(params), "--model", FAST_MODEL,
                       "--data", s3_uri(s3, "pipeline/beton"), "--out", s3_uri(s3, "pipeline/outputs/lenet5"),
                       env=S3_KEYS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(nodes_of_new_workers(cluster, before)) == 2, "the two workers ran on the two nodes"
    runs = tracked(tracking, "s3")
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert epochs_logged(tracking, runs[0].info.run_id) == [0, 1, 2]
    [record] = [child for child in (bucket / "runs").children() if child.name.startswith(f"{FAST_MODEL}-")]
    assert sorted(child.name for child in record.children() if not child.name.startswith(".")) == \
        sorted([RESULT_MARKER, RESULT_WEIGHTS]), "a finished run keeps its result, not its checkpoints"
    assert {child.name for child in (bucket / "outputs" / "lenet5").children()} == {"model.pt", "metrics.json", "history.csv"}
    # The nodes copied the data once (they share this machine's disk, so once in all), verified.
    copies = list((tmp_path / "cache").glob("*/train.beton"))
    assert len(copies) == 1 and copies[0].read_bytes() == (digits_betons / "train.beton").read_bytes()
    # Nothing landed in the params folder or the project, where a forgotten default would put it.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "params.yaml"]


def test_ensemble_members_spread_over_both_nodes(cluster, tracking, tmp_path, digits_betons):
    overrides = training_overrides(tmp_path)
    overrides["ensemble"] |= {"members": 2, "epochs": 1, "num_workers": 1, "max_concurrent": None}
    overrides["mlflow"] |= {"tracking_uri": tracking, "experiment": "ensemble"}
    params, _ = write_params(tmp_path, overrides)
    before = train_workers(cluster)
    result = run_stage(cluster, "ensemble", "--params", str(params), "--data", str(digits_betons),
                       "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Training 2 members, 2 at a time" in result.stdout
    assert len(nodes_of_new_workers(cluster, before)) == 2, "one member on each node"
    assert len(list((tmp_path / "ray_results").glob(f"*/{RESULT_MARKER}"))) == 2
    runs = tracked(tracking, "ensemble")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.status for run in parents] == ["FINISHED"] and len(runs) == 3


# The README's commands for the whole pipeline as one Ray job, as written (the test's head and tracking
# server listen on other ports than the README's).
README_PIPELINE_JOB = """ray job submit --address http://127.0.0.1:8265 \\
    --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://HEAD_IP:5000"}}' -- bash -c "cd $PWD && dvc repro\""""
README_AFTERWARDS = "dvc metrics show && dvc plots show"


@pytest.mark.timeout(1200)
def test_the_whole_pipeline_as_one_job_lands_in_the_project(cluster, tracking, tmp_path):
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert README_PIPELINE_JOB in readme and README_AFTERWARDS in readme
    project = clean_copy(tmp_path / "project", {
        "train": {"models": [FAST_MODEL], "epochs": 1, "resolution": FAST_RESOLUTION},
        "ensemble": {"model": FAST_MODEL, "members": 1, "epochs": 1, "num_workers": 1, "include": [FAST_MODEL]},
        "evaluate": {"protocols": ["center"]},
        "mlflow": {"experiment": "pipeline-job"},
    })
    command = README_PIPELINE_JOB.replace("127.0.0.1:8265", cluster.dashboard.removeprefix("http://"))
    command = command.replace("http://HEAD_IP:5000", tracking)
    job = subprocess.run(["bash", "-c", command], cwd=project, env=cluster.env, capture_output=True, text=True,
                         timeout=1100)
    assert job.returncode == 0, job.stdout + job.stderr
    # Afterwards the project has what a local `dvc repro` leaves: the lock file, metrics, plots ...
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {"prepare", "preprocess", f"train@{FAST_MODEL}", "ensemble"} <= set(lock)
    status = subprocess.run(["dvc", "status", "--json"], cwd=project, env=cluster.env, capture_output=True,
                            text=True, timeout=300)
    assert json.loads(status.stdout) == {}, "the lock file matches the project: nothing left to reproduce"
    shown = subprocess.run(["bash", "-c", README_AFTERWARDS], cwd=project, env=cluster.env, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and "val_top1_error" in shown.stdout, shown.stdout + shown.stderr
    assert (project / "dvc_plots" / "index.html").is_file()
    assert list(project.glob(f"ray_results/{FAST_MODEL}-*/{RESULT_MARKER}"))
    # ... and its MLflow runs are at the tracking server, none in a file store of the project.
    stages = {run.data.tags["dvc_stage"] for run in tracked(tracking, "pipeline-job")}
    assert stages == {f"train@{FAST_MODEL}", "ensemble"}
    assert not (project / "mlflow.db").exists()


def train_in_background(cluster, params: Path, tmp_path: Path) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def train() -> None:
        outcome["result"] = run_stage(cluster, "train", "--params", str(params), "--model", FAST_MODEL,
                                      "--data", str(tmp_path / "beton"), "--out", str(tmp_path / "out"))

    thread = threading.Thread(target=train)
    thread.start()
    return thread, outcome


def long_run(tmp_path: Path, digits_betons: Path, tracking: str, experiment: str, **ray) -> Path:
    (tmp_path / "beton").symlink_to(digits_betons)
    overrides = training_overrides(tmp_path, epochs=LONG_RUN_EPOCHS, ray=ray)
    overrides["mlflow"] |= {"tracking_uri": tracking, "experiment": experiment}
    return write_params(tmp_path, overrides)[0]


def wait_for_epochs(tracking: str, experiment: str, count: int, thread: threading.Thread) -> str:
    def logged():
        assert thread.is_alive(), "the stage ended before the node was lost"
        runs = tracked(tracking, experiment)
        return runs and len(epochs_logged(tracking, runs[0].info.run_id)) >= count and runs[0].info.run_id

    return wait_until(logged, 300, f"{count} epochs in MLflow", interval=0.5)


@pytest.mark.timeout(900)
def test_a_lost_node_is_replaced_and_the_run_resumes(cluster, tracking, tmp_path, digits_betons):
    params = long_run(tmp_path, digits_betons, tracking, "node-loss")
    thread, outcome = train_in_background(cluster, params, tmp_path)
    run_id = wait_for_epochs(tracking, "node-loss", 2, thread)
    cluster.kill_node("worker")
    time.sleep(5)  # the run is stuck: one CPU left for two workers
    assert thread.is_alive()
    cluster.add_node("replacement")
    thread.join(timeout=600)
    result = outcome["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert [run.info.status for run in tracked(tracking, "node-loss")] == ["FINISHED"]
    assert epochs_logged(tracking, run_id) == list(range(LONG_RUN_EPOCHS)), "no epoch lost or repeated"
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + LONG_RUN_EPOCHS


@pytest.mark.timeout(900)
def test_without_a_replacement_the_run_fails_clearly_and_keeps_its_checkpoints(cluster, tracking, tmp_path,
                                                                               digits_betons):
    params = long_run(tmp_path, digits_betons, tracking, "no-capacity", capacity_timeout_s=20)
    thread, outcome = train_in_background(cluster, params, tmp_path)
    wait_for_epochs(tracking, "no-capacity", 2, thread)
    cluster.kill_node("replacement")
    thread.join(timeout=600)
    result = outcome["result"]
    assert result.returncode == 1, result.stdout + result.stderr
    # The stage says it in one line of its own, no traceback of its own; Ray's forwarded worker and
    # controller logs (lines prefixed with the actor) show the lost connections.
    lines = result.stderr.splitlines()
    [error] = [line for line in lines if line.startswith("error: ")]
    assert "the cluster had no room for 2 worker(s) within ray.capacity_timeout_s=20 s" in error
    assert not [line for line in lines if line.startswith("Traceback")]
    assert [run.info.status for run in tracked(tracking, "no-capacity")] == ["FAILED"]
    assert list((tmp_path / "ray_results").glob(f"*/{RAY_SNAPSHOT}")), "the checkpoints are kept to resume from"
    assert list((tmp_path / "ray_results").glob("*/checkpoint_*"))

