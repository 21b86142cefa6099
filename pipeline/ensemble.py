"""The ensemble stage: N members of one model trained side by side as Ray Tune trials, then combined.

Each member is a data-parallel TorchTrainer run with its own seed, named like a train-stage run
(model + fingerprint, seed included), so an interrupted stage picks up where it stopped: a member
whose run folder holds the done marker is not trained again, and one that was cut short resumes from
its last checkpoint through Ray Train. A finished member keeps only its weights and history (half a
checkpoint's size: no optimizer state) next to the marker. Members do not write to MLflow while they
train (several at once would contend for the SQLite store); the driver logs them as nested runs once
all have finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the stage runs headless: DVC, CI, Ray jobs
import matplotlib.pyplot as plt
import mlflow
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from pipeline import tracking
from pipeline.combine import combine, error_curve, top_k_errors
from pipeline.config import Params
from pipeline.errors import InputError
from pipeline.loaders import make_val_loader
from pipeline.train_loop import TrainJob
from pipeline.training import (
    DataFiles,
    connect_ray,
    device_name,
    drop_checkpoints,
    load_final_state,
    load_model,
    log_model,
    make_job,
    make_trainer,
    run_name,
    storage_root,
)

DONE_MARKER = "member_done.json"
MEMBER_WEIGHTS = "member.pt"
TRIAL_MEMORY_BYTES = 64 * 2**20


class EnsembleError(InputError):
    """A member is missing, failed or unreadable: the ensemble refuses to average fewer."""


@dataclasses.dataclass(frozen=True)
class Member:
    index: int
    job: TrainJob
    name: str

    def describe(self) -> str:
        return f"member {self.index} (seed {self.job.seed}, run {self.name})"


def plan_members(params: Params, data: DataFiles, uri: str) -> list[Member]:
    members = []
    for index in range(params.ensemble.members):
        job = make_job(params, params.ensemble.model, data, seed=params.ensemble.first_seed + index,
                       epochs=params.ensemble.epochs, num_workers=params.ensemble_workers, uri=uri)
        members.append(Member(index, job, run_name(job, prefix="ensemble-")))
    return members


def fit_member(config: dict, members: list[Member], params: Params) -> None:
    """Ray Tune trainable: one member is one TorchTrainer run, marked done only once it has finished."""
    member = members[config["index"]]
    started = time.time()
    state = load_final_state(make_trainer(member.job, member.name, params).fit())
    run_dir = storage_root(params.ray) / member.name
    partial = run_dir / f"{MEMBER_WEIGHTS}.partial"
    torch.save({"model": state["model"], "history": state["history"]}, partial)
    partial.replace(run_dir / MEMBER_WEIGHTS)
    marker = {"started_at": started, "finished_at": time.time()}
    (run_dir / DONE_MARKER).write_text(json.dumps(marker))
    drop_checkpoints(run_dir)


def max_concurrent_members(params: Params) -> int:
    """As many members at once as the cluster has CPUs (or GPUs) for their workers."""
    resource, per_worker = ("GPU", 1.0) if params.ray.use_gpu else ("CPU", params.ray.cpus_per_worker)
    available = ray.cluster_resources().get(resource, 0)
    fits = max(1, math.floor(available / (per_worker * params.ensemble_workers)))
    return min(fits, params.ensemble.max_concurrent or fits)


def train_members(members: list[Member], params: Params) -> None:
    pending = [m for m in members if not (storage_root(params.ray) / m.name / DONE_MARKER).exists()]
    for member in members:
        if member not in pending:
            print(f"Reusing {member.describe()}: already trained")
    if not pending:
        return
    concurrent = max_concurrent_members(params)
    print(f"Training {len(pending)} members, {concurrent} at a time")
    # The trial only drives a TorchTrainer, whose workers hold the CPUs/GPUs in a placement group of their
    # own. A trial asking for any CPU would leave a 2-CPU machine short of a 2-worker member for good;
    # Tune refuses an empty request, so the trial asks for a little (logical) memory instead.
    trial_resources = {"cpu": 0, "memory": TRIAL_MEMORY_BYTES}
    trainable = tune.with_resources(tune.with_parameters(fit_member, members=members, params=params), trial_resources)
    tuner = tune.Tuner(
        trainable,
        param_space={"index": tune.grid_search([m.index for m in pending])},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name=f"ensemble-tune-{members[0].name}", storage_path=str(storage_root(params.ray)), verbose=1
        ),
    )
    tuner.fit()  # failures surface below, as the member that has no done marker


def load_member(member: Member, params: Params) -> tuple[torch.nn.Module, list[dict]]:
    marker = storage_root(params.ray) / member.name / DONE_MARKER
    if not marker.exists():
        raise EnsembleError(f"{member.describe()} did not finish training (no {marker}); "
                            f"see its Ray logs under {marker.parent}")
    weights = marker.parent / MEMBER_WEIGHTS
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        return load_model(member.job, state), state["history"]
    except Exception as error:
        raise EnsembleError(f"{member.describe()}: weights {weights} do not load: {error}") from error


@torch.no_grad()
def member_logits(networks: list[torch.nn.Module], val_beton: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[members, samples, classes] logits and [samples] labels, in one pass over the validation set."""
    for network in networks:
        network.eval()
    loader = make_val_loader(val_beton, batch_size=256, resolution=resolution,
                             num_threads=torch.get_num_threads(), distributed=False)
    logits, labels = [], []
    for images, batch_labels in loader:
        logits.append(torch.stack([network(images) for network in networks]))
        labels.append(batch_labels)
    return torch.cat(logits, dim=1), torch.cat(labels)


def evaluate_members(logits: torch.Tensor, labels: torch.Tensor, rule: str) -> tuple[dict, list[dict]]:
    errors = [top_k_errors(member, labels) for member in logits]
    curve = error_curve(logits, labels, rule)
    top1s, top5s = [e[0] for e in errors], [e[1] for e in errors]
    summary = {
        "members": len(errors),
        "combine": rule,
        "member_top1_error": {f"member_{i}": e[0] for i, e in enumerate(errors)},
        "member_top5_error": {f"member_{i}": e[1] for i, e in enumerate(errors)},
        "member_top1_error_mean": statistics.mean(top1s),
        "member_top1_error_std": statistics.stdev(top1s),
        "member_top5_error_mean": statistics.mean(top5s),
        "member_top5_error_std": statistics.stdev(top5s),
        "ensemble_top1_error": curve[-1]["top1_error"],
        "ensemble_top5_error": curve[-1]["top5_error"],
    }
    summary["gain_top1"] = summary["member_top1_error_mean"] - summary["ensemble_top1_error"]
    summary["gain_top5"] = summary["member_top5_error_mean"] - summary["ensemble_top5_error"]
    return summary, curve


def run_ensemble(params: Params, data_dir: Path, out_dir: Path) -> dict:
    """The ensemble stage: returns the metrics it also writes to out_dir/metrics.json."""
    data = DataFiles.find(data_dir)
    uri = tracking.tracking_uri(params.mlflow, os.environ)
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, params.mlflow.experiment, uri)
    # Before the MLflow run and its SIGTERM handler: ray.init installs a SIGTERM handler of its own.
    connect_ray(params.ray)
    members = plan_members(params, data, uri)
    digest = hashlib.sha256(json.dumps([m.name for m in members] + [params.ensemble.combine]).encode())
    name = f"ensemble-{params.ensemble.model}-{digest.hexdigest()[:10]}"
    tags = {"model": params.ensemble.model, "dvc_stage": "ensemble", "device": device_name(params.ray)}
    parent, _ = tracking.resume_or_create_run(client, experiment, name, tags, params.model_dump())

    with tracking.closed_with_true_status(client, parent):
        train_members(members, params)
        loaded = [load_member(member, params) for member in members]  # refuses before any averaging
        logits, labels = member_logits([network for network, _ in loaded], data.val_beton, params.train.resolution)
        summary, curve = evaluate_members(logits, labels, params.ensemble.combine)
        summary = {"model": params.ensemble.model, **summary}
        write_outputs(out_dir, members, summary, curve)
        log_to_mlflow(client, uri, experiment, parent, members, loaded, summary, curve, params)
    print_summary(summary, uri, experiment)
    return summary


def write_outputs(out_dir: Path, members: list[Member], summary: dict, curve: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["members,top1_error,top5_error"] + [f"{p['members']},{p['top1_error']},{p['top5_error']}" for p in curve]
    (out_dir / "error_curve.csv").write_text("\n".join(lines) + "\n")
    references = [
        {"index": m.index, "seed": m.job.seed, "ray_run": m.name,
         "top1_error": summary["member_top1_error"][f"member_{m.index}"],
         "top5_error": summary["member_top5_error"][f"member_{m.index}"]}
        for m in members
    ]
    (out_dir / "members.json").write_text(json.dumps(references, indent=2) + "\n")


def log_to_mlflow(client, uri, experiment, parent, members, loaded, summary, curve, params: Params) -> None:
    """Nested member runs under the parent, the parent's metrics and plot, the best member registered."""
    # A previous attempt that died while logging may have left some member runs: replace them.
    for stale in client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        client.delete_run(stale.info.run_id)
    child_ids = []
    for member, (_, history) in zip(members, loaded):
        child = client.create_run(experiment, run_name=f"member-{member.index}", tags={
            "mlflow.parentRunId": parent, tracking.RUN_NAME_TAG: member.name,
            "model": member.job.model, "seed": str(member.job.seed), "dvc_stage": "ensemble",
        }).info.run_id
        tracking.log_params(client, child, {"seed": member.job.seed, "epochs": member.job.epochs,
                                            "train": member.job.recipe.model_dump()})
        for row in history:
            tracking.log_metrics(client, child, {k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        client.set_terminated(child)
        child_ids.append(child)

    scalars = {k: v for k, v in summary.items() if isinstance(v, float)}
    tracking.log_metrics(client, parent, scalars)
    for point in curve:
        tracking.log_metrics(client, parent, {"curve_top1_error": point["top1_error"],
                                              "curve_top5_error": point["top5_error"]}, step=point["members"])
    client.log_figure(parent, error_curve_figure(curve, summary), "error_vs_members.png")

    best = members[best_member(summary)]
    info = log_model(uri, child_ids[best.index], loaded[best.index][0], params.train.resolution)
    version = mlflow.register_model(info.model_uri, params.mlflow.registered_model)
    client.set_registered_model_alias(params.mlflow.registered_model, "best", version.version)


def best_member(summary: dict) -> int:
    """Lowest top-1 error; ties (common on a small validation set) go to top-5, then to the first member."""
    return min(range(summary["members"]), key=lambda i: (summary["member_top1_error"][f"member_{i}"],
                                                          summary["member_top5_error"][f"member_{i}"]))


def error_curve_figure(curve: list[dict], summary: dict):
    figure, axes = plt.subplots(figsize=(5, 3.5))
    ks = [p["members"] for p in curve]
    axes.plot(ks, [p["top1_error"] for p in curve], "o-", label="ensemble top-1")
    axes.plot(ks, [p["top5_error"] for p in curve], "s-", label="ensemble top-5")
    axes.axhline(summary["member_top1_error_mean"], ls="--", c="C0", alpha=0.5, label="mean member top-1")
    axes.set_xlabel("members averaged (first k)")
    axes.set_ylabel("validation error")
    axes.legend()
    figure.tight_layout()
    return figure


def print_summary(summary: dict, uri: str, experiment: str) -> None:
    print(f"\nEnsemble of {summary['members']} x {summary['model']} ({summary['combine']} averaging)")
    print(f"{'':24}{'top-1 error':>14}{'top-5 error':>14}")
    for key, top1 in summary["member_top1_error"].items():
        print(f"{key:24}{top1:>14.4f}{summary['member_top5_error'][key]:>14.4f}")
    mean_std = lambda k: f"{summary[k + '_mean']:.4f}+-{summary[k + '_std']:.4f}"  # noqa: E731
    print(f"{'members mean +- std':24}{mean_std('member_top1_error'):>15}{mean_std('member_top5_error'):>15}")
    print(f"{'ensemble':24}{summary['ensemble_top1_error']:>14.4f}{summary['ensemble_top5_error']:>14.4f}")
    print(f"{'gain over mean member':24}{summary['gain_top1']:>14.4f}{summary['gain_top5']:>14.4f}")
    print(f"\nMLflow: mlflow ui --backend-store-uri {uri}  then open "
          f"http://127.0.0.1:5000/#/experiments/{experiment}/runs")
