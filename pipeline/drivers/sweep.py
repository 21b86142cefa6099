"""The sweep stage: a search over one model's training recipe with Ray Tune, ASHA stopping the trials
that fall behind, recorded in MLflow and in DVC's metrics and plots.

Each trial is a training run (pipeline/runs/identity.py) of sweep.model with the train section's recipe
changed by the values Tune sampled from sweep.space, trained from train.seed for sweep.epochs epochs on
sweep.num_workers workers, and reporting every epoch to Tune. The sampling is seeded (sweep.seed), so
running the sweep again asks for the same trials: a finished trial's epochs are replayed to ASHA from
the run store without training, and an interrupted or early-stopped trial resumes from its last
checkpoint, where ASHA lets it go further. Trials do not write to MLflow while they train; the driver
logs them at the end as nested runs of the sweep's run, as the ensemble does its members.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time

import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline import tracking
from pipeline.config import Params, ParamsError, RayParams, Recipe
from pipeline.errors import ExplainedFailure
from pipeline.runs.context import StageContext
from pipeline.runs.identity import weight_keys
from pipeline.runs.store import RunRecord, RunResult, RunStore
from pipeline.storage.location import Location
from pipeline.training.fit import fit
from pipeline.training.job import TrainJob
from pipeline.training.trials import TRIAL_RESOURCES, TrialProgress, max_concurrent_runs, trials_run_config

DISTRIBUTIONS = {"grid": tune.grid_search, "choice": tune.choice,
                 "uniform": lambda ends: tune.uniform(*ends), "loguniform": lambda ends: tune.loguniform(*ends)}


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int
    config: dict  # the sampled values, by train key
    job: TrainJob
    history: list[dict]  # the epochs it trained, in this sweep or an earlier one
    status: str  # "completed", "stopped early" or "failed"

    @property
    def name(self) -> str:
        return self.job.spec.name


def check_space(params: Params) -> None:
    """Refuses a key that does not shape the model's weights: every trial would be the same run."""
    sweep = params.sweep
    schedules = sweep.values("schedule") if "schedule" in sweep.space else [params.train.schedule]
    shaping = {key for schedule in schedules for key in weight_keys(sweep.model, schedule, params.ray.use_gpu)}
    for key in sweep.space:
        if key not in shaping:
            device = "GPUs" if params.ray.use_gpu else "the CPU"
            raise ParamsError(f"sweep.space.{key}: does not shape {sweep.model}'s weights on {device} (schedule "
                              f"{'/'.join(schedules)}), so every trial would be the same run")


def trial_job(base: TrainJob, config: dict) -> TrainJob:
    recipe = Recipe.model_validate(base.spec.recipe.model_dump() | config)
    return dataclasses.replace(base, spec=dataclasses.replace(base.spec, recipe=recipe))


def run_trial(config: dict, base: TrainJob, runs: RunStore, ray_params: RayParams) -> None:
    """Ray Tune trainable: the trial's run trained (or resumed), each epoch reported to Tune for ASHA;
    the epochs an earlier sweep trained are reported first, without training them again."""
    job = trial_job(base, config)
    record = runs.record(job.spec.name)
    if finish_from_checkpoint(record, job):
        for row in record.load_result().history:
            tune.report(row)
        return
    for row in record.checkpoint_history():
        tune.report(row)
    result = fit(job, runs, ray_params, callbacks=[TuneReportCallback()])
    record.save_result(result, job.spec.identity(), {"finished_at": time.time()})
    record.drop_checkpoints()


def finish_from_checkpoint(record: RunRecord, job: TrainJob) -> bool:
    """Whether the run is finished, finishing it first if its last checkpoint holds every epoch: ASHA
    stops a trial when it reports its last epoch, before the trial itself can save the result."""
    if record.status() != "finished":
        state = record.checkpoint_state()
        if not state or len(state["history"]) < job.spec.epochs:
            return False
        record.save_result(RunResult.from_state(state), job.spec.identity(), {"finished_at": time.time()})
        record.drop_checkpoints()
    return True


def search(params: Params, base: TrainJob, runs: RunStore, name: str) -> list[tuple[dict, bool]]:
    """Runs the trials; (config, whether it failed) per trial, in the order Tune sampled them."""
    sweep = params.sweep
    space = {key: DISTRIBUTIONS[kind](values) for key, distribution in sweep.space.items()
             for kind, values in distribution.items()}
    concurrent = max_concurrent_runs(params.ray, params.sweep_workers, sweep.max_concurrent)
    print(f"Sweep {name}: {sweep.trials} sample(s) of the space over {', '.join(sweep.space)}, "
          f"{concurrent} trial(s) at a time")
    trainable = tune.with_parameters(run_trial, base=base, runs=runs, ray_params=params.ray)
    tuner = tune.Tuner(
        tune.with_resources(trainable, TRIAL_RESOURCES),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode="min", num_samples=sweep.trials,
            # Tune ignores max_concurrent_trials beside a search algorithm instance: the limit goes to it.
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=sweep.seed),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=sweep.epochs,
                                    grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)),
        run_config=trials_run_config(name, runs, progress=TrialProgress("sweep", expected_trials(sweep), describe_config)),
    )
    return [(result.config, result.error is not None) for result in tuner.fit()]


def expected_trials(sweep) -> int:
    """Tune's trial count: each sample covers the grid keys' every combination."""
    return sweep.trials * math.prod(len(values) for key in sweep.space for kind, values in sweep.space[key].items()
                                    if kind == "grid")


def describe_config(config: dict) -> str:
    return "trial " + ", ".join(f"{key}={shown(value)}" for key, value in sorted(config.items()))


def collect(index: int, base: TrainJob, config: dict, failed: bool, runs: RunStore) -> Trial:
    job = trial_job(base, config)
    record = runs.record(job.spec.name)
    if finish_from_checkpoint(record, job):
        return Trial(index, config, job, record.load_result().history, "completed")
    return Trial(index, config, job, record.checkpoint_history(), "failed" if failed else "stopped early")


def summarize(trials: list[Trial], params: Params) -> tuple[dict, Trial]:
    """The figures a user compares, and the best trial: the lowest final error among the trials that
    trained the whole budget (ASHA stopped the others at fewer epochs, where errors are higher)."""
    sweep, metric = params.sweep, params.sweep.metric
    completed = [trial for trial in trials if trial.status == "completed"]
    if not completed:
        raise ExplainedFailure(f"sweep: no trial finished its {sweep.epochs} epochs; see the Ray logs "
                                        "in the run store")
    best = min(completed, key=lambda trial: trial.history[-1][metric])
    summary = {
        "model": sweep.model, f"best_{metric}": best.history[-1][metric], "best_run": best.name,
        "trials": len(trials), "completed": len(completed),
        "stopped_early": sum(trial.status == "stopped early" for trial in trials),
        "failed": sum(trial.status == "failed" for trial in trials),
        "epochs_trained": sum(len(trial.history) for trial in trials),
        "epochs_without_stopping": len(trials) * sweep.epochs,
    }
    return summary, best


def sweep_name(params: Params, base: TrainJob) -> str:
    settings = params.sweep.model_dump(exclude={"max_concurrent"}) | {"base": base.spec.name}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"sweep-{params.sweep.model}-{digest}"


def run_sweep(params: Params, data: Location, out: Location) -> dict:
    """The sweep stage: returns the metrics it also writes to out/metrics.json."""
    context = StageContext.open(params, data, check=lambda dataset: check_space(params))
    sweep, store = params.sweep, context.store
    base = TrainJob.for_run(context.spec(sweep.model, seed=params.train.seed, epochs=sweep.epochs,
                                         num_workers=params.sweep_workers), context, tracking=None)
    name = sweep_name(params, base)
    settings = {"sweep": sweep.model_dump(), "train": base.spec.recipe.model_dump()}
    parent = tracking.open_run(store, name, context.tags(sweep.model, "sweep"), settings, reuse_finished=False)
    with tracking.closed_with_true_status(store.client, parent.id):
        outcomes = search(params, base, context.runs, name)
        trials = [collect(index, base, config, failed, context.runs) for index, (config, failed) in enumerate(outcomes)]
        summary, best = summarize(trials, params)
        write_outputs(out, trials, best, summary, params)
        log_to_mlflow(context, parent.id, trials, best, summary)
    print_summary(trials, best, summary, params, out)
    return summary


def set_param_command(best: Trial) -> str:
    return "dvc exp run " + " ".join(f"-S 'train.{key}={value!r}'" for key, value in sorted(best.config.items()))


def write_outputs(out: Location, trials: list[Trial], best: Trial, summary: dict, params: Params) -> None:
    """metrics.json; best_params.yaml (the best trial's values, as params.yaml's train keys); curves.csv
    (every trial's error by epoch); by_key/<key>.csv (each trial's last error against its value of the key)."""
    metric = params.sweep.metric
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    header = f"# The best trial of the sweep ({best.name}); apply it with:\n#   {set_param_command(best)}\n"
    (out / "best_params.yaml").write_text(header + yaml.safe_dump({"train": dict(sorted(best.config.items()))}))
    # The error column is named for what it holds whichever sweep.metric chose it, so the plots' fields stay put.
    rows = [f"{t.index},{row['epoch'] + 1},{row[metric]},{t.status}" for t in trials for row in t.history]
    (out / "curves.csv").write_text("\n".join(["trial,epoch,error,status", *rows]) + "\n")
    (out / "by_key").delete()  # a key no longer searched leaves no plot behind
    for key in params.sweep.space:
        finals = [f"{t.config[key]},{t.history[-1][metric]},{len(t.history)}" for t in trials if t.history]
        (out / "by_key" / f"{key}.csv").write_text("\n".join(["value,error,epochs", *finals]) + "\n")


def log_to_mlflow(context: StageContext, parent: str, trials: list[Trial], best: Trial, summary: dict) -> None:
    """One nested run per trial under the sweep's run (replacing any an interrupted attempt left), each
    with the data it trained on."""
    client, store = context.store.client, context.store
    inputs = context.data_inputs()
    tracking.log_data_inputs(client, parent, inputs)
    for stale in client.search_runs([store.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        client.delete_run(stale.info.run_id)
    for trial in trials:
        child = client.create_run(store.experiment_id, run_name=f"trial-{trial.index}", tags={
            "mlflow.parentRunId": parent, tracking.RUN_NAME_TAG: trial.name, "model": trial.job.spec.model,
            "dvc_stage": "sweep", "trial_status": trial.status, "best": str(trial is best).lower(),
        }).info.run_id
        tracking.log_params(client, child, trial.job.spec.mlflow_params())
        tracking.log_data_inputs(client, child, inputs)
        tracking.log_history(client, child, trial.history)
        client.set_terminated(child, status="FAILED" if trial.status == "failed" else "FINISHED")
    tracking.log_metrics(client, parent, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    client.set_tag(parent, "best_run", best.name)


def print_summary(trials: list[Trial], best: Trial, summary: dict, params: Params, out: Location) -> None:
    metric, keys = params.sweep.metric, list(params.sweep.space)
    print(f"\n{'trial':>5} " + " ".join(f"{key:>14}" for key in keys) + f" {'epochs':>6} {metric:>15}  status")
    for trial in trials:
        values = " ".join(f"{shown(trial.config[key]):>14}" for key in keys)
        error = f"{trial.history[-1][metric]:.4f}" if trial.history else "-"
        marker = "  <- best" if trial is best else ""
        print(f"{trial.index:>5} {values} {len(trial.history):>6} {error:>15}  {trial.status}{marker}")
    print(f"\n{summary['epochs_trained']} epochs trained of {summary['epochs_without_stopping']} without early "
          f"stopping; {summary['stopped_early']} trials stopped early. Best recipe in {out / 'best_params.yaml'}; "
          f"try it with:\n  {set_param_command(best)}")


def shown(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
