"""The sweep stage with real Ray Tune, Ray Train, FFCV and MLflow: ASHA stops the trials that fall
behind, a killed sweep resumes its trials from their checkpoints, a rerun trains nothing new, and a
space that cannot be searched is refused before any work.

One sweep of LeNet-5's learning rate on all the digits serves every test: three trials one at a time (so
the order in which they reach ASHA's rungs, and so what it stops, is the same in every run), the best
learning rates first, so that the last falls behind at the first rung and is stopped there. Four
epochs, so that a stopped trial is stopped well before its last: Tune ends a trial's training a second
or two after ASHA decides, an epoch or so here.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from pipeline.config import load_params
from pipeline.runs.context import run_store
from pipeline.runs.store import RAY_SNAPSHOT, RESULT_MARKER
from tests.conftest import (
    FAST_MODEL, end_tree, finish, mlflow_runs, registered_checkpoint, run_stage, start_stage, steps,
    training_overrides, wait_for, without_ray_address, write_params,
)

pytestmark = pytest.mark.slow  # every test here shares a sweep of 3 trainings

LEARNING_RATES = [0.05, 0.02, 0.0001]
EPOCHS = 4


def start_sweep(folder, log_name: str):
    env = without_ray_address()
    env.pop("MLFLOW_TRACKING_URI", None)
    log = folder / log_name
    # Its own session, so the test can end the whole tree (the stage's private Ray cluster too).
    return start_stage("sweep", "--params", str(folder / "params.yaml"), "--data", str(folder / "data"),
                       "--out", str(folder / "out"), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                       env=env), log


def run_store_files(folder) -> dict[str, float]:
    """Every file of the trials' runs with its modification time: what a rerun that trains nothing keeps
    (Tune's own records beside them, sweep-*/, are written anew by every sweep)."""
    return {str(path): path.stat().st_mtime for path in (folder / "ray_results").glob(f"{FAST_MODEL}-*/**/*")
            if path.is_file()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, digits_full_betons):
    """The sweep killed once its first checkpoint is registered, run again to the end, and its state."""
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "data").symlink_to(digits_full_betons)
    overrides = training_overrides(folder, epochs=EPOCHS, batch_size=64)
    overrides["sweep"] = {"model": FAST_MODEL, "space": {"lr": {"grid": LEARNING_RATES}}, "trials": 1,
                          "epochs": EPOCHS, "grace_period": 1, "reduction_factor": 2, "num_workers": 1,
                          "max_concurrent": 1}
    write_params(folder, overrides)

    stage, log = start_sweep(folder, "killed.log")
    try:
        wait_for(lambda: registered_checkpoint(folder), 600, "the first trial's first checkpoint")
    finally:
        end_tree(stage)  # SIGKILL: nothing is cleaned up, as when a node dies
    runs = run_store(load_params(folder / "params.yaml"))
    before = {snapshot.parent.name: runs.record(snapshot.parent.name).checkpoint_history()
              for snapshot in (folder / "ray_results").glob(f"*/{RAY_SNAPSHOT}")}

    output = finish(*start_sweep(folder, "sweep.log"))
    return {"folder": folder, "before": before, "output": output, "runs": runs,
            "metrics": json.loads((folder / "out" / "metrics.json").read_text())}


def test_asha_stops_the_trials_that_fall_behind(swept):
    metrics = swept["metrics"]
    assert metrics["trials"] == len(LEARNING_RATES) and metrics["failed"] == 0
    assert metrics["stopped_early"] >= 1 and metrics["completed"] >= 1, metrics
    assert metrics["epochs_trained"] < metrics["epochs_without_stopping"] == len(LEARNING_RATES) * EPOCHS
    curves = (swept["folder"] / "out" / "curves.csv").read_text().splitlines()
    assert curves[0] == "trial,epoch,error,status" and len(curves) - 1 == metrics["epochs_trained"]
    finals = (swept["folder"] / "out" / "by_key" / "lr.csv").read_text().splitlines()[1:]
    assert sorted(float(line.split(",")[0]) for line in finals) == sorted(LEARNING_RATES)
    completed = [line.split(",") for line in finals if int(line.split(",")[2]) == EPOCHS]
    best_lr, best_error, _ = min(completed, key=lambda row: float(row[1]))
    assert metrics["best_val_top1_error"] == float(best_error) < 0.9  # chance: 0.9


def test_the_best_recipe_is_a_params_file_and_a_command(swept):
    best = yaml.safe_load((swept["folder"] / "out" / "best_params.yaml").read_text())
    [line] = [line for line in swept["output"].splitlines() if line.strip().startswith("dvc exp run -S")]
    assert line.strip() == f"dvc exp run -S 'train.lr={best['train']['lr']!r}'"
    assert set(best) == {"train"} and best["train"]["lr"] in LEARNING_RATES
    assert swept["runs"].record(swept["metrics"]["best_run"]).status() == "finished"


def test_mlflow_holds_the_sweep_and_one_nested_run_per_trial(swept):
    client, runs = mlflow_runs(swept["folder"])
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["dvc_stage"] == "sweep"
    assert parent.data.metrics["stopped_early"] == swept["metrics"]["stopped_early"]
    assert sorted(float(run.data.params["train.lr"]) for run in trials) == sorted(LEARNING_RATES)
    assert [run.data.tags["best"] for run in trials].count("true") == 1
    for run in trials:
        epochs = steps(client, run.info.run_id, "val_top1_error")
        stopped = run.data.tags["trial_status"] == "stopped early"
        assert len(epochs) < EPOCHS if stopped else epochs == list(range(1, EPOCHS + 1)), run.data.tags
        assert {i.dataset.name for i in client.get_run(run.info.run_id).inputs.dataset_inputs} == {
            "digits-train", "digits-val"}


def test_the_killed_sweep_resumed_its_trial_from_the_checkpoint(swept):
    assert swept["before"], "the kill came before any checkpoint was registered"
    for name, history in swept["before"].items():
        record = swept["runs"].record(name)
        resumed = record.load_result().history if record.status() == "finished" else record.checkpoint_history()
        # epoch_time_s is measured: equal only if the epoch was not trained again.
        assert resumed[:len(history)] == history


def test_a_rerun_trains_nothing_new(swept):
    folder = swept["folder"]
    before = run_store_files(folder)
    output = finish(*start_sweep(folder, "rerun.log"))
    assert run_store_files(folder) == before
    assert json.loads((folder / "out" / "metrics.json").read_text()) == swept["metrics"]
    assert sorted(folder.glob(f"ray_results/*/{RESULT_MARKER}")), output


def test_a_key_that_does_not_shape_the_weights_is_refused_before_any_work(tmp_path, digits_betons):
    overrides = training_overrides(tmp_path)
    overrides["sweep"] = {"model": FAST_MODEL, "space": {"log_every_s": {"choice": [1.0, 5.0]}}}
    params, _ = write_params(tmp_path, overrides)
    result = run_stage("sweep", "--params", str(params), "--data", str(digits_betons), "--out", str(tmp_path / "out"),
                       env=without_ray_address(), check=False, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: sweep.space.log_every_s: does not shape lenet5's weights on the CPU (schedule cosine), so every "
        "trial would be the same run"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()
