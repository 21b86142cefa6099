"""The ensemble stage on real small data: members side by side, scored, combined with an evaluated train
stage model, refusals, resume, MLflow."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT
from pipeline.data.dataset import Dataset
from pipeline.drivers.ensemble import (
    METRIC_KEYS,
    EnsembleError,
    included_scores,
    load_member,
    member_seeds,
    plan_members,
    run_ensemble,
)
from pipeline.drivers.evaluate import evaluate_model
from pipeline.drivers.train import train_model
from pipeline.runs.context import StageContext, run_store
from pipeline.runs.store import RESULT_MARKER, RESULT_WEIGHTS
from pipeline.scoring.combine import best_model
from pipeline.scoring.protocols import ScoresError
from pipeline.storage.location import Location
from tests.conftest import (
    FAST_MODEL,
    end_tree,
    training_overrides,
    wait_for,
    without_ray_address,
    write_params,
)

pytestmark = pytest.mark.slow  # every test here trains or runs stages on a cluster

MEMBERS = 2


def ensemble_overrides(folder, **ensemble):
    return training_overrides(folder) | {
        "ensemble": {"model": FAST_MODEL, "members": MEMBERS, "epochs": 1, "max_concurrent": 2, "include": [],
                     **ensemble},
        "evaluate": {"protocols": ["center"]},
    }


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, ray_cluster, digits_betons):
    """Two LeNet-5 members combined with the train stage's LeNet-5, which the evaluate stage scored."""
    folder = tmp_path_factory.mktemp("ensemble")
    _, params = write_params(folder, ensemble_overrides(folder, include=[FAST_MODEL]))
    data = Location.local(digits_betons)
    train_model(params, FAST_MODEL, data, Location.local(folder / "train"))
    evaluate_model(params, FAST_MODEL, data, Location.local(folder / "train" / "model.pt"),
                   Location.local(folder / "evaluate" / FAST_MODEL))
    summary = run_ensemble(params, data, Location.local(folder / "evaluate"), Location.local(folder / "out"))
    yield {"folder": folder, "params": params, "summary": summary}
    shutil.rmtree(folder)  # weights that no later module reads


def members_of(params, data) -> list:
    """The members the stage plans, planned as it does (the session's Ray is already joined)."""
    return plan_members(StageContext.open(params, Location.local(data)))


def result_markers(params, data) -> list[dict]:
    members = members_of(params, data)
    return [run_store(params).record(m.name).marker() for m in members]


def test_members_train_two_at_a_time(ensemble_run, digits_betons):
    spans = [(m["summary"]["started_at"], m["summary"]["finished_at"])
             for m in result_markers(ensemble_run["params"], digits_betons)]
    most_at_once = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert most_at_once == 2


def test_finished_members_keep_their_weights_and_scores_only(ensemble_run, digits_betons):
    params = ensemble_run["params"]
    for member in members_of(params, digits_betons):
        folder = run_store(params).record(member.name).folder.local_path()
        assert sorted(path.name for path in folder.iterdir() if not path.name.startswith(".")) == \
            [RESULT_MARKER, RESULT_WEIGHTS, "scores-center.npz"], "checkpoints take GBs at VGG sizes"


def test_outputs_and_curve(ensemble_run):
    out, summary = ensemble_run["folder"] / "out", ensemble_run["summary"]
    assert json.loads((out / "report.json").read_text()) == summary
    assert json.loads((out / "metrics.json").read_text()) == {key: summary[key] for key in METRIC_KEYS}
    assert summary["members"] == MEMBERS and summary["models"] == MEMBERS + 1 and summary["combine"] == "softmax"
    assert summary["protocol"] == "center" and summary["included"] == [FAST_MODEL]
    with open(out / "error_curve.csv") as handle:
        curve = list(csv.DictReader(handle))
    assert [int(row["models"]) for row in curve] == list(range(1, MEMBERS + 2))
    # k=1 is member 0 alone; k=N is the whole ensemble, the included model last.
    assert float(curve[0]["top1_error"]) == summary["model_top1_error"]["member_0"]
    assert float(curve[-1]["top1_error"]) == summary["ensemble_top1_error"]
    assert float(curve[-1]["top5_error"]) == summary["ensemble_top5_error"]
    member_errors = [summary["model_top1_error"][f"member_{i}"] for i in range(MEMBERS)]
    assert summary["member_top1_error_mean"] == pytest.approx(statistics.mean(member_errors))
    assert summary["member_top1_error_std"] == pytest.approx(statistics.stdev(member_errors))
    assert summary["gain_top1"] == pytest.approx(summary["member_top1_error_mean"] - summary["ensemble_top1_error"])
    references = json.loads((out / "members.json").read_text())
    assert [ref["seed"] for ref in references] == member_seeds(100, MEMBERS)


def test_a_trained_model_joins_by_its_evaluated_scores(ensemble_run):
    folder, summary = ensemble_run["folder"], ensemble_run["summary"]
    evaluated = json.loads((folder / "evaluate" / FAST_MODEL / "metrics.json").read_text())
    assert summary["model_top1_error"][FAST_MODEL] == pytest.approx(evaluated[FAST_MODEL]["center_top1_error"])
    table = (folder / "out" / "papers.md").read_text()
    assert f"| {FAST_MODEL} (evaluate@{FAST_MODEL}) | center | 1 |" in table
    assert f"| ensemble ({MEMBERS} members + {FAST_MODEL}) | center | {MEMBERS + 1} |" in table


def test_mlflow_parent_with_nested_members(ensemble_run):
    params = ensemble_run["params"]
    client = MlflowClient(params.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("tests").experiment_id
    [parent] = [run for run in client.search_runs([experiment], filter_string="tags.dvc_stage = 'ensemble'")
                if "mlflow.parentRunId" not in run.data.tags]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["ensemble_top1_error"] == ensemble_run["summary"]["ensemble_top1_error"]
    assert {"error_vs_models.png", "papers.md"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    seeds = member_seeds(100, MEMBERS)
    assert sorted(int(child.data.tags["seed"]) for child in children) == sorted(seeds)
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_top1_error")] == [1], "epoch 1"
    # The registry's `best` is the best model trained, a member or the included one (tests/test_tracking_ux.py).
    best = client.get_model_version_by_alias(params.mlflow.registered_model, "best")
    errors = ensemble_run["summary"]["model_top1_error"]
    registered = client.get_run(best.run_id)
    name = (f"member_{seeds.index(int(registered.data.tags['seed']))}" if "seed" in registered.data.tags
            else registered.data.tags["model"])
    assert errors[name] == min(errors.values())


def test_best_model_breaks_ties_on_top5_then_order():
    summary = {"members": 3, "model_top1_error": {"member_0": 0.5, "member_1": 0.4, "member_2": 0.4, "vgg": 0.1},
               "model_top5_error": {"member_0": 0.1, "member_1": 0.2, "member_2": 0.1, "vgg": 0.0}}
    assert best_model(summary) == "vgg", "an included model better than every member"
    summary["model_top1_error"]["vgg"] = 0.4
    assert best_model(summary) == "vgg", "top-1 tied: the lower top-5"
    summary["model_top5_error"]["vgg"] = 0.1
    assert best_model(summary) == "member_2", "both tied: the first"


def test_member_seeds_are_independent_of_the_member_count():
    seeds = member_seeds(100, 9)
    assert seeds[:7] == member_seeds(100, 7), "raising ensemble.members must keep the members trained"
    assert len(set(seeds)) == 9 and all(0 <= seed < 2**31 for seed in seeds)
    # Not consecutive: member i+1's shuffle in epoch e would be member i's in epoch e+1 (FFCV: seed + epoch).
    assert all(abs(a - b) > 1000 for a, b in zip(seeds, seeds[1:]))
    assert member_seeds(101, 3) != member_seeds(100, 3)


def test_refuses_missing_or_unreadable_members(ensemble_run, digits_betons, tmp_path):
    shutil.copytree(ensemble_run["folder"] / "ray_results", tmp_path / "ray_results")
    _, params = write_params(tmp_path, ensemble_overrides(tmp_path))
    members = members_of(params, digits_betons)
    runs = run_store(params)
    for member in members:
        load_member(member, runs)  # the copy loads as it is

    (runs.record(members[0].name).folder / RESULT_MARKER).delete()
    with pytest.raises(EnsembleError, match=r"member 0 \(seed \d+, run .*\) did not finish training"):
        load_member(members[0], runs)
    (runs.record(members[1].name).folder / RESULT_WEIGHTS).write_bytes(b"truncated")
    with pytest.raises(EnsembleError, match=r"member 1 \(seed \d+, .*weights in .* do not load"):
        load_member(members[1], runs)

    # An included model's scores must be of this validation set, and exist.
    val = Dataset.read(digits_betons).files["val"]
    evaluations = Location.local(ensemble_run["folder"] / "evaluate")
    with_include = params.model_copy(update={"ensemble": params.ensemble.model_copy(update={"include": [FAST_MODEL]})})
    assert len(included_scores(with_include, evaluations, val)) == 1
    other_val = dataclasses.replace(val, sha256="0" * 64)
    with pytest.raises(ScoresError, match=rf"evaluate/{FAST_MODEL}/scores/scores-center.npz: scores of another validation set"):
        included_scores(with_include, evaluations, other_val)
    with pytest.raises(EnsembleError, match=rf"nowhere/{FAST_MODEL}/scores/scores-center.npz: not found; .*evaluate@{FAST_MODEL}"):
        included_scores(with_include, Location.local(tmp_path / "nowhere"), val)


def test_interrupted_stage_reuses_finished_members(tmp_path, digits_betons):
    (tmp_path / "beton").symlink_to(digits_betons)
    params, loaded = write_params(tmp_path, ensemble_overrides(tmp_path, members=2, epochs=1, max_concurrent=1))
    command = [sys.executable, "-m", "stages.ensemble", "--params", str(params), "--data", str(tmp_path / "beton"),
               "--evaluations", str(tmp_path / "evaluate"), "--out", str(tmp_path / "out")]
    markers = lambda: sorted((tmp_path / "ray_results").glob(f"*/{RESULT_MARKER}"))  # noqa: E731
    first = subprocess.Popen(command, cwd=PROJECT_ROOT, start_new_session=True, env=without_ray_address(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(markers()) >= 1, 600, "the first member to finish")
    finally:
        end_tree(first)
    finished = markers()
    assert len(finished) == 1
    weights_written = (finished[0].parent / RESULT_WEIGHTS).stat().st_mtime_ns

    second = subprocess.run(command, cwd=PROJECT_ROOT, env=without_ray_address(), capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Reusing member 0" in second.stdout and "Training 1 members" in second.stdout
    assert (finished[0].parent / RESULT_WEIGHTS).stat().st_mtime_ns == weights_written, "the member was trained again"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["members"] == 2
    client = MlflowClient(loaded.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.status for run in parents] == ["FINISHED"], "the rerun continues the parent run"
    assert len(runs) == 3
