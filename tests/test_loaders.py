"""The FFCV loaders on small .beton files whose labels are the sample indices and whose images are
flat colours derived from them, so every batch can be checked value by value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
import yaml
from PIL import Image
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import PROJECT_ROOT, PreprocessParams
from pipeline.data.augment import IMAGENET_PCA_EIGENVALUES, IMAGENET_PCA_EIGENVECTORS
from pipeline.data.beton import write_beton
from pipeline.data.loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    make_train_loader,
    make_val_loader,
    normalize_on_device,
)
from tests.conftest import colour, flat_colour_beton

TRAIN_SAMPLES = 40  # even: two ranks split it without padding
VAL_SAMPLES = 21  # odd: a distributed sequential loader pads it
RESOLUTION = 32


def normalised(index: int) -> torch.Tensor:
    return torch.tensor((colour(index) - IMAGENET_MEAN) / IMAGENET_STD, dtype=torch.float32)


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> dict[str, Path]:
    params_dict = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    folder = tmp_path_factory.mktemp("betons")
    return {
        "train": flat_colour_beton(folder / "train", TRAIN_SAMPLES, params_dict),
        "val": flat_colour_beton(folder / "val", VAL_SAMPLES, params_dict),
    }


@pytest.mark.timeout(120)
def test_val_batches_are_center_crops_normalised_in_order(betons):
    loader = make_val_loader(betons["val"], batch_size=8, resolution=RESOLUTION, num_threads=2, distributed=False)

    batches = list(loader)

    assert loader.num_samples == VAL_SAMPLES and len(loader) == len(batches) == 3
    assert [len(labels) for _, labels in batches] == [8, 8, 5]
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    assert images.shape == (VAL_SAMPLES, 3, RESOLUTION, RESOLUTION) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == list(range(VAL_SAMPLES))
    expected = torch.stack([normalised(i) for i in range(VAL_SAMPLES)])[:, :, None, None].expand_as(images)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)

    # The channels-last route, and a dtype NumPy lacks.
    loader = make_val_loader(
        betons["val"], batch_size=8, resolution=RESOLUTION, num_threads=2, distributed=False, channels_last=True,
        dtype=torch.bfloat16,
    )
    images = torch.cat([images for images, _ in loader])
    assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images.float(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.timeout(120)
def test_train_batches_carry_pca_lighting_noise(betons):
    std = 0.1
    loader = make_train_loader(
        betons["train"], batch_size=16, resolution=RESOLUTION, num_threads=2, distributed=False, seed=0,
        pca_lighting_std=std,
    )

    batches = list(loader)

    assert len(loader) == len(batches) == TRAIN_SAMPLES // 16  # drop_last
    images, labels = batches[0]
    assert images.shape == (16, 3, RESOLUTION, RESOLUTION) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    # Flat images stay flat under crop, flip and lighting: the lighting is one RGB offset per image...
    offsets = images - torch.stack([normalised(int(label)) for label in labels])[:, :, None, None]
    per_image = offsets.mean(dim=(2, 3))
    torch.testing.assert_close(offsets, per_image[:, :, None, None].expand_as(offsets), atol=1e-4, rtol=0)
    # ...which, back on the 0..1 pixel scale, is sum_i p_i alpha_i lambda_i with alpha_i ~ N(0, std).
    rgb = per_image * torch.tensor(IMAGENET_STD / 255, dtype=torch.float32)
    alpha = rgb @ IMAGENET_PCA_EIGENVECTORS / IMAGENET_PCA_EIGENVALUES
    assert alpha.abs().max() < 6 * std
    assert 0.5 * std < alpha.std() < 1.5 * std


def crop_widths(beton: Path, crop_min_scale: float) -> torch.Tensor:
    """The width, in source pixels, of every train crop of the horizontal-ramp images (red = 4 * x)."""
    loader = make_train_loader(beton, batch_size=8, resolution=RESOLUTION, num_threads=2, distributed=False,
                               seed=0, crop_min_scale=crop_min_scale)
    red = torch.cat([images[:, 0] for images, _ in loader]) * IMAGENET_STD[0]
    return (red.amax(dim=(1, 2)) - red.amin(dim=(1, 2))) / 4


@pytest.mark.timeout(120)
def test_crop_min_scale_bounds_the_random_crops(tmp_path, params_dict):
    side = 64
    ramp = np.zeros((side, side, 3), dtype=np.uint8)
    ramp[..., 0] = 4 * np.arange(side)[None, :]
    paths = []
    for index in range(TRAIN_SAMPLES):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(ramp).save(paths[-1])
    params = PreprocessParams.model_validate(params_dict["preprocess"] | {"write_mode": "raw", "max_resolution": 64})
    beton = tmp_path / "ramp.beton"
    write_beton(beton, paths, list(range(TRAIN_SAMPLES)), params)

    # Area share >= 0.9 at aspect ratios >= 3/4: every crop is at least sqrt(0.9 * 3/4) * 64 = 52.6 px wide.
    assert crop_widths(beton, 0.9).min() > 48
    # Down to 0.08 (ImageNet's), 40 crops all that wide would be a (~0.7)^40 chance.
    assert crop_widths(beton, 0.08).min() < 40


@pytest.mark.timeout(120)
def test_resuming_at_an_epoch_replays_that_epochs_order(betons):
    options = dict(batch_size=8, resolution=RESOLUTION, num_threads=2, distributed=False, seed=5)
    uninterrupted = make_train_loader(betons["train"], **options)
    orders = [torch.cat([labels for _, labels in uninterrupted]).tolist() for _ in range(3)]

    resumed = make_train_loader(betons["train"], start_epoch=2, **options)
    resumed_order = torch.cat([labels for _, labels in resumed]).tolist()

    assert resumed_order == orders[2]
    assert orders[0] != orders[1] != orders[2]
    assert sorted(orders[2]) == list(range(TRAIN_SAMPLES))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("os_cache", [True, False])
def test_quasi_random_order_covers_every_sample_and_resumes(betons, os_cache):
    options = dict(batch_size=8, resolution=RESOLUTION, num_threads=2, distributed=False, seed=5,
                   order="quasi_random", os_cache=os_cache)
    uninterrupted = make_train_loader(betons["train"], **options)
    orders = [torch.cat([labels for _, labels in uninterrupted]).tolist() for _ in range(3)]

    resumed = make_train_loader(betons["train"], start_epoch=2, **options)

    assert torch.cat([labels for _, labels in resumed]).tolist() == orders[2]
    assert orders[0] != orders[1] != orders[2]
    assert all(sorted(order) == list(range(TRAIN_SAMPLES)) for order in orders)


def test_quasi_random_order_refuses_several_workers(betons):
    with pytest.raises(ValueError, match="train.order quasi_random takes one worker"):
        make_train_loader(betons["train"], batch_size=8, resolution=RESOLUTION, num_threads=1, distributed=True,
                          seed=0, order="quasi_random")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_device_normalisation_matches_the_cpu_route(dtype, channels_last):
    """The GPU route's normalisation, run on the CPU: uint8 channels-last batches as FFCV's ToTorchImage
    leaves them on the device, out in the dtype and memory format asked for."""
    indices = [0, 7, 20]
    pixels = torch.tensor(np.stack([colour(i) for i in indices]), dtype=torch.uint8)
    nhwc = pixels[:, None, None, :].expand(len(indices), RESOLUTION, RESOLUTION, 3).contiguous()

    images = normalize_on_device(torch.device("cpu"), dtype, channels_last)(nhwc.permute(0, 3, 1, 2))

    assert images.dtype == dtype and images.shape == (len(indices), 3, RESOLUTION, RESOLUTION)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert images.is_contiguous(memory_format=layout)
    expected = torch.stack([normalised(i) for i in indices])[:, :, None, None].expand_as(images)
    # One rounding from float32: half an ulp of the largest value (|x| < 2.7), 2^-7 for bf16, 2^-10 for fp16.
    tolerance = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(images.float(), expected, atol=tolerance, rtol=0)


def record_what_each_rank_sees(config: dict) -> None:
    """Ray Train worker: one epoch of the distributed train and val loaders, written to a file."""
    rank = ray.train.get_context().get_world_rank()
    train = make_train_loader(
        Path(config["train"]), batch_size=4, resolution=RESOLUTION, num_threads=1, distributed=True, seed=3
    )
    val = make_val_loader(Path(config["val"]), batch_size=5, resolution=RESOLUTION, num_threads=1, distributed=True)
    seen = {
        "train": [label for _, labels in train for label in labels.tolist()],
        "val": [label for _, labels in val for label in labels.tolist()],
        "val_num_samples": val.num_samples,
        "val_batches": len(val),
    }
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ray_workers_split_train_and_count_every_val_image_once(betons, tmp_path, ray_cluster):
    trainer = TorchTrainer(
        record_what_each_rank_sees,
        train_loop_config={"train": str(betons["train"]), "val": str(betons["val"]), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="loader_shards"),
    )
    trainer.fit()

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    train = [set(rank["train"]) for rank in ranks]
    assert [len(rank["train"]) for rank in ranks] == [TRAIN_SAMPLES // 2] * 2
    assert not train[0] & train[1] and train[0] | train[1] == set(range(TRAIN_SAMPLES))
    # DistributedSampler order: rank r gets r, r + 2, ...; the padding (a repeat of sample 0) is dropped.
    assert [rank["val"] for rank in ranks] == [list(range(0, VAL_SAMPLES, 2)), list(range(1, VAL_SAMPLES, 2))]
    assert [rank["val_num_samples"] for rank in ranks] == [11, 10]
    assert [rank["val_batches"] for rank in ranks] == [3, 2]
