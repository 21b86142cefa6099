"""The typed form of params.yaml: one model per section, validated before any stage does work."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import InputError

# Validation resizes the short side to resolution / VAL_CROP_RATIO and keeps the central crop (the papers'
# 224 of 256).
VAL_CROP_RATIO = 224 / 256

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ParamsError(InputError):
    """params.yaml is missing, malformed or holds a value the pipeline cannot run with."""


class Section(BaseModel):
    # strict: a quoted "0.01" or a bool where a number belongs is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    source: Literal["digits", "imagenet", "folder", "webdataset"]
    root: str | None
    val_ground_truth: str | None
    devkit_meta: str | None
    # webdataset only (pipeline/data/archives.py); defaulted so that params files written before them load.
    train_shards: str | None = None  # glob relative to root; null: *train*.tar
    val_shards: str | None = None  # null: *val*.tar
    class_names: str | None = None  # one name per line, line i naming label i; null: the labels
    digits_image_size: int = Field(ge=32, le=1024)
    digits_val_fraction: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0)

    @model_validator(mode="after")
    def _source_needs_root(self) -> DataParams:
        if self.source != "digits" and self.root is None:
            raise ValueError(f"data.root is required when data.source is {self.source!r}")
        if (self.val_ground_truth is None) != (self.devkit_meta is None):
            raise ValueError("data.val_ground_truth and data.devkit_meta go together: set both or neither")
        shard_keys = [key for key in ("train_shards", "val_shards", "class_names") if getattr(self, key) is not None]
        if shard_keys and self.source != "webdataset":
            raise ValueError(f"data.{shard_keys[0]} is for data.source webdataset, not {self.source!r}")
        return self


class PreprocessParams(Section):
    write_mode: Literal["raw", "jpg", "smart", "proportion"]
    max_resolution: int = Field(ge=16)
    # Defaults to null (only shrink, the behaviour before it existed) for params built without it.
    short_side: int | None = Field(default=None, ge=16)
    compress_probability: float = Field(ge=0, le=1)
    jpeg_quality: int = Field(ge=1, le=100)
    smart_threshold: int = Field(gt=0)
    num_workers: int | None = Field(ge=1)  # null: every core
    max_skipped_fraction: float = Field(ge=0, le=1)
    seed: int = Field(ge=0)

    @model_validator(mode="after")
    def _short_side_fits_max_resolution(self) -> PreprocessParams:
        if self.short_side is not None and self.short_side > self.max_resolution:
            raise ValueError(
                f"preprocess.short_side={self.short_side} exceeds preprocess.max_resolution={self.max_resolution}: "
                "the long side is capped at max_resolution, so no image could get that short side"
            )
        return self


class Recipe(Section):
    """How one model is trained, epoch by epoch: shared by the train stage and every ensemble member.
    How long and from which seed are not part of it: each run (pipeline/runs/identity.py) has its own."""

    alexnet_groups: Literal[1, 2]
    alexnet_init: Literal["paper", "kaiming"]
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    dropout: float = Field(ge=0, lt=1)
    schedule: Literal["plateau", "step", "cosine"]
    plateau_patience: int = Field(ge=0)
    step_size: int = Field(gt=0)
    step_gamma: float = Field(gt=0, le=1)
    label_smoothing: float = Field(ge=0, lt=1)
    resolution: int = Field(gt=0)
    crop_min_scale: float = Field(gt=0, le=1)
    pca_lighting_std: float = Field(ge=0)
    amp: bool
    channels_last: bool
    # Defaults for params built without them; params.yaml sets and explains each.
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    deterministic: bool = False
    decay_norm_and_bias: bool = True
    order: Literal["random", "quasi_random"] = "random"
    os_cache: bool = True
    val_batch_size: int = Field(default=64, gt=0)
    compile: bool = False
    log_every_s: float = Field(default=10.0, gt=0)
    # How the workers share a step (pipeline/training/hybrid.py, pipeline/training/communication.py).
    # hybrid splits AlexNet's and VGG's classifiers; for other models (no large classifier) it is data.
    parallelism: Literal["data", "hybrid"] = "data"
    gradient_compression: Literal["none", "bf16", "powersgd"] = "none"
    powersgd_rank: int = Field(default=4, ge=1)
    # torch's PowerSGD needs at least 2 plain steps before it compresses (its error feedback starts then).
    powersgd_warmup_steps: int = Field(default=1000, ge=2)


class TrainParams(Recipe):
    """The train section: the recipe, and the models the train stage trains with it, for how many
    epochs, from which seed."""

    models: list[str]
    epochs: int = Field(gt=0)
    seed: int = Field(ge=0)

    def recipe(self) -> Recipe:
        return Recipe(**self.model_dump(include=set(Recipe.model_fields)))

    @model_validator(mode="after")
    def _models_known_and_fit_resolution(self) -> TrainParams:
        if not self.models:
            import models

            raise ValueError("train.models is empty: name at least one of " + ", ".join(models.names()))
        for name in self.models:
            _check_model(name, self.resolution, "train.models")
        return self


Protocol = Literal["center", "center_mirror", "ten_crop", "multi_scale"]


class EvaluateParams(Section):
    protocols: list[Protocol] = Field(min_length=1)
    scales: list[int] = Field(min_length=1)
    batch_size: int = Field(gt=0)

    @model_validator(mode="after")
    def _protocols_once(self) -> EvaluateParams:
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"evaluate.protocols lists a protocol twice: {self.protocols}")
        if any(scale < 224 for scale in self.scales):
            raise ValueError(f"evaluate.scales={self.scales}: each is a side relative to a 224-pixel crop, at least 224")
        return self


class EnsembleParams(Section):
    model: str
    members: int = Field(ge=1)
    first_seed: int = Field(ge=0)
    epochs: int = Field(gt=0)
    include: list[str]
    protocol: Protocol
    combine: Literal["softmax", "logits"]
    num_workers: int | None = Field(ge=1)
    max_concurrent: int | None = Field(ge=1)


Distribution = Literal["grid", "choice", "uniform", "loguniform"]


class SweepParams(Section):
    """A search over the recipe for one model with Ray Tune and ASHA (the sweep stage, sweeps/dvc.yaml)."""

    model: str
    # train key -> {distribution: values}: grid and choice list the values, uniform and loguniform
    # give [low, high]; checked against the train section's rules in Params.
    space: dict[str, dict[Distribution, list]] = Field(min_length=1)
    trials: int = Field(ge=1)
    epochs: int = Field(gt=0)
    grace_period: int = Field(ge=1)
    reduction_factor: float = Field(gt=1)
    metric: Literal["val_top1_error", "val_top5_error"]
    seed: int = Field(ge=0)
    num_workers: int | None = Field(ge=1)
    max_concurrent: int | None = Field(ge=1)

    @model_validator(mode="after")
    def _one_distribution_per_key(self) -> SweepParams:
        for key, distribution in self.space.items():
            if len(distribution) != 1:
                raise ValueError(f"sweep.space.{key}: give exactly one of grid, choice, uniform, loguniform")
            [(kind, values)] = distribution.items()
            if not values:
                raise ValueError(f"sweep.space.{key}.{kind}: no values")
            if kind in ("uniform", "loguniform") and not (len(values) == 2 and values[0] < values[1]):
                raise ValueError(f"sweep.space.{key}.{kind}: expected [low, high] with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"sweep.space.{key}.loguniform: the low end must be above 0, got {values[0]}")
        if self.grace_period > self.epochs:
            raise ValueError(f"sweep.grace_period={self.grace_period} exceeds sweep.epochs={self.epochs}")
        return self

    def values(self, key: str) -> list:
        """The values a key's distribution lists (its ends, for uniform and loguniform)."""
        [values] = self.space[key].values()
        return values


class RayParams(Section):
    num_workers: int = Field(ge=1)
    use_gpu: bool
    cpus_per_worker: float = Field(gt=0)
    local_num_cpus: int | None = Field(ge=1)
    storage_path: str
    checkpoints_to_keep: int = Field(ge=1)
    max_failures: int = Field(ge=0)
    keep_finished_runs: int | None = Field(ge=0)
    capacity_timeout_s: float = Field(gt=0)
    local_data_cache: str | None


class MlflowParams(Section):
    tracking_uri: str | None
    experiment: str = Field(min_length=1)
    log_model: bool
    system_metrics: bool
    registered_model: str = Field(min_length=1)


class Params(Section):
    data: DataParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    ensemble: EnsembleParams
    sweep: SweepParams
    ray: RayParams
    mlflow: MlflowParams

    @property
    def ensemble_workers(self) -> int:
        """Ray workers per ensemble member: ensemble.num_workers, or ray.num_workers when that is null."""
        return self.ensemble.num_workers or self.ray.num_workers

    @property
    def sweep_workers(self) -> int:
        """Ray workers per sweep trial: sweep.num_workers, or ray.num_workers when that is null."""
        return self.sweep.num_workers or self.ray.num_workers

    def check_trained_model(self, name: str) -> None:
        """The stages of one trained model (train@, evaluate@) take only the models train.models lists."""
        if name not in self.train.models:
            raise ParamsError(f"--model {name!r} is not in train.models {self.train.models}")

    @model_validator(mode="after")
    def _cross_section_rules(self) -> Params:
        workers_by_key = {"ray.num_workers": self.ray.num_workers, "ensemble.num_workers": self.ensemble_workers,
                          "sweep.num_workers": self.sweep_workers}
        for key, workers in workers_by_key.items():
            if self.train.batch_size % workers:
                raise ValueError(
                    f"train.batch_size={self.train.batch_size} is not divisible by {key}="
                    f"{workers}: the global batch is split evenly across the workers"
                )
        _check_model(self.ensemble.model, self.train.resolution, "ensemble.model")
        for name in self.ensemble.include:
            if name not in self.train.models:
                raise ValueError(f"ensemble.include: {name!r} is not in train.models {self.train.models}: only "
                                 "models the train stage trains (and the evaluate stage scores) can join")
        if self.ensemble.include and self.ensemble.protocol not in self.evaluate.protocols:
            raise ValueError(f"ensemble.protocol={self.ensemble.protocol!r} is not in evaluate.protocols "
                             f"{self.evaluate.protocols}: the included models' scores come from the evaluate stage")
        self._check_val_crops_are_not_upsampled()
        _check_model(self.sweep.model, self.train.resolution, "sweep.model")
        self._check_sweep_values()
        if self.ensemble.members + len(self.ensemble.include) < 2:
            raise ValueError("ensemble.members + len(ensemble.include) must be at least 2: an ensemble combines models")
        return self

    def _check_sweep_values(self) -> None:
        """Every value the sweep can give a train key is one the train section accepts for it."""
        recipe = self.train.recipe().model_dump()
        for key in self.sweep.space:
            if key not in Recipe.model_fields:
                raise ValueError(f"sweep.space.{key}: not a key of the train recipe")
            [kind] = self.sweep.space[key]
            if kind in ("uniform", "loguniform") and Recipe.model_fields[key].annotation is not float:
                raise ValueError(f"sweep.space.{key}.{kind}: draws real numbers, and train.{key} is not one; "
                                 "list its values with grid or choice")
            for value in self.sweep.values(key):
                try:
                    Recipe.model_validate(recipe | {key: value})
                except ValidationError as error:
                    raise ValueError(f"sweep.space.{key}: {value!r} is refused: " + _describe(error)) from None
                if key == "batch_size" and value % self.sweep_workers:
                    raise ValueError(f"sweep.space.batch_size: {value} is not divisible by the "
                                     f"{self.sweep_workers} workers of a trial (sweep.num_workers)")

    def _check_val_crops_are_not_upsampled(self) -> None:
        """Where the stored short side is known (digits' square images, or preprocess.short_side), it must
        hold validation's resize, or every centre crop would be an upsampled, blurred image."""
        preprocess, needed = self.preprocess, math.ceil(self.train.resolution / VAL_CROP_RATIO)
        if preprocess.short_side is not None:
            stored, keys = preprocess.short_side, "preprocess.short_side"
        elif self.data.source == "digits":
            stored = min(self.data.digits_image_size, preprocess.max_resolution)
            keys = "data.digits_image_size / preprocess.max_resolution"
        else:
            return
        if stored < needed:
            raise ValueError(f"{keys} store images with a {stored}-pixel short side, and validation resizes it to "
                             f"train.resolution / {VAL_CROP_RATIO} = {needed} before its centre crop: store at "
                             f"least {needed} pixels or lower train.resolution")


def _check_model(name: str, resolution: int, key: str) -> None:
    # Imported here, not at the top: the data stages validate the whole params.yaml too (a typo in train
    # fails `dvc repro` in its first second), but their outputs do not depend on the model code, and DVC
    # makes each stage depend on the modules it imports.
    import models

    if name not in models.names():
        raise ValueError(f"{key}: unknown model {name!r}; known models: {', '.join(models.names())}")
    minimum = models.min_resolution(name)
    if resolution < minimum:
        raise ValueError(f"train.resolution={resolution} is below {name}'s minimum input size {minimum}")


def load_params(path: str | Path = PROJECT_ROOT / "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is reported with the key that holds it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{path}: " + _describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if part != "[key]")  # pydantic's marker for a dict's keys
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "literal_error":
            message = f"got {item['input']!r}; allowed: {item['ctx']['expected']}"
        lines.append(f"{key}: {message}" if key else message)
    return "\n  ".join(lines)
