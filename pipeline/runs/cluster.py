"""The Ray cluster a stage trains on: joining it, and checking before training that every node can
reach what the run needs.

On one node every path is as good as shared. With several, rank 0 may run on any node and write to
MLflow from there, and every worker reads the data and writes checkpoints from its own node, so:
  the MLflow store    must be a tracking server: a file store (sqlite:///..., file:...) is the driver's
                      node's file, which other nodes do not see (and SQLite over a network mount
                      corrupts under concurrent writers);
  ray.storage_path    a URI, or a path every node sees: a probe file written by the driver must be
                      visible from every node;
  the data (--data)   a URI (each node copies it once, pipeline/data/node_copy.py), or a path every node
                      sees with the same dataset.json and .beton sizes.
Each check names the setting to change.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import uuid

import ray
import ray._private.ray_constants as ray_constants
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import RayParams
from pipeline.errors import InputError
from pipeline.storage.location import Location
from pipeline.tracking import is_file_store

# Ray Train's default wait for a worker group's resources (ray/train/v2/_internal/constants.py).
WORKER_GROUP_START_TIMEOUT_S = 60.0
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
LOOPBACK = "127.0.0.1"
# Where Ray's state API clients look for the dashboard before they search the machine for a Ray.
API_SERVER_VARIABLE = "RAY_API_SERVER_ADDRESS"


class ClusterError(InputError):
    """A node cannot reach something the run needs; the message names the setting to change."""


def connect(params: RayParams) -> None:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit` jobs; RAY_ADDRESS=auto finds a
    `ray start` cluster on this machine); else start a private local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        start_private(params.local_num_cpus)
    drop_known_noise()


def start_private(num_cpus: int | None) -> None:
    """A Ray for this stage alone that listens on loopback only, apart from any other on the machine
    (another DVC experiment's stage may run its own at the same time)."""
    dashboard_port = free_port()
    # Ray turns a node address of 127.0.0.1 into the machine's network address unless it believes clusters
    # are off (ray._private.services.resolve_ip_for_localhost); the processes it starts read that switch
    # from the environment, this one read it at import. Ray Train's PlacementGroupCleaner asks the state
    # API of the one Ray it finds on the machine, and with two it fails every few seconds ("Found multiple
    # active Ray instances"): named in the environment the processes inherit, it asks this one.
    variables = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0",
                 API_SERVER_VARIABLE: f"http://{LOOPBACK}:{dashboard_port}"}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray enables token authentication for a new local cluster and warns that it did at every start, i.e.
    # once per stage; the README says it once. Its errors (a refused token) still show.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        # The dashboard stays on: the placement-group cleaner asks its state API.
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK,
                 dashboard_port=dashboard_port)
    finally:  # Ray's processes have their copy; this one may join a real cluster later (the tests do)
        ray_constants.ENABLE_RAY_CLUSTER = clusters
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


def device_name(params: RayParams) -> str:
    return "cuda" if params.use_gpu else "cpu"


def check_nodes_reach(tracking_uri: str, storage: Location, data: Location) -> None:
    """With several nodes: the tracking store, the run store and the data are reachable from each."""
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    if is_file_store(tracking_uri):
        raise ClusterError(
            f"the cluster has {len(nodes)} nodes, and the MLflow store {tracking_uri} is a file on this node that "
            "the others cannot write: run an MLflow tracking server (mlflow server ...) and set "
            "mlflow.tracking_uri or MLFLOW_TRACKING_URI to it (README: Running on a Ray cluster)"
        )
    if storage.is_local:
        probe = storage / f".probe-{uuid.uuid4().hex}"
        probe.write_text("written by the driver")
        try:
            blind = _nodes_where(lambda location: location.exists(), probe, nodes, expect=True)
        finally:
            probe.delete()
        if blind:
            raise ClusterError(
                f"ray.storage_path {storage} is not shared: node(s) {', '.join(blind)} do not see a file the driver "
                "wrote there; give a folder every node mounts, or a URI (s3://bucket/prefix)"
            )
    if data.is_local:
        description = data / "dataset.json"
        expected = description.read_text()
        blind = _nodes_where(lambda location: location.exists() and location.read_text(), description, nodes,
                             expect=expected)
        if blind:
            raise ClusterError(
                f"--data {data} is not the same on every node: node(s) {', '.join(blind)} do not see its "
                "dataset.json; put the .beton files on storage every node mounts, or give a URI (s3://...)"
            )


def _nodes_where(check, location: Location, nodes: list[dict], expect) -> list[str]:
    """The nodes (by address) on which check(location) does not give `expect`."""

    @ray.remote(num_cpus=0)
    def run_check(target: Location):
        return check(target)

    pending = {
        node["NodeManagerAddress"] + f" ({node['NodeID'][:8]})": run_check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(location)
        for node in nodes
    }
    return [name for name, result in pending.items() if ray.get(result) != expect]


def capacity_wait(params: RayParams) -> tuple[float, int]:
    """(Ray Train's wait for a worker group's resources, how many such waits may fail in a row) that add
    up to ray.capacity_timeout_s: Ray Train's own default retries them without end, so a run whose node
    died and was never replaced would wait forever."""
    start_timeout = min(WORKER_GROUP_START_TIMEOUT_S, params.capacity_timeout_s)
    return start_timeout, math.ceil(params.capacity_timeout_s / start_timeout) - 1


# Lines Ray's processes print, forwarded to the driver, that report no fault of the run; each is matched
# whole, so that any other line of the same source still shows.
KNOWN_NOISE = [
    # Ray Train's controller starts its PreemptionWatcher actor (a watcher of node drains) with
    # max_restarts=-1 and arguments that Ray keeps in the object store; Ray's core worker logs that
    # combination at error level, once per worker group, though nothing has failed.
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the "
               r"object store and max_restarts > 0"),
]


def drop_known_noise() -> None:
    """Wraps the handler through which the driver prints the lines of Ray's worker processes (set up by
    ray.init with log_to_driver) so that it skips KNOWN_NOISE."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs":
            continue

        def without_noise(batch: dict, printer=handler) -> None:
            lines = [line for line in batch["lines"] if not any(noise.search(line) for noise in KNOWN_NOISE)]
            if lines:
                printer(batch | {"lines": lines})

        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, without_noise)
