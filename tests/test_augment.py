"""The keyed training augmentation (pipeline/data/augment.py): a sample's crop, flip and lighting depend on
(seed, epoch, sample index) only, and their distributions are those of FFCV's own random operations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ffcv.fields.rgb_image import get_random_crop
from PIL import Image
from scipy import stats

from pipeline.config import PreprocessParams
from pipeline.data.augment import FLIP_DRAW, lighting_alphas, random_crop, sample_key, uniform
from pipeline.data.beton import write_beton
from pipeline.data.loaders import IMAGENET_STD, make_train_loader

SAMPLES = 40  # divisible by both batch sizes below: drop_last keeps every sample
RESOLUTION = 32
DRAWS = 4000
# Two-sample and goodness-of-fit tests at this level: a correct implementation fails one in 10,000 runs
# per comparison (the keys are fixed, so a given checkout passes or fails every time).
SIGNIFICANCE = 1e-4


def keys(count: int, seed: int = 3, epoch: int = 0) -> np.ndarray:
    with np.errstate(over="ignore"):
        return sample_key(np.full(count, seed, dtype=np.uint64), epoch, np.arange(count, dtype=np.uint64))


@pytest.fixture
def ramp_beton(tmp_path, params_dict) -> Path:
    """Sample i: red = 4 x, green = 4 y, of a few sizes, so a crop shows where it was taken and a flip
    which way red runs."""
    folder = tmp_path
    paths = []
    for index in range(SAMPLES):
        height, width = 48 + 8 * (index % 3), 64 - 8 * (index % 2)
        ramp = np.zeros((height, width, 3), dtype=np.uint8)
        ramp[..., 0] = 4 * np.arange(width)[None, :]
        ramp[..., 1] = 4 * np.arange(height)[:, None]
        ramp[..., 2] = index
        paths.append(folder / f"{index}.png")
        Image.fromarray(ramp).save(paths[-1])
    params = PreprocessParams.model_validate(params_dict["preprocess"] | {"write_mode": "raw", "max_resolution": 64})
    write_beton(folder / "ramps.beton", paths, list(range(SAMPLES)), params)
    return folder / "ramps.beton"


def epochs_by_sample(beton: Path, epochs: int, start_epoch: int = 0, **options) -> list[dict[int, torch.Tensor]]:
    """For each epoch, every sample's training image by its index (the label)."""
    loader = make_train_loader(beton, resolution=RESOLUTION, distributed=False, pca_lighting_std=0.1,
                               start_epoch=start_epoch, **options)
    result = []
    for _ in range(epochs):
        images = {}
        for batch, labels in loader:
            # Cloned: FFCV reuses a batch's memory a few batches later.
            images |= {int(label): image.clone() for label, image in zip(labels, batch)}
        assert sorted(images) == list(range(SAMPLES))
        result.append(images)
    return result


def same_images(first: dict[int, torch.Tensor], second: dict[int, torch.Tensor]) -> list[bool]:
    return [torch.equal(first[index], second[index]) for index in range(SAMPLES)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_samples_augmentation_ignores_threads_batch_position_and_resume(ramp_beton):
    one_thread = epochs_by_sample(ramp_beton, 2, batch_size=8, num_threads=1, seed=7)
    # Two threads, other batches (size 5, the order's positions shift): the same images, epoch by epoch.
    two_threads = epochs_by_sample(ramp_beton, 2, batch_size=5, num_threads=2, seed=7)
    for epoch in range(2):
        assert all(same_images(one_thread[epoch], two_threads[epoch])), f"epoch {epoch}"
    # A loader started at epoch 1, as a resumed run builds it, draws epoch 1's crops.
    assert all(same_images(epochs_by_sample(ramp_beton, 1, start_epoch=1, batch_size=8, num_threads=2, seed=7)[0],
                           one_thread[1]))
    # The draws do change with the epoch and the seed (random crops of a ramp are never equal).
    assert not any(same_images(one_thread[0], one_thread[1]))
    other_seed = epochs_by_sample(ramp_beton, 1, batch_size=8, num_threads=2, seed=8)[0]
    assert not any(same_images(one_thread[0], other_seed))
    # Both flips occur: red, undone from the normalisation, runs left to right or right to left.
    red = torch.stack([one_thread[0][index][0] for index in range(SAMPLES)]) * IMAGENET_STD[0]
    flipped = (red[:, :, 0] > red[:, :, -1]).all(dim=1)
    assert 0 < int(flipped.sum()) < SAMPLES


@pytest.mark.parametrize("height, width", [(48, 64), (16, 64)])  # (16, 64): many fall back to the centre
def test_crops_are_distributed_as_ffcvs(height, width):
    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])
    keyed = np.array([random_crop(np.uint32(height), np.uint32(width), scale, ratio, key) for key in keys(DRAWS)])
    np.random.seed(0)
    ffcv = np.array([get_random_crop(height, width, scale, ratio) for _ in range(DRAWS)])

    for crops in (keyed, ffcv):
        top, left, h, w = crops.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # Area share, aspect ratio, and where the box sits in the room left to it.
    def features(crops):
        top, left, h, w = crops.T.astype(float)
        return [h * w / (height * width), w / h, top / (height - h + 1), left / (width - w + 1)]

    for name, ours, theirs in zip(["area", "aspect", "top", "left"], features(keyed), features(ffcv)):
        assert stats.ks_2samp(ours, theirs).pvalue > SIGNIFICANCE, name


def test_flips_come_at_ffcvs_rate_independent_of_the_crop():
    draws = keys(DRAWS * 4)
    flips = uniform(draws, np.uint64(FLIP_DRAW)) < 0.5
    assert stats.binomtest(int(flips.sum()), len(flips), 0.5).pvalue > SIGNIFICANCE
    # The flip draw is uniform on its own and uncorrelated with the crop's first draw.
    flip_draw, crop_draw = uniform(draws, np.uint64(FLIP_DRAW)), uniform(draws, np.uint64(0))
    assert stats.kstest(flip_draw, "uniform").pvalue > SIGNIFICANCE
    assert stats.pearsonr(flip_draw, crop_draw).pvalue > SIGNIFICANCE


def test_lighting_draws_are_normal_with_the_std_asked_for():
    std = 0.1
    alphas = lighting_alphas(seed=3, epoch=2, indices=np.arange(DRAWS), std=std)

    assert alphas.shape == (DRAWS, 3) and alphas.dtype == np.float32
    for component in range(3):
        assert stats.kstest(alphas[:, component] / std, "norm").pvalue > SIGNIFICANCE, component
    for first, second in ((0, 1), (0, 2), (1, 2)):
        assert stats.pearsonr(alphas[:, first], alphas[:, second]).pvalue > SIGNIFICANCE
    # Keyed: the same sample, epoch and seed give the same draws, another epoch others.
    np.testing.assert_array_equal(alphas[5:9], lighting_alphas(3, 2, np.arange(5, 9), std))
    assert (lighting_alphas(3, 3, np.arange(DRAWS), std) == alphas).mean() < 0.01
