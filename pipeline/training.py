"""The driver side of one training run: Ray, the TorchTrainer, the MLflow run, and the stage outputs.

A run's Ray name is the model plus a fingerprint of everything that shapes the result (recipe,
epochs, seed, worker count, data files). Running the same training again after it was interrupted
therefore lands in the same Ray storage folder, where Ray Train V2 hands the last checkpoint back to
the workers, and continues the same MLflow run; changed params give a new name and a fresh start.
Once a run has finished, its checkpoints are deleted: the weights live on in the stage outputs and
MLflow, a rerun of a finished run starts from scratch anyway, and at VGG sizes they are GBs per run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import ray.train
import torch
from ffcv.reader import Reader
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer

from pipeline import tracking
from pipeline.errors import InputError
from pipeline.config import PROJECT_ROOT, Params, RayParams
from pipeline.train_loop import CHECKPOINT_FILE, TrainJob, train_worker


class TrainingInputError(InputError):
    """The data a training run was pointed at is missing or unusable."""


@dataclass(frozen=True)
class DataFiles:
    train_beton: Path
    val_beton: Path
    num_classes: int

    @classmethod
    def find(cls, data_dir: Path) -> DataFiles:
        """Checked before Ray starts: a missing file should cost seconds, not a cluster start-up."""
        data_dir = data_dir.resolve()  # Ray workers run in folders of their own
        labels = {split: _read_labels(data_dir / f"{split}.beton") for split in ("train", "val")}
        num_classes = int(labels["train"].max()) + 1
        if labels["val"].max() >= num_classes:
            raise TrainingInputError(f"{data_dir / 'val.beton'}: holds labels that train.beton does not have")
        return cls(data_dir / "train.beton", data_dir / "val.beton", num_classes)


def _read_labels(path: Path):
    """The label column of an FFCV file's metadata: opening it checks the header too, for a few ms."""
    if not path.is_file():
        raise TrainingInputError(f"{path}: FFCV file not found (run the preprocess stage first)")
    try:
        labels = Reader(str(path)).metadata["f1"]
    except Exception as error:
        raise TrainingInputError(f"{path}: not a readable FFCV file ({error})") from error
    if len(labels) == 0:
        raise TrainingInputError(f"{path}: holds no samples")
    return labels


def make_job(
    params: Params, model: str, data: DataFiles, *, seed: int, epochs: int, num_workers: int, uri: str
) -> TrainJob:
    """The job before it has an MLflow run; see run_name and the callers."""
    return TrainJob(
        model=model, num_classes=data.num_classes, recipe=params.train, epochs=epochs, seed=seed,
        num_workers=num_workers,
        train_beton=str(data.train_beton), val_beton=str(data.val_beton),
        threads_per_worker=max(1, int(params.ray.cpus_per_worker)), mlflow_run_id=None,
        tracking_uri=uri, log_system_metrics=params.mlflow.system_metrics,
    )


def run_name(job: TrainJob, prefix: str = "") -> str:
    """Same name = same training: what shapes the result, including the data files' size and mtime."""
    identity = {
        key: value for key, value in dataclasses.asdict(job).items()
        if key not in ("mlflow_run_id", "tracking_uri", "log_system_metrics")
    }
    identity["data"] = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (job.train_beton, job.val_beton)]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{prefix}{job.model}-{digest[:10]}"


def connect_ray(params: RayParams) -> None:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit` jobs; RAY_ADDRESS=auto finds a
    `ray start` cluster on this machine); else start a private local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner asks its state API.
        ray.init(address="local", num_cpus=params.local_num_cpus)


def device_name(params: RayParams) -> str:
    return "cuda" if params.use_gpu else "cpu"


def storage_root(params: RayParams) -> Path:
    return (PROJECT_ROOT / params.storage_path).resolve()


def make_trainer(job: TrainJob, name: str, params: Params) -> TorchTrainer:
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=params.ray.use_gpu,
            resources_per_worker={"CPU": params.ray.cpus_per_worker} | ({"GPU": 1} if params.ray.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage_root(params.ray)),
            failure_config=ray.train.FailureConfig(max_failures=job.recipe.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.recipe.checkpoints_to_keep),
        ),
    )


def load_final_state(result: ray.train.Result) -> dict:
    if result.checkpoint is None:
        raise RuntimeError(f"training {result.path} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def drop_checkpoints(run_dir: Path) -> None:
    """Ray's record of them goes too, so that fitting the same name again starts fresh instead of
    looking for deleted checkpoints."""
    for checkpoint in run_dir.glob("checkpoint_*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint)
    (run_dir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)


def train_model(params: Params, model_name: str, data_dir: Path, out_dir: Path) -> dict:
    """The train stage for one model: returns the metrics it also writes to out_dir/metrics.json."""
    data = DataFiles.find(data_dir)
    uri = tracking.tracking_uri(params.mlflow, os.environ)
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, params.mlflow.experiment, uri)
    # Before the MLflow run and its SIGTERM handler: ray.init installs a SIGTERM handler of its own.
    connect_ray(params.ray)
    job = make_job(params, model_name, data, seed=params.train.seed, epochs=params.train.epochs,
                   num_workers=params.ray.num_workers, uri=uri)
    name = run_name(job)

    tags = {"model": model_name, "dvc_stage": f"train@{model_name}", "device": device_name(params.ray)}
    run_id, resumed = tracking.resume_or_create_run(client, experiment, name, tags, params.model_dump())
    if resumed:
        print(f"Resuming {name} (MLflow run {run_id}) from its last checkpoint")
    else:
        # A finished run of the same name is rerun from scratch, not "resumed" at its last epoch.
        shutil.rmtree(storage_root(params.ray) / name, ignore_errors=True)

    with tracking.closed_with_true_status(client, run_id):
        job = dataclasses.replace(job, mlflow_run_id=run_id)
        state = load_final_state(make_trainer(job, name, params).fit())
        model = load_model(job, state)
        metrics = summarize(model_name, model, state["history"])
        write_outputs(out_dir, model, metrics, state["history"])
        # The last epoch's values are in the history already; log only what the history lacks.
        summary_only = {k: v for k, v in metrics.items() if k not in state["history"][-1] and k != "model"}
        tracking.log_metrics(client, run_id, summary_only)
        if params.mlflow.log_model:
            log_model(uri, run_id, model, params.train.resolution)
    drop_checkpoints(storage_root(params.ray) / name)
    print(f"[{model_name}] val top-1 error {metrics['val_top1_error']:.4f}, top-5 {metrics['val_top5_error']:.4f}; "
          f"MLflow run {run_id} at {uri}")
    return metrics


def load_model(job: TrainJob, state: dict) -> torch.nn.Module:
    model = job.build_model()
    model.load_state_dict(state["model"])
    return model


def summarize(model_name: str, model: torch.nn.Module, history: list[dict]) -> dict:
    last = history[-1]
    # The first epoch pays FFCV's numba compilation; later ones show the steady rate.
    steady = history[1:] or history
    return {
        "model": model_name,
        "val_top1_error": last["val_top1_error"],
        "val_top5_error": last["val_top5_error"],
        "best_val_top1_error": min(row["val_top1_error"] for row in history),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steady_images_per_s": sum(row["images_per_s"] for row in steady) / len(steady),
        "steady_data_wait_share": sum(row["data_wait_share"] for row in steady) / len(steady),
        "epochs": len(history),
    }


def write_outputs(out_dir: Path, model: torch.nn.Module, metrics: dict, history: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out_dir / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def log_model(uri: str, run_id: str, model: torch.nn.Module, resolution: int) -> mlflow.models.model.ModelInfo:
    """MLflow's pt2 format: an exported graph that loads without this project's code or pickle."""
    mlflow.set_tracking_uri(uri)
    # A batch of 2: torch.export fixes size-1 dimensions, and the batch must stay free.
    example = torch.zeros(2, 3, resolution, resolution).numpy()
    with mlflow.start_run(run_id=run_id):
        # Explicit requirements: inferring them imports and probes the whole venv (slow, and noisy).
        return mlflow.pytorch.log_model(
            model.eval(), name="model", input_example=example, serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
