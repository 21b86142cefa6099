"""The ensemble stage on real small data: members side by side, scored, combined with an evaluated train
stage model, refusals, MLflow (a killed stage's resume: tests/test_reproducible.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import statistics

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.dataset import Dataset
from pipeline.drivers.ensemble import (
    METRIC_KEYS,
    EnsembleError,
    included_scores,
    load_member,
    member_seeds,
    plan_members,
)
from pipeline.runs.context import StageContext, run_store
from pipeline.runs.store import RESULT_MARKER, RESULT_WEIGHTS
from pipeline.scoring.combine import best_model
from pipeline.scoring.protocols import ScoresError
from pipeline.storage.location import Location
from tests.conftest import ENSEMBLE_MEMBERS, FAST_MODEL

pytestmark = pytest.mark.slow  # every test here trains or runs stages on a cluster


def members_of(params, data) -> list:
    """The members the stage plans, planned as it does (the session's Ray is already joined)."""
    return plan_members(StageContext.open(params, Location.local(data)))


def result_markers(params, data) -> list[dict]:
    members = members_of(params, data)
    return [run_store(params).record(m.name).marker() for m in members]


def test_members_train_two_at_a_time(lenet5_pipeline, digits_betons):
    spans = [(m["summary"]["started_at"], m["summary"]["finished_at"])
             for m in result_markers(lenet5_pipeline["params"], digits_betons)]
    most_at_once = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert most_at_once == 2


def test_finished_members_keep_their_weights_and_scores_only(lenet5_pipeline, digits_betons):
    params = lenet5_pipeline["params"]
    for member in members_of(params, digits_betons):
        folder = run_store(params).record(member.name).folder.local_path()
        assert sorted(path.name for path in folder.iterdir() if not path.name.startswith(".")) == \
            [RESULT_MARKER, RESULT_WEIGHTS, "scores-center.npz"], "checkpoints take GBs at VGG sizes"


def test_outputs_and_curve(lenet5_pipeline):
    out, summary = lenet5_pipeline["folder"] / "out", lenet5_pipeline["summary"]
    assert json.loads((out / "report.json").read_text()) == summary
    assert json.loads((out / "metrics.json").read_text()) == {key: summary[key] for key in METRIC_KEYS}
    assert summary["members"] == ENSEMBLE_MEMBERS and summary["models"] == ENSEMBLE_MEMBERS + 1 and summary["combine"] == "softmax"
    assert summary["protocol"] == "center" and summary["included"] == [FAST_MODEL]
    with open(out / "error_curve.csv") as handle:
        curve = list(csv.DictReader(handle))
    assert [int(row["models"]) for row in curve] == list(range(1, ENSEMBLE_MEMBERS + 2))
    # k=1 is member 0 alone; k=N is the whole ensemble, the included model last.
    assert float(curve[0]["top1_error"]) == summary["model_top1_error"]["member_0"]
    assert float(curve[-1]["top1_error"]) == summary["ensemble_top1_error"]
    assert float(curve[-1]["top5_error"]) == summary["ensemble_top5_error"]
    member_errors = [summary["model_top1_error"][f"member_{i}"] for i in range(ENSEMBLE_MEMBERS)]
    assert summary["member_top1_error_mean"] == pytest.approx(statistics.mean(member_errors))
    assert summary["member_top1_error_std"] == pytest.approx(statistics.stdev(member_errors))
    assert summary["gain_top1"] == pytest.approx(summary["member_top1_error_mean"] - summary["ensemble_top1_error"])
    references = json.loads((out / "members.json").read_text())
    assert [ref["seed"] for ref in references] == member_seeds(100, ENSEMBLE_MEMBERS)


def test_a_trained_model_joins_by_its_evaluated_scores(lenet5_pipeline):
    folder, summary = lenet5_pipeline["folder"], lenet5_pipeline["summary"]
    evaluated = json.loads((folder / "evaluate" / FAST_MODEL / "metrics.json").read_text())
    assert summary["model_top1_error"][FAST_MODEL] == pytest.approx(evaluated[FAST_MODEL]["center_top1_error"])
    table = (folder / "out" / "papers.md").read_text()
    assert f"| {FAST_MODEL} (evaluate@{FAST_MODEL}) | center | 1 |" in table
    assert f"| ensemble ({ENSEMBLE_MEMBERS} members + {FAST_MODEL}) | center | {ENSEMBLE_MEMBERS + 1} |" in table


def test_mlflow_parent_with_nested_members(lenet5_pipeline):
    params = lenet5_pipeline["params"]
    client = MlflowClient(params.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("tests").experiment_id
    [parent] = [run for run in client.search_runs([experiment], filter_string="tags.dvc_stage = 'ensemble'")
                if "mlflow.parentRunId" not in run.data.tags]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["ensemble_top1_error"] == lenet5_pipeline["summary"]["ensemble_top1_error"]
    assert {"error_vs_models.png", "papers.md"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    seeds = member_seeds(100, ENSEMBLE_MEMBERS)
    assert sorted(int(child.data.tags["seed"]) for child in children) == sorted(seeds)
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_top1_error")] == [1], "epoch 1"
    # The registry's `best` is the best model trained, a member or the included one (tests/test_tracking_ux.py).
    best = client.get_model_version_by_alias(params.mlflow.registered_model, "best")
    errors = lenet5_pipeline["summary"]["model_top1_error"]
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


def test_refuses_missing_or_unreadable_members(lenet5_pipeline, digits_betons, tmp_path):
    shutil.copytree(lenet5_pipeline["folder"] / "ray_results", tmp_path / "ray_results")
    shared = lenet5_pipeline["params"]
    params = shared.model_copy(update={"ray": shared.ray.model_copy(update={"storage_path": str(tmp_path / "ray_results")})})
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
    evaluations = Location.local(lenet5_pipeline["folder"] / "evaluate")
    with_include = params.model_copy(update={"ensemble": params.ensemble.model_copy(update={"include": [FAST_MODEL]})})
    assert len(included_scores(with_include, evaluations, val)) == 1
    other_val = dataclasses.replace(val, sha256="0" * 64)
    with pytest.raises(ScoresError, match=rf"evaluate/{FAST_MODEL}/scores/scores-center.npz: scores of another validation set"):
        included_scores(with_include, evaluations, other_val)
    with pytest.raises(EnsembleError, match=rf"nowhere/{FAST_MODEL}/scores/scores-center.npz: not found; .*evaluate@{FAST_MODEL}"):
        included_scores(with_include, Location.local(tmp_path / "nowhere"), val)
