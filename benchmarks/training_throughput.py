"""Training throughput, measured side by side in one run on the same model, data and batch size:

1. a plain torch loop fed by the FFCV loader,
2. the same loop fed from in-memory tensors (the same batches, decoded once beforehand): the gap
   between 1 and 2 is what data loading costs,
3. the FFCV loop inside Ray Train with 1 worker: the gap between 1 and 3 is what Ray Train costs.

    python -m benchmarks.training_throughput [--data data/beton] [--model alexnet2012] [--epochs 2]

The first epoch of every variant is a warm-up (FFCV compiles its numba pipeline, torch allocates),
and the rate is taken over the epochs after it.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

import models
from pipeline.loaders import make_train_loader
from pipeline.dataset import Dataset


def images_per_second(model: nn.Module, batches_per_epoch, epochs: int) -> float:
    """SGD steps over `epochs` epochs after one warm-up epoch; batches_per_epoch() gives an iterable."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    images, start = 0, None
    for epoch in range(epochs + 1):
        if epoch == 1:
            images, start = 0, time.perf_counter()
        for inputs, labels in batches_per_epoch():
            loss = loss_function(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += labels.numel()
    return images / (time.perf_counter() - start)


def loader_and_model(config: dict):
    torch.manual_seed(0)
    torch.set_num_threads(config["threads"])
    loader = make_train_loader(Path(config["beton"]), batch_size=config["batch_size"], resolution=config["resolution"],
                               num_threads=config["threads"], distributed=False, seed=0)
    return loader, models.build(config["model"], config["num_classes"])


def ffcv_loop(config: dict) -> float:
    loader, model = loader_and_model(config)
    return images_per_second(model, lambda: loader, config["epochs"])


def in_memory_loop(config: dict) -> float:
    loader, model = loader_and_model(config)
    batches = [(images.clone(), labels.clone()) for images, labels in loader]
    return images_per_second(model, lambda: batches, config["epochs"])


def ray_train_worker(config: dict) -> None:
    rate = ffcv_loop(config)
    Path(config["result_file"]).write_text(json.dumps({"images_per_s": rate}))
    ray.train.report({"images_per_s": rate})


def ray_train_loop(config: dict) -> float:
    with tempfile.TemporaryDirectory() as folder:
        config = config | {"result_file": str(Path(folder) / "result.json")}
        trainer = ray.train.torch.TorchTrainer(
            ray_train_worker, train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": config["threads"]}),
            run_config=ray.train.RunConfig(storage_path=folder, name="benchmark"),
        )
        trainer.fit()
        # Result.metrics is not dependable in Ray 2.60 (it can come back None): read the worker's file.
        return json.loads(Path(config["result_file"]).read_text())["images_per_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/beton"), help="folder with train.beton (make run makes it)")
    parser.add_argument("--model", default="alexnet2012")
    parser.add_argument("--resolution", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    args = parser.parse_args(argv)

    data = Dataset.read(args.data)
    config = {"beton": str(data.files["train"].path), "num_classes": data.num_classes, "model": args.model,
              "resolution": args.resolution, "batch_size": args.batch_size, "threads": args.threads,
              "epochs": args.epochs}
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    rates = {
        "torch loop, FFCV loader": ffcv_loop(config),
        "torch loop, in-memory tensors": in_memory_loop(config),
        "Ray Train (1 worker), FFCV loader": ray_train_loop(config),
    }
    ray.shutdown()

    print(f"\n{args.model} at {args.resolution}px, batch {args.batch_size}, {args.threads} threads, "
          f"{args.epochs} timed epochs of {data.files['train'].path} on {platform.processor() or platform.machine()}")
    for name, rate in rates.items():
        print(f"  {name:36} {rate:8.1f} img/s")
    ffcv, memory, on_ray = rates.values()
    print(f"  FFCV loader / in-memory tensors: {ffcv / memory:.2f}")
    print(f"  Ray Train (1 worker) / plain torch loop: {on_ray / ffcv:.2f}")


if __name__ == "__main__":
    main()
