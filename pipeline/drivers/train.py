"""The train stage for one model: find or train the run, then publish it to the outputs and MLflow.

A finished run (pipeline/runs/store.py) is published again, not retrained: DVC reruns a stage whenever
one of its dependencies changes, also those that do not change the weights. An interrupted run resumes
from its checkpoints, whatever the MLflow store holds; the store's unfinished run of the same name is
continued, and a store without one gets a new run whose history starts with the epochs already done.
"""

from __future__ import annotations

import csv
import io
import json

import torch

from pipeline import tracking
from pipeline.config import Params
from pipeline.runs.context import StageContext
from pipeline.runs.identity import RunSpec
from pipeline.runs.store import RunRecord, RunResult
from pipeline.storage.location import Location
from pipeline.training.communication import step_traffic
from pipeline.training.fit import fit
from pipeline.training.job import TrainJob
from pipeline.training.progress import STEP_COLUMNS

# The summary's figures that `dvc metrics show` and `dvc exp show` compare, under the model's name: DVC
# names a column by its key alone when no other metrics file has that key, and by the file's path and
# the key otherwise (50 characters, for every model). The whole summary is in report.json.
METRIC_KEYS = ("val_top1_error", "val_top5_error", "best_val_top1_error", "steady_images_per_s")


def train_model(params: Params, model_name: str, data: Location, out: Location) -> dict:
    """The train stage: returns the metrics it also writes to out/metrics.json."""
    context = StageContext.open(params, data)
    spec = context.train_spec(model_name)
    record = context.runs.record(spec.name)
    finished = record.status() == "finished"
    store = context.store
    run = tracking.open_run(store, spec.name, context.tags(model_name, f"train@{model_name}"), spec.mlflow_params(),
                            reuse_finished=finished)
    describe_start(spec.name, record, run)

    if run.state == "finished":
        metrics = publish(out, spec, record.load_result())
    else:
        with tracking.closed_with_true_status(store.client, run.id):
            tracking.log_data_inputs(store.client, run.id, context.data_inputs())
            if finished:
                result = record.load_result()
            else:
                target = tracking.TrackingTarget(store.uri, run.id, params.mlflow.system_metrics)
                result = fit(TrainJob.for_run(spec, context, target), context.runs, params.ray)
            metrics = publish(out, spec, result)
            if not finished:
                record.save_result(result, spec.identity(), metrics)
            log_to_mlflow(context, run.id, spec, result, metrics)
    record.mark_used()
    record.drop_checkpoints()  # everything the run owes is written: outputs, result, MLflow
    pruned = context.runs.prune(params.ray.keep_finished_runs, protect={spec.name})
    if pruned:
        print(f"Run store: removed {len(pruned)} least recently used finished run(s) (ray.keep_finished_runs)")
    print(f"[{model_name}] val top-1 error {metrics['val_top1_error']:.4f}, top-5 {metrics['val_top5_error']:.4f}; "
          f"MLflow run {run.id} at {store.uri}")
    return metrics


def describe_start(name: str, record: RunRecord, run: tracking.Run) -> None:
    status = record.status()
    if status == "finished":
        print(f"Reusing {name}: already trained (run store {record.folder})")
    elif status == "interrupted":
        print(f"Resuming {name} (MLflow run {run.id}) from its last checkpoint")


def summarize(model: torch.nn.Module, history: list[dict]) -> dict:
    last = history[-1]
    # The first epoch pays FFCV's numba compilation; later ones show the steady rate.
    steady = history[1:] or history
    return {
        "val_top1_error": last["val_top1_error"],
        "val_top5_error": last["val_top5_error"],
        "best_val_top1_error": min(row["val_top1_error"] for row in history),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steady_images_per_s": sum(row["images_per_s"] for row in steady) / len(steady),
        "steady_data_wait_share": sum(row["data_wait_share"] for row in steady) / len(steady),
        "epochs": len(history),
    }


def publish(out: Location, spec: RunSpec, result: RunResult) -> dict:
    """The stage outputs: model.pt (state dict), metrics.json (METRIC_KEYS), report.json (the whole
    summary), history.csv (one row per epoch), steps.csv (the training loss within epochs)."""
    metrics = summarize(spec.load_model(result.weights), result.history)
    with (out / "model.pt").open_write() as stream:
        torch.save(result.weights, stream)
    compared = {spec.model: {key: metrics[key] for key in METRIC_KEYS}}
    (out / "metrics.json").write_text(json.dumps(compared, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps({"model": spec.model, **metrics}, indent=2) + "\n")
    (out / "history.csv").write_text(csv_table(result.history, list(result.history[0])))
    (out / "steps.csv").write_text(csv_table(result.steps, STEP_COLUMNS))
    return metrics


def csv_table(rows: list[dict], columns: list[str]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def log_to_mlflow(context: StageContext, run_id: str, spec: RunSpec, result: RunResult, metrics: dict) -> None:
    """What the run does not have yet: epochs, the summary (the last epoch's values are in the history
    already) and the model."""
    store = context.store
    tracking.log_history(store.client, run_id, result.history)
    tracking.log_metrics(store.client, run_id, {k: v for k, v in metrics.items() if k not in result.history[-1]})
    # What each worker sent per step (pipeline/training/communication.py): gradients, and activations when hybrid.
    tracking.log_metrics(store.client, run_id, {"bytes_sent_per_step": step_traffic(spec).total})
    if context.params.mlflow.log_model and not store.client.search_logged_models(
            [store.experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        tracking.log_model(store.uri, run_id, spec.load_model(result.weights), context.dataset,
                           spec.recipe.resolution)
