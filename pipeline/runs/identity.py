"""What names a training run: its identity, made of what shapes its weights and nothing else.

The model, the recipe keys that model and schedule use, the seed, the epochs, the worker count (the
global batch is split across them), the device, and the content of the data (the .beton files'
SHA-256, from dataset.json). Paths, hosts, tracking settings and fault-tolerance settings are not part
of it, so the same run is found again after `dvc checkout`, a moved or re-cloned project, `dvc exp run
--temp`, or `ray job submit`. RUN_FORMAT is part of it too: raise it when a change to the training code
changes what a run computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import torch

import models
from pipeline.config import Params, Recipe
from pipeline.data.dataset import Dataset

# 2: augmentation drawn from keys of (seed, epoch, sample) instead of unseeded thread-local state.
RUN_FORMAT = 2

# Which recipe keys a run depends on: these always; the schedule's own; the GPU-only ones on GPUs; and
# the keys models.recipe_keys(model) names (dropout, alexnet_groups, alexnet_init).
COMMON_RECIPE_KEYS = ("batch_size", "lr", "momentum", "weight_decay", "schedule", "label_smoothing",
                      "resolution", "crop_min_scale", "pca_lighting_std", "decay_norm_and_bias", "order")
SCHEDULE_KEYS = {"plateau": ("plateau_patience",), "step": ("step_size", "step_gamma"), "cosine": ()}
GPU_ONLY_KEYS = ("amp", "channels_last", "amp_dtype", "deterministic")
# How several workers share a step: named only when a run has several workers and leaves the default
# (plain data parallelism, float32 gradients), so the names of runs from before these keys stay. Hybrid
# computes the same gradients as data parallelism, but with dropout it draws other masks, and its sums
# run in another order; compressed gradients change the optimisation itself.
COMPRESSION_KEYS = {"none": (), "bf16": ("gradient_compression",),
                    "powersgd": ("gradient_compression", "powersgd_rank", "powersgd_warmup_steps")}


def weight_keys(model: str, schedule: str, use_gpu: bool) -> tuple[str, ...]:
    """The recipe keys that shape a run of `model` under `schedule` on the device."""
    keys = COMMON_RECIPE_KEYS + SCHEDULE_KEYS[schedule] + models.recipe_keys(model)
    return keys + (GPU_ONLY_KEYS if use_gpu else ())


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that shapes one training run's weights."""

    model: str
    num_classes: int
    recipe: Recipe
    seed: int
    epochs: int
    num_workers: int
    use_gpu: bool
    data_sha256: Mapping[str, str]  # split -> SHA-256 of its .beton

    def recipe_keys(self) -> tuple[str, ...]:
        return weight_keys(self.model, self.recipe.schedule, self.use_gpu) + self.parallel_keys()

    def parallel_keys(self) -> tuple[str, ...]:
        if self.num_workers == 1:
            return ()
        hybrid = ("parallelism",) if self.hybrid else ()
        return hybrid + COMPRESSION_KEYS[self.recipe.gradient_compression]

    @property
    def hybrid(self) -> bool:
        """The classifier split across the workers: asked for, a model with a large fully connected
        classifier (models.HYBRID_MODELS; for the others hybrid is the same run as data), and more than
        one worker to split it over."""
        return self.recipe.parallelism == "hybrid" and self.model in models.HYBRID_MODELS and self.num_workers > 1

    def identity(self) -> dict:
        return {
            "format": RUN_FORMAT,
            "model": self.model,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "epochs": self.epochs,
            "workers": self.num_workers,
            "device": "cuda" if self.use_gpu else "cpu",
            "recipe": {key: getattr(self.recipe, key) for key in sorted(self.recipe_keys())},
            "data": dict(sorted(self.data_sha256.items())),
        }

    @property
    def name(self) -> str:
        # Canonical JSON: sorted keys, no whitespace; floats by repr, which Python keeps shortest and stable.
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return f"{self.model}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"

    def mlflow_params(self) -> dict:
        """What shaped the run, under the params.yaml keys a user sets (train.lr, ray.num_workers...)."""
        identity = self.identity()
        return {"model": self.model, "num_classes": self.num_classes, "run_format": RUN_FORMAT,
                "train": {**identity["recipe"], "seed": self.seed, "epochs": self.epochs},
                "ray": {"num_workers": self.num_workers, "use_gpu": self.use_gpu}, "data_sha256": identity["data"]}

    def build_model(self) -> torch.nn.Module:
        return build_model(self.model, self.num_classes, self.recipe)

    def load_model(self, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        model = self.build_model()
        model.load_state_dict(weights)
        return model


def build_model(model: str, num_classes: int, recipe: Recipe) -> torch.nn.Module:
    """The model with the recipe's options it uses (and only those: build refuses the others)."""
    options = {models.RECIPE_OPTIONS[key]: getattr(recipe, key) for key in models.recipe_keys(model)}
    return models.build(model, num_classes, **options)


def run_spec(params: Params, model: str, dataset: Dataset, *, seed: int, epochs: int, num_workers: int) -> RunSpec:
    """A run of `model` on `dataset` with the train section's recipe, on ray.use_gpu's device."""
    return RunSpec(model=model, num_classes=dataset.num_classes, recipe=params.train.recipe(), seed=seed,
                   epochs=epochs, num_workers=num_workers, use_gpu=params.ray.use_gpu,
                   data_sha256={split: beton.sha256 for split, beton in dataset.files.items()})


def train_spec(params: Params, model: str, dataset: Dataset) -> RunSpec:
    """The train stage's run of `model`: the train section's seed and epochs, ray.num_workers workers."""
    return run_spec(params, model, dataset, seed=params.train.seed, epochs=params.train.epochs,
                    num_workers=params.ray.num_workers)
