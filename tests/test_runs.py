"""Run identity, the run store, the project's home and the MLflow store under concurrent starts."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import PROJECT_ROOT, MlflowParams, load_params
from pipeline.errors import InputError
from pipeline.runs.identity import RunSpec
from pipeline.runs.store import RunResult, RunStore
from pipeline.storage.location import Location
from pipeline.storage.paths import command_line_location, params_location, project_home

RAY_COPY = Path("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd")
DATA = {"train": "a" * 64, "val": "b" * 64}


def spec(params=None, **changes) -> RunSpec:
    params = params or load_params()
    fields = dict(model="alexnet2012", num_classes=10, recipe=params.train.recipe(), seed=0, epochs=2, num_workers=2,
                  use_gpu=False, data_sha256=DATA) | changes
    return RunSpec(**fields)


def with_recipe(**changes):
    params = load_params()
    return params.train.recipe().model_copy(update=changes)


def test_run_name_is_stable():
    # Pinned: a change here renames every run, so interrupted runs would no longer resume. Raise
    # runs.RUN_FORMAT on purpose when training changes what a run computes, and update this name.
    recipe = with_recipe(lr=0.01, batch_size=32, resolution=67, schedule="plateau", plateau_patience=2, dropout=0.0,
                         crop_min_scale=0.35, alexnet_init="kaiming", alexnet_groups=1, momentum=0.9,
                         weight_decay=0.0005, label_smoothing=0.0, pca_lighting_std=0.0, parallelism="data",
                         gradient_compression="none")
    assert spec(recipe=recipe).name == "alexnet2012-1fdc248eec1e"


@pytest.mark.parametrize("before, after", [
    ({}, {"recipe": with_recipe(models=["vgg11_bn"])}),                       # the stage's model list
    ({}, {"recipe": with_recipe(step_size=7, plateau_patience=5)}),           # ignored by the cosine schedule
    ({"recipe": with_recipe(schedule="plateau")},
     {"recipe": with_recipe(schedule="plateau", step_size=7)}),              # and by plateau
    ({}, {"recipe": with_recipe(amp=False, channels_last=False)}),            # GPU-only keys on the CPU
    ({"model": "vgg11"}, {"model": "vgg11", "recipe": with_recipe(alexnet_init="paper")}),  # alexnet2012 only
])
def test_what_does_not_shape_the_weights_does_not_rename_the_run(before, after):
    assert spec(**before).name == spec(**after).name


@pytest.mark.parametrize("change", [
    {"recipe": with_recipe(lr=0.02)}, {"seed": 1}, {"epochs": 3}, {"num_workers": 1}, {"use_gpu": True},
    {"num_classes": 9}, {"data_sha256": DATA | {"val": "c" * 64}}, {"recipe": with_recipe(alexnet_init="paper")},
    {"recipe": with_recipe(schedule="step")}, {"recipe": with_recipe(schedule="plateau")},
])
def test_what_shapes_the_weights_renames_the_run(change):
    assert spec(**change).name != spec().name


def test_a_schedules_own_keys_rename_its_runs():
    plateau = with_recipe(schedule="plateau")
    assert spec(recipe=plateau).name != spec(recipe=plateau.model_copy(update={"plateau_patience": 5})).name


def test_gpu_only_keys_count_on_gpus():
    assert spec(use_gpu=True).name != spec(use_gpu=True, recipe=with_recipe(amp=False)).name


def test_params_outside_the_recipe_do_not_reach_the_name(tmp_path, params_dict):
    params_dict["ray"] |= {"max_failures": 7, "checkpoints_to_keep": 5, "storage_path": "/elsewhere"}
    params_dict["mlflow"] |= {"tracking_uri": "http://somewhere:5000", "experiment": "renamed"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict))
    assert spec(load_params(tmp_path / "params.yaml")).name == spec().name


def weights() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(4.0)}


def test_run_store_states_result_and_checkpoints(tmp_path):
    runs = RunStore(Location.local(tmp_path / "store"))
    record = runs.record("model-0")
    assert record.status() == "new"
    (record.folder / "checkpoint_000000").make_dirs()
    assert record.status() == "new", "Ray resumes only from checkpoints its snapshot lists"
    (record.folder / "checkpoint_manager_snapshot.json").write_text("{}")
    assert record.status() == "interrupted"
    history = [{"epoch": 0, "val_top1_error": 0.5}]
    record.save_result(RunResult(weights(), history), {"model": "m"}, {"val_top1_error": 0.5})
    assert record.status() == "finished"
    record.drop_checkpoints()
    assert sorted(child.name for child in record.folder.children()) == ["result.json", "result.pt"]
    loaded = record.load_result()
    assert torch.equal(loaded.weights["w"], weights()["w"]) and loaded.history == history
    assert record.marker()["identity"] == {"model": "m"}


def test_retention_keeps_the_most_recently_used_and_never_interrupted_runs(tmp_path):
    runs = RunStore(Location.local(tmp_path / "store"))
    for index in range(4):
        runs.record(f"run-{index}").save_result(RunResult(weights(), []), {}, {})
    runs.record("run-0").mark_used()  # reused last: the most recently used
    (runs.record("interrupted").folder / "checkpoint_manager_snapshot.json").write_text("{}")
    removed = runs.prune(keep=2, protect={"run-1"})
    assert sorted(removed) == ["run-2", "run-3"]
    assert sorted(child.name for child in runs.root.children()) == ["interrupted", "run-0", "run-1"]
    assert runs.prune(keep=None, protect=set()) == []


def test_project_home(tmp_path):
    assert project_home({}, PROJECT_ROOT) == PROJECT_ROOT
    assert project_home({"DVC_ROOT": str(tmp_path)}, tmp_path / ".dvc/tmp/exps/tmpab12") == tmp_path
    assert project_home({}, RAY_COPY) is None
    assert project_home({"PIPELINE_HOME": str(tmp_path)}, RAY_COPY) == tmp_path
    with pytest.raises(InputError, match="PIPELINE_HOME=relative: not an absolute path to a folder"):
        project_home({"PIPELINE_HOME": "relative"}, RAY_COPY)


def test_relative_locations_come_from_the_home_or_are_refused(tmp_path):
    assert params_location("ray_results", "ray.storage_path", {}, PROJECT_ROOT).path == str(PROJECT_ROOT / "ray_results")
    dvc_temp = {"DVC_ROOT": str(tmp_path)}
    assert params_location("ray_results", "ray.storage_path", dvc_temp, tmp_path / ".dvc/tmp/exps/x").path == \
        str(tmp_path / "ray_results")
    with pytest.raises(InputError, match=r"ray.storage_path='ray_results' is relative, .*ray job submit.*PIPELINE_HOME"):
        params_location("ray_results", "ray.storage_path", {}, RAY_COPY)
    assert params_location("/abs/runs", "ray.storage_path", {}, RAY_COPY).path == "/abs/runs"
    assert str(params_location("s3://bucket/runs?region=us-east-1", "k", {}, RAY_COPY)) == "s3://bucket/runs"

    # Command-line paths are the stage's DVC outputs: relative to the folder DVC runs the stage in.
    assert command_line_location("outputs/x", "--out", {}, tmp_path).path == str(tmp_path / "outputs/x")
    with pytest.raises(InputError, match=r"--out outputs/x is relative"):
        command_line_location("outputs/x", "--out", {}, RAY_COPY)
    assert command_line_location("outputs/x", "--out", {"PIPELINE_HOME": str(tmp_path)}, RAY_COPY).path == \
        str(tmp_path / "outputs/x")


def test_default_tracking_store_is_the_homes(tmp_path):
    params = load_params().mlflow
    assert tracking.tracking_uri(params, {}, PROJECT_ROOT) == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    assert tracking.tracking_uri(params, {"DVC_ROOT": str(tmp_path)}, tmp_path / "x") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.tracking_uri(params, {"MLFLOW_TRACKING_URI": "http://h:5000"}, RAY_COPY) == "http://h:5000"
    with pytest.raises(InputError, match=r"mlflow.tracking_uri: no store is set .*ray job submit"):
        tracking.tracking_uri(params, {}, RAY_COPY)


def mlflow_params(uri: str, experiment: str = "tests") -> MlflowParams:
    return load_params().mlflow.model_copy(update={"tracking_uri": uri, "experiment": experiment})


def open_store_in_process(uri: str, barrier, results) -> None:
    barrier.wait()
    try:
        results.put(tracking.open_store(mlflow_params(uri)).experiment_id)
    except Exception as error:  # noqa: BLE001 - the test reports whatever went wrong
        results.put(f"{type(error).__name__}: {error}")


def test_stages_starting_at_once_create_the_store_and_experiment_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=open_store_in_process, args=(uri, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert len(set(outcomes)) == 1 and outcomes[0].isdigit(), outcomes
    assert sorted(e.name for e in MlflowClient(uri).search_experiments()) == ["Default", "tests"]


def test_a_store_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"
    with pytest.raises(tracking.TrackingStoreError, match=r"^MLflow store sqlite:///.*a_file/mlflow.db: cannot be written"):
        tracking.open_store(mlflow_params(uri))
    with pytest.raises(tracking.TrackingStoreError, match=r"^MLflow tracking server http://127.0.0.1:9: not reachable"):
        tracking.open_store(mlflow_params("http://127.0.0.1:9"))


MOVED_PROJECT_LOGS = """
import sys
from pipeline import tracking
from pipeline.config import load_params
store = tracking.open_store(load_params().mlflow.model_copy(update={"tracking_uri": None, "experiment": "tests"}))
store.client.log_text(sys.argv[1], "new", "new.txt")
print(store.client.get_run(sys.argv[1]).info.artifact_uri)
"""


def test_a_moved_project_keeps_its_artifacts_in_the_project(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    store = tracking.open_store(mlflow_params(None), {"PIPELINE_HOME": str(first)})
    run = tracking.open_run(store, "r", {}, {}, reuse_finished=True)
    store.client.log_text(run.id, "hello", "note.txt")
    second = tmp_path / "second"
    shutil.move(first, second)

    # A new process, as a stage run after the move is (MLflow caches a run's artifact location).
    moved = subprocess.run([sys.executable, "-c", MOVED_PROJECT_LOGS, run.id], cwd=PROJECT_ROOT, text=True,
                           capture_output=True, env=os.environ | {"PIPELINE_HOME": str(second)}, timeout=120)
    assert moved.returncode == 0, moved.stderr
    assert "the project moved" in moved.stdout
    assert moved.stdout.strip().endswith((second / "mlartifacts").as_uri() + f"/{run.id}/artifacts")
    assert (second / "mlartifacts" / run.id / "artifacts" / "new.txt").read_text() == "new"
    mlflow.set_tracking_uri(f"sqlite:///{second / 'mlflow.db'}")
    assert mlflow.artifacts.load_text(f"runs:/{run.id}/note.txt") == "hello"
    assert not first.exists()


def test_a_stage_run_by_a_python_without_the_project_packages_says_which_environment(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    result = subprocess.run([str(bare / "bin" / "python"), "-m", "stages.train", "--model", "x", "--out", "o"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "lacks the project's packages (torch, ffcv, ray, mlflow, pydantic, yaml)" in result.stderr
    assert "source .venv/bin/activate" in result.stderr
