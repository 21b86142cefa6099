"""The cluster path: a local Ray head with token authentication, the train stage sent by `ray job submit`."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT
from tests.conftest import free_port, training_overrides, without_ray_address, write_params

VENV_BIN = Path(os.sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` as the README says, token auth included; its own HOME keeps the token file
    and its own --temp-dir lets the test stop exactly this head (`ray stop` would stop every Ray here)."""
    home = tmp_path / "home"
    home.mkdir()
    env = without_ray_address() | {
        "HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
    }
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's sockets live below it
    dashboard = free_port()
    # Ports of its own: the tests' other Ray (conftest.ray_cluster) holds the default agent ports, and a
    # job agent that cannot bind never comes up ("No available agent to submit job").
    ports = {option: free_port() for option in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "metrics-export-port", "runtime-env-agent-port")}
    subprocess.run(
        ["ray", "start", "--head", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         "--num-cpus=3", f"--temp-dir={temp_dir}", *(f"--{option}={port}" for option, port in ports.items())],
        env=env, check=True, capture_output=True, timeout=180,
    )
    address = f"http://127.0.0.1:{dashboard}"
    wait_for_job_agent(env, address)
    yield env, address
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or []):
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass


def wait_for_job_agent(env: dict, address: str, timeout: float = 180) -> None:
    """`ray start` returns before the node's job agent takes jobs ("No available agent to submit job")."""
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(["ray", "job", "submit", "--address", address, "--", "true"],
                               env=env, capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return
        assert time.monotonic() < deadline, f"the Ray job agent never came up:\n{probe.stderr}"
        time.sleep(2)


def submit(env: dict, address: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(PROJECT_ROOT), "--", *command],
        env=env, capture_output=True, text=True, timeout=900,
    )


def test_ray_job_submit_runs_the_train_stage_on_the_cluster(ray_head, tmp_path, digits_betons):
    env, address = ray_head
    params, _ = write_params(tmp_path, training_overrides(tmp_path, epochs=1))
    stage = ["python", "-m", "stages.train", "--params", str(params), "--model", "alexnet2012"]

    without_token = {key: value for key, value in env.items() if key != "HOME"} | {"HOME": str(tmp_path)}
    refused = submit(without_token, address, *stage, "--data", str(digits_betons), "--out", str(tmp_path / "x"))
    assert refused.returncode != 0, "a client without the token must be refused"
    assert "token" in (refused.stdout + refused.stderr).lower()

    job = submit(env, address, *stage, "--data", str(digits_betons), "--out", str(tmp_path / "out"))
    output = job.stdout + job.stderr
    assert job.returncode == 0, output
    assert "succeeded" in output
    assert "Started a local Ray instance" not in output, "the job must join the cluster, not start its own"
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "model.pt").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]

    failing = submit(env, address, *stage, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "y"))
    assert failing.returncode != 0, "a failed job must make `ray job submit` fail"
    assert "missing/train.beton: FFCV file not found" in failing.stdout + failing.stderr
