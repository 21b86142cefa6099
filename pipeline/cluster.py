"""The Ray cluster a stage trains on: joining it, and what it offers."""

from __future__ import annotations

import os

import ray

from pipeline.config import RayParams


def connect(params: RayParams) -> None:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit` jobs; RAY_ADDRESS=auto finds a
    `ray start` cluster on this machine); else start a private local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner asks its state API.
        ray.init(address="local", num_cpus=params.local_num_cpus)


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


def device_name(params: RayParams) -> str:
    return "cuda" if params.use_gpu else "cpu"
