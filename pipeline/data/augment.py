"""Training augmentation whose every random draw is keyed by (run seed, epoch, sample index, draw number).

FFCV 1.0.2 draws its random-resized crops and flips from numba's per-thread random state, which is
seeded from system entropy (FFCV issues #164, #300, #392): the same run gives other crops every time, and
which thread decodes a sample changes its crop too. Here each draw is a counter-based hash of its key
(splitmix64, the finaliser of Java's SplittableRandom), so a sample's crop, flip and lighting in an epoch
are the same whatever the thread count, the batch it lands in, the worker it goes to or a resume: FFCV's
own suggestion in #300, per-sample seeding through the sample indices it hands to the operations. The
distributions are those of FFCV's RandomResizedCropRGBImageDecoder and RandomHorizontalFlip and of
AlexNet's PCA lighting (tests/test_augment.py compares them).

The epoch reaches the compiled operations through `AugmentationKey.epoch`, a one-element array that
`KeyedLoader` sets when an epoch starts. numba freezes arrays captured by a compiled function into
constants, so the operations capture the array's address and read it with `read_int64`; the key keeps
the array alive as long as the loader and its operations.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import RandomHorizontalFlip
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, register_jitable

from pipeline.data.transforms import IMAGENET_STD

# splitmix64's constants: the golden-ratio increment and the two multipliers of its finaliser.
GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_2 = np.uint64(0x94D049BB133111EB)
# Draw numbers, so that no two random decisions about a sample share a draw: the crop tries up to
# CROP_ATTEMPTS boxes of 4 draws each (like torchvision's and FFCV's), then the flip, then the lighting.
CROP_ATTEMPTS = 10
FLIP_DRAW = 4 * CROP_ATTEMPTS
LIGHTING_DRAW = FLIP_DRAW + 1  # 2 uniforms per normal, 3 normals

# Principal components of ImageNet's RGB pixel covariance (pixels in 0..1), as fb.resnet.torch and
# timm carry them: eigenvalues, and eigenvectors as columns.
IMAGENET_PCA_EIGENVALUES = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_PCA_EIGENVECTORS = torch.tensor(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
)


@register_jitable
def splitmix64(x):
    """One splitmix64 step on uint64 values: NumPy arrays in Python, scalars in compiled code (where,
    as in NumPy arrays, uint64 products wrap as in C). register_jitable lets numba call these three."""
    x = x + GOLDEN_GAMMA
    x = (x ^ (x >> np.uint64(30))) * MIX_1
    x = (x ^ (x >> np.uint64(27))) * MIX_2
    return x ^ (x >> np.uint64(31))


@register_jitable
def sample_key(seed, epoch, index):
    """The key of one sample's draws in one epoch of a run (hashed in turn, so that no two of the
    triples share a key by adding up to the same sum)."""
    return splitmix64(splitmix64(splitmix64(np.uint64(seed)) ^ np.uint64(epoch)) ^ np.uint64(index))


@register_jitable
def uniform(key, draw):
    """Draw number `draw` of a sample key: a float64 uniform in [0, 1), from the hash's top 53 bits."""
    return (splitmix64(key ^ np.uint64(draw)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit
def random_crop(height, width, scale, ratio, key):
    """(top, left, crop height, crop width): FFCV 1.0.2's get_random_crop (torchvision's algorithm) with
    its np.random draws replaced by the key's."""
    area = height * width
    log_ratio = np.log(ratio)
    for attempt in range(CROP_ATTEMPTS):
        draw = 4 * attempt
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, draw))
        aspect_ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(key, draw + 1))
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int((height - h + 1) * uniform(key, draw + 2))
            j = int((width - w + 1) * uniform(key, draw + 3))
            return i, j, h, w
    # No box fitted: the central crop at the nearest allowed aspect ratio, as FFCV and torchvision do.
    in_ratio = float(width) / float(height)
    if in_ratio < ratio.min():
        w = width
        h = int(round(w / ratio.min()))
    elif in_ratio > ratio.max():
        h = height
        w = int(round(h * ratio.max()))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@intrinsic
def read_int64(typingctx, address):
    """The int64 at a memory address, read at run time (a captured array would be a compile-time constant)."""

    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))

    return types.int64(types.intp), codegen


class AugmentationKey:
    """The run's seed and the epoch the loader is drawing, shared by the loader and its operations."""

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = np.zeros(1, dtype=np.int64)

    @property
    def address(self) -> int:
        return self.epoch.ctypes.data


class KeyedLoader(Loader):
    """FFCV's Loader, telling the keyed operations the epoch whose order it starts drawing.

    The loader thread of an epoch reads the key while it decodes; by the time the next epoch starts
    the previous one has handed over every batch, so a change of epoch never meets a batch in flight."""

    def __init__(self, *args, key: AugmentationKey, **kwargs):
        super().__init__(*args, **kwargs)
        self.key = key

    def __iter__(self):
        self.key.epoch[0] = self.next_epoch
        return super().__iter__()


class KeyedRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """FFCV's random-resized-crop decoder, each crop drawn from the key of the sample it decodes."""

    def __init__(self, key: AugmentationKey, output_size, scale=(0.08, 1.0), ratio=(0.75, 4 / 3)):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.key = key

    def generate_code(self):
        # FFCV 1.0.2's ResizedCropRGBImageDecoder.generate_code, with the crop keyed by the sample index
        # (its crop generator takes no index, so the decode loop is written again here).
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        seed, address = self.key.seed, self.key.address

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = read_int64(address)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = random_crop(height, width, scale, ratio, sample_key(seed, epoch, source_ix))
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class KeyedHorizontalFlip(RandomHorizontalFlip):
    """FFCV's horizontal flip, each decision drawn from the key of the sample it flips."""

    def __init__(self, key: AugmentationKey, flip_prob: float = 0.5):
        super().__init__(flip_prob)
        self.key = key

    def generate_code(self):
        my_range = Compiler.get_iterator()
        flip_prob, seed, address = self.flip_prob, self.key.seed, self.key.address

        def flip(images, dst, indices):
            epoch = read_int64(address)
            for i in my_range(images.shape[0]):
                if uniform(sample_key(seed, epoch, indices[i]), FLIP_DRAW) < flip_prob:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip


def lighting_alphas(seed: int, epoch: int, indices: np.ndarray, std: float) -> np.ndarray:
    """(len(indices), 3) float32 draws of N(0, std), by Box-Muller from each sample's keyed uniforms."""
    with np.errstate(over="ignore"):  # uint64 products wrap on purpose
        keys = sample_key(np.full(len(indices), seed, dtype=np.uint64), epoch, np.asarray(indices, dtype=np.uint64))
        draws = np.uint64(LIGHTING_DRAW) + 2 * np.arange(3, dtype=np.uint64)
        first = uniform(keys[:, None], draws[None, :])
        second = uniform(keys[:, None], draws[None, :] + np.uint64(1))
    normals = np.sqrt(-2 * np.log1p(-first)) * np.cos(2 * np.pi * second)  # log1p(-u): u < 1, never log(0)
    return (normals * std).astype(np.float32)


class KeyedPCALighting(Operation):
    """AlexNet's colour augmentation on normalised (B, 3, H, W) batches, after FFCV's compiled stages: each
    image gets sum_i p_i * alpha_i * lambda_i added to every pixel, alpha_i ~ N(0, std) drawn from the
    sample's key, p_i and lambda_i ImageNet's RGB eigenvectors and eigenvalues (pixels in 0..1), divided
    by the normalisation's std to land on the batch's scale."""

    def __init__(self, key: AugmentationKey, std: float):
        super().__init__()
        self.key, self.std = key, std

    def generate_code(self):
        key, std = self.key, self.std
        to_normalised = torch.tensor(255 / IMAGENET_STD, dtype=torch.float32)

        def add_lighting(images: torch.Tensor, _, indices: np.ndarray) -> torch.Tensor:
            alpha = torch.from_numpy(lighting_alphas(key.seed, int(key.epoch[0]), indices, std))
            rgb_offset = (alpha * IMAGENET_PCA_EIGENVALUES) @ IMAGENET_PCA_EIGENVECTORS.T
            offset = (rgb_offset * to_normalised).to(device=images.device, dtype=images.dtype)
            return images.add_(offset[:, :, None, None])

        add_lighting.with_indices = True
        return add_lighting

    def declare_state_and_memory(self, previous_state: State):
        return replace(previous_state, jit_mode=False), None
