"""The ensemble stage: N members of one model trained side by side as Ray Tune trials, scored, and
combined with the evaluated scores of any models the train stage trained (ensemble.include).

Each member is a training run like the train stage's (pipeline/runs/store.py), with a seed of its own drawn
from numpy's SeedSequence(ensemble.first_seed).spawn: member i's seed is independent of the others'
and of the member count, so raising ensemble.members trains only the new members. A member whose run
has finished is reused; one that was cut short resumes from its checkpoints. A finished member keeps its
result (weights and history) and its validation scores under ensemble.protocol in the run store; the
scores are made on the cluster (pipeline/scoring/protocols.py) once the members have trained, in one pass
for every member that has none for the protocol asked: each scoring task starts once, not once a member.
Combining reads scores only: nothing is reloaded or retrained.
Members do not write to MLflow while they train (several at once would contend for the SQLite store);
the driver logs them as nested runs at the end, with the papers' table (pipeline/scoring/papers.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import matplotlib

matplotlib.use("Agg")  # the stage runs headless: DVC, CI, Ray jobs
import matplotlib.pyplot as plt
import mlflow
import numpy as np
from mlflow.entities import LoggedModelOutput
from ray import tune

from pipeline import tracking
from pipeline.config import Params
from pipeline.data.dataset import BetonFile, Dataset
from pipeline.errors import InputError
from pipeline.runs.context import StageContext
from pipeline.runs.store import RunResult, RunStore
from pipeline.scoring.combine import best_model, evaluate_members
from pipeline.scoring.papers import Measured, papers_table
from pipeline.scoring.protocols import Scores, score_on_cluster, scores_file
from pipeline.storage.location import Location
from pipeline.training.fit import fit
from pipeline.training.job import TrainJob
from pipeline.training.trials import TRIAL_RESOURCES, TrialProgress, max_concurrent_runs, trials_run_config

# The summary's figures that `dvc metrics show` and `dvc exp show` compare; each model's errors would be
# two columns per member. The members' std is one model's seed-to-seed spread: the margin an experiment's
# change of recipe must beat.
METRIC_KEYS = ("members", "ensemble_top1_error", "ensemble_top5_error", "member_top1_error_mean",
               "member_top1_error_std", "gain_top1", "gain_top5")


# The members' names in the summary and the error curve; included models keep their own.
MEMBER_PREFIX = "member_"


class EnsembleError(InputError):
    """A member is missing, failed or unreadable: the ensemble refuses to average fewer."""


@dataclasses.dataclass(frozen=True)
class Member:
    index: int
    job: TrainJob

    @property
    def name(self) -> str:
        return self.job.spec.name

    def describe(self) -> str:
        return f"member {self.index} (seed {self.job.spec.seed}, run {self.name})"


def member_seeds(first_seed: int, count: int) -> list[int]:
    """Independent seeds: consecutive ones (first_seed + i) would make member i+1's shuffle in epoch e
    member i's in epoch e+1, since FFCV orders an epoch by seed + epoch. Kept below 2**31 so seed + epoch
    stays a valid numpy seed."""
    children = np.random.SeedSequence(first_seed).spawn(count)
    return [int(child.generate_state(1)[0]) % 2**31 for child in children]


def plan_members(context: StageContext) -> list[Member]:
    ensemble = context.params.ensemble
    seeds = member_seeds(ensemble.first_seed, ensemble.members)
    specs = [context.spec(ensemble.model, seed=seed, epochs=ensemble.epochs, num_workers=context.params.ensemble_workers)
             for seed in seeds]
    return [Member(index, TrainJob.for_run(spec, context, tracking=None)) for index, spec in enumerate(specs)]


def fit_member(config: dict, members: list[Member], runs: RunStore, params: Params) -> None:
    """Ray Tune trainable: one member is one TorchTrainer run; once it has finished its result is saved
    and then its checkpoints go (the driver scores members and logs them to MLflow from their results)."""
    member = members[config["index"]]
    started = time.time()
    result = fit(member.job, runs, params.ray)
    record = runs.record(member.name)
    record.save_result(result, member.job.spec.identity(), {"started_at": started, "finished_at": time.time()})
    record.drop_checkpoints()


def train_members(members: list[Member], runs: RunStore, params: Params) -> None:
    pending = [member for member in members if runs.record(member.name).status() != "finished"]
    for member in members:
        if member not in pending:
            print(f"Reusing {member.describe()}: already trained")
    if not pending:
        return
    concurrent = max_concurrent_runs(params.ray, params.ensemble_workers, params.ensemble.max_concurrent)
    print(f"Training {len(pending)} members, {concurrent} at a time")
    trainable = tune.with_parameters(fit_member, members=members, runs=runs, params=params)
    tuner = tune.Tuner(
        tune.with_resources(trainable, TRIAL_RESOURCES),
        param_space={"index": tune.grid_search([member.index for member in pending])},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=trials_run_config(f"ensemble-tune-{members[0].name}", runs, progress=TrialProgress(
            "ensemble", len(pending), lambda config: members[config["index"]].describe())),
    )
    tuner.fit()  # failures surface below, as the member that has no result


def load_member(member: Member, runs: RunStore) -> RunResult:
    record = runs.record(member.name)
    if record.status() != "finished":
        raise EnsembleError(f"{member.describe()} did not finish training (no result in {record.folder}); "
                            f"see its Ray logs there")
    try:
        result = record.load_result()
        member.job.spec.load_model(result.weights)
    except Exception as error:
        raise EnsembleError(f"{member.describe()}: its weights in {record.folder} do not load: {error}") from error
    record.mark_used()
    return result


def member_scores(members: list[Member], results: list[RunResult], runs: RunStore, params: Params,
                  val: BetonFile) -> list[Scores]:
    """Each member's saved scores under ensemble.protocol; the members without (just trained, or scored
    under another protocol) are scored now, on the cluster, in one pass."""
    protocol = params.ensemble.protocol
    unscored = [(member, result) for member, result in zip(members, results)
                if not scores_file(runs.record(member.name).folder, protocol).exists()]
    if unscored:
        print(f"Scoring {len(unscored)} members ({protocol})")
        job = unscored[0][0].job
        scored = score_on_cluster([(member.job.spec, result.weights) for member, result in unscored], job.data,
                                  job.data_cache, val.images, val.sha256, [protocol], params,
                                  tasks=params.ray.num_workers)
        for (member, _), scores in zip(unscored, scored):
            scores[protocol].save(scores_file(runs.record(member.name).folder, protocol))
    return [Scores.load(scores_file(runs.record(member.name).folder, protocol), val.sha256) for member in members]


def included_scores(params: Params, evaluations: Location, val: BetonFile) -> list[Scores]:
    """The evaluate stage's scores of the models in ensemble.include."""
    found = []
    for model in params.ensemble.include:
        location = scores_file(evaluations / model / "scores", params.ensemble.protocol)
        if not location.exists():
            raise EnsembleError(f"{location}: not found; ensemble.include names {model}: run the evaluate stage "
                                f"(dvc repro evaluate@{model}) with {params.ensemble.protocol} in evaluate.protocols")
        found.append(Scores.load(location, val.sha256))
    return found


def run_ensemble(params: Params, data: Location, evaluations: Location, out: Location) -> dict:
    """The ensemble stage: returns the metrics it also writes to out/metrics.json."""
    included: list[Scores] = []  # filled by the check: missing evaluations are refused before any training
    context = StageContext.open(params, data, check=lambda dataset: included.extend(
        included_scores(params, evaluations, dataset.files["val"])))
    runs, store, val = context.runs, context.store, context.dataset.files["val"]
    members = plan_members(context)
    digest = hashlib.sha256(json.dumps([m.name for m in members] + params.ensemble.include +
                                       [params.ensemble.protocol, params.ensemble.combine]).encode())
    name = f"ensemble-{params.ensemble.model}-{digest.hexdigest()[:12]}"
    parent = tracking.open_run(store, name, context.tags(params.ensemble.model, "ensemble"), params.model_dump(),
                               reuse_finished=False)

    with tracking.closed_with_true_status(store.client, parent.id):
        train_members(members, runs, params)
        results = [load_member(member, runs) for member in members]  # refuses before any averaging
        scores = member_scores(members, results, runs, params, val) + included
        names = [f"{MEMBER_PREFIX}{member.index}" for member in members] + params.ensemble.include
        summary, curve = evaluate_members(scores, names, len(members), params.ensemble.combine)
        summary = {"model": params.ensemble.model, "included": params.ensemble.include, **summary}
        table = papers_table(measured_figures(evaluations, params, summary, curve), data_name(params, context.dataset))
        write_outputs(out, members, summary, curve, table)
        log_to_mlflow(context, parent.id, members, results, summary, curve, table)
    print_summary(summary, store)
    print(f"\nThe papers' figures beside this run's ({out / 'papers.md'}):\n{table}")
    return summary


def measured_figures(evaluations: Location, params: Params, summary: dict, curve: list[dict]) -> list[Measured]:
    """Every evaluated model under every protocol, and the ensemble's first k members for every k that
    the papers report (k nets of the members' model)."""
    figures = []
    for folder in evaluations.children():
        for model, metrics in json.loads((folder / "metrics.json").read_text()).items():
            for protocol in params.evaluate.protocols:
                if f"{protocol}_top1_error" in metrics:
                    figures.append(Measured(model, protocol, 1, metrics[f"{protocol}_top1_error"],
                                            metrics[f"{protocol}_top5_error"], f"evaluate@{model}"))
    for point in curve[1:summary["members"]]:
        figures.append(Measured(params.ensemble.model, summary["protocol"], point["members"], point["top1_error"],
                                point["top5_error"], f"ensemble, first {point['members']} members"))
    if params.ensemble.include:
        figures.append(Measured("ensemble", summary["protocol"], summary["models"], summary["ensemble_top1_error"],
                                summary["ensemble_top5_error"],
                                f"{summary['members']} members + {', '.join(params.ensemble.include)}"))
    return figures


def data_name(params: Params, dataset: Dataset) -> str:
    named = {"digits": "embedded digits", "imagenet": "ILSVRC-2012", "folder": "image folder"}[params.data.source]
    return f"{named}, {dataset.num_classes} classes, {dataset.files['val'].images} val images"


def write_outputs(out: Location, members: list[Member], summary: dict, curve: list[dict], table: str) -> None:
    """metrics.json: the figures DVC compares (METRIC_KEYS); report.json: the whole summary, every
    model's errors too; error_curve.csv; members.json; papers.md."""
    (out / "metrics.json").write_text(json.dumps({key: summary[key] for key in METRIC_KEYS}, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["models,top1_error,top5_error"] + [f"{p['members']},{p['top1_error']},{p['top5_error']}" for p in curve]
    (out / "error_curve.csv").write_text("\n".join(lines) + "\n")
    references = [
        {"index": m.index, "seed": m.job.spec.seed, "run": m.name,
         "top1_error": summary["model_top1_error"][f"member_{m.index}"],
         "top5_error": summary["model_top5_error"][f"member_{m.index}"]}
        for m in members
    ]
    (out / "members.json").write_text(json.dumps(references, indent=2) + "\n")
    (out / "papers.md").write_text(table)


def log_to_mlflow(context: StageContext, parent: str, members: list[Member], results: list[RunResult],
                  summary: dict, curve: list[dict], table: str) -> None:
    """Nested member runs under the parent, the parent's data, metrics, plot and papers' table, the best
    model registered."""
    client = context.store.client
    inputs = context.data_inputs()
    tracking.log_data_inputs(client, parent, inputs)
    child_ids = log_members(context, parent, members, results, inputs)
    scalars = {k: v for k, v in summary.items() if isinstance(v, float)}
    tracking.log_metrics(client, parent, scalars)
    for point in curve:
        tracking.log_metrics(client, parent, {"curve_top1_error": point["top1_error"],
                                              "curve_top5_error": point["top5_error"]}, step=point["members"])
    client.log_figure(parent, error_curve_figure(curve, summary), "error_vs_models.png")
    client.log_text(parent, table, "papers.md")
    register_best(context, parent, members, results, child_ids, summary)


def log_members(context: StageContext, parent: str, members: list[Member], results: list[RunResult],
                inputs: list) -> list[str]:
    """One finished run per member, nested under the parent; their ids in the members' order."""
    store = context.store
    client = store.client
    # A previous attempt that died while logging may have left some member runs: replace them.
    for stale in client.search_runs([store.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        client.delete_run(stale.info.run_id)
    child_ids = []
    for member, result in zip(members, results):
        child = client.create_run(store.experiment_id, run_name=f"member-{member.index}", tags={
            "mlflow.parentRunId": parent, tracking.RUN_NAME_TAG: member.name,
            "model": member.job.spec.model, "seed": str(member.job.spec.seed), "dvc_stage": "ensemble",
        }).info.run_id
        tracking.log_params(client, child, member.job.spec.mlflow_params())
        tracking.log_data_inputs(client, child, inputs)
        tracking.log_history(client, child, result.history)
        client.set_terminated(child)
        child_ids.append(child)
    return child_ids


def register_best(context: StageContext, parent: str, members: list[Member], results: list[RunResult],
                  child_ids: list[str], summary: dict) -> None:
    """The best model the pipeline trained, a member or a model of ensemble.include (whose train run
    logged it), registered as mlflow.registered_model with the alias `best` and linked to the parent run
    as its output (the run page lists it; the tags name the version)."""
    store, params = context.store, context.params
    best = best_model(summary)
    model_id = None if best.startswith(MEMBER_PREFIX) else included_model_id(context, best)
    if model_id is None:
        if not best.startswith(MEMBER_PREFIX):
            print(f"MLflow: {best} is the best model, but its train run has no logged model (mlflow.log_model "
                  "false, or another store): registering the best member")
        best = best_model(summary, [f"{MEMBER_PREFIX}{member.index}" for member in members])
        index = int(best.removeprefix(MEMBER_PREFIX))
        model_id = tracking.log_model(store.uri, child_ids[index], members[index].job.spec.load_model(
            results[index].weights), context.dataset, params.train.resolution).model_id
    mlflow.set_tracking_uri(store.uri)
    version = mlflow.register_model(f"models:/{model_id}", params.mlflow.registered_model)
    store.client.set_registered_model_alias(params.mlflow.registered_model, "best", version.version)
    store.client.log_outputs(parent, [LoggedModelOutput(model_id, step=0)])
    store.client.set_tag(parent, "registered_model", f"{params.mlflow.registered_model}/{version.version}")
    store.client.set_tag(parent, "registered_model_is", best)
    print(f"MLflow: {best} registered as models:/{params.mlflow.registered_model}@best (version {version.version})")


def included_model_id(context: StageContext, model: str) -> str | None:
    """The model that the train stage's run of `model` logged, if the store has it."""
    run = tracking.find_run(context.store, context.train_spec(model).name)
    if run is None:
        return None
    logged = context.store.client.search_logged_models([context.store.experiment_id],
                                                       filter_string=f"source_run_id = '{run.id}'")
    return logged[0].model_id if logged else None


def error_curve_figure(curve: list[dict], summary: dict):
    figure, axes = plt.subplots(figsize=(5, 3.5))
    ks = [p["members"] for p in curve]
    axes.plot(ks, [p["top1_error"] for p in curve], "o-", label="ensemble top-1")
    axes.plot(ks, [p["top5_error"] for p in curve], "s-", label="ensemble top-5")
    axes.axhline(summary["member_top1_error_mean"], ls="--", c="C0", alpha=0.5, label="mean member top-1")
    axes.set_xlabel("models averaged (first k: members, then included models)")
    axes.set_ylabel("validation error")
    axes.legend()
    figure.tight_layout()
    return figure


def print_summary(summary: dict, store: tracking.Store) -> None:
    included = f" + {', '.join(summary['included'])}" if summary["included"] else ""
    print(f"\nEnsemble of {summary['members']} x {summary['model']}{included} "
          f"({summary['combine']} averaging, protocol {summary['protocol']})")
    print(f"{'':24}{'top-1 error':>14}{'top-5 error':>14}")
    for key, top1 in summary["model_top1_error"].items():
        print(f"{key:24}{top1:>14.4f}{summary['model_top5_error'][key]:>14.4f}")
    mean_std = lambda k: f"{summary[k + '_mean']:.4f}+-{summary[k + '_std']:.4f}"  # noqa: E731
    print(f"{'members mean +- std':24}{mean_std('member_top1_error'):>15}{mean_std('member_top5_error'):>15}")
    print(f"{'ensemble':24}{summary['ensemble_top1_error']:>14.4f}{summary['ensemble_top5_error']:>14.4f}")
    print(f"{'gain over mean member':24}{summary['gain_top1']:>14.4f}{summary['gain_top5']:>14.4f}")
    print(f"\nMLflow: mlflow ui --backend-store-uri {store.uri}  then open "
          f"http://127.0.0.1:5000/#/experiments/{store.experiment_id}/runs")
