"""Training throughput, measured side by side in one run on the same model, data and batch size:

1. a plain torch loop fed by the FFCV loader,
2. the same loop fed from in-memory tensors (the same batches, decoded once beforehand): the gap
   between 1 and 2 is what data loading costs,
3. the FFCV loop inside Ray Train with 1 worker: the gap between 1 and 3 is what Ray Train costs,
4. the loop on in-memory tensors as pipeline/training/worker.py ran it before issue #12: the loss and the
   correct count read from the device after every step, SGD's default implementation; and
5. the same with the running sums kept on the device (the reads gone, SGD unchanged): 2 against 4 is
   what the new hot path gains, 5 against 4 what removing the reads alone does.

    python -m benchmarks.training_throughput [--data data/beton] [--model alexnet2012] [--epochs 2] [--rounds 3]

The first epoch of every variant is a warm-up (FFCV compiles its numba pipeline, torch allocates),
and the rate is taken over the epochs after it. The in-memory variants 2, 4 and 5 run --rounds times
in rotating order on the same batches, and their medians are reported, per second of wall-clock time
and per second of this process's CPU time: on a machine shared with other work, the wall-clock rates
follow that work, while the CPU time a step costs does much less.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

import models
from benchmarks.common import rate_in_one_ray_worker
from pipeline.data.dataset import Dataset
from pipeline.data.loaders import make_train_loader
from pipeline.training.optim import sgd_step


def images_per_second(model: nn.Module, batches_per_epoch, epochs: int, *, read_every_step: bool = False,
                      fused: bool = True) -> tuple[float, float]:
    """SGD steps over `epochs` epochs after one warm-up epoch; batches_per_epoch() gives an iterable.
    Images per second of wall-clock time, and per second of this process's CPU time (all threads).
    The loop keeps the training loop's running sums: on the device, or (read_every_step) read from it
    after every step; fused picks SGD's fused implementation over its default."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=fused)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    images, start, cpu_start = 0, None, None
    for epoch in range(epochs + 1):
        if epoch == 1:
            images, start, cpu_start = 0, time.perf_counter(), time.process_time()
        if read_every_step:
            loss_sum, correct = 0.0, 0
        else:
            loss_sum, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
        for inputs, labels in batches_per_epoch():
            loss, logits = sgd_step(model, optimizer, scaler, loss_function, inputs, labels)
            if read_every_step:
                loss_sum += loss.item() * labels.numel()
                correct += (logits.argmax(1) == labels).sum().item()
            else:
                loss_sum += loss.detach() * labels.numel()
                correct += (logits.argmax(1) == labels).sum()
            images += labels.numel()
        float(loss_sum), int(correct)  # the epoch's one read, as the training loop makes it
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def loader_and_model(config: dict):
    torch.manual_seed(0)
    torch.set_num_threads(config["threads"])
    loader = make_train_loader(Path(config["beton"]), batch_size=config["batch_size"], resolution=config["resolution"],
                               num_threads=config["threads"], distributed=False, seed=0)
    return loader, models.build(config["model"], config["num_classes"])


def ffcv_loop(config: dict) -> float:
    loader, model = loader_and_model(config)
    return images_per_second(model, lambda: loader, config["epochs"])[0]


# The loop on in-memory tensors as the training loop runs it now, as it ran before issue #12, and between.
LOOP_VARIANTS = {
    "in-memory tensors, loop after #12": {},
    "in-memory tensors, loop before #12": {"read_every_step": True, "fused": False},
    "in-memory tensors, no reads, default SGD": {"fused": False},
}


def in_memory_loops(config: dict, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Each of LOOP_VARIANTS on the same batches, decoded once, `rounds` times in rotating order:
    (wall-clock, CPU-time) rates per round."""
    loader, _ = loader_and_model(config)
    batches = [(images.clone(), labels.clone()) for images, labels in loader]
    names = list(LOOP_VARIANTS)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            torch.manual_seed(0)
            model = models.build(config["model"], config["num_classes"])
            rates[name].append(images_per_second(model, lambda: batches, config["epochs"], **LOOP_VARIANTS[name]))
    return rates


def ray_train_loop(config: dict) -> float:
    with tempfile.TemporaryDirectory() as folder:
        scaling = ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": config["threads"]})
        return rate_in_one_ray_worker(ffcv_loop, config, scaling, Path(folder), "benchmark")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/beton"), help="folder with train.beton (make run makes it)")
    parser.add_argument("--model", default="alexnet2012")
    parser.add_argument("--resolution", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the in-memory variants")
    args = parser.parse_args(argv)

    data = Dataset.read(args.data)
    config = {"beton": str(data.files["train"].path), "num_classes": data.num_classes, "model": args.model,
              "resolution": args.resolution, "batch_size": args.batch_size, "threads": args.threads,
              "epochs": args.epochs}
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    loops = in_memory_loops(config, args.rounds)
    ffcv, on_ray = ffcv_loop(config), ray_train_loop(config)
    ray.shutdown()

    print(f"\n{args.model} at {args.resolution}px, batch {args.batch_size}, {args.threads} threads, "
          f"{args.epochs} timed epochs of {data.files['train'].path} on {platform.processor() or platform.machine()}")
    print(f"  {'torch loop, FFCV loader':42} {ffcv:8.1f} img/s")
    print(f"  {'Ray Train (1 worker), FFCV loader':42} {on_ray:8.1f} img/s")
    print(f"  in-memory variants, median of {args.rounds} rounds (range): per wall-clock s; per CPU s")
    wall, cpu = {}, {}
    for name, rates in loops.items():
        walls, cpus = [rate[0] for rate in rates], [rate[1] for rate in rates]
        wall[name], cpu[name] = statistics.median(walls), statistics.median(cpus)
        print(f"  {name:42} {wall[name]:8.1f} img/s ({min(walls):.1f} - {max(walls):.1f}); "
              f"{cpu[name]:.1f} img/CPU-s ({min(cpus):.1f} - {max(cpus):.1f})")
    after, before, no_reads = LOOP_VARIANTS
    print(f"  FFCV loader / in-memory tensors: {ffcv / wall[after]:.2f}")
    print(f"  Ray Train (1 worker) / plain torch loop: {on_ray / ffcv:.2f}")
    for what, new, old in (("loop after / before #12", after, before), ("reads removed alone", no_reads, before),
                           ("fused SGD alone", after, no_reads)):
        print(f"  {what}: {wall[new] / wall[old]:.2f} per wall-clock s, {cpu[new] / cpu[old]:.2f} per CPU s")


if __name__ == "__main__":
    main()
