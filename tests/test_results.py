"""What the train stage leaves for a user to compare and plot: metrics.json with the compared figures
under the model's name, report.json with the whole summary, steps.csv with the loss within epochs (the
same points as MLflow's train_loss_step)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from mlflow.tracking import MlflowClient

from pipeline.drivers.train import METRIC_KEYS
from pipeline.training.progress import STEP_COLUMNS, STEP_POINTS_PER_EPOCH

pytestmark = pytest.mark.slow  # the shared trained_run fixture trains alexnet2012


def test_metrics_hold_the_compared_figures_and_the_report_the_rest(trained_run):
    out, summary = trained_run["out"], trained_run["metrics"]
    assert json.loads((out / "metrics.json").read_text()) == {"alexnet2012": {key: summary[key] for key in METRIC_KEYS}}
    assert json.loads((out / "report.json").read_text()) == {"model": "alexnet2012", **summary}


def test_steps_csv_follows_the_loss_within_epochs_as_logged_to_mlflow(trained_run):
    with open(trained_run["out"] / "steps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == STEP_COLUMNS
    steps = [int(row["step"]) for row in rows]
    epochs = trained_run["metrics"]["epochs"]
    assert steps == sorted(set(steps)) and len(steps) >= STEP_POINTS_PER_EPOCH * epochs
    assert 0 < float(rows[0]["epoch"]) < 1 and float(rows[-1]["epoch"]) <= epochs
    assert all(math.isfinite(float(row["train_loss"])) and float(row["train_loss"]) > 0 for row in rows)

    client = MlflowClient(trained_run["params"].mlflow.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                             filter_string="tags.dvc_stage = 'train@alexnet2012'")[0]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss_step")}
    assert logged == pytest.approx({int(row["step"]): float(row["train_loss"]) for row in rows})
