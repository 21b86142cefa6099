"""The cluster path on one machine: a Ray head with token authentication, and the README's
`ray job submit` command run as written from a clean copy of the project, whose results land in that
project (not in the copy of it that Ray unpacks for the job, which Ray deletes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT
from tests.conftest import clean_copy, free_port, without_ray_address

pytestmark = pytest.mark.slow  # every test here trains or runs stages on a cluster

VENV_BIN = Path(os.sys.executable).parent
README_PORT = "127.0.0.1:8265"
# The README's command, as written (the test's head listens on another port than the README's 8265).
README_JOB = """ray job submit --address http://127.0.0.1:8265 --working-dir . \\
    --runtime-env-json "{\\"env_vars\\": {\\"PIPELINE_HOME\\": \\"$PWD\\"}}" -- \\
    python -m stages.train --model alexnet2012 --out outputs/train/alexnet2012"""
SMALL = {"train": {"epochs": 1, "resolution": 67}, "ensemble": {"members": 2}}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` as the README says, token auth included; its own HOME keeps the token file
    and its own --temp-dir lets the test stop exactly this head's processes (by PID)."""
    home = tmp_path_factory.mktemp("home")
    env = without_ray_address() | {
        "HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's sockets live below it
    dashboard = free_port()
    # Ports of its own: the tests' other Ray (conftest.ray_cluster) holds the default agent ports, and a
    # job agent that cannot bind never comes up ("No available agent to submit job").
    ports = {option: free_port() for option in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                "metrics-export-port", "runtime-env-agent-port")}
    subprocess.run(
        ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--num-cpus=3", f"--temp-dir={temp_dir}",
         *(f"--{option}={port}" for option, port in ports.items())],
        env=env, check=True, capture_output=True, timeout=180,
    )
    address = f"127.0.0.1:{dashboard}"
    wait_for_job_agent(env, f"http://{address}")
    yield env, address
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or []):
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    shutil.rmtree(temp_dir, ignore_errors=True)


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


def run_in(folder: Path, command: str, env: dict, address: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command.replace(README_PORT, address)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture
def project(tmp_path, digits_betons) -> Path:
    """A fresh clone whose data stage has run (the README says `make run` first)."""
    folder = clean_copy(tmp_path / "project", SMALL)
    shutil.copytree(digits_betons, folder / "data" / "beton")
    return folder


def test_readme_job_lands_in_the_project(ray_head, project):
    env, address = ray_head
    assert README_JOB in (PROJECT_ROOT / "README.md").read_text()
    job = run_in(project, README_JOB, env, address)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output
    assert "succeeded" in output
    assert "Started a local Ray instance" not in output, "the job must join the cluster, not start its own"
    # Everything in the project the job was submitted from: outputs, run store, and the MLflow store the
    # README's `mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db` opens.
    assert (project / "outputs/train/alexnet2012/model.pt").is_file()
    assert list(project.glob("ray_results/alexnet2012-*/result.pt"))
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(run.data.tags["dvc_stage"], run.info.status) for run in runs] == [("train@alexnet2012", "FINISHED")]
    assert list(project.glob("mlartifacts/**/MLmodel")), "the logged model lands in the project's mlartifacts/"


def test_job_without_a_home_is_refused_and_token_is_required(ray_head, project, tmp_path):
    env, address = ray_head
    without_home = README_JOB.replace(' \\\n    --runtime-env-json "{\\"env_vars\\": {\\"PIPELINE_HOME\\": \\"$PWD\\"}}"', "")
    job = run_in(project, without_home, env, address)
    assert job.returncode != 0, "a failed job must make `ray job submit` fail"
    refusal = "is relative, but this stage runs in the copy of the project that `ray job submit --working-dir` made"
    assert refusal in job.stdout + job.stderr and "set PIPELINE_HOME" in job.stdout + job.stderr
    assert not (project / "ray_results").exists() and not (project / "mlflow.db").exists()

    without_token = env | {"HOME": str(tmp_path)}
    refused = run_in(project, README_JOB, without_token, address)
    assert refused.returncode != 0, "a client without the token must be refused"
    assert "token" in (refused.stdout + refused.stderr).lower()


def test_the_upload_holds_code_and_params_not_weights_or_stores(project):
    """What `ray job submit --working-dir .` packs, by Ray's own packaging code (.gitignore + .rayignore)."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import _zip_files

    for stray in ("model.pt", "notes/scores.npz", "runs/mlflow.db", "outputs/x/model.pt", "ray_results/r/result.pt"):
        (project / stray).parent.mkdir(parents=True, exist_ok=True)
        (project / stray).write_bytes(b"x" * 1000)
    package = project.parent / "package.zip"
    _zip_files(str(project), [], str(package), include_gitignore=True)
    names = ZipFile(package).namelist()
    assert {"params.yaml", "dvc.yaml", "stages/train.py", "pipeline/runs/store.py", "models/lenet.py"} <= set(names)
    assert not [name for name in names if name.endswith((".pt", ".npz", ".db", ".beton")) or name.startswith("data/")]
