"""predict: the top-5 classes, with probabilities, of image files, from a trained model.

    predict --model models:/best-model@best photo.jpg scan.png        # the MLflow registry
    predict --model outputs/train/vgg11_bn/model.pt photo.jpg         # a train stage's output

An MLflow model (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model, models:/m-ID) is read from
mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else the project's mlflow.db; it carries its classes
and validation transform as metadata. A model.pt is read with params.yaml (which model, its options)
and --data's dataset.json (the classes and how the images were stored). Images in any format the
preprocess stage accepts get the validation transform the model was evaluated with
(pipeline/data/transforms.py), whatever their size (a 1x1 image is enlarged like any other).

Each file gets its lines in the order given: its top-5, or why it could not be read; the exit status is
1 when any could not be read (the rest are still predicted), 2 when nothing could be (no model).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.transforms import UnusableImage, ValTransform
from pipeline.errors import InputError

TOP = 5
BATCH = 32


Prediction = list[tuple[str, float]]  # (class, probability), best first


@dataclass(frozen=True)
class Predictor:
    forward: Callable[[torch.Tensor], torch.Tensor]  # normalised (B, 3, r, r) -> logits (B, classes)
    classes: list[str]
    transform: ValTransform

    @torch.no_grad()
    def top_classes(self, paths: list[Path]) -> list[Prediction | UnusableImage]:
        """Per path, in order: its top classes, or why it is not an image (the others are predicted)."""
        found: list[Prediction | UnusableImage] = []
        images: dict[int, torch.Tensor] = {}
        for index, path in enumerate(paths):
            try:
                images[index] = self.transform(path)
                found.append([])
            except UnusableImage as error:
                found.append(error)
        readable = list(images)
        for start in range(0, len(readable), BATCH):
            batch = readable[start : start + BATCH]
            probabilities = self.forward(torch.stack([images[i] for i in batch])).float().softmax(dim=1)
            best = probabilities.topk(min(TOP, len(self.classes)), dim=1)
            for index, values, indices in zip(batch, best.values, best.indices):
                found[index] = [(self.classes[i], p) for p, i in zip(values.tolist(), indices.tolist())]
        return found


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

    if not path.is_file():
        raise InputError(f"--model {path}: no such file (a train stage's model.pt, e.g. outputs/train/vgg11_bn/"
                         "model.pt, or an MLflow model URI such as models:/best-model@best)")
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
    """Exit status 0: every image predicted; 1: some could not be read (each says why, the others are
    predicted); 2: nothing predicted (no model, bad arguments)."""
    parser = argparse.ArgumentParser(prog="predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an MLflow model URI (models:/..., runs:/...) or a model.pt")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="with a model.pt: the params it was trained with")
    parser.add_argument("--data", type=Path, default=Path("data/beton"), help="with a model.pt: the folder with dataset.json")
    parser.add_argument("--name", help="with a model.pt: the model's name (default: the name of its folder)")
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        results = load_predictor(args).top_classes(args.images)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, found in zip(args.images, results):
        print(path)
        if isinstance(found, UnusableImage):
            print(f"  not predicted: {found}")
            continue
        for rank, (name, probability) in enumerate(found, start=1):
            print(f"  {rank}  {name:24} {probability:.4f}")
    failed = [path for path, found in zip(args.images, results) if isinstance(found, UnusableImage)]
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} files could not be read as images: "
              f"{', '.join(map(str, failed))}", file=sys.stderr)
    return 1 if failed else 0


def load_predictor(args: argparse.Namespace) -> Predictor:
    if args.model.startswith(("models:/", "runs:/")):
        from pipeline.config import load_params
        from pipeline.tracking import tracking_uri

        return from_mlflow(args.model, tracking_uri(load_params(args.params).mlflow, os.environ))
    return from_weights(Path(args.model), args.params, args.data, args.name)


if __name__ == "__main__":
    sys.exit(main())
