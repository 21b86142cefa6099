"""Where and in what precision a worker computes: the device Ray Train gave it, autocast, channels-last,
the GPU's speed settings, and its peak FLOP/s for the model FLOP utilisation (MFU) metric."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import ray.train.torch
import torch

import models
from models.layers import layer_table
from pipeline.config import Recipe
from pipeline.runs.identity import RunSpec

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


@dataclass(frozen=True)
class Device:
    device: torch.device
    use_amp: bool  # autocast, on GPUs only
    amp_dtype: torch.dtype
    channels_last: bool  # on GPUs only
    peak_flops: float | None  # None on the CPU and on GPUs PEAK_TFLOPS lacks

    @classmethod
    def set_up(cls, recipe: Recipe, threads: int) -> Device:
        device = ray.train.torch.get_device()
        on_gpu = device.type == "cuda"
        use_amp, amp_dtype = on_gpu and recipe.amp, getattr(torch, recipe.amp_dtype)
        torch.set_num_threads(threads)
        if on_gpu:
            _check_amp_dtype(device, use_amp, amp_dtype)
            # TF32 tensor cores for float32 matmuls; cuDNN's convolutions use them by default. TF32 rounds
            # the same way every time: it costs no reproducibility.
            torch.set_float32_matmul_precision("high")
            _choose_gpu_kernels(recipe.deterministic)
        peak = gpu_peak_flops(device, use_amp) if on_gpu else None
        return cls(device, use_amp, amp_dtype, on_gpu and recipe.channels_last, peak)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def input_dtype(self) -> torch.dtype:
        """What the loaders deliver: autocast's dtype with AMP, else float32."""
        return self.amp_dtype if self.use_amp else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """float16 needs its gradients loss-scaled; bfloat16 and float32 do not."""
        return torch.amp.GradScaler(self.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)


def gpu_peak_flops(device: torch.device, use_amp: bool) -> float | None:
    """The GPU's peak FLOP/s at the precision the model runs in (autocast's 16-bit, or TF32), or None."""
    name = torch.cuda.get_device_name(device)
    for pattern, (half_tflops, tf32_tflops) in PEAK_TFLOPS.items():
        if re.fullmatch(pattern, name):
            return (half_tflops if use_amp else tf32_tflops) * 1e12
    return None


def training_flops_per_image(spec: RunSpec) -> float:
    """From the MACs of one forward pass, counted layer by layer (models/layers.py)."""
    groups = spec.recipe.alexnet_groups if "alexnet_groups" in models.recipe_keys(spec.model) else None
    table = layer_table(spec.model, spec.recipe.resolution, num_classes=spec.num_classes, groups=groups)
    return TRAINING_FLOPS_PER_MAC * table.total_macs


def _choose_gpu_kernels(deterministic: bool) -> None:
    """The fastest kernels, or (train.deterministic) ones that give the same result on every run."""
    if not deterministic:
        # Every training batch has one shape: cuDNN times its algorithms for it once and keeps the
        # fastest, which may differ from run to run, as may the order in which atomic adds (some
        # convolutions' weight gradients, AdaptiveAvgPool2d's backward) sum.
        torch.backends.cudnn.benchmark = True
        return
    # cuBLAS reduces in a fixed order only with a fixed workspace; it reads the variable when it creates
    # its handle, at this process's first matmul, which comes later.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # warn_only: AdaptiveAvgPool2d's CUDA backward (the VGG/AlexNet models' pooling to the classifier's
    # side) has no deterministic version and would stop the run; torch warns instead. Where the feature map
    # divides into the pooled side (the papers' input sizes) every input gradient gets one add, so its
    # atomic adds still sum the same way.
    torch.use_deterministic_algorithms(True, warn_only=True)


def _check_amp_dtype(device: torch.device, use_amp: bool, amp_dtype: torch.dtype) -> None:
    # Before Ampere, torch emulates bfloat16 without tensor cores: slower than float32, so refuse it.
    if use_amp and amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"train.amp_dtype=bfloat16: the {torch.cuda.get_device_name(device)} has no bfloat16 "
                         "tensor cores; set train.amp_dtype: float16")
