"""What the workers of a run exchange each step: DDP's gradient compression (train.gradient_compression,
torch's own communication hooks) and the bytes each worker sends per step, by the arithmetic.

The arithmetic counts what torch's collectives send on a ring of N workers, as gloo and NCCL run them
for large tensors: an all-reduce of S bytes sends 2 (N - 1) / N x S from each worker (a reduce-scatter,
then an all-gather), an all-gather of N parts of S bytes sends (N - 1) x S. benchmarks/parallel_scaling.py
checks the figures against the bytes the processes write to their sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


def compress_gradients(model: nn.Module, recipe: Recipe, seed: int) -> PowerSGD | None:
    """Registers recipe.gradient_compression's hook on a DDP model (none leaves DDP's float32 all-reduce);
    returns PowerSGD's state, which a checkpoint must hold for a resumed run to go on as if uninterrupted."""
    if recipe.gradient_compression == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif recipe.gradient_compression == "powersgd":
        powersgd = PowerSGD(model.module, recipe, seed)
        model.register_comm_hook(powersgd.state, powersgd.hook)
        return powersgd
    return None


class PowerSGD:
    """torch's PowerSGD hook and its state, kept in step with the layout of DDP's buckets.

    Error feedback adds what the low-rank approximation left out to the next step's gradient, so nothing
    is lost, only delayed (Vogels et al. 2019); with warm start each step's factors start from the last
    step's. Both live in flat tensors per bucket, in the order of the bucket's parameters, and that order
    changes: DDP lays a new model's bucket out in parameter order and rebuilds it in the order the
    gradients became ready after the first step. A run's own rebuild falls in PowerSGD's plain warm-up
    steps, before there is any state; a resumed run's does not, so the hook moves the state to the new
    order whenever a bucket's order changes (DDP's own rebuild after a resume included)."""

    def __init__(self, network: nn.Module, recipe: Recipe, seed: int):
        self.state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=recipe.powersgd_rank,
            start_powerSGD_iter=recipe.powersgd_warmup_steps, use_error_feedback=True, warm_start=True,
            random_seed=seed)
        self.names = {id(parameter): name for name, parameter in network.named_parameters()}
        self.shapes = {name: parameter.shape for name, parameter in network.named_parameters()}
        self.layouts: dict[int, list[str]] = {}  # by bucket index: the parameter order of its state

    def hook(self, state, bucket):  # unannotated: DDP refuses a hook whose annotations are strings
        index, layout = bucket.index(), [self.names[id(parameter)] for parameter in bucket.parameters()]
        if self.layouts.get(index, layout) != layout:
            self._reorder(index, self.layouts[index], layout)
        self.layouts[index] = layout
        return powerSGD_hook.powerSGD_hook(state, bucket)

    def _reorder(self, index: int, old: list[str], new: list[str]) -> None:
        state = self.state
        for memory, sizes in ((state.error_dict, self._gradient_sizes), (state.p_memory_dict, self._p_sizes),
                              (state.q_memory_dict, self._q_sizes)):
            if index in memory:
                old_sizes, new_sizes = sizes(old), sizes(new)
                parts = dict(zip(old_sizes, memory[index].split(list(old_sizes.values())), strict=True))
                memory[index] = torch.cat([parts[name] for name in new_sizes])

    def _gradient_sizes(self, layout: list[str]) -> dict[str, int]:
        return {name: self.shapes[name].numel() for name in layout}

    def _factors(self, layout: list[str]) -> list[tuple[str, int, int, int]]:
        """(name, rows, columns, rank) of the gradients PowerSGD compresses, in the order its factors
        lie: grouped by matrix shape, groups in order of first appearance (as powerSGD_hook orders them)."""
        groups: dict[tuple[int, int], list[tuple[str, int, int, int]]] = {}
        for name in layout:
            rows = self.shapes[name][0]
            columns = self.shapes[name].numel() // rows
            rank = min(rows, columns, self.state.matrix_approximation_rank)
            if powerSGD_hook._should_compress(rows, columns, rank, self.state.min_compression_rate)[0]:
                groups.setdefault((rows, columns), []).append((name, rows, columns, rank))
        return [factor for group in groups.values() for factor in group]

    def _p_sizes(self, layout: list[str]) -> dict[str, int]:
        return {name: rows * rank for name, rows, _, rank in self._factors(layout)}

    def _q_sizes(self, layout: list[str]) -> dict[str, int]:
        return {name: columns * rank for name, _, columns, rank in self._factors(layout)}

    def state_dict(self) -> dict:
        """This rank's state as tensors and numbers (what torch.load(weights_only=True) reads back): the
        step count, the residuals and factors (each rank's own: the residuals are what its local
        gradient lost) with the layout they are in, and the generator of a new bucket's first factors."""
        kind, keys, position, has_gauss, gauss = self.state.rng.get_state()
        assert kind == "MT19937"
        cpu = torch.device("cpu")
        return {"iter": self.state.iter, "layouts": dict(self.layouts), "error": _moved(self.state.error_dict, cpu),
                "p": _moved(self.state.p_memory_dict, cpu), "q": _moved(self.state.q_memory_dict, cpu),
                "rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                        "has_gauss": has_gauss, "gauss": gauss}}

    def load_state_dict(self, saved: dict, device: torch.device) -> None:
        state = self.state
        state.iter, self.layouts = saved["iter"], dict(saved["layouts"])
        state.error_dict, state.p_memory_dict, state.q_memory_dict = (
            _moved(saved[key], device) for key in ("error", "p", "q"))
        rng = saved["rng"]
        state.rng.set_state(("MT19937", rng["keys"].numpy().astype(np.uint32), rng["position"], rng["has_gauss"],
                             rng["gauss"]))


def _moved(tensors: dict[int, torch.Tensor], device: torch.device) -> dict[int, torch.Tensor]:
    """By bucket index, as the hook keys them."""
    return {index: tensor.to(device) for index, tensor in tensors.items()}


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
