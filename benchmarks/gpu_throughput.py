"""GPU training throughput, measured side by side in one run on one GPU, for each model (default
alexnet2012 and vgg16 at 224 px, 1,000 classes), with the training loop's settings: autocast (bf16, or
fp16 with loss scaling where the GPU has no bf16), channels_last, cuDNN benchmark mode, TF32, fused
SGD, no per-step reads of the device.

1. the loop in a plain torch DDP process (one GPU, NCCL), fed by the project's FFCV GPU loader,
2. the same loop on in-memory tensors already on the GPU (the same batches, decoded once beforehand):
   1 / 2 is what loading costs,
3. the loop of 1 run by Ray Train (1 worker, 1 GPU): 3 / 1 is what Ray Train costs.

    python -m benchmarks.gpu_throughput [--data data/beton] [--images 10000] [--models alexnet2012 vgg16]
                                        [--batch-size 256] [--threads N] [--epochs 5] [--compile]

Without --data it writes --images photo-like 400x300 JPEGs (benchmarks/loader_throughput.py) into a
.beton as the preprocess stage does (write_mode proportion). Every variant's first epoch is a warm-up
(FFCV compiles its numba pipeline, cuDNN picks its algorithms, torch.compile compiles); the rate is
taken over the epochs after it, with the GPU synchronised at both ends. MFU is the model's training
FLOP/s (6 x the forward MACs of models/layers.py per image) over the GPU's dense peak, for the
GPUs pipeline/training/worker.py knows.

How several GPUs share a step (plain DDP, bf16 and PowerSGD gradient compression, hybrid parallelism)
is compared by benchmarks/parallel_scaling.py --device cuda on a machine with 2 or more GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import models
from benchmarks.common import rate_in_one_ray_worker
from benchmarks.loader_throughput import write_sample_tree
from models.layers import layer_table
from pipeline.config import PreprocessParams
from pipeline.data.beton import preprocess
from pipeline.data.dataset import Dataset
from pipeline.data.loaders import make_train_loader
from pipeline.data.tree import read_tree
from pipeline.training.device import TRAINING_FLOPS_PER_MAC, gpu_peak_flops
from pipeline.training.optim import sgd_step

RESOLUTION = 224
NUM_CLASSES = 1000


def images_per_second(model: nn.Module, batches_per_epoch, epochs: int, amp_dtype: torch.dtype) -> float:
    """SGD steps over `epochs` epochs after one warm-up epoch; batches_per_epoch() gives an iterable."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    model.train()
    images, start = 0, None
    for epoch in range(epochs + 1):
        if epoch == 1:
            torch.cuda.synchronize()
            images, start = 0, time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device="cuda")  # as the training loop keeps it
        for inputs, labels in batches_per_epoch():
            loss, _ = sgd_step(model, optimizer, scaler, criterion, inputs, labels,
                               lambda: torch.autocast("cuda", dtype=amp_dtype))
            loss_sum += loss.detach() * len(labels)
            images += len(labels)
    torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def gpu_loop(config: dict) -> float:
    """The loop on this process's current GPU, in the torch.distributed group that exists already."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda", torch.cuda.current_device())
    amp_dtype = getattr(torch, config["amp_dtype"])
    torch.manual_seed(0)
    network = models.build(config["model"], NUM_CLASSES).to(device, memory_format=torch.channels_last)
    model = DistributedDataParallel(network, device_ids=[device.index])
    if config["compile"]:
        model = torch.compile(model)
    loader = make_train_loader(Path(config["beton"]), batch_size=config["batch_size"], resolution=RESOLUTION,
                               num_threads=config["threads"], distributed=False, seed=0, device=device,
                               channels_last=True, dtype=amp_dtype)
    if config["in_memory"]:
        batches = [(images.clone(), labels.clone()) for images, labels in loader]
        return images_per_second(model, lambda: batches, config["epochs"], amp_dtype)
    return images_per_second(model, lambda: loader, config["epochs"], amp_dtype)


def plain_ddp(config: dict, scratch: Path) -> float:
    """gpu_loop in this process, as a one-process NCCL group: DDP without Ray."""
    torch.cuda.set_device(0)
    store = scratch / f"process-group-{time.monotonic_ns()}"
    dist.init_process_group("nccl", init_method=store.as_uri(), rank=0, world_size=1)
    try:
        return gpu_loop(config)
    finally:
        dist.destroy_process_group()
        torch.cuda.empty_cache()  # the memory goes back before the Ray worker's turn


def ray_train(config: dict, scratch: Path) -> float:
    scaling = ray.train.ScalingConfig(num_workers=1, use_gpu=True,
                                      resources_per_worker={"CPU": config["threads"], "GPU": 1})
    return rate_in_one_ray_worker(gpu_loop, config, scaling, scratch, f"gpu-benchmark-{config['model']}")


def photo_beton(scratch: Path, images: int, threads: int) -> Path:
    tree = write_sample_tree(scratch / "tree", images)
    params = PreprocessParams(write_mode="proportion", max_resolution=400, compress_probability=0.5, jpeg_quality=90,
                              smart_threshold=1, num_workers=threads, max_skipped_fraction=0.0, seed=0)
    preprocess(read_tree(tree), scratch / "beton", params)
    return scratch / "beton"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder with train.beton and dataset.json (default: generated)")
    parser.add_argument("--images", type=int, default=10_000, help="photo-like images to generate without --data")
    parser.add_argument("--models", nargs="+", default=["alexnet2012", "vgg16"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FFCV decoding threads")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_throughput measures a GPU, and torch sees none here (torch.cuda.is_available() "
                 "is False): run it on a machine with an NVIDIA GPU and a CUDA build of torch.")

    amp_dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    gpu = torch.cuda.get_device_name(0)
    peak = gpu_peak_flops(torch.device("cuda", 0), use_amp=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        data = args.data or photo_beton(scratch, args.images, args.threads)
        beton = Dataset.read(data).files["train"].path
        ray.init(address="local", num_cpus=args.threads, num_gpus=1, include_dashboard=False, log_to_driver=False)
        for model in args.models:
            config = {"model": model, "beton": str(beton), "batch_size": args.batch_size, "threads": args.threads,
                      "epochs": args.epochs, "compile": args.compile, "amp_dtype": amp_dtype}
            rates = {
                "FFCV loader, DDP without Ray": plain_ddp(config | {"in_memory": False}, scratch),
                "in-memory tensors, DDP without Ray": plain_ddp(config | {"in_memory": True}, scratch),
                "FFCV loader, Ray Train (1 worker)": ray_train(config | {"in_memory": False}, scratch),
            }
            macs = layer_table(model, RESOLUTION, num_classes=NUM_CLASSES).total_macs
            rows.append((model, rates, TRAINING_FLOPS_PER_MAC * macs))
        ray.shutdown()

    print(f"\n{gpu}, {amp_dtype} autocast, channels_last, batch {args.batch_size}, {RESOLUTION} px, "
          f"{'compiled' if args.compile else 'eager'}, {args.threads} FFCV threads, {args.epochs} timed epochs of "
          f"{beton} ({'given' if args.data else 'generated photo-like JPEGs'})")
    for model, rates, flops_per_image in rows:
        print(f"{model} ({flops_per_image / 1e9:.1f} GFLOP per training image):")
        for name, rate in rates.items():
            mfu = f"  MFU {rate * flops_per_image / peak:.1%}" if peak else ""
            print(f"  {name:38} {rate:9.1f} img/s{mfu}")
        ffcv, in_memory, on_ray = rates.values()
        print(f"  FFCV loader / in-memory tensors: {ffcv / in_memory:.2f}; "
              f"Ray Train / DDP without Ray: {on_ray / ffcv:.2f}")


if __name__ == "__main__":
    main()
