"""Training runs: what names one (its identity), and the run store that keeps its checkpoints and result.

A run is named by what shapes its weights, and nothing else: the model, the recipe keys that model
and schedule use, the seed, the epochs, the worker count (the global batch is split across them), the
device, and the content of the data (the .beton files' SHA-256, from dataset.json). Paths, hosts,
tracking settings and fault-tolerance settings are not part of it, so the same run is found again after
`dvc checkout`, a moved or re-cloned project, `dvc exp run --temp`, or `ray job submit`. RUN_FORMAT is
part of it too: raise it when a change to the training code changes what a run computes.

The run store is the folder (or URI) ray.storage_path; each run has one folder in it, by name:
  <name>/checkpoint_*/, checkpoint_manager_snapshot.json   Ray Train's, while the run trains
  <name>/result.pt     {"model": state dict, "history": [one dict per epoch]} once training finished
  <name>/result.json   {"name", "identity", "finished_at", "used_at", "summary"}: the done marker,
                       written after result.pt, so its presence means the result is whole
  <name>/scores-*.npz  per-image validation scores (pipeline/evaluation.py)
A run with a result is finished: stages reuse it instead of training again. A run with checkpoints and
no result was interrupted: fitting the same name makes Ray Train hand the workers its last checkpoint.
Checkpoints are deleted only once the stage that trained the run has written everything it owes
(outputs, MLflow records); finished runs beyond ray.keep_finished_runs are pruned, least recently
used first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

import models
from pipeline.config import TrainRecipe
from pipeline.storage import Location

RUN_FORMAT = 1
RESULT_WEIGHTS = "result.pt"
RESULT_MARKER = "result.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"

# Which recipe keys a run depends on: these always; the schedule's own; the GPU-only ones on GPUs; and
# the keys models.recipe_keys(model) names (dropout, alexnet_groups, alexnet_init).
COMMON_RECIPE_KEYS = ("batch_size", "lr", "momentum", "weight_decay", "schedule", "label_smoothing",
                      "resolution", "crop_min_scale", "pca_lighting_std", "decay_norm_and_bias", "order")
SCHEDULE_KEYS = {"plateau": ("plateau_patience",), "step": ("step_size", "step_gamma"), "cosine": ()}
GPU_ONLY_KEYS = ("amp", "channels_last", "amp_dtype")

Status = Literal["new", "interrupted", "finished"]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that shapes one training run's weights."""

    model: str
    num_classes: int
    recipe: TrainRecipe
    seed: int
    epochs: int
    num_workers: int
    use_gpu: bool
    data_sha256: Mapping[str, str]  # split -> SHA-256 of its .beton

    def recipe_keys(self) -> tuple[str, ...]:
        keys = COMMON_RECIPE_KEYS + SCHEDULE_KEYS[self.recipe.schedule] + models.recipe_keys(self.model)
        return keys + (GPU_ONLY_KEYS if self.use_gpu else ())

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

    def build_model(self) -> torch.nn.Module:
        """The model with the recipe's options it uses (and only those: build refuses the others)."""
        options = {models.RECIPE_OPTIONS[key]: getattr(self.recipe, key) for key in models.recipe_keys(self.model)}
        return models.build(self.model, self.num_classes, **options)


@dataclasses.dataclass(frozen=True)
class RunResult:
    weights: dict[str, torch.Tensor]
    history: list[dict]


class RunRecord:
    """One run's folder in the run store."""

    def __init__(self, folder: Location):
        self.folder = folder
        self.name = folder.name

    def status(self) -> Status:
        if (self.folder / RESULT_MARKER).exists():
            return "finished"
        # Ray Train resumes from the checkpoints its snapshot lists; a checkpoint folder written just
        # before the run was stopped, and not yet listed, is not resumed from.
        if (self.folder / RAY_SNAPSHOT).exists():
            return "interrupted"
        return "new"

    def save_result(self, result: RunResult, identity: dict, summary: Mapping[str, float]) -> None:
        """result.pt first, then the marker that says it is whole."""
        with (self.folder / RESULT_WEIGHTS).open_write() as stream:
            torch.save({"model": result.weights, "history": result.history}, stream)
        now = time.time()
        marker = {"name": self.name, "identity": identity, "finished_at": now, "used_at": now, "summary": dict(summary)}
        (self.folder / RESULT_MARKER).write_text(json.dumps(marker, indent=1))

    def marker(self) -> dict:
        return json.loads((self.folder / RESULT_MARKER).read_text())

    def load_result(self) -> RunResult:
        """Raises whatever torch raises for a missing or damaged file; callers name the run."""
        data = (self.folder / RESULT_WEIGHTS).read_bytes()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return RunResult(state["model"], state["history"])

    def mark_used(self) -> None:
        """For retention: a reused run counts as recently used."""
        marker = self.marker() | {"used_at": time.time()}
        (self.folder / RESULT_MARKER).write_text(json.dumps(marker, indent=1))

    def drop_checkpoints(self) -> None:
        """Ray's snapshot goes too: Ray Train refuses to restore a snapshot whose checkpoints are gone."""
        for child in self.folder.children():
            if child.name.startswith("checkpoint_") or child.name == RAY_SNAPSHOT:
                child.delete()


class RunStore:
    """The folder or URI (ray.storage_path) holding one RunRecord per run name."""

    def __init__(self, root: Location):
        self.root = root

    def record(self, name: str) -> RunRecord:
        return RunRecord(self.root / name)

    def finished(self) -> list[RunRecord]:
        return [RunRecord(child) for child in self.root.children() if (child / RESULT_MARKER).exists()]

    def prune(self, keep: int | None, protect: Iterable[str]) -> list[str]:
        """Deletes finished runs beyond the `keep` most recently used, never one named in `protect`;
        interrupted runs stay (their checkpoints are progress). Returns the names removed."""
        if keep is None:
            return []
        protected = set(protect)
        candidates = [record for record in self.finished() if record.name not in protected]
        candidates.sort(key=lambda record: record.marker()["used_at"], reverse=True)
        removed = [record for record in candidates[max(0, keep - len(protected)):]]
        for record in removed:
            record.folder.delete()
        return [record.name for record in removed]
