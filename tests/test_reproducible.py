"""The same inputs give the same numbers: an ensemble member (trained from scratch as a Tune trial, in a
run store of its own) and the train-stage run of the same seed, and a run killed after its first epoch
and resumed, end with equal weights and identical per-epoch losses and errors (real Ray Train, 2 gloo
workers, FFCV with its keyed augmentation, on the CPU: bit for bit)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import PROJECT_ROOT
from pipeline.drivers.ensemble import member_seeds, plan_members
from pipeline.drivers.train import train_model
from pipeline.runs.context import StageContext
from pipeline.runs.store import RESULT_MARKER, RESULT_WEIGHTS
from pipeline.storage.location import Location
from tests.conftest import (
    EPOCH_METRICS, FAST_MODEL, assert_same_weights, checkpoints, computed, end_tree, finish, mlflow_runs, read_history,
    stage_command, start_train_stage, steps, stop_after_first_checkpoint, training_overrides, wait_for,
    without_ray_address, write_params,
)

# Enough epochs that a stop sent once the first checkpoint is registered lands before the run ends (a
# LeNet-5 epoch here takes well under a second once FFCV has compiled).
EPOCHS = 10
FIRST_SEED = 11
# The ensemble's first member gets this seed (whatever the member count): the train stage uses it too, so
# both are the same run.
SEED = member_seeds(FIRST_SEED, 1)[0]


def overrides(folder: Path) -> dict:
    # Dropout on, so the test also covers the per-epoch seeding of the workers' torch RNG.
    settings = training_overrides(folder, epochs=EPOCHS, seed=SEED, dropout=0.5, pca_lighting_std=0.1)
    settings["ensemble"] |= {"members": 2, "first_seed": FIRST_SEED, "epochs": EPOCHS, "num_workers": 2,
                             "max_concurrent": 1}
    settings["ray"] |= {"num_workers": 2}
    return settings


def train_stage(folder: Path, data: Path, settings: dict | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    _, params = write_params(folder, settings or overrides(folder))
    train_model(params, FAST_MODEL, Location.local(data), Location.local(folder / "out"))
    return read_history(folder / "out"), torch.load(folder / "out" / "model.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_cluster, digits_betons):
    """One uninterrupted train-stage run that the other runs must equal."""
    history, weights = train_stage(tmp_path_factory.mktemp("reference"), digits_betons)
    assert len(history) == EPOCHS
    # Not a run that stands still: the figures move from epoch to epoch.
    assert len({row["train_loss"] for row in history}) == EPOCHS
    return computed(history), weights


@pytest.mark.slow
def test_an_ensemble_member_equals_the_train_stage_run_of_its_seed_and_survives_a_killed_stage(
        reference, tmp_path, digits_betons):
    """The ensemble stage killed once its first member has finished, and run again: the rerun reuses that
    member, trains the other, and continues the stage's MLflow parent run; the member is the train stage's
    run of its seed, trained as a Tune trial."""
    params, loaded = write_params(tmp_path, overrides(tmp_path))
    command = stage_command("ensemble", "--params", str(params), "--data", str(digits_betons),
                            "--evaluations", str(tmp_path / "evaluate"), "--out", str(tmp_path / "out"))
    markers = lambda: sorted((tmp_path / "ray_results").glob(f"*/{RESULT_MARKER}"))  # noqa: E731
    first = subprocess.Popen(command, cwd=PROJECT_ROOT, start_new_session=True, env=without_ray_address(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(markers()) >= 1, 600, "the first member to finish")
    finally:
        end_tree(first)
    [finished] = markers()
    weights_written = (finished.parent / RESULT_WEIGHTS).stat().st_mtime_ns

    second = subprocess.run(command, cwd=PROJECT_ROOT, env=without_ray_address(), capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Reusing member 0" in second.stdout and "Training 1 members" in second.stdout
    assert (finished.parent / RESULT_WEIGHTS).stat().st_mtime_ns == weights_written, "the member was trained again"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["members"] == 2
    _, runs = mlflow_runs(tmp_path)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.status for run in parents] == ["FINISHED"], "the rerun continues the parent run"
    assert len(runs) == 3

    context = StageContext.open(loaded, Location.local(digits_betons))
    member = plan_members(context)[0]
    assert member.job.spec == context.train_spec(FAST_MODEL)
    result = context.runs.record(member.name).load_result()
    assert computed(result.history) == reference[0]
    assert_same_weights(result.weights, reference[1])


@pytest.mark.slow
def test_a_run_stopped_after_its_first_epoch_resumes_to_the_same_end(reference, tmp_path, digits_betons):
    """SIGTERM marks the MLflow run KILLED and keeps the checkpoints. The rerun logs to another store (a
    new tracking server, a renamed experiment) and shows progress 5 times a second: settings that name no
    run, so the checkpoints decide, the run resumes, and it ends where the uninterrupted run ends."""
    params, _ = write_params(tmp_path, overrides(tmp_path))
    stop_after_first_checkpoint(params, digits_betons, tmp_path)
    assert [run.info.status for run in mlflow_runs(tmp_path)[1]] == ["KILLED"]
    assert checkpoints(tmp_path), "an unfinished run keeps its checkpoints"

    other = tmp_path / "other"
    settings = overrides(tmp_path)
    settings["train"]["log_every_s"] = 0.2
    settings["mlflow"]["tracking_uri"] = f"sqlite:///{other / 'mlflow.db'}"
    changed, _ = write_params(other, settings)
    log = finish(start_train_stage(changed, digits_betons, tmp_path / "out", tmp_path / "again.log"),
                 tmp_path / "again.log")
    assert f"Resuming {FAST_MODEL}-" in log and f"epoch 1/{EPOCHS} " not in log
    # Each epoch's line once (Ray Train's print patch doubled them), and none of Ray's report records.
    epoch_lines = [int(e) for e in re.findall(rf"\] epoch (\d+)/{EPOCHS} train_loss=", log)]
    assert epoch_lines and epoch_lines == list(range(epoch_lines[0], EPOCHS + 1)) and epoch_lines[0] > 1, log
    assert "TrainingReport(" not in log and "Reporting training result" not in log
    assert re.search(rf"\] epoch \d+/{EPOCHS} step \d+/\d+ \d+ img/s ETA \d+m\d\ds loss so far \d", log), log
    client, runs = mlflow_runs(other)
    assert [run.info.status for run in runs] == ["FINISHED"]
    for metric in EPOCH_METRICS:
        assert steps(client, runs[0].info.run_id, metric) == list(range(1, EPOCHS + 1)), metric
    assert steps(client, runs[0].info.run_id, "train_loss_step"), "no step-level loss in MLflow"
    assert [run.info.status for run in mlflow_runs(tmp_path)[1]] == ["KILLED"]
    assert not checkpoints(tmp_path)

    assert computed(read_history(tmp_path / "out")) == reference[0]
    assert_same_weights(torch.load(tmp_path / "out" / "model.pt", weights_only=True), reference[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_gpu_runs_are_identical(tmp_path, ray_cluster, digits_betons):
    def gpu_run(folder: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
        settings = training_overrides(folder, ray={"num_workers": 1, "use_gpu": True}, epochs=2, deterministic=True,
                                      amp=True, amp_dtype="float16", channels_last=True)
        return train_stage(folder, digits_betons, settings)

    (first_history, first_weights), (second_history, second_weights) = gpu_run(tmp_path / "a"), gpu_run(tmp_path / "b")

    assert computed(first_history) == computed(second_history)
    assert_same_weights(first_weights, second_weights)
