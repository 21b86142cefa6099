"""Hybrid parallelism (train.parallelism: hybrid), Krizhevsky's "one weird trick" (2014, arXiv:1404.5997):
the convolutional layers data-parallel, the fully connected classifier split across the workers.

Plain data parallelism all-reduces every gradient every step, and AlexNet's fc6-fc8 hold 58.6 M of its
61 M parameters (VGG-16's: 123.6 M of 138.4 M). Here each worker holds a slice of every fully connected
layer's output units (rows of its weight and bias, cut from the same full initial weights), and the
workers exchange activations instead of those gradients. A step on worker r of N:

1. the features of its own images, as in data parallelism; DDP all-reduces the convolutional gradients;
2. the features of the whole global batch gathered on every worker (all-gather along the rows);
3. per layer: worker r's slice of the output units for the whole batch, the ReLU and dropout that
   follow (elementwise, so a slice at a time), then the slices gathered into the layer's full output
   (all-gather along the columns) for the next layer;
4. the rows of its own images kept: its loss is the one data parallelism computes on worker r.

Backward, each gather's gradient is summed over the workers (an all-reduce) and each keeps its part.
The backward passes of the N workers then add up to the gradient of the sum of their losses: N times
the global batch's mean loss that DDP minimises. DDP divides the convolutional gradients by N; a hook
divides the slices' gradients by N the same way. The step is data parallelism's, up to float rounding;
only dropout draws other masks, from the same distribution (each unit of each image is dropped by the
one worker that computes it, with probability p).

Checkpoints hold the full, unsharded weights and optimizer state (Sharding gathers and cuts them), so a
hybrid run's checkpoints, result and model.pt are those of a data-parallel run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Layers between the fully connected ones act on each activation alone, so they run on a slice.
ELEMENTWISE = (nn.ReLU, nn.Dropout)


def all_gather_along(local: torch.Tensor, sizes: list[int], dim: int, group) -> torch.Tensor:
    """The workers' tensors concatenated along `dim`, worker r's holding sizes[r] entries there.
    torch's all_gather takes equal shapes: each is padded to the largest and cut back after."""
    pad = [0, 0] * (local.ndim - dim - 1) + [0, max(sizes) - local.shape[dim]]
    parts = [torch.empty_like(padded := F.pad(local, pad).contiguous()) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes, strict=True)], dim=dim)


class _Gather(torch.autograd.Function):
    """all_gather_along with its gradient: every worker used the whole gathered tensor, so the gradient
    of worker r's part is the sum over the workers of their gradients there."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], dim: int, group) -> torch.Tensor:
        ctx.sizes, ctx.dim, ctx.group = sizes, dim, group
        return all_gather_along(local, sizes, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A copy: autograd may hand the same gradient tensor to other uses, and all_reduce writes in place.
        summed = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return summed.narrow(ctx.dim, sum(ctx.sizes[:rank]), ctx.sizes[rank]), None, None, None


def split_sizes(total: int, world: int) -> list[int]:
    """How many of `total` output units each worker holds: as even as can be, the first ones one more."""
    return [len(part) for part in torch.arange(total).tensor_split(world)]


class ShardedLinear(nn.Module):
    """Worker `rank`'s slice of a fully connected layer: output units start .. start + sizes[rank]."""

    def __init__(self, full: nn.Linear, rank: int, world: int) -> None:
        super().__init__()
        self.sizes = split_sizes(full.out_features, world)
        self.start = sum(self.sizes[:rank])
        rows = slice(self.start, self.start + self.sizes[rank])
        self.weight = nn.Parameter(full.weight.detach()[rows].clone())
        self.bias = nn.Parameter(full.bias.detach()[rows].clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.weight, self.bias)


class ShardedClassifier(nn.Sequential):
    """A classifier of fully connected layers with ReLU and dropout between them, split across the
    workers of `group`. Its layers keep their indices, so parameter names are the full classifier's."""

    def __init__(self, classifier: nn.Sequential, group) -> None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        layers = []
        for index, layer in enumerate(classifier):
            if not isinstance(layer, (nn.Linear, *ELEMENTWISE)):
                raise ValueError(f"hybrid parallelism splits fully connected layers with ReLU and dropout between "
                                 f"them; classifier.{index} is a {type(layer).__name__}")
            layers.append(ShardedLinear(layer, rank, world) if isinstance(layer, nn.Linear) else layer)
        super().__init__(*layers)
        self.group, self.rank, self.world = group, rank, world

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Validation batches may differ by an image between workers; training batches never do.
        count = torch.tensor([len(features)], device=features.device)
        rows = all_gather_along(count, [1] * self.world, 0, self.group).tolist()
        activations, last_sizes = features, None
        for layer in self:
            if isinstance(layer, ShardedLinear):
                # Before the first layer, the batch's rows; before the others, the previous layer's slices.
                activations = (_Gather.apply(activations, rows, 0, self.group) if last_sizes is None
                               else _Gather.apply(activations, last_sizes, 1, self.group))
                last_sizes = layer.sizes
            # Dropout before the first layer (torchvision's AlexNet) acts on this worker's own images.
            activations = layer(activations)
        logits = _Gather.apply(activations, last_sizes, 1, self.group)
        return logits.narrow(0, sum(rows[:self.rank]), rows[self.rank])


class Sharding:
    """The sharded tensors of a hybrid network, and its full-layout weights and optimizer state."""

    def __init__(self, network: nn.Module, group) -> None:
        self.group = group
        # (state_dict key, parameter, its layer), in one order on every worker: the gathers pair up.
        self.tensors = [(f"{name}.{kind}", getattr(layer, kind), layer)
                        for name, layer in network.named_modules() if isinstance(layer, ShardedLinear)
                        for kind in ("weight", "bias")]

    @classmethod
    def install(cls, network: nn.Module, world: int) -> Sharding:
        """Splits network.classifier across the `world` workers; call it before DDP wraps the network."""
        # Its own connections: the classifier's collectives never queue behind DDP's gradient all-reduces.
        group = dist.new_group(list(range(world)))
        network.classifier = ShardedClassifier(network.classifier, group)
        sharding = cls(network, group)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(network, [key for key, *_ in sharding.tensors])
        for _, parameter, _ in sharding.tensors:
            # What DDP does to the replicated gradients (module docstring).
            parameter.register_hook(lambda grad: grad / world)
        return sharding

    def full_model_state(self, network: nn.Module) -> dict:
        """network.state_dict() in the full layout; every worker calls it (the slices are gathered)."""
        state = network.state_dict()
        for key, _, layer in self.tensors:
            state[key] = all_gather_along(state[key], layer.sizes, 0, self.group)
        return state

    def model_shard(self, full: dict) -> dict:
        return {**full, **{key: full[key].narrow(0, layer.start, tensor.shape[0]) for key, tensor, layer in self.tensors}}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() with the slices' momentum gathered; every worker calls it."""
        state = optimizer.state_dict()
        for index, layer in self._indices(optimizer):
            if (buffer := state["state"].get(index, {}).get("momentum_buffer")) is not None:
                # A new dict: the packed state shares the optimizer's own dicts.
                state["state"][index] = {**state["state"][index],
                                         "momentum_buffer": all_gather_along(buffer, layer.sizes, 0, self.group)}
        return state

    def optimizer_shard(self, optimizer: torch.optim.Optimizer, full: dict) -> dict:
        state = {**full, "state": dict(full["state"])}
        for index, layer in self._indices(optimizer):
            if (buffer := state["state"].get(index, {}).get("momentum_buffer")) is not None:
                size = layer.sizes[dist.get_rank(self.group)]
                state["state"][index] = {**state["state"][index], "momentum_buffer": buffer.narrow(0, layer.start, size)}
        return state

    def _indices(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, ShardedLinear]]:
        """(the optimizer state's index of each sharded parameter, its layer): state_dict numbers the
        parameters in the order of its groups."""
        ordered = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        position = {id(parameter): index for index, parameter in enumerate(ordered)}
        return [(position[id(parameter)], layer) for _, parameter, layer in self.tensors]
