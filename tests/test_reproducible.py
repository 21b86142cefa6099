"""The same inputs give the same numbers: two runs of the train stage with the same params in separate run
stores, an ensemble member and a train-stage run of the same seed, and a run killed after its first
epoch and resumed all end with equal weights and identical per-epoch losses and errors (real Ray Train,
2 gloo workers, FFCV with its keyed augmentation, on the CPU: bit for bit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.drivers.ensemble import member_seeds, plan_members, run_ensemble
from pipeline.drivers.train import train_model
from pipeline.runs.context import StageContext
from pipeline.storage.location import Location
from tests.conftest import (
    FAST_MODEL, assert_same_weights, computed, finish, read_history, start_train_stage, stop_after_first_checkpoint,
    training_overrides, write_params,
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
def test_two_train_stage_runs_with_the_same_params_are_identical(reference, tmp_path, digits_betons):
    history, weights = train_stage(tmp_path, digits_betons)

    assert computed(history) == reference[0]
    assert_same_weights(weights, reference[1])


@pytest.mark.slow
def test_an_ensemble_member_equals_the_train_stage_run_of_its_seed(reference, tmp_path, digits_betons):
    _, params = write_params(tmp_path, overrides(tmp_path))
    data = Location.local(digits_betons)
    run_ensemble(params, data, Location.local(tmp_path / "evaluate"), Location.local(tmp_path / "out"))

    context = StageContext.open(params, data)
    member = plan_members(context)[0]
    assert member.job.spec == context.train_spec(FAST_MODEL)  # the same run, trained as a Tune trial
    result = context.runs.record(member.name).load_result()
    assert computed(result.history) == reference[0]
    assert_same_weights(result.weights, reference[1])


@pytest.mark.slow
def test_a_run_killed_after_its_first_epoch_resumes_to_the_same_end(reference, tmp_path, digits_betons):
    params, _ = write_params(tmp_path, overrides(tmp_path))
    stop_after_first_checkpoint(params, digits_betons, tmp_path)
    log = finish(start_train_stage(params, digits_betons, tmp_path / "out", tmp_path / "again.log"),
                 tmp_path / "again.log")
    assert f"Resuming {FAST_MODEL}-" in log and f"epoch 1/{EPOCHS} " not in log

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
