"""One training run as its workers see it: a picklable description handed to every Ray Train worker."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.runs.context import StageContext
from pipeline.runs.identity import RunSpec
from pipeline.storage.location import Location
from pipeline.tracking import TrackingTarget


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """What to train (the spec), where the data is, and where rank 0 logs while it trains (None:
    nobody does; ensemble members are logged by their driver)."""

    spec: RunSpec
    data: Location  # the folder with dataset.json and the .beton files, local or a URI
    data_cache: Path  # where a node keeps its copy of data given as a URI
    threads_per_worker: int
    tracking: TrackingTarget | None

    @classmethod
    def for_run(cls, spec: RunSpec, context: StageContext, tracking: TrackingTarget | None) -> TrainJob:
        return cls(spec=spec, data=context.data, data_cache=context.data_cache,
                   threads_per_worker=max(1, int(context.params.ray.cpus_per_worker)), tracking=tracking)
