"""The evaluate stage for one trained model: its validation error under every protocol of
evaluate.protocols, scored on the cluster (pipeline/scoring/protocols.py), with the per-image scores that the
ensemble stage combines, per-class errors and a confusion matrix; recorded on the model's MLflow run.

Outputs in --out: metrics.json ({model: {{protocol}_top1_error / _top5_error}}: under the model's name, so
that DVC names the columns by key alone), scores/scores-{protocol}.npz,
per_class.csv (each class's top-1 error per protocol), confusion.csv (actual and predicted class of
every image under the first protocol: DVC's confusion-matrix plot).
"""

from __future__ import annotations

import io
import json

import torch

from pipeline import tracking
from pipeline.config import Params
from pipeline.errors import InputError
from pipeline.runs.context import StageContext
from pipeline.runs.identity import RunSpec, train_spec
from pipeline.scoring.class_errors import (
    confusion_figure,
    confusion_matrix,
    confusion_rows,
    per_class_table,
)
from pipeline.scoring.protocols import Scores, score_on_cluster, scores_file
from pipeline.storage.location import Location


def evaluate_model(params: Params, model_name: str, data: Location, weights: Location, out: Location) -> dict:
    """The evaluate stage: returns the metrics it also writes to out/metrics.json."""
    state: dict[str, torch.Tensor] = {}  # filled by the check, before the cluster is joined
    context = StageContext.open(params, data, check=lambda dataset: state.update(
        load_weights(weights, train_spec(params, model_name, dataset))))
    # The train stage's run of this model: its name finds the MLflow run the evaluation joins.
    spec = context.train_spec(model_name)
    val = context.dataset.files["val"]
    [scores] = score_on_cluster([(spec, state)], data, context.data_cache, val.images, val.sha256,
                                params.evaluate.protocols, params, tasks=params.ray.num_workers)
    metrics = {f"{protocol}_{kind}_error": value for protocol, result in scores.items()
               for kind, value in zip(("top1", "top5"), result.errors())}
    write_outputs(out, model_name, scores, metrics, context.dataset.classes)
    log_to_mlflow(context, spec, scores, metrics)
    print_summary(model_name, scores, context.dataset.classes)
    return metrics


def load_weights(weights: Location, spec: RunSpec) -> dict[str, torch.Tensor]:
    """The train stage's model.pt, checked against the model the params describe before any scoring."""
    try:
        state = torch.load(io.BytesIO(weights.read_bytes()), map_location="cpu", weights_only=True)
        spec.build_model().load_state_dict(state)
    except Exception as error:
        raise InputError(f"{weights}: not the weights of {spec.model} with {spec.num_classes} classes ({error}); "
                         "run the train stage first") from None
    return state


def write_outputs(out: Location, model_name: str, scores: dict[str, Scores], metrics: dict, classes: list[str]) -> None:
    for protocol, result in scores.items():
        result.save(scores_file(out / "scores", protocol))
    (out / "metrics.json").write_text(json.dumps({model_name: metrics}, indent=2) + "\n")
    (out / "per_class.csv").write_text(per_class_table(scores, classes))
    first = next(iter(scores.values()))
    (out / "confusion.csv").write_text(confusion_rows(first.log_probs, first.labels, classes))


def log_to_mlflow(context: StageContext, spec: RunSpec, scores: dict[str, Scores], metrics: dict) -> None:
    """On the model's training run (a store without it gets a run of its own)."""
    store, classes = context.store, context.dataset.classes
    run = tracking.open_run(store, spec.name, context.tags(spec.model, f"evaluate@{spec.model}"), spec.mlflow_params(),
                            reuse_finished=True)
    tracking.log_metrics(store.client, run.id, metrics)
    tracking.log_data_inputs(store.client, run.id, context.data_inputs(splits=("val",)))
    store.client.log_text(run.id, per_class_table(scores, classes), "evaluation/per_class.csv")
    for protocol, result in scores.items():
        figure = confusion_figure(confusion_matrix(result.log_probs, result.labels, len(classes)), classes,
                                  f"{spec.model}, {protocol}")
        store.client.log_figure(run.id, figure, f"evaluation/confusion_{protocol}.png")
    if run.state == "new":
        store.client.set_terminated(run.id)


def print_summary(model_name: str, scores: dict[str, Scores], classes: list[str]) -> None:
    print(f"\n{model_name} on {len(next(iter(scores.values())).labels)} validation images, {len(classes)} classes")
    print(f"{'protocol':16}{'top-1 error':>14}{'top-5 error':>14}")
    for protocol, result in scores.items():
        top1, top5 = result.errors()
        print(f"{protocol:16}{top1:>14.4f}{top5:>14.4f}")
