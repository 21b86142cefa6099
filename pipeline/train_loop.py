"""The per-worker training function that Ray Train runs on every data-parallel worker.

`train_worker` reads top to bottom: set up, resume, then one loop of train / evaluate / schedule /
checkpoint / report per epoch. Everything it needs arrives in one picklable `TrainJob`.

A step never waits for the GPU: an epoch's running sums (loss x images, correct predictions) stay on
the device and are read once per progress line and once per epoch, and an evaluation reads its counts
once. Each read of a device value (`.item()`, `float(tensor)`, `.tolist()`, printing a tensor) waits
for every kernel queued before it, so one per step would leave the GPU idle while Python catches up.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
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
from models.layer_table import layer_table
from pipeline.config import TrainRecipe
from pipeline.image_tree import DataError
from pipeline.local_data import local_copy
from pipeline.runs import RunSpec
from pipeline.storage import Location
from pipeline.tracking import TrackingTarget, log_history, log_metrics

CHECKPOINT_FILE = "state.pt"
# A training step costs about 3 forward passes (the backward pass computes gradients for both the
# inputs and the weights of each layer), and a multiply-accumulate is 2 FLOPs.
TRAINING_FLOPS_PER_MAC = 6
# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets, as (fp16/bf16, TF32), by
# torch.cuda.get_device_name(). A GPU not listed gets no mfu metric.
PEAK_TFLOPS = {
    r"NVIDIA A100[- ].*": (312, 156),
    r"NVIDIA H100 80GB HBM3": (989, 495),  # H100 SXM5
    r"NVIDIA H100 PCIe": (756, 378),
    r"NVIDIA H200": (989, 495),  # H200 SXM
}


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
    _quiet_ray_console()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    use_amp = on_gpu and recipe.amp
    amp_dtype = getattr(torch, recipe.amp_dtype)
    channels_last = on_gpu and recipe.channels_last
    torch.set_num_threads(job.threads_per_worker)
    if on_gpu:
        _check_amp_dtype(device, use_amp, amp_dtype)
        # Every training batch has one shape: cuDNN times its algorithms for it once and keeps the fastest.
        torch.backends.cudnn.benchmark = True
        # TF32 tensor cores for float32 matmuls; cuDNN's convolutions use them by default.
        torch.set_float32_matmul_precision("high")
    # Model FLOP utilisation needs the GPU's peak: none on the CPU or on a GPU PEAK_TFLOPS lacks.
    peak_flops = gpu_peak_flops(device, use_amp) if on_gpu else None
    flops_per_image = _training_flops_per_image(spec) if peak_flops else None

    torch.manual_seed(spec.seed)  # identical initial weights on every rank before DDP broadcasts
    network = spec.build_model()  # the bare module: checkpoints hold its weights, whatever wraps it
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(network)
    if recipe.compile:
        model = torch.compile(model)
    # fused: one kernel for all parameters, and with fp16's GradScaler the skip-on-overflow check stays
    # on the device instead of reading found_inf every step.
    optimizer = torch.optim.SGD(parameter_groups(network, recipe), lr=recipe.lr, momentum=recipe.momentum,
                                fused=True)
    scheduler = make_scheduler(optimizer, recipe, spec.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    # Imported here: FFCV (with numba and OpenCV) costs 3.5 s of CPU to import, and of the processes that
    # import this module only the workers read data (Ray Train's controller and an ensemble member's
    # trial import it too, to unpickle the job). See docs/benchmarks.md.
    from pipeline.loaders import make_train_loader, make_val_loader

    betons = node_local_betons(job)
    per_worker_batch = recipe.batch_size // world
    loader_options = dict(
        resolution=recipe.resolution,
        num_threads=job.threads_per_worker,
        distributed=world > 1,
        os_cache=recipe.os_cache,
        device=device,
        channels_last=channels_last,
        dtype=amp_dtype if use_amp else torch.float32,
    )
    # The loader's shuffle is seeded by seed + epoch, so a resumed run replays the same order.
    train_loader = make_train_loader(
        betons["train"], batch_size=per_worker_batch, seed=spec.seed, start_epoch=start_epoch,
        crop_min_scale=recipe.crop_min_scale, pca_lighting_std=recipe.pca_lighting_std, order=recipe.order,
        **loader_options,
    )
    per_worker_val_batch = -(-recipe.val_batch_size // world)  # rounded up
    val_loader = make_val_loader(betons["val"], batch_size=per_worker_val_batch, **loader_options)
    mlflow_client, system_metrics = _rank0_mlflow(job.tracking, rank)
    if mlflow_client:
        # A run resumed into a new or other MLflow store starts with the epochs its checkpoint has done.
        log_history(mlflow_client, job.tracking.run_id, history)
    progress = None
    if rank == 0:
        progress = Progress(f"[{spec.model}]", spec.epochs, len(train_loader), per_worker_batch * world,
                            recipe.log_every_s, mlflow_client, job.tracking.run_id if mlflow_client else None)

    for epoch in range(start_epoch, spec.epochs):
        # Reseeding per epoch makes dropout replayable after a resume without saving RNG state.
        torch.manual_seed(spec.seed * 10_000 + epoch * world + rank)
        model.train()
        epoch_start = time.perf_counter()
        if progress:
            progress.start(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, data_wait = 0, 0.0
        wait_start = time.perf_counter()
        for step, (images, labels) in enumerate(train_loader, 1):
            data_wait += time.perf_counter() - wait_start
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                # GoogLeNet adds its auxiliary classifiers' losses in training.
                loss, logits = models.training_loss(model(images), labels, criterion)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            if progress:
                progress.step(step, seen, loss_sum)
            wait_start = time.perf_counter()
        # The epoch's one read of the device: it waits for the queued steps, which train_time then counts.
        loss_sum, correct, seen, data_wait = _sum_over_workers([loss_sum, correct, seen, data_wait], device)
        train_time = time.perf_counter() - epoch_start

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
        if on_gpu:
            metrics["images_per_s_per_gpu"] = metrics["images_per_s"] / world
        if peak_flops:
            metrics["mfu"] = metrics["images_per_s_per_gpu"] * flops_per_image / peak_flops
        history.append({"epoch": epoch, **metrics})
        _report(epoch, metrics, history, network, optimizer, scheduler, scaler, rank)
        if rank == 0:
            _say(f"[{spec.model}] epoch {epoch + 1}/{spec.epochs} " + " ".join(
                f"{key}={value:.4g}" for key, value in metrics.items()))
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


class Progress:
    """Rank 0's view inside an epoch, every `every_s` seconds: a line with the step, the images/s of
    all workers, the epoch's ETA and rank 0's loss so far, and (given an MLflow client) the mean loss
    of rank 0's steps since the last line as train_loss_step, at the global step. Reading the loss
    waits for the GPU, so it is read only then."""

    def __init__(self, label: str, epochs: int, steps: int, images_per_step: int, every_s: float,
                 mlflow_client: mlflow.MlflowClient | None, run_id: str | None):
        self.label, self.epochs, self.steps, self.images_per_step = label, epochs, steps, images_per_step
        self.every_s, self.mlflow_client, self.run_id = every_s, mlflow_client, run_id

    def start(self, epoch: int) -> None:
        self.epoch = epoch
        self.started = self.shown_at = time.perf_counter()
        self.shown_loss_sum, self.shown_seen = 0.0, 0

    def step(self, step: int, seen: int, loss_sum: torch.Tensor) -> None:
        now = time.perf_counter()
        if now - self.shown_at < self.every_s:
            return
        total = loss_sum.item()
        elapsed = now - self.started
        eta = elapsed / step * (self.steps - step)
        _say(f"{self.label} epoch {self.epoch + 1}/{self.epochs} step {step}/{self.steps} "
             f"{step * self.images_per_step / elapsed:.0f} img/s ETA {eta // 60:.0f}m{eta % 60:02.0f}s "
             f"loss so far {total / seen:.4g}")
        if self.mlflow_client:
            recent = (total - self.shown_loss_sum) / (seen - self.shown_seen)
            log_metrics(self.mlflow_client, self.run_id, {"train_loss_step": recent},
                        step=self.epoch * self.steps + step)
        self.shown_at, self.shown_loss_sum, self.shown_seen = now, total, seen


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
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for images, labels in val_loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            logits = model(images)
        best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = best5 == labels[:, None]
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        count += len(labels)
    top1, top5, count = _sum_over_workers([top1, top5, count], device)
    return 1 - top1 / count, 1 - top5 / count


def parameter_groups(network: nn.Module, recipe: TrainRecipe) -> list[dict]:
    """Weight decay on every parameter, or (decay_norm_and_bias false) not on the 1-D ones: batch-norm
    weights and biases, and every layer's bias."""
    if recipe.decay_norm_and_bias:
        return [{"params": list(network.parameters()), "weight_decay": recipe.weight_decay}]
    return [
        {"params": [p for p in network.parameters() if p.ndim > 1], "weight_decay": recipe.weight_decay},
        {"params": [p for p in network.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]


def _report(epoch, metrics, history, network, optimizer, scheduler, scaler, rank) -> None:
    """Every rank reports (it is a barrier); rank 0 alone attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            state = {
                "epoch": epoch,
                "model": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "history": history,
            }
            torch.save(state, Path(directory) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"epoch": epoch, **metrics}, checkpoint=checkpoint)


def _sum_over_workers(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    """The values summed over the workers, read back in one transfer."""
    tensor = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _check_amp_dtype(device: torch.device, use_amp: bool, amp_dtype: torch.dtype) -> None:
    # Before Ampere, torch emulates bfloat16 without tensor cores: slower than float32, so refuse it.
    if use_amp and amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"train.amp_dtype=bfloat16: the {torch.cuda.get_device_name(device)} has no bfloat16 "
                         "tensor cores; set train.amp_dtype: float16")


def gpu_peak_flops(device: torch.device, use_amp: bool) -> float | None:
    """The GPU's peak FLOP/s at the precision the model runs in (autocast's 16-bit, or TF32), or None."""
    name = torch.cuda.get_device_name(device)
    for pattern, (half_tflops, tf32_tflops) in PEAK_TFLOPS.items():
        if re.fullmatch(pattern, name):
            return (half_tflops if use_amp else tf32_tflops) * 1e12
    return None


def _training_flops_per_image(spec: RunSpec) -> float:
    """From the MACs of one forward pass, counted layer by layer (models/layer_table.py)."""
    groups = spec.recipe.alexnet_groups if "alexnet_groups" in models.recipe_keys(spec.model) else None
    table = layer_table(spec.model, spec.recipe.resolution, num_classes=spec.num_classes, groups=groups)
    return TRAINING_FLOPS_PER_MAC * table.total_macs


def _quiet_ray_console() -> None:
    """Ray Train logs an INFO record on every worker's console for each report (the whole
    TrainingReport: every metric and the checkpoint's path) and each checkpoint. Its warnings and
    errors still show, and its log files in the Ray session's logs/train/ keep everything."""
    for handler in logging.getLogger("ray.train").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _say(line: str) -> None:
    # Ray Train replaces print in its workers with one that logs the line and, since Ray wraps the
    # worker's sys.stdout, prints it as well: every line would show twice. The process's own stdout,
    # which Ray forwards to the driver, shows it once.
    print(line, file=sys.__stdout__, flush=True)


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
