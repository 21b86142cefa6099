"""The train stage for one model: find or train the run, then publish it to the outputs and MLflow.

A finished run (pipeline/runs.py) is published again, not retrained: DVC reruns a stage whenever one
of its dependencies changes, also those that do not change the weights. An interrupted run resumes from
its checkpoints, whatever the MLflow store holds; the store's unfinished run of the same name is
continued, and a store without one gets a new run whose history starts with the epochs already done.
"""

from __future__ import annotations

import csv
import io
import json

import mlflow
import torch

from pipeline import cluster, tracking
from pipeline.config import Params
from pipeline.dataset import Dataset
from pipeline.local_data import cache_root, describe
from pipeline.locations import params_location
from pipeline.runs import RunRecord, RunResult, RunSpec, RunStore
from pipeline.storage import Location
from pipeline.train_loop import TrainJob
from pipeline.val_transform import ValTransform
from pipeline.trainer import fit


def train_model(params: Params, model_name: str, data: Location, out: Location) -> dict:
    """The train stage: returns the metrics it also writes to out/metrics.json."""
    dataset = describe(data, cache_root(params.ray.local_data_cache))  # bad data costs seconds, not a cluster
    runs = run_store(params)
    # Before the MLflow run and its SIGTERM handler: ray.init installs a SIGTERM handler of its own.
    cluster.connect(params.ray)
    cluster.check_nodes_reach(tracking.tracking_uri(params.mlflow), runs.root, data)
    store = tracking.open_store(params.mlflow)
    spec = run_spec(params, model_name, dataset, seed=params.train.seed, epochs=params.train.epochs,
                    num_workers=params.ray.num_workers)
    record = runs.record(spec.name)
    finished = record.status() == "finished"
    tags = {"model": model_name, "dvc_stage": f"train@{model_name}", "device": cluster.device_name(params.ray)}
    run = tracking.open_run(store, spec.name, tags, params.model_dump(), reuse_finished=finished)
    describe_start(spec.name, record, run)

    if run.state == "finished":
        metrics = publish(out, spec, record.load_result())
    else:
        with tracking.closed_with_true_status(store.client, run.id):
            if finished:
                result = record.load_result()
            else:
                target = tracking.TrackingTarget(store.uri, run.id, params.mlflow.system_metrics)
                result = fit(make_job(spec, data, params, target), runs, params.ray)
            metrics = publish(out, spec, result)
            if not finished:
                record.save_result(result, spec.identity(), metrics)
            log_to_mlflow(store, run.id, spec, result, metrics, dataset, params.mlflow.log_model)
    record.mark_used()
    record.drop_checkpoints()  # everything the run owes is written: outputs, result, MLflow
    pruned = runs.prune(params.ray.keep_finished_runs, protect={spec.name})
    if pruned:
        print(f"Run store: removed {len(pruned)} least recently used finished run(s) (ray.keep_finished_runs)")
    print(f"[{model_name}] val top-1 error {metrics['val_top1_error']:.4f}, top-5 {metrics['val_top5_error']:.4f}; "
          f"MLflow run {run.id} at {store.uri}")
    return metrics


def run_store(params: Params) -> RunStore:
    return RunStore(params_location(params.ray.storage_path, "ray.storage_path"))


def run_spec(params: Params, model: str, dataset: Dataset, *, seed: int, epochs: int, num_workers: int) -> RunSpec:
    return RunSpec(
        model=model, num_classes=dataset.num_classes, recipe=params.train, seed=seed, epochs=epochs,
        num_workers=num_workers, use_gpu=params.ray.use_gpu,
        data_sha256={split: beton.sha256 for split, beton in dataset.files.items()},
    )


def make_job(spec: RunSpec, data: Location, params: Params, tracking_target: tracking.TrackingTarget | None) -> TrainJob:
    return TrainJob(
        spec=spec, data=data, data_cache=cache_root(params.ray.local_data_cache),
        threads_per_worker=max(1, int(params.ray.cpus_per_worker)), tracking=tracking_target,
    )


def describe_start(name: str, record: RunRecord, run: tracking.Run) -> None:
    status = record.status()
    if status == "finished":
        print(f"Reusing {name}: already trained (run store {record.folder})")
    elif status == "interrupted":
        print(f"Resuming {name} (MLflow run {run.id}) from its last checkpoint")


def load_model(spec: RunSpec, result: RunResult) -> torch.nn.Module:
    model = spec.build_model()
    model.load_state_dict(result.weights)
    return model


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
    """The stage outputs: model.pt (state dict), metrics.json, history.csv (one row per epoch)."""
    metrics = summarize(load_model(spec, result), result.history)
    with (out / "model.pt").open_write() as stream:
        torch.save(result.weights, stream)
    (out / "metrics.json").write_text(json.dumps({"model": spec.model, **metrics}, indent=2) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(result.history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.history)
    (out / "history.csv").write_text(table.getvalue())
    return metrics


def log_to_mlflow(store: tracking.Store, run_id: str, spec: RunSpec, result: RunResult, metrics: dict,
                  dataset: Dataset, log_model_too: bool) -> None:
    """What the run does not have yet: epochs, the summary (the last epoch's values are in the history
    already) and the model."""
    tracking.log_history(store.client, run_id, result.history)
    tracking.log_metrics(store.client, run_id, {k: v for k, v in metrics.items() if k not in result.history[-1]})
    if log_model_too and not store.client.search_logged_models([store.experiment_id],
                                                                 filter_string=f"source_run_id = '{run_id}'"):
        log_model(store.uri, run_id, load_model(spec, result), dataset, spec.recipe.resolution)


def log_model(uri: str, run_id: str, model: torch.nn.Module, dataset: Dataset,
              resolution: int) -> mlflow.models.model.ModelInfo:
    """MLflow's pt2 format: an exported graph that loads without this project's code or pickle, with the
    class names and the validation transform as metadata, so `predict` needs nothing else."""
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
