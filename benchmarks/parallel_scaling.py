"""Scaling of 2 data-parallel workers, setting by setting: plain DDP (float32 gradients), DDP with bf16
and PowerSGD gradient compression, hybrid parallelism (pipeline/training/hybrid.py), and, as the bound
none of them can pass, the same two processes exchanging nothing (DDP's no_sync).

    python -m benchmarks.parallel_scaling [--models alexnet2012 vgg11_bn] [--resolutions 67 224]
        [--workers 2] [--batch 16] [--steps 6] [--rounds 3] [--powersgd-rank 4] [--device cpu|cuda]
        [--settings data bf16 powersgd hybrid no_exchange]

Each setting runs as --workers gloo processes of one thread each on loopback (one CPU per worker), on
random tensors of --batch images per worker, with the training loop's optimizer; "single" is one such
process alone. A run times --steps steps after 2 warm-up steps (PowerSGD compresses from the third);
its rate is the images of all workers over the slowest worker's time. The settings run --rounds times
in rotating order and the medians are reported, with the scaling efficiency (N workers' rate over N
times the single process's) and the bytes rank 0 wrote to its sockets in a step, next to the arithmetic
of pipeline/training/communication.py. With --device cuda each worker is one GPU and NCCL carries
the exchange (float32, no autocast; bytes are counted only on gloo's sockets): on a machine with as
many GPUs as --workers, the same comparison for GPUs. --settings leaves some out (where a step takes
seconds, as vgg11_bn's at 224 px on a CPU); "single" always runs, the efficiencies need it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import load_params
from pipeline.runs.identity import RunSpec
from pipeline.training.communication import compress_gradients, ddp_options, step_traffic
from pipeline.training.hybrid import Sharding
from pipeline.training.optim import make_optimizer, sgd_step

WARMUP_STEPS = 2
# Each setting names both keys: the rest of the recipe comes from params.yaml, whose own choice must not leak in.
PLAIN = {"parallelism": "data", "gradient_compression": "none"}
SETTINGS = {
    "single": PLAIN,
    "data": PLAIN,
    "bf16": PLAIN | {"gradient_compression": "bf16"},
    "powersgd": PLAIN | {"gradient_compression": "powersgd"},
    "hybrid": PLAIN | {"parallelism": "hybrid"},
    "no_exchange": PLAIN,
}


def spec_for(model: str, setting: str, world: int, batch: int, resolution: int, powersgd_rank: int) -> RunSpec:
    recipe = load_params().train.recipe().model_copy(update={
        **SETTINGS[setting], "batch_size": world * batch, "resolution": resolution, "dropout": 0.0,
        "powersgd_rank": powersgd_rank, "powersgd_warmup_steps": WARMUP_STEPS})
    return RunSpec(model=model, num_classes=10, recipe=recipe, seed=0, epochs=1, num_workers=world,
                   use_gpu=False, data_sha256={})


def worker(rank: int, spec: RunSpec, setting: str, port: int, steps: int, out: str, device: str) -> None:
    torch.set_num_threads(1)
    world, on_gpu = spec.num_workers, device == "cuda"
    if on_gpu:
        torch.cuda.set_device(rank)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    where = torch.device(device, rank) if on_gpu else torch.device("cpu")
    network = spec.build_model().to(where)
    if spec.hybrid:
        Sharding.install(network, world)
    model = DistributedDataParallel(network, **ddp_options(network, spec.recipe)) if world > 1 else network
    if world > 1:
        compress_gradients(model, spec.recipe, spec.seed)
    optimizer = make_optimizer(network, spec.recipe)
    scaler, criterion = torch.amp.GradScaler(where.type, enabled=False), nn.CrossEntropyLoss()
    batch, side = spec.recipe.batch_size // world, spec.recipe.resolution
    images, labels = torch.randn(batch, 3, side, side, device=where), torch.randint(0, 10, (batch,), device=where)
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            if on_gpu:
                torch.cuda.synchronize()
            if world > 1:
                dist.barrier()
            started, written = time.perf_counter(), bytes_written()
        exchange = model.no_sync() if setting == "no_exchange" else contextlib.nullcontext()
        with exchange:  # the training loop's step; under no_sync DDP all-reduces nothing
            sgd_step(model, optimizer, scaler, criterion, images, labels)
    if on_gpu:
        torch.cuda.synchronize()
    elapsed, written = time.perf_counter() - started, bytes_written() - written
    Path(f"{out}.{rank}").write_text(json.dumps({"seconds": elapsed, "bytes_per_step": written / steps}))
    if world > 1:
        dist.destroy_process_group()


def bytes_written() -> int:
    """What this process has written, sockets included (Linux counts them in /proc/self/io's wchar)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar"))


def measure(spec: RunSpec, setting: str, steps: int, folder: Path, port: int, device: str) -> dict:
    out = str(folder / f"{spec.model}-{setting}")
    context = mp.get_context("spawn")
    processes = [context.Process(target=worker, args=(rank, spec, setting, port, steps, out, device))
                 for rank in range(spec.num_workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode:
            raise RuntimeError(f"{spec.model} {setting}: a worker exited with {process.exitcode}")
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(spec.num_workers)]
    seconds = max(result["seconds"] for result in results)
    return {"images_per_s": spec.recipe.batch_size * steps / seconds, "bytes_per_step": results[0]["bytes_per_step"]}


def benchmark(model: str, resolution: int, arguments: argparse.Namespace, folder: Path) -> dict:
    settings = ["single", *arguments.settings]
    rounds: dict[str, list[dict]] = {setting: [] for setting in settings}
    for round_index in range(arguments.rounds):
        order = settings[round_index % len(settings):] + settings[:round_index % len(settings)]
        for number, setting in enumerate(order):
            world = 1 if setting == "single" else arguments.workers
            spec = spec_for(model, setting, world, arguments.batch, resolution, arguments.powersgd_rank)
            rounds[setting].append(measure(spec, setting, arguments.steps, folder, 29700 + round_index * 10 + number,
                                           arguments.device))
    single = statistics.median(run["images_per_s"] for run in rounds["single"])
    table = {}
    for setting, runs in rounds.items():
        world = 1 if setting == "single" else arguments.workers
        rate = statistics.median(run["images_per_s"] for run in runs)
        spec = spec_for(model, setting, world, arguments.batch, resolution, arguments.powersgd_rank)
        table[setting] = {
            "images_per_s": round(rate, 1), "scaling_efficiency": round(rate / (world * single), 2),
            "rates": [round(run["images_per_s"], 1) for run in runs],
            "bytes_per_step_counted": round(statistics.median(run["bytes_per_step"] for run in runs)),
            "bytes_per_step_arithmetic": 0 if setting == "no_exchange" else round(step_traffic(spec).total),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["alexnet2012", "vgg11_bn"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[67, 224])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="images per worker per step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--powersgd-rank", type=int, default=4)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    others = [setting for setting in SETTINGS if setting != "single"]
    parser.add_argument("--settings", nargs="+", choices=others, default=others)
    arguments = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for model in arguments.models:
            for resolution in arguments.resolutions:
                results[f"{model}@{resolution}"] = benchmark(model, resolution, arguments, Path(folder))
                print(json.dumps({f"{model}@{resolution}": results[f"{model}@{resolution}"]}, indent=1), flush=True)
    print(json.dumps({"arguments": vars(arguments), "cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
