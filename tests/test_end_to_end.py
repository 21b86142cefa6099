"""The README's run path on a clean copy of the repository, with real DVC: `dvc repro` through every
stage, the DVC commands users run on the results, and what a params change reruns (only what it
shapes), including an experiment in a temporary workspace whose runs land in the project."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import load_params
from pipeline.data.dataset import Dataset
from pipeline.runs.identity import train_spec
from pipeline.runs.store import RESULT_MARKER

from tests.conftest import (
    FAST_MODEL,
    FAST_RESOLUTION,
    change_params,
    clean_copy,
    console_faults,
    plots_drawn_offline,
    ran,
    without_ray_address,
)

pytestmark = pytest.mark.slow  # every test here trains or runs stages on a cluster

# LeNet-5 everywhere, so the time goes to DVC, Ray and MLflow rather than to convolutions.
REDUCED = {
    "train": {"models": [FAST_MODEL], "epochs": 1, "batch_size": 64, "resolution": FAST_RESOLUTION},
    "ensemble": {"model": FAST_MODEL, "members": 1, "epochs": 1, "max_concurrent": None, "include": [FAST_MODEL]},
    "evaluate": {"protocols": ["center"]},
    # Two trials of the train stage's own run with another learning rate each (the workers and epochs too).
    "sweep": {"model": FAST_MODEL, "space": {"lr": {"grid": [0.02, 0.05]}}, "trials": 1, "epochs": 1, "grace_period": 1,
              "num_workers": None},
}
TRACKING_AND_FAULT_TOLERANCE = {"mlflow": {"experiment": "renamed"},
                                "ray": {"max_failures": 5, "checkpoints_to_keep": 3, "storage_path": "elsewhere"}}


def dvc(repo: Path, *arguments: str, timeout: float = 1200, with_stderr: bool = False) -> str:
    env = without_ray_address() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(["dvc", *arguments], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"dvc {' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + (result.stderr if with_stderr else "")


# The stage that fingerprints data.root's archives runs on every `dvc repro` (dvc.yaml: always_changed).
ALWAYS_RUN = {"source"}


def changed_stages(repo: Path) -> set[str]:
    """The main pipeline's stages that a `dvc repro` would run (the sweep, run apart, is left out)."""
    return set(json.loads(dvc(repo, "status", "--json", "dvc.yaml"))) - ALWAYS_RUN


def tracked_runs(repo: Path) -> list:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def check_what_a_user_reads(repo: Path, output: str) -> None:
    """The console of a successful `dvc repro`, `make run`'s last screen, `dvc exp show` piped, and the
    plots page drawn with no network."""
    assert not console_faults(output), "\n".join(console_faults(output))
    assert "Trial status" not in output, "Tune's status tables"
    assert re.search(r"^ensemble: member 0 \(seed \d+, run \S+\) ended; 1/1 done", output, re.MULTILINE), output

    screen = subprocess.run([sys.executable, "-m", "pipeline.reports.summary"], cwd=repo, capture_output=True, text=True,
                            check=True).stdout
    assert max(len(line) for line in screen.splitlines()) <= 160, screen
    trained = json.loads((repo / f"outputs/train/{FAST_MODEL}/metrics.json").read_text())[FAST_MODEL]
    assert f"{trained['val_top1_error']:.4f} {trained['val_top5_error']:.4f}" in screen, screen

    # Piped, DVC fits the table into 1,024 columns, dropping columns from the right: every metric of every
    # metrics file must keep a column, named by its key alone.
    metrics = next(iter(json.loads(dvc(repo, "metrics", "show", "--json")).values()))["data"]
    # The sweep is not part of the default `dvc repro`: its metrics file appears when it runs.
    assert {path for path, data in metrics.items() if "data" not in data} == {"outputs/sweep/metrics.json"}
    names = {name for data in metrics.values() if "data" in data for name in flat_keys(data["data"])}
    header = dvc(repo, "exp", "show").splitlines()[1].split()
    assert names <= set(header), f"missing from dvc exp show: {names - set(header)}"

    drawn = plots_drawn_offline(repo / "plots" / "index.html",
                                not_yet_written=frozenset({"outputs_sweep_curves_csv", "outputs_sweep_by_key"}))
    assert any("steps" in plot for plot in drawn) and any("history" in plot for plot in drawn), drawn


def flat_keys(data: dict, prefix: str = "") -> list[str]:
    """DVC's names of the values in a metrics file: nested keys joined by dots."""
    return [name for key, value in data.items()
            for name in (flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


@pytest.mark.timeout(2400)
def test_dvc_repro_then_params_changes_rerun_only_what_they_shape(tmp_path):
    repo = clean_copy(tmp_path / "repo", REDUCED)
    output = dvc(repo, "repro", with_stderr=True)
    assert ran(output) == ALWAYS_RUN | {"prepare", "preprocess", f"train@{FAST_MODEL}", f"evaluate@{FAST_MODEL}", "ensemble"}
    assert f"Ensemble of 1 x {FAST_MODEL}" in output and "gain over mean member" in output
    for path in ("data/prepared/classes.json", "data/beton/train.beton", "data/beton/dataset.json",
                 "reports/preprocess.json", f"outputs/train/{FAST_MODEL}/model.pt",
                 f"outputs/train/{FAST_MODEL}/history.csv", f"outputs/evaluate/{FAST_MODEL}/metrics.json",
                 "outputs/ensemble/error_curve.csv", "outputs/ensemble/papers.md",
                 "outputs/ensemble/members.json", "mlflow.db"):
        assert (repo / path).is_file(), path
    # The .beton files are linked from DVC's cache, not stored twice.
    assert (repo / "data/beton/train.beton").stat().st_nlink == 2
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    by_file = next(iter(metrics.values()))["data"]
    assert by_file["reports/preprocess.json"]["data"]["train"]["images"] == 1437
    assert by_file[f"outputs/train/{FAST_MODEL}/metrics.json"]["data"][FAST_MODEL]["val_top1_error"] < 0.9  # chance: 0.9
    assert by_file["outputs/ensemble/metrics.json"]["data"]["members"] == 1
    assert ran(dvc(repo, "repro")) == ALWAYS_RUN
    dvc(repo, "plots", "show", "-o", "plots")
    check_what_a_user_reads(repo, output)

    # Tracking and fault-tolerance settings shape nothing; the recipe shapes every stage that trains.
    original = (repo / "params.yaml").read_text()
    change_params(repo, TRACKING_AND_FAULT_TOLERANCE)
    assert changed_stages(repo) == set()
    (repo / "params.yaml").write_text(original)
    change_params(repo, {"train": {"lr": 0.02}})
    assert changed_stages(repo) == {f"train@{FAST_MODEL}", "ensemble"}
    (repo / "params.yaml").write_text(original)

    # An experiment in a temporary workspace (DVC deletes it afterwards) with a new model (GoogLeNet, with
    # its auxiliary heads' losses) and one more ensemble member: only the new model trains and is evaluated,
    # the ensemble reuses the project's member, and the new runs land in the project's stores.
    new_model = "googlenet"
    models = f"[{FAST_MODEL},{new_model}]"
    output = dvc(repo, "exp", "run", "--temp", "-S", f"train.models={models}", "-S", "ensemble.members=2",
                 "-S", f"ensemble.include={models}")
    assert ran(output) == ALWAYS_RUN | {f"train@{new_model}", f"evaluate@{new_model}", "ensemble"}
    assert "Reusing member 0" in output and "Training 1 members" in output
    assert f"Ensemble of 2 x {FAST_MODEL} + {FAST_MODEL}, {new_model} " in output
    # The workspace's row has one member: the row with two is the experiment's, with its own metrics.
    rows = list(csv.DictReader(io.StringIO(dvc(repo, "exp", "show", "--csv"))))
    experiment = [row for row in rows if row["ensemble.members"] == "2"]
    assert len(experiment) == 1 and experiment[0]["members"] == "2", rows
    assert float(experiment[0]["ensemble_top1_error"]) < 0.9
    ensembles = [run for run in tracked_runs(repo)
                 if run.data.tags.get("dvc_stage") == "ensemble" and "mlflow.parentRunId" not in run.data.tags]
    assert sorted(run.data.params["ensemble.members"] for run in ensembles) == ["1", "2"]
    # The train stage's run, two members, the new model's run.
    assert len(list((repo / "ray_results").glob(f"*/{RESULT_MARKER}"))) == 4
    assert list((repo / "ray_results").glob(f"{new_model}-*/{RESULT_MARKER}"))

    # The sweep, run apart; its best recipe, applied with the command it prints, trains no run again: the
    # train stage's run with that learning rate is the sweep's finished trial, which the stage reuses (as
    # the experiment above reused the ensemble's member; not run again here, to save its three stages).
    output = dvc(repo, "repro", "sweeps/dvc.yaml")
    assert ran(output) == ALWAYS_RUN | {"sweeps/dvc.yaml:sweep"}
    assert json.loads((repo / "outputs/sweep/metrics.json").read_text())["completed"] == 2
    [command] = [line.strip() for line in output.splitlines() if line.strip().startswith("dvc exp run -S 'train.lr=")]
    [setting] = shlex.split(command)[4:]
    params = load_params(repo / "params.yaml")
    best = params.train.model_copy(update={"lr": yaml.safe_load(setting.removeprefix("train.lr="))})
    run = train_spec(params.model_copy(update={"train": best}), FAST_MODEL, Dataset.read(repo / "data/beton")).name
    assert (repo / "ray_results" / run / RESULT_MARKER).is_file(), f"{command}: would train {run} again"

