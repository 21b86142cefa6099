"""The run store: the folder (or URI) ray.storage_path, one folder per training run, by its name
(pipeline/runs/identity.py):
  <name>/checkpoint_*/state.pt, checkpoint_manager_snapshot.json   Ray Train's, while the run trains
  <name>/result.pt     {"model": state dict, "history": [one dict per epoch], "steps": [the training loss
                       within epochs, pipeline/training/progress.py]} once training finished
  <name>/result.json   {"name", "identity", "finished_at", "used_at", "summary"}: the done marker,
                       written after result.pt, so its presence means the result is whole
  <name>/scores-*.npz  an ensemble member's per-image validation scores (pipeline/drivers/ensemble.py)
A run with a result is finished: stages reuse it instead of training again. A run with checkpoints and
no result was interrupted: fitting the same name makes Ray Train hand the workers its last checkpoint.
Checkpoints are deleted only once the stage that trained the run has written everything it owes
(outputs, MLflow records); finished runs beyond ray.keep_finished_runs are pruned, least recently
used first.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

from pipeline.storage.location import Location

CHECKPOINT_FILE = "state.pt"  # in each checkpoint: the epoch, weights, optimizer state and history so far
RESULT_WEIGHTS = "result.pt"
RESULT_MARKER = "result.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"

Status = Literal["new", "interrupted", "finished"]


@dataclasses.dataclass(frozen=True)
class RunResult:
    weights: dict[str, torch.Tensor]
    history: list[dict]
    steps: list[dict] = dataclasses.field(default_factory=list)

    @classmethod
    def from_state(cls, state: dict) -> RunResult:
        """From a checkpoint's or result.pt's contents (runs from before the loss points have no steps)."""
        return cls(state["model"], state["history"], state.get("steps", []))


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
            torch.save({"model": result.weights, "history": result.history, "steps": result.steps}, stream)
        now = time.time()
        marker = {"name": self.name, "identity": identity, "finished_at": now, "used_at": now, "summary": dict(summary)}
        (self.folder / RESULT_MARKER).write_text(json.dumps(marker, indent=1))

    def marker(self) -> dict:
        return json.loads((self.folder / RESULT_MARKER).read_text())

    def load_result(self) -> RunResult:
        """Raises whatever torch raises for a missing or damaged file; callers name the run."""
        data = (self.folder / RESULT_WEIGHTS).read_bytes()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        # Runs finished before steps were kept have none.
        return RunResult.from_state(state)

    def checkpoint_state(self) -> dict | None:
        """The checkpoint an unfinished run resumes from ({"epoch", "model", "optimizer", ..., "history"}),
        if any: the latest one Ray Train's snapshot lists (a newer folder, written as the run was stopped
        and not yet listed, is not resumed from)."""
        if not (self.folder / RAY_SNAPSHOT).exists():
            return None
        latest = json.loads((self.folder / RAY_SNAPSHOT).read_text()).get("latest_checkpoint_result")
        if not latest:
            return None
        data = (self.folder / latest["checkpoint_dir_name"] / CHECKPOINT_FILE).read_bytes()
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def checkpoint_history(self) -> list[dict]:
        """The epochs an unfinished run has done, from its last checkpoint ([] without one)."""
        state = self.checkpoint_state()
        return state["history"] if state else []

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
