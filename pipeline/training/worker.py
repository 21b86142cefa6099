"""The per-worker training function that Ray Train runs on every data-parallel worker.

`train_worker` reads top to bottom: set up, resume, build the loaders, then per epoch train one epoch,
evaluate, step the schedule, checkpoint and report. Everything it needs arrives in one picklable
`TrainJob` (pipeline/training/job.py).

A step never waits for the GPU: an epoch's running sums (loss x images, correct predictions) stay on
the device and are read once per progress line and once per epoch, and an evaluation reads its counts
once. Each read of a device value (`.item()`, `float(tensor)`, `.tolist()`, printing a tensor) waits
for every kernel queued before it, so one per step would leave the GPU idle while Python catches up.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipeline.data.node_copy import local_copy
from pipeline.errors import DataError
from pipeline.runs.store import CHECKPOINT_FILE
from pipeline.scoring.combine import top_k_hits
from pipeline.training.communication import PowerSGD, compress_gradients, ddp_options
from pipeline.training.device import Device, training_flops_per_image
from pipeline.training.hybrid import Sharding
from pipeline.training.job import TrainJob
from pipeline.training.optim import (
    make_optimizer,
    make_scheduler,
    sgd_step,
    step_schedule,
)
from pipeline.training.progress import RankZeroLog, Silent, quiet_ray_console


def train_worker(loop_config: dict) -> None:
    job: TrainJob = loop_config["job"]
    spec = job.spec
    quiet_ray_console()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = Device.set_up(spec.recipe, job.threads_per_worker)
    state = TrainState.build(job, device)
    start_epoch, history, points = state.resume(ray.train.get_checkpoint(), device)
    train_loader, val_loader = make_loaders(job, device, world, start_epoch)
    log = (RankZeroLog(f"[{spec.model}]", spec.epochs, len(train_loader), spec.recipe.batch_size // world * world,
                       spec.recipe.log_every_s, job.tracking) if rank == 0 else Silent())
    log.resumed(history, points)
    flops_per_image = training_flops_per_image(spec) if device.peak_flops else None

    for epoch in range(start_epoch, spec.epochs):
        # Reseeding per epoch makes dropout replayable after a resume without saving RNG state.
        torch.manual_seed(spec.seed * 10_000 + epoch * world + rank)
        log.start_epoch(epoch)
        trained = train_one_epoch(state, train_loader, device, log)
        val_top1, val_top5 = evaluate(state.model, val_loader, device)
        lr = state.optimizer.param_groups[0]["lr"]
        step_schedule(state.scheduler, spec.recipe, val_top1)
        metrics = trained.metrics(val_top1, val_top5, lr, world)
        metrics |= gpu_metrics(metrics["images_per_s"], world, device, flops_per_image)
        history.append({"epoch": epoch, **metrics})
        report(state, epoch, history, log.points, rank)
        log.epoch_done(history)
    log.close()


@dataclass
class TrainState:
    """What a run carries from step to step and what its checkpoints hold."""

    network: nn.Module  # the bare module: checkpoints hold its weights, whatever wraps it
    model: nn.Module  # what the steps call: the network under DDP (and torch.compile)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    sharding: Sharding | None  # train.parallelism hybrid: the classifier's slices (pipeline/training/hybrid.py)
    powersgd: PowerSGD | None  # train.gradient_compression powersgd: this rank's residuals and factors

    @classmethod
    def build(cls, job: TrainJob, device: Device) -> TrainState:
        spec, recipe = job.spec, job.spec.recipe
        torch.manual_seed(spec.seed)  # identical initial weights on every rank before DDP broadcasts
        network = spec.build_model()
        # Cut from the full initial weights, so a hybrid run starts where a data-parallel one does.
        sharding = Sharding.install(network, spec.num_workers) if spec.hybrid else None
        if device.channels_last:
            network = network.to(memory_format=torch.channels_last)
        model = ray.train.torch.prepare_model(network, parallel_strategy_kwargs=ddp_options(network, recipe))
        powersgd = compress_gradients(model, recipe, spec.seed) if spec.num_workers > 1 else None
        if recipe.compile:
            model = torch.compile(model)
        optimizer = make_optimizer(network, recipe)
        return cls(network, model, optimizer, make_scheduler(optimizer, recipe, spec.epochs), device.grad_scaler(),
                   nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing), sharding, powersgd)

    def state_dict(self, epoch: int, history: list[dict], points: list[dict]) -> dict:
        """The checkpoint, in the full layout whatever the parallelism; every worker calls it."""
        model, optimizer = self.network.state_dict(), self.optimizer.state_dict()
        if self.sharding:
            model, optimizer = self.sharding.full_model_state(self.network), self.sharding.full_optimizer_state(self.optimizer)
        state = {"epoch": epoch, "model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "history": history, "steps": points}
        if self.powersgd:  # every rank's own, gathered on rank 0 (the one that saves)
            ranks = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(self.powersgd.state_dict(), ranks, dst=0)
            state["powersgd"] = ranks
        return state

    def resume(self, checkpoint: ray.train.Checkpoint | None, device: Device) -> tuple[int, list[dict], list[dict]]:
        """(the first epoch to train, the history so far, the loss curve's points so far): from the last
        checkpoint, if Ray Train gave one."""
        if not checkpoint:
            return 0, [], []
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device.device, weights_only=True)
        model, optimizer = state["model"], state["optimizer"]
        if self.sharding:
            model, optimizer = self.sharding.model_shard(model), self.sharding.optimizer_shard(self.optimizer, optimizer)
        self.network.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.powersgd and state.get("powersgd"):
            self.powersgd.load_state_dict(state["powersgd"][dist.get_rank()], device.device)
        return state["epoch"] + 1, state["history"], state.get("steps", [])


def make_loaders(job: TrainJob, device: Device, world: int, start_epoch: int):
    """This worker's share of the training batches (an order fixed by seed and epoch, so a resumed run
    replays the same order) and of the validation images."""
    # Imported here: FFCV (with numba and OpenCV) costs 3.5 s of CPU to import, and of the processes that
    # import this module only the workers read data (Ray Train's controller and an ensemble member's
    # trial import it too, to unpickle the job). See docs/benchmarks.md.
    from pipeline.data.loaders import make_train_loader, make_val_loader

    recipe, betons = job.spec.recipe, node_local_betons(job)
    options = dict(resolution=recipe.resolution, num_threads=job.threads_per_worker, distributed=world > 1,
                   os_cache=recipe.os_cache, device=device.device, channels_last=device.channels_last,
                   dtype=device.input_dtype)
    train = make_train_loader(betons["train"], batch_size=recipe.batch_size // world, seed=job.spec.seed,
                              start_epoch=start_epoch, crop_min_scale=recipe.crop_min_scale,
                              pca_lighting_std=recipe.pca_lighting_std, order=recipe.order, **options)
    # Hybrid parallelism's forward is a collective: every worker must run as many validation batches.
    val = make_val_loader(betons["val"], batch_size=-(-recipe.val_batch_size // world), same_batch_count=job.spec.hybrid,
                          **options)
    return train, val


def node_local_betons(job: TrainJob) -> dict[str, Path]:
    """This node's .beton files (copied once per node when the data is a URI), checked to be the data
    the run is named by."""
    dataset = local_copy(job.data, job.data_cache)
    found = {split: beton.sha256 for split, beton in dataset.files.items()}
    if found != dict(job.spec.data_sha256):
        raise DataError(f"{job.data}: holds other data than run {job.spec.name} was started on (dataset.json "
                        "changed since): run the stage again")
    return {split: beton.path for split, beton in dataset.files.items()}


@dataclass
class EpochSums:
    """One epoch's training figures, summed over the workers."""

    started: float
    loss_sum: float
    correct: float
    seen: float
    data_wait: float
    train_time: float

    def metrics(self, val_top1: float, val_top5: float, lr: float, world: int) -> dict[str, float]:
        """The epoch's row of the history (after its evaluation)."""
        return {
            "train_loss": self.loss_sum / self.seen,
            "train_top1_error": 1 - self.correct / self.seen,
            "val_top1_error": val_top1,
            "val_top5_error": val_top5,
            "lr": lr,
            "images_per_s": self.seen / self.train_time,
            "epoch_time_s": time.perf_counter() - self.started,
            "data_wait_share": self.data_wait / world / self.train_time,
        }


def train_one_epoch(state: TrainState, loader, device: Device, log: RankZeroLog) -> EpochSums:
    state.model.train()
    started = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device.device)
    correct = torch.zeros((), dtype=torch.int64, device=device.device)
    seen, data_wait = 0, 0.0
    wait_start = time.perf_counter()
    for step, (images, labels) in enumerate(loader, 1):
        data_wait += time.perf_counter() - wait_start
        loss, logits = sgd_step(state.model, state.optimizer, state.scaler, state.criterion, images, labels,
                                device.autocast)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        log.step(step, seen, loss_sum)
        wait_start = time.perf_counter()
    # The epoch's one read of the device: it waits for the queued steps, which train_time then counts.
    sums = sum_over_workers([loss_sum, correct, seen, data_wait], device.device)
    return EpochSums(started, *sums, train_time=time.perf_counter() - started)


@torch.no_grad()
def evaluate(model: nn.Module, val_loader, device: Device) -> tuple[float, float]:
    """Top-1 and top-5 error over the whole validation set, each image counted once across workers."""
    model.eval()
    top1 = torch.zeros((), dtype=torch.int64, device=device.device)
    top5 = torch.zeros((), dtype=torch.int64, device=device.device)
    count = 0
    for images, labels in val_loader:
        with device.autocast():
            logits = model(images)
        hits = top_k_hits(logits, labels)
        top1 += hits[0]
        top5 += hits[1]
        count += len(labels)
    top1, top5, count = sum_over_workers([top1, top5, count], device.device)
    return 1 - top1 / count, 1 - top5 / count


def gpu_metrics(images_per_s: float, world: int, device: Device, flops_per_image: float | None) -> dict[str, float]:
    if not device.on_gpu:
        return {}
    per_gpu = images_per_s / world
    metrics = {"images_per_s_per_gpu": per_gpu}
    if flops_per_image:
        metrics["mfu"] = per_gpu * flops_per_image / device.peak_flops
    return metrics


def report(state: TrainState, epoch: int, history: list[dict], points: list[dict], rank: int) -> None:
    """Every rank reports (it is a barrier); rank 0 alone attaches the checkpoint (and has the points)."""
    checkpoint_state = state.state_dict(epoch, history, points)  # a collective under hybrid and PowerSGD
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            torch.save(checkpoint_state, Path(directory) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(history[-1], checkpoint=checkpoint)


def sum_over_workers(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    """The values summed over the workers, read back in one transfer."""
    tensor = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()
