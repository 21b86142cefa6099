"""The per-worker training function that Ray Train runs on every data-parallel worker.

`train_worker` reads top to bottom: set up, resume, then one loop of train / evaluate / schedule /
checkpoint / report per epoch. Everything it needs arrives in one picklable `TrainJob`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

import models
from pipeline.config import TrainRecipe
from pipeline.image_tree import DataError
from pipeline.loaders import make_train_loader, make_val_loader
from pipeline.local_data import local_copy
from pipeline.runs import RunSpec
from pipeline.storage import Location
from pipeline.tracking import TrackingTarget, log_history

CHECKPOINT_FILE = "state.pt"


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One training run as its workers see it: what to train (the spec), where the data is, and where
    rank 0 logs while it trains (None: nobody does; ensemble members are logged by their driver)."""

    spec: RunSpec
    data: Location  # the folder with dataset.json and the .beton files, local or a URI
    data_cache: Path  # where a node keeps its copy of data given as a URI
    threads_per_worker: int
    tracking: TrackingTarget | None


def train_worker(loop_config: dict) -> None:
    job: TrainJob = loop_config["job"]
    spec, recipe = job.spec, job.spec.recipe
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    # Autocast only pays on a GPU; bf16 needs no loss scaling, fp16 (pre-Ampere) does.
    amp_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = on_gpu and recipe.amp
    channels_last = on_gpu and recipe.channels_last
    torch.set_num_threads(job.threads_per_worker)

    torch.manual_seed(spec.seed)  # identical initial weights on every rank before DDP broadcasts
    model = spec.build_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    scheduler = make_scheduler(optimizer, recipe, spec.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    betons = node_local_betons(job)
    per_worker_batch = recipe.batch_size // world
    loader_options = dict(
        resolution=recipe.resolution,
        num_threads=job.threads_per_worker,
        distributed=world > 1,
        device=device,
        channels_last=channels_last,
        dtype=amp_dtype if use_amp else torch.float32,
    )
    # The loader's shuffle is seeded by seed + epoch, so a resumed run replays the same order.
    train_loader = make_train_loader(
        betons["train"], batch_size=per_worker_batch, seed=spec.seed, start_epoch=start_epoch,
        crop_min_scale=recipe.crop_min_scale, pca_lighting_std=recipe.pca_lighting_std, **loader_options,
    )
    val_loader = make_val_loader(betons["val"], batch_size=per_worker_batch, **loader_options)
    mlflow_client, system_metrics = _rank0_mlflow(job.tracking, rank)
    if mlflow_client:
        # A run resumed into a new or other MLflow store starts with the epochs its checkpoint has done.
        log_history(mlflow_client, job.tracking.run_id, history)

    for epoch in range(start_epoch, spec.epochs):
        # Reseeding per epoch makes dropout replayable after a resume without saving RNG state.
        torch.manual_seed(spec.seed * 10_000 + epoch * world + rank)
        model.train()
        epoch_start = time.perf_counter()
        data_wait = 0.0
        loss_sum = correct = seen = 0
        wait_start = time.perf_counter()
        for images, labels in train_loader:
            data_wait += time.perf_counter() - wait_start
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                # GoogLeNet adds its auxiliary classifiers' losses in training.
                loss, logits = models.training_loss(model(images), labels, criterion)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            wait_start = time.perf_counter()
        train_time = time.perf_counter() - epoch_start
        loss_sum, correct, seen, data_wait = _sum_over_workers([loss_sum, correct, seen, data_wait], device)

        val_top1, val_top5 = evaluate(model, val_loader, device, use_amp, amp_dtype)
        lr = optimizer.param_groups[0]["lr"]
        if recipe.schedule == "plateau":
            scheduler.step(val_top1)
        else:
            scheduler.step()

        metrics = {
            "train_loss": loss_sum / seen,
            "train_top1_error": 1 - correct / seen,
            "val_top1_error": val_top1,
            "val_top5_error": val_top5,
            "lr": lr,
            "images_per_s": seen / train_time,
            "epoch_time_s": time.perf_counter() - epoch_start,
            "data_wait_share": data_wait / world / train_time,
        }
        history.append({"epoch": epoch, **metrics})
        _report(epoch, metrics, history, model, optimizer, scheduler, scaler, rank)
        if rank == 0:
            print(f"[{spec.model}] epoch {epoch + 1}/{spec.epochs} " + " ".join(
                f"{key}={value:.4g}" for key, value in metrics.items()), flush=True)
            if mlflow_client:
                # Skips an epoch the store has: one logged just before a failure and then trained again.
                log_history(mlflow_client, job.tracking.run_id, history[-1:])
    if system_metrics:
        system_metrics.finish()


def node_local_betons(job: TrainJob) -> dict[str, Path]:
    """This node's .beton files (copied once per node when the data is a URI), checked to be the data
    the run is named by."""
    dataset = local_copy(job.data, job.data_cache)
    found = {split: beton.sha256 for split, beton in dataset.files.items()}
    if found != dict(job.spec.data_sha256):
        raise DataError(f"{job.data}: holds other data than run {job.spec.name} was started on (dataset.json "
                        "changed since): run the stage again")
    return {split: beton.path for split, beton in dataset.files.items()}


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe, epochs: int):
    if recipe.schedule == "plateau":
        # mode "min" on validation top-1 error: the papers' "divide by 10 when it stops improving".
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.1, patience=recipe.plateau_patience
        )
    if recipe.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.step_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


@torch.no_grad()
def evaluate(model: nn.Module, val_loader, device: torch.device, use_amp: bool, amp_dtype) -> tuple[float, float]:
    """Top-1 and top-5 error over the whole validation set, each image counted once across workers."""
    model.eval()
    top1 = top5 = count = 0
    for images, labels in val_loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            logits = model(images)
        best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = best5 == labels[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    top1, top5, count = _sum_over_workers([top1, top5, count], device)
    return 1 - top1 / count, 1 - top5 / count


def _report(epoch, metrics, history, model, optimizer, scheduler, scaler, rank) -> None:
    """Every rank reports (it is a barrier); rank 0 alone attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            state = {
                "epoch": epoch,
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "history": history,
            }
            torch.save(state, Path(directory) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"epoch": epoch, **metrics}, checkpoint=checkpoint)


def _sum_over_workers(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _rank0_mlflow(target: TrackingTarget | None, rank: int) -> tuple[mlflow.MlflowClient | None, SystemMetricsMonitor | None]:
    """Rank 0 logs the epochs and samples system metrics, so the store has one writer while training.
    The run's status stays the driver's business: nothing here ends the run."""
    if rank != 0 or target is None:
        return None, None
    mlflow.set_tracking_uri(target.uri)
    monitor = None
    if target.system_metrics:
        monitor = SystemMetricsMonitor(target.run_id)
        monitor.start()
    return mlflow.MlflowClient(target.uri), monitor


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
