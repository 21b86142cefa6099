"""The training loop and the loaders on a CUDA GPU; every test is skipped on a machine without one.

One Ray worker on one GPU, LeNet-5 on the digits subset (the plumbing, not the model, is under test):
bf16 autocast with channels_last and torch.compile, fp16 autocast with the GradScaler, a run stopped
after its first checkpoint and resumed, and the GPU loader's batches checked value by value while the
GPU lags behind the Python code (the case pipeline/data/loaders.py's notes on CUDA streams are about).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

from pipeline.config import PROJECT_ROOT
from pipeline.data.loaders import IMAGENET_MEAN, IMAGENET_STD, make_val_loader
from pipeline.drivers.train import train_model
from pipeline.storage.location import Location
from pipeline.training.device import PEAK_TFLOPS
from tests.conftest import (
    EPOCH_METRICS,
    FAST_MODEL,
    checkpoints,
    finish,
    flat_colour_beton,
    mlflow_runs,
    read_history,
    start_train_stage,
    steps,
    stop_after_first_checkpoint,
    training_overrides,
    write_params,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Long enough that the SIGTERM lands while the run still trains: a LeNet-5 epoch on a GPU is well under a second.
STOP_EPOCHS = 60
BF16_GPU = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def gpu_overrides(folder: Path, **train: object) -> dict:
    return training_overrides(folder, ray={"num_workers": 1, "use_gpu": True}, amp=True, channels_last=True, **train)


@pytest.mark.parametrize("train", [
    pytest.param({"amp_dtype": "bfloat16", "compile": True}, id="bf16-compiled",
                 marks=pytest.mark.skipif(not BF16_GPU, reason="needs a GPU with bfloat16 tensor cores")),
    pytest.param({"amp_dtype": "float16", "compile": False}, id="fp16-gradscaler"),
])
def test_one_gpu_learns_in_two_epochs(tmp_path, ray_cluster, digits_betons, train):
    _, params = write_params(tmp_path, gpu_overrides(tmp_path, epochs=2, **train))

    metrics = train_model(params, FAST_MODEL, Location.local(digits_betons), Location.local(tmp_path / "out"))

    history = read_history(tmp_path / "out")
    assert [row["epoch"] for row in history] == [0, 1]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert metrics["val_top1_error"] < 0.9  # 10 classes: chance is 0.9
    known_gpu = any(re.fullmatch(pattern, torch.cuda.get_device_name()) for pattern in PEAK_TFLOPS)
    for row in history:
        assert row["images_per_s_per_gpu"] == row["images_per_s"] > 0  # one worker
        if known_gpu:
            assert 0 < row["mfu"] < 1
        else:
            assert "mfu" not in row
    client, runs = mlflow_runs(tmp_path)
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert steps(client, runs[0].info.run_id, "mfu" if known_gpu else "images_per_s_per_gpu") == [1, 2]


def test_mlflow_samples_the_gpu():
    """MLflow's system metrics include the GPU's only with NVML's bindings (nvidia-ml-py) installed. A run
    publishes its first sample after 10 s, longer than the runs above take, so the monitor is asked here."""
    monitor = GPUMonitor()
    monitor.collect_metrics()
    assert monitor.metrics["gpu_0_utilization_percentage"] and monitor.metrics["gpu_0_memory_usage_megabytes"]


def test_stopped_gpu_run_resumes_from_its_checkpoint(tmp_path, digits_betons):
    # fp16: the checkpoint carries the GradScaler's state as well as the model's and the optimizer's.
    params, _ = write_params(tmp_path, gpu_overrides(tmp_path, epochs=STOP_EPOCHS, amp_dtype="float16"))
    stop_after_first_checkpoint(params, digits_betons, tmp_path)
    assert checkpoints(tmp_path), "an unfinished run keeps its checkpoints"

    log = finish(start_train_stage(params, digits_betons, tmp_path / "out", tmp_path / "again.log"), tmp_path / "again.log")

    assert f"Resuming {FAST_MODEL}-" in log and f"epoch 1/{STOP_EPOCHS} " not in log
    history = read_history(tmp_path / "out")
    assert [row["epoch"] for row in history] == list(range(STOP_EPOCHS))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    client, runs = mlflow_runs(tmp_path)
    for metric in EPOCH_METRICS:
        assert steps(client, runs[0].info.run_id, metric) == list(range(1, STOP_EPOCHS + 1)), metric


@pytest.mark.timeout(300)
def test_gpu_batches_stay_intact_while_the_gpu_lags_behind(tmp_path):
    """Every batch of three sequential epochs checked against the images it must hold, while each step
    first keeps the GPU busy for some 30 ms: with no per-step sync the loader's thread runs many batches
    ahead of the GPU, the case in which FFCV 1.0.2 would reuse a pinned buffer before its copy ran."""
    count, batch_size, epochs = 64, 2, 3
    params_dict = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    beton = flat_colour_beton(tmp_path / "flat", count, params_dict)
    device = torch.device("cuda")
    loader = make_val_loader(beton, batch_size=batch_size, resolution=32, num_threads=2, distributed=False,
                             device=device, channels_last=True, dtype=torch.bfloat16)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device)
    cycles = 50_000_000  # ~25-35 ms at a data-centre GPU's 1.4-2 GHz

    errors = []
    for _ in range(epochs):
        for index, (images, labels) in enumerate(loader):
            torch.cuda._sleep(cycles)
            expected = torch.arange(index * batch_size, index * batch_size + len(labels), device=device)
            # tests/test_loaders.py's colour(i): flat images, so each image's pixel mean is its colour.
            colours = torch.stack([(7 * expected) % 256, (100 + 3 * expected) % 256, 200 - expected], dim=1)
            pixel_error = (images.float().mean(dim=(2, 3)) - (colours - mean) / std).abs().amax()
            errors.append(torch.maximum(pixel_error, (labels != expected).any().float() * 100))

    assert len(errors) == epochs * count // batch_size
    assert torch.stack(errors).max().item() < 2e-2  # bf16 rounding of values below 2.7
