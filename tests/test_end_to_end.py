"""The README's run path on a clean copy of the repository: `dvc repro` through every stage, then the
DVC commands users run on the results. Reduced epochs and members keep it to a few minutes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import PROJECT_ROOT
from tests.conftest import TEST_RESOLUTION, without_ray_address

REDUCED = {
    "data": {"digits_image_size": 72},
    "preprocess": {"max_resolution": 72},
    "train": {"models": ["alexnet2012"], "epochs": 1, "batch_size": 64, "resolution": TEST_RESOLUTION},
    "ensemble": {"members": 2, "epochs": 1, "max_concurrent": None},
}


def clean_copy(target: Path) -> Path:
    """What a fresh clone holds: the tracked files plus new ones git would add, none of the outputs."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = PROJECT_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    params = yaml.safe_load((target / "params.yaml").read_text())
    for section, values in REDUCED.items():
        params[section].update(values)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=target, check=True)
    return target


def dvc(repo: Path, *arguments: str, timeout: float = 1200) -> str:
    env = without_ray_address() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(["dvc", *arguments], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"dvc {' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.timeout(2400)
def test_dvc_repro_runs_every_stage_then_nothing(tmp_path):
    repo = clean_copy(tmp_path / "repo")
    output = dvc(repo, "repro")
    for stage in ("prepare", "preprocess", "train@alexnet2012", "ensemble"):
        assert f"Running stage '{stage}'" in output
    assert "Ensemble of 2 x alexnet2012" in output and "gain over mean member" in output

    for path in ("data/prepared/classes.json", "data/beton/train.beton", "data/beton/val.beton",
                 "reports/preprocess.json", "outputs/train/alexnet2012/model.pt",
                 "outputs/train/alexnet2012/history.csv", "outputs/ensemble/error_curve.csv",
                 "outputs/ensemble/members.json", "mlflow.db"):
        assert (repo / path).is_file(), path
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    by_file = next(iter(metrics.values()))["data"]
    assert by_file["reports/preprocess.json"]["data"]["train"]["images"] == 1437
    assert 0 <= by_file["outputs/train/alexnet2012/metrics.json"]["data"]["val_top1_error"] <= 1
    assert by_file["outputs/ensemble/metrics.json"]["data"]["members"] == 2

    assert "Data and pipelines are up to date." in dvc(repo, "repro")
    dvc(repo, "plots", "show", "-o", "plots")
    assert (repo / "plots" / "index.html").is_file()

    # An experiment with one param changed reruns what depends on it and is compared with the baseline.
    dvc(repo, "exp", "run", "-S", "train.lr=0.02")
    shown = dvc(repo, "exp", "show", "--csv")
    assert "0.02" in shown and "val_top1_error" in shown
