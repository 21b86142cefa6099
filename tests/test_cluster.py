"""A real multi-node Ray cluster on this machine: two raylets on loopback (a head and a worker node, one
CPU each, so a two-worker run spans both), an MLflow tracking server and an S3-compatible server.
The nodes share this machine's filesystem, which would hide a file written to the wrong place, so the
tests check where every file goes: the tracking server, the declared storage, the declared outputs.
The last tests kill the worker node, as when a machine dies."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT, load_params
from pipeline.runs.store import RAY_SNAPSHOT, RESULT_MARKER, RESULT_WEIGHTS
from pipeline.storage.location import Location
from tests._trees import WNIDS, class_folder_tree, flat_val_with_devkit, ilsvrc_archives
from tests.cluster import LocalCluster, mlflow_server, s3_server, wait_until
from tests.conftest import (
    FAST_MODEL,
    change_params,
    clean_copy,
    ran,
    run_stage,
    training_overrides,
    write_params,
)

pytestmark = pytest.mark.slow  # every test here trains or runs stages on a cluster

S3_KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
LONG_RUN_EPOCHS = 8


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


def on_cluster(cluster: LocalCluster, env: dict | None = None) -> dict:
    """The environment of a stage that joins `cluster`."""
    return cluster.env | {"RAY_ADDRESS": cluster.address} | (env or {})


def train_workers(cluster: LocalCluster) -> dict[str, tuple[str, str]]:
    """Every Ray Train worker that has run on the cluster, by actor id, with its Ray job (each stage's
    driver is one) and node (the state API keeps finished actors)."""
    listed = subprocess.run(["ray", "list", "actors", "--address", cluster.dashboard, "--filter",
                             "class_name=RayTrainWorker", "--format", "json", "--limit", "1000"],
                            env=cluster.env, capture_output=True, text=True, timeout=60, check=True)
    if listed.stdout.startswith("No resource"):  # the CLI's answer when there is no such actor yet
        return {}
    return {actor["actor_id"]: (actor["job_id"], actor["node_id"]) for actor in json.loads(listed.stdout)}


def nodes_of_new_workers(cluster: LocalCluster, before: dict) -> dict[str, set[str]]:
    """The nodes of the workers started since `before`, by Ray job."""
    nodes: dict[str, set[str]] = {}
    for actor, (job, node) in train_workers(cluster).items():
        if actor not in before:
            nodes.setdefault(job, set()).add(node)
    return nodes


def tracked(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def epochs_logged(uri: str, run_id: str) -> list[int]:
    return sorted(metric.step for metric in MlflowClient(uri).get_metric_history(run_id, "val_top1_error"))


def test_a_file_tracking_store_is_refused_with_several_nodes(cluster, tmp_path, digits_betons):
    params, _ = write_params(tmp_path, training_overrides(tmp_path))
    result = run_stage("train", "--params", str(params), "--model", FAST_MODEL, "--data", str(digits_betons),
                       "--out", str(tmp_path / "out"), env=on_cluster(cluster), check=False)
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

    run_stage("train", "--params", str(params), "--model", FAST_MODEL, "--data", s3_uri(s3, "pipeline/beton"),
              "--out", s3_uri(s3, "pipeline/outputs/lenet5"), env=on_cluster(cluster, S3_KEYS), timeout=900)
    [nodes] = nodes_of_new_workers(cluster, before).values()
    assert len(nodes) == 2, "the two workers ran on the two nodes"
    runs = tracked(tracking, "s3")
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert epochs_logged(tracking, runs[0].info.run_id) == [1, 2, 3]
    [record] = [child for child in (bucket / "runs").children() if child.name.startswith(f"{FAST_MODEL}-")]
    assert sorted(child.name for child in record.children() if not child.name.startswith(".")) == \
        sorted([RESULT_MARKER, RESULT_WEIGHTS]), "a finished run keeps its result, not its checkpoints"
    assert {child.name for child in (bucket / "outputs" / "lenet5").children()} == {"model.pt", "metrics.json", "report.json", "history.csv", "steps.csv"}
    # The nodes copied the data once (they share this machine's disk, so once in all), verified.
    copies = list((tmp_path / "cache").glob("*/train.beton"))
    assert len(copies) == 1 and copies[0].read_bytes() == (digits_betons / "train.beton").read_bytes()
    # Nothing landed in the params folder or the project, where a forgotten default would put it.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "params.yaml"]


# The README's commands for the whole pipeline as one Ray job, as written (the test's head and tracking
# server listen on other ports than the README's).
README_PIPELINE_JOB = """ray job submit --address http://127.0.0.1:8265 \\
    --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://HEAD_IP:5000"}}' -- bash -c "cd $PWD && dvc repro\""""
README_AFTERWARDS = "dvc metrics show && dvc plots show"
PRESET = "params-imagenet-alexnet2012.yaml"
PHOTO = (500, 375)  # ILSVRC-2012's most common size
TRAIN_PER_CLASS, VAL_PER_CLASS = 45, 8  # 135 train images: one step of the preset's batch of 128
# What two 1-CPU nodes without a GPU cannot take from the preset: 8 GPU workers of 8 CPUs each, 90 epochs,
# four members of 8 workers. Only these keys and data.root change: the train stage's run spans both nodes,
# and so do the ensemble's two 1-worker members, trained at once.
ON_THIS_MACHINE = {
    "train": {"epochs": 1},
    "ensemble": {"epochs": 1, "members": 2, "num_workers": 1},
    "ray": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
}


def imagenet_download(root: Path) -> Path:
    """ILSVRC-2012 as downloaded (root/ILSVRC2012_img_train.tar, a tar of per-class tars; the flat
    ILSVRC2012_img_val.tar; the devkit tar.gz), of photo-sized JPEGs; their extracted tree beside it."""
    tree = class_folder_tree(root.with_name(f"{root.name}-extracted"),
                             {"train": {wnid: TRAIN_PER_CLASS for wnid in WNIDS}}, size=PHOTO)
    val_wnids = [WNIDS[index % len(WNIDS)] for index in range(VAL_PER_CLASS * len(WNIDS))]
    return ilsvrc_archives(tree, root, *flat_val_with_devkit(tree, val_wnids, WNIDS, size=PHOTO))


@pytest.mark.timeout(1200)
def test_the_alexnet2012_preset_as_one_job_lands_in_the_project(cluster, tracking, tmp_path):
    """The README's ImageNet and cluster sections together: a preset copied to params.yaml, its data.root
    set, and the whole pipeline submitted as one Ray job over both nodes, on ImageNet-shaped archives."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert README_PIPELINE_JOB in readme and README_AFTERWARDS in readme
    download = imagenet_download(tmp_path / "ILSVRC2012")
    project = clean_copy(tmp_path / "project", {})
    shutil.copy(PROJECT_ROOT / PRESET, project / "params.yaml")
    # The preset reads the archives as downloaded: only the root and the machine-size keys change.
    change_params(project, ON_THIS_MACHINE | {"data": {"root": str(download)}})
    params = load_params(project / "params.yaml")
    command = README_PIPELINE_JOB.replace("127.0.0.1:8265", cluster.dashboard.removeprefix("http://"))
    command = command.replace("http://HEAD_IP:5000", tracking)
    before = train_workers(cluster)
    job = subprocess.run(["bash", "-c", command], cwd=project, env=cluster.env, capture_output=True, text=True,
                         timeout=1100)
    assert job.returncode == 0, job.stdout + job.stderr
    assert ran(job.stdout) == {"source", "prepare", "preprocess", "train@alexnet2012", "evaluate@alexnet2012", "ensemble"}
    assert "Training 2 members, 2 at a time" in job.stdout
    # Each stage is a Ray job of its own: the train stage's two workers, and the ensemble's two members,
    # ran one on each node.
    spans = nodes_of_new_workers(cluster, before)
    assert [len(nodes) for nodes in spans.values()] == [2, 2], spans

    # The preset's data preparation, evaluation and papers' table ...
    dataset = json.loads((project / "data/beton/dataset.json").read_text())
    assert dataset["classes"] == sorted(WNIDS)
    assert dataset["preprocess"]["short_side"] == 260 and dataset["preprocess"]["max_resolution"] == 520
    evaluated = json.loads((project / "outputs/evaluate/alexnet2012/metrics.json").read_text())["alexnet2012"]
    assert {"center_top1_error", "ten_crop_top1_error", "ten_crop_top5_error"} <= set(evaluated)
    assert evaluated["ten_crop_top5_error"] == 0, "three classes: top-5 holds them all"
    ensemble = json.loads((project / "outputs/ensemble/report.json").read_text())
    assert ensemble["protocol"] == "ten_crop" and ensemble["models"] == 3
    table = (project / "outputs/ensemble/papers.md").read_text()
    row = next(line for line in table.splitlines()
               if line.startswith("| alexnet2012 (evaluate@alexnet2012) | ten_crop | 1 |"))
    assert row.endswith("| 0.407 / 0.182 | Krizhevsky et al. 2012, Table 2 |")

    # ... and what a local `dvc repro` leaves in the project: the lock file, metrics, plots, the run store ...
    # The main pipeline's (the sweep runs apart); the source stage fingerprints the archives at every run.
    status = subprocess.run(["dvc", "status", "--json", "dvc.yaml"], cwd=project, env=cluster.env,
                            capture_output=True, text=True, timeout=300)
    assert set(json.loads(status.stdout)) <= {"source"}, "the lock file matches the project: nothing left to reproduce"
    shown = subprocess.run(["bash", "-c", README_AFTERWARDS], cwd=project, env=cluster.env, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and "val_top1_error" in shown.stdout, shown.stdout + shown.stderr
    assert (project / "dvc_plots" / "index.html").is_file()
    assert list(project.glob(f"ray_results/alexnet2012-*/{RESULT_MARKER}"))
    # ... while its MLflow runs are at the tracking server, none in a file store of the project.
    runs = tracked(tracking, params.mlflow.experiment)
    assert {run.info.status for run in runs} == {"FINISHED"}
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert sorted(run.data.tags["dvc_stage"] for run in parents) == ["ensemble", "train@alexnet2012"]
    [trained] = [run for run in runs if run.data.tags["dvc_stage"] == "train@alexnet2012"]
    assert trained.data.params["train.alexnet_groups"] == "2" and trained.data.params["train.pca_lighting_std"] == "0.1"
    assert "ten_crop_top1_error" in trained.data.metrics, "the evaluate stage logs on the training run"
    assert not (project / "mlflow.db").exists()


def train_in_background(cluster, params: Path, tmp_path: Path) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def train() -> None:
        outcome["result"] = run_stage("train", "--params", str(params), "--model", FAST_MODEL, "--data",
                                      str(tmp_path / "beton"), "--out", str(tmp_path / "out"),
                                      env=on_cluster(cluster), timeout=900, check=False)

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
    assert epochs_logged(tracking, run_id) == list(range(1, LONG_RUN_EPOCHS + 1)), "no epoch lost or repeated"
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

