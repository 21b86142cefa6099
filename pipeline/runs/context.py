"""How every stage that trains or scores on the cluster opens: the data described, the run store, the
cluster joined and checked, the MLflow store ready; then the run specs and tags it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.config import Params
from pipeline.data.dataset import Dataset
from pipeline.data.node_copy import cache_root, describe
from pipeline.runs import cluster
from pipeline.runs.identity import RunSpec, run_spec, train_spec
from pipeline.runs.store import RunStore
from pipeline.storage.location import Location
from pipeline.storage.paths import params_location


@dataclass(frozen=True)
class StageContext:
    params: Params
    data: Location  # the folder with dataset.json and the .beton files, local or a URI
    dataset: Dataset
    runs: RunStore
    store: tracking.Store

    @classmethod
    def open(cls, params: Params, data: Location, check: Callable[[Dataset], object] = lambda dataset: None
             ) -> StageContext:
        """`check` refuses bad input from what dataset.json says, before the cluster is joined."""
        dataset = describe(data, cache_root(params.ray.local_data_cache))  # bad data costs seconds, not a cluster
        check(dataset)
        runs = run_store(params)
        # Before Ray starts: an unreachable server or refused credentials cost a second, not a cluster.
        store = tracking.open_store(params.mlflow)
        # Before any MLflow run and its SIGTERM handler: ray.init installs a SIGTERM handler of its own.
        cluster.connect(params.ray)
        cluster.check_nodes_reach(store.uri, runs.root, data)
        return cls(params, data, dataset, runs, store)

    @property
    def data_cache(self) -> Path:
        return cache_root(self.params.ray.local_data_cache)

    def spec(self, model: str, *, seed: int, epochs: int, num_workers: int) -> RunSpec:
        return run_spec(self.params, model, self.dataset, seed=seed, epochs=epochs, num_workers=num_workers)

    def train_spec(self, model: str) -> RunSpec:
        return train_spec(self.params, model, self.dataset)

    def data_inputs(self, splits: tuple[str, ...] = ("train", "val")) -> list:
        """The .beton files a run reads, as MLflow dataset inputs (pipeline/tracking.py)."""
        return tracking.data_inputs(self.data, self.dataset, self.params.data.source, splits)

    def tags(self, model: str, stage: str) -> dict[str, str]:
        return {"model": model, "dvc_stage": stage, "device": cluster.device_name(self.params.ray)}


def run_store(params: Params) -> RunStore:
    return RunStore(params_location(params.ray.storage_path, "ray.storage_path"))
