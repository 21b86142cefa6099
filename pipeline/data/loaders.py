"""FFCV loaders for training and validation, with the augmentations of the AlexNet/VGG papers.

Train: random-resized crop + horizontal flip (+ AlexNet's PCA lighting noise), ImageNet mean/std
normalisation, a shuffled order fixed by (seed, epoch). Val: resize to resolution * 256/224 and take
the central resolution x resolution crop, sequential order, every image counted once.

batch_size is per process. With distributed=True the loaders shard the samples over the ranks of the
default torch.distributed process group, which must exist already (build them inside the Ray Train
worker, not in the driver).

On a GPU, FFCV's loader thread runs each batch's pipeline on a CUDA stream of its own (one per batch
slot, batches_ahead + 2 slots; ffcv/loader/epoch_iterator.py in FFCV 1.0.2), and the training thread
uses the batch on its current stream, which FFCV makes wait for the slot's stream when it hands the
batch over. The training loop does not wait for the GPU at every step, so the GPU may run several
steps behind the Python code; three things keep a batch from being overwritten while it is in use:
- FFCV's own device buffers of a slot are rewritten for batch b + slots only after the slot's stream
  has waited for an event that FFCV records on the training stream once batch b + 1 was taken, that
  is after every kernel the loop queued for batch b. This holds while the loop touches a batch only
  in its own step (pipeline/training/worker.py keeps its running sums in tensors of its own).
- FFCV's pinned host buffers of a slot are rewritten by the CPU for batch b + slots without waiting
  for the asynchronous copy of batch b to the device, which sits on the slot's stream behind that
  event and so behind the training stream's queue. ToDevice therefore copies with non_blocking=False:
  the loader thread, not the training thread, waits for its own copy before it decodes more.
- Tensors torch allocates on a slot's stream (the normalised images) are used on the training stream,
  while the caching allocator hands a freed block out again to the stream it was allocated on at
  once. normalize_on_device records them on the training stream (Tensor.record_stream), so their
  memory is reused only once the training stream is past them, whatever FFCV's streams do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import (
    NormalizeImage,
    Squeeze,
    ToDevice,
    ToTensor,
    ToTorchImage,
)
from ffcv.traversal_order.quasi_random import QuasiRandom, generate_order_inner

from pipeline.config import VAL_CROP_RATIO
from pipeline.data.augment import (
    AugmentationKey,
    KeyedHorizontalFlip,
    KeyedLoader,
    KeyedPCALighting,
    KeyedRandomResizedCrop,
)
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# train.order: FFCV's QUASI_RANDOM shuffles within a few pages of the file at a time, so an epoch reads
# each page once and a process cache (os_cache=False) holds only the pages in use.
ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM}


class NormalizeToCHW(Operation):
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W) in one compiled, parallel pass.

    FFCV's CPU route, NormalizeImage and then ToTorchImage, ends in a channels-first copy that torch
    makes in the loader thread after the parallel stage: measured on 2 cores at 224 px, it cost a
    third of the loader's throughput. Writing the planes directly removes that copy."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.lookup = ((np.arange(256)[:, None] - mean[None, :]) / std[None, :]).astype(np.float32)

    def generate_code(self):
        parallel_range = Compiler.get_iterator()
        lookup = self.lookup

        def normalize_to_chw(images, result):
            for i in parallel_range(images.shape[0]):
                for y in range(images.shape[1]):
                    for x in range(images.shape[2]):
                        for channel in range(3):
                            result[i, channel, y, x] = lookup[images[i, y, x, channel], channel]
            return result[: images.shape[0]]

        normalize_to_chw.is_parallel = True
        return normalize_to_chw

    def declare_state_and_memory(self, previous_state: State):
        height, width, channels = previous_state.shape
        shape = (channels, height, width)
        return replace(previous_state, shape=shape, dtype=np.float32), AllocationQuery(shape, np.float32)


class ReplayableQuasiRandom(QuasiRandom):
    """FFCV's quasi-random order with each epoch's order a function of (seed, epoch) only.

    FFCV 1.0.2's QuasiRandom shuffles its page table in place, so the order of an epoch also depends
    on every order drawn before it (a Loader draws one when it is built): a run resumed at epoch e
    would see other batches than the run it continues. Drawing from a copy of the table fixes that."""

    def sample_order(self, epoch: int) -> np.ndarray:
        order = np.zeros(len(self.indices), dtype=np.int64)
        generate_order_inner(self.seed * 912300 + epoch, self.page_to_samples_array.copy(), self.page_sizes, order,
                             2 * self.loader.batch_size)
        return order


class TensorTransform(Operation):
    """Applies a function to each batch tensor after FFCV's compiled stages, on whatever device it is."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.transform = transform

    def generate_code(self):
        transform = self.transform
        return lambda images, _: transform(images)

    def declare_state_and_memory(self, previous_state: State):
        return replace(previous_state, jit_mode=False), None


def normalize_on_device(
    device: torch.device, dtype: torch.dtype, channels_last: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (B, 3, H, W) batches in channels-last layout on `device` -> normalised `dtype` batches in
    channels-last or contiguous layout, computed in float32 and rounded once.

    FFCV's own GPU NormalizeImage needs CuPy, which the project does not install; this is torch's
    version of the same arithmetic, a few memory-bound kernels per batch."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    scale = torch.tensor(1 / IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # The loaders are built on the training thread: its current stream is the one that uses the batches.
    training_stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def normalize(images: torch.Tensor) -> torch.Tensor:
        normalised = images.float().sub_(mean).mul_(scale).to(dtype=dtype, memory_format=memory_format)
        if training_stream is not None:
            normalised.record_stream(training_stream)
        return normalised

    return normalize


def make_train_loader(
    beton: Path,
    *,
    batch_size: int,
    resolution: int,
    num_threads: int,
    distributed: bool,
    seed: int,
    start_epoch: int = 0,
    crop_min_scale: float = 0.08,
    pca_lighting_std: float = 0.0,
    order: str = "random",
    os_cache: bool = True,
    device: torch.device = torch.device("cpu"),
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Loader:
    """Shuffled, augmented batches of (images (B, 3, resolution, resolution) `dtype`, labels (B,) int64).
    The order of epoch e depends on (seed, e) only: start_epoch resumes it where a run stopped.
    order: a key of ORDERS. os_cache: read through the OS page cache, or (False) a cache per process."""
    if order == "quasi_random" and distributed:
        # FFCV 1.0.2's QuasiRandom raises NotImplementedError for distributed loaders.
        raise ValueError("train.order quasi_random takes one worker: FFCV 1.0.2 cannot split it across workers")
    key = AugmentationKey(seed)
    decoder = KeyedRandomResizedCrop(key, (resolution, resolution), scale=(crop_min_scale, 1))
    image_pipeline = _image_pipeline(decoder, [KeyedHorizontalFlip(key)], device, channels_last, dtype)
    if pca_lighting_std > 0:
        image_pipeline.append(KeyedPCALighting(key, pca_lighting_std))
    loader = _loader(beton, image_pipeline, device, batch_size, num_threads, distributed, os_cache=os_cache,
                     order=ORDERS[order], seed=seed, drop_last=True, loader_class=KeyedLoader, key=key)
    if order == "quasi_random":
        # FFCV 1.0.2's Loader takes no order class of one's own (its isinstance test fails for a class).
        loader.traversal_order = ReplayableQuasiRandom(loader)
    # FFCV shuffles with seed + next_epoch and counts next_epoch from 0 in every new Loader.
    loader.next_epoch = start_epoch
    return loader


class ValLoader:
    """Sequential validation batches with FFCV's distributed padding removed.

    A distributed sequential FFCV loader follows torch's DistributedSampler(shuffle=False,
    drop_last=False): it pads the N indices to a multiple of the world size by repeating the first
    ones and gives rank r indices r, r + world, ...; the repeats end up at the tail of some ranks.
    Keeping only the first len(range(r, N, world)) samples of rank r counts every image exactly once.
    """

    def __init__(self, loader: Loader, num_samples: int, same_batch_count: bool = False):
        self.loader = loader
        self.num_samples = num_samples  # images this rank evaluates, padding excluded
        self.batch_size = loader.batch_size
        # A batch made only of padding is skipped, or (same_batch_count) yielded empty: the ranks, whose
        # padded loaders hold as many batches, then run as many steps.
        self.same_batch_count = same_batch_count

    def __len__(self) -> int:
        return len(self.loader) if self.same_batch_count else -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        remaining = self.num_samples
        for images, labels in self.loader:
            if remaining <= 0 and not self.same_batch_count:
                continue  # drain the padding batch so the loader's epoch ends cleanly
            remaining = max(remaining, 0)
            yield images[:remaining], labels[:remaining]
            remaining -= len(labels)


def make_val_loader(
    beton: Path,
    *,
    batch_size: int,
    resolution: int,
    num_threads: int,
    distributed: bool,
    os_cache: bool = True,
    device: torch.device = torch.device("cpu"),
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    crop_ratio: float = VAL_CROP_RATIO,
    indices: Sequence[int] | None = None,
    same_batch_count: bool = False,
) -> ValLoader:
    """Center-cropped batches of (images (B, 3, resolution, resolution) `dtype`, labels (B,) int64): the
    central square of `crop_ratio` times the short side, resized to `resolution`; of the samples
    `indices` in that order when given (not distributed), else of all of them."""
    decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio)
    image_pipeline = _image_pipeline(decoder, [], device, channels_last, dtype)
    loader = _loader(beton, image_pipeline, device, batch_size, num_threads, distributed, os_cache=os_cache,
                     order=OrderOption.SEQUENTIAL, drop_last=False, indices=indices)
    if indices is not None:
        return ValLoader(loader, num_samples=len(indices))
    total = loader.reader.num_samples
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    return ValLoader(loader, num_samples=len(range(rank, total, world)), same_batch_count=same_batch_count)


def _image_pipeline(
    decoder: Operation, augmentations: list[Operation], device: torch.device, channels_last: bool, dtype: torch.dtype
) -> list[Operation]:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"image dtype {dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    # On a GPU the copy to the device moves uint8 (4x fewer bytes than float32), as in ffcv-imagenet, and
    # the device normalises (see the module docstring for the streams). On the CPU the order FFCV 1.0.2
    # accepts is narrower: it fuses consecutive numba-jitted operations, and a jitted -> torch -> jitted
    # sequence (NormalizeImage after ToTensor) makes pipeline building spin forever, so the CPU
    # normalises the uint8 arrays before they become tensors.
    if device.type != "cpu":
        return [
            decoder,
            *augmentations,
            ToTensor(),
            ToDevice(device, non_blocking=False),
            ToTorchImage(channels_last=True),
            TensorTransform(normalize_on_device(device, dtype, channels_last)),
        ]
    if channels_last:
        # The HWC arrays viewed as a channels-last NCHW tensor: no copy.
        normalize = NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32)
        pipeline = [decoder, *augmentations, normalize, ToTensor(), ToTorchImage(channels_last=True)]
    else:
        pipeline = [decoder, *augmentations, NormalizeToCHW(IMAGENET_MEAN, IMAGENET_STD), ToTensor()]
    if dtype != torch.float32:
        # NumPy, hence FFCV's NormalizeImage, has no bfloat16.
        pipeline.append(TensorTransform(lambda images: images.to(dtype)))
    return pipeline


def _loader(
    beton: Path, image_pipeline: list[Operation], device: torch.device, batch_size: int, num_threads: int,
    distributed: bool, loader_class: type[Loader] = Loader, **options,
) -> Loader:
    return loader_class(
        str(beton), batch_size=batch_size, num_workers=num_threads, distributed=distributed,
        pipelines={"image": image_pipeline, "label": _label_pipeline(device)}, **options,
    )


def _label_pipeline(device: torch.device) -> list[Operation]:
    # Squeeze(1), not Squeeze(): a batch of one must stay a (1,) tensor.
    pipeline = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type != "cpu":
        pipeline.append(ToDevice(device, non_blocking=False))  # see the module docstring
    return pipeline
