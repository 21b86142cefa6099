"""predict: the top-5 classes, with probabilities, of image files, from a trained model.

    predict --model models:/ensemble-best-member@best photo.jpg scan.png     # the MLflow registry
    predict --model outputs/train/alexnet2012/model.pt photo.jpg             # a train stage's output

An MLflow model (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model, models:/m-ID) is read from
mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the project's mlflow.db; it carries its classes
and validation transform as metadata. A model.pt is read with params.yaml (which model, its options)
and --data's dataset.json (the classes and how the images were stored). Images in any format the
preprocess stage accepts get the validation transform the model was evaluated with
(pipeline/data/transforms.py).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.transforms import UnusableImage, ValTransform
from pipeline.errors import InputError

TOP = 5
BATCH = 32


@dataclass(frozen=True)
class Predictor:
    forward: Callable[[torch.Tensor], torch.Tensor]  # normalised (B, 3, r, r) -> logits (B, classes)
    classes: list[str]
    transform: ValTransform

    @torch.no_grad()
    def top_classes(self, paths: list[Path]) -> list[list[tuple[str, float]]]:
        """Refuses the whole request, naming the file, before any prediction when one is not an image."""
        images = []
        for path in paths:
            try:
                images.append(self.transform(path))
            except UnusableImage as error:
                raise InputError(f"{path}: {error}") from None
        predictions = []
        for start in range(0, len(images), BATCH):
            probabilities = self.forward(torch.stack(images[start : start + BATCH])).float().softmax(dim=1)
            best = probabilities.topk(min(TOP, len(self.classes)), dim=1)
            predictions += [[(self.classes[i], p) for p, i in zip(values.tolist(), indices.tolist())]
                            for values, indices in zip(best.values, best.indices)]
        return predictions


def from_mlflow(uri: str, tracking_uri: str) -> Predictor:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        info = mlflow.models.get_model_info(uri)
        model = mlflow.pytorch.load_model(uri)
    except Exception as error:  # noqa: BLE001 - MLflow reports a missing model in many ways
        raise InputError(f"--model {uri}: not found in the MLflow store {tracking_uri} ({str(error).splitlines()[0]})") from None
    metadata = info.metadata or {}
    if "classes" not in metadata or "transform" not in metadata:
        raise InputError(f"--model {uri}: logged without its classes and transform (logged by another program?)")
    return Predictor(model, metadata["classes"], ValTransform(**metadata["transform"]))


def from_weights(path: Path, params_path: Path, data: Path, model_name: str | None) -> Predictor:
    from pipeline.config import load_params
    from pipeline.data.dataset import Dataset
    from pipeline.runs.identity import build_model

    params = load_params(params_path)
    dataset = Dataset.read(data)
    name = model_name or path.parent.name
    if name not in params.train.models:
        raise InputError(f"{path}: which model? pass --name, one of train.models {params.train.models}")
    model = build_model(name, dataset.num_classes, params.train.recipe())
    try:
        model.load_state_dict(torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True))
    except Exception as error:  # noqa: BLE001
        raise InputError(f"{path}: not the weights of {name} with {dataset.num_classes} classes ({error})") from None
    return Predictor(model.eval(), dataset.classes, ValTransform.for_data(dataset.preprocess, params.train.resolution))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an MLflow model URI (models:/..., runs:/...) or a model.pt")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="with a model.pt: the params it was trained with")
    parser.add_argument("--data", type=Path, default=Path("data/beton"), help="with a model.pt: the folder with dataset.json")
    parser.add_argument("--name", help="with a model.pt: the model's name (default: the name of its folder)")
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.model.startswith(("models:/", "runs:/")):
            import os

            from pipeline.config import load_params
            from pipeline.tracking import tracking_uri

            predictor = from_mlflow(args.model, tracking_uri(load_params(args.params).mlflow, os.environ))
        else:
            predictor = from_weights(Path(args.model), args.params, args.data, args.name)
        results = predictor.top_classes(args.images)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, best in zip(args.images, results):
        print(path)
        for rank, (name, probability) in enumerate(best, start=1):
            print(f"  {rank}  {name:24} {probability:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
