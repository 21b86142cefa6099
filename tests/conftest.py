"""Fixtures shared by the test modules: the validated default params and one local Ray cluster."""

from __future__ import annotations

import os

import pytest
import yaml

from pipeline.config import PROJECT_ROOT

# The project venv's CPU has 2 cores; Ray is given 4 logical CPUs so 2 training workers plus
# Ray Train's controller and a Tune trial fit at once (they mostly wait on each other).
TEST_RAY_CPUS = 4


@pytest.fixture
def params_dict() -> dict:
    """params.yaml as a plain dict, for tests that change one value and validate it."""
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head for the whole session; tests that need Ray take this fixture."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=TEST_RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
