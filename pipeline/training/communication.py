"""What the workers of a run exchange each step: DDP's gradient compression (train.gradient_compression,
torch's own communication hooks) and the bytes each worker sends per step, by the arithmetic.

The arithmetic counts what torch's collectives send on a ring of N workers, as gloo and NCCL run them
for large tensors: an all-reduce of S bytes sends 2 (N - 1) / N x S from each worker (a reduce-scatter,
then an all-gather), an all-gather of N parts of S bytes sends (N - 1) x S. benchmarks/parallel_scaling.py
checks the figures against the bytes the processes write to their sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from pipeline.config import Recipe
from pipeline.runs.identity import RunSpec

FLOAT32_BYTES, HALF_BYTES, INDEX_BYTES = 4, 2, 8


def ddp_options(network: nn.Module, recipe: Recipe) -> dict:
    """DDP's keyword arguments for the recipe's compression. PowerSGD chains collectives in callbacks
    (P's all-reduce, then Q's): with several buckets in flight, gloo ranks issued them in different orders
    and failed with "Received data size doesn't match expected size". One bucket for all gradients keeps
    one chain; the all-reduce it waits for is small, so little overlap with the backward pass is lost."""
    if recipe.gradient_compression != "powersgd":
        return {}
    megabytes = sum(parameter.numel() * parameter.element_size() for parameter in network.parameters()) / 2**20
    return {"bucket_cap_mb": megabytes + 1}


def compress_gradients(model: nn.Module, recipe: Recipe, seed: int) -> None:
    """Registers recipe.gradient_compression's hook on a DDP model (none leaves DDP's float32 all-reduce)."""
    if recipe.gradient_compression == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif recipe.gradient_compression == "powersgd":
        # Error feedback adds what the low-rank approximation left out to the next step's gradient, so
        # nothing is lost, only delayed (Vogels et al. 2019); its buffers are not checkpointed, so a
        # resumed run starts them again from zero.
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=recipe.powersgd_rank,
            start_powerSGD_iter=recipe.powersgd_warmup_steps, use_error_feedback=True, warm_start=True,
            random_seed=seed)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def ring_all_reduce(size: float, world: int) -> float:
    return 2 * (world - 1) / world * size


@dataclass(frozen=True)
class StepTraffic:
    """Bytes one worker sends per training step, by what they carry."""

    gradients: float  # DDP's all-reduce of the replicated parameters' gradients
    activations: float  # hybrid only: the classifier's gathers, forward and backward

    @property
    def total(self) -> float:
        return self.gradients + self.activations


def step_traffic(spec: RunSpec, activation_bytes: int | None = None) -> StepTraffic:
    """The bytes each worker of `spec` sends per training step (after PowerSGD's plain warm-up steps).
    activation_bytes: the size of an activation's element, autocast's 2 bytes on a GPU with train.amp."""
    world = spec.num_workers
    if world == 1:
        return StepTraffic(0.0, 0.0)
    if activation_bytes is None:
        activation_bytes = HALF_BYTES if spec.use_gpu and spec.recipe.amp else FLOAT32_BYTES
    with torch.device("meta"):  # shapes only: nothing is allocated or drawn
        network = spec.build_model()
    linears = [layer for layer in network.classifier if isinstance(layer, nn.Linear)] if spec.hybrid else []
    sharded = {id(parameter) for layer in linears for parameter in layer.parameters()}
    replicated = [parameter for parameter in network.parameters() if id(parameter) not in sharded]
    gradients = ring_all_reduce(_gradient_bytes(replicated, spec.recipe), world)
    return StepTraffic(gradients, _classifier_activation_bytes(linears, spec.recipe.batch_size, world, activation_bytes))


def _gradient_bytes(parameters: list[nn.Parameter], recipe: Recipe) -> float:
    """The bytes DDP all-reduces for these gradients, as the compression hook sends them."""
    if recipe.gradient_compression == "none":
        return FLOAT32_BYTES * sum(parameter.numel() for parameter in parameters)
    if recipe.gradient_compression == "bf16":
        return HALF_BYTES * sum(parameter.numel() for parameter in parameters)
    elements = 0
    for parameter in parameters:
        # PowerSGD's rule: a gradient viewed as rows x columns goes as two rank-r factors when they are
        # at least 2x smaller (its min_compression_rate), else as it is; vectors always as they are.
        rows, columns = parameter.shape[0], parameter.numel() // parameter.shape[0]
        compressed = (rows + columns) * recipe.powersgd_rank
        worth = parameter.ndim > 1 and rows * columns >= 2 * compressed
        elements += compressed if worth else parameter.numel()
    return FLOAT32_BYTES * elements


def _classifier_activation_bytes(linears: list[nn.Linear], batch: int, world: int, element: int) -> float:
    """pipeline/training/hybrid.py's exchanges: the row counts, then for the features and each layer's
    output an all-gather of the padded parts forward and an all-reduce of the whole backward."""
    if not linears:
        return 0.0
    local = batch // world
    sent = (world - 1) * INDEX_BYTES  # the row counts
    sent += (world - 1) * local * linears[0].in_features * element + ring_all_reduce(
        batch * linears[0].in_features * element, world)
    for layer in linears:
        widest = -(-layer.out_features // world)
        sent += (world - 1) * batch * widest * element + ring_all_reduce(batch * layer.out_features * element, world)
    return sent
