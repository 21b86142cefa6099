"""Test-time protocols checked by hand, the evaluate stage on the cluster (every image once, scores that
later stages reuse, per-class errors, MLflow), and predictions from a model.pt or the MLflow registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ffcv.reader import Reader
from mlflow.tracking import MlflowClient

import models
from pipeline.data.dataset import Dataset
from pipeline.data.loaders import make_val_loader
from pipeline.drivers.evaluate import evaluate_model
from pipeline.drivers.predict import from_weights
from pipeline.runs.identity import train_spec
from pipeline.scoring.combine import combine, top_k_errors
from pipeline.scoring.protocols import (
    Scores,
    ScoresError,
    dense_logits,
    image_streams,
    probabilities,
    score_share,
    scores_file,
)
from pipeline.storage.location import Location
from tests.conftest import PROJECT_ROOT, run_predict

PROTOCOLS = ["center", "center_mirror", "ten_crop", "multi_scale"]


def test_ten_crop_is_the_mean_of_the_ten_crops_softmaxes():
    torch.manual_seed(0)
    model = models.build("lenet5", 7).eval()
    images = torch.randn(2, 3, 37, 37)  # S = round(32 * 256/224) = 37
    assert image_streams("ten_crop", 32, [256]) == [(37, 1.0)]
    # Corners at (0, 0), (0, 5), (5, 0), (5, 5) and the centre at (2, 2) of a 37-pixel square, 32 wide.
    patches = [images[:, :, y:y + 32, x:x + 32] for y, x in [(0, 0), (0, 5), (5, 0), (5, 5), (2, 2)]]
    patches += [torch.flip(patch, dims=[3]) for patch in patches]
    expected = sum(torch.softmax(model(patch), dim=1) for patch in patches) / 10
    with torch.no_grad():
        assert torch.allclose(probabilities("ten_crop", model, [images], 32), expected, atol=1e-6)


def test_center_mirror_is_the_mean_of_the_crop_and_its_mirror():
    torch.manual_seed(1)
    model = models.build("lenet5", 5).eval()
    images = torch.randn(3, 3, 32, 32)
    expected = (torch.softmax(model(images), dim=1) + torch.softmax(model(torch.flip(images, dims=[3])), dim=1)) / 2
    with torch.no_grad():
        assert torch.allclose(probabilities("center_mirror", model, [images], 32), expected, atol=1e-6)


def test_dense_evaluation_is_the_classifier_on_every_window():
    """LeNet-5 at 48 px has a 9 x 9 feature map; its classifier reads 5 x 5 windows: 25 of them."""
    torch.manual_seed(2)
    model = models.build("lenet5", 4).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        features = model.features(images)
        assert features.shape[-2:] == (9, 9)
        windows = [model.classifier(features[:, :, y:y + 5, x:x + 5].flatten(1)) for y in range(5) for x in range(5)]
        assert torch.allclose(dense_logits(model, images), torch.stack(windows).mean(dim=0), atol=1e-5)
        # At the native size the map is one window: dense evaluation is the model's own forward pass.
        native = torch.randn(2, 3, 32, 32)
        assert torch.allclose(dense_logits(model, native), model(native), atol=1e-6)


def test_models_that_pool_globally_are_dense_as_they_are():
    torch.manual_seed(3)
    model = models.build("resnet18", 6).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dense_logits(model, images), model(images))


def test_scores_round_trip_and_refuse_another_validation_set(tmp_path):
    scores = Scores("ten_crop", np.log(np.full((3, 4), 0.25)).astype(np.float16), np.array([0, 1, 3]), "a" * 64)
    location = Location.local(tmp_path / "scores-ten_crop.npz")
    scores.save(location)
    loaded = Scores.load(location, "a" * 64)
    assert np.array_equal(loaded.log_probs, scores.log_probs) and loaded.protocol == "ten_crop"
    with pytest.raises(ScoresError, match=r"scores-ten_crop.npz: scores of another validation set"):
        Scores.load(location, "b" * 64)
    (tmp_path / "broken.npz").write_bytes(b"not numpy")
    with pytest.raises(ScoresError, match=r"broken.npz: not readable as scores"):
        Scores.load(Location.local(tmp_path / "broken.npz"), "a" * 64)


@pytest.fixture(scope="module")
def evaluated(trained_run, digits_tree):
    """The shared alexnet2012 run evaluated under every protocol by two Ray tasks."""
    params = trained_run["params"]
    # Two scales near the training crop's keep multi_scale's dense passes cheap: 67 and 77 pixels.
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"protocols": PROTOCOLS, "scales": [224, 256]})})
    betons = digits_tree / "beton"
    out = trained_run["folder"] / "evaluate"
    metrics = evaluate_model(params, "alexnet2012", Location.local(betons),
                             Location.local(trained_run["out"] / "model.pt"), Location.local(out))
    return {"params": params, "betons": betons, "out": out, "metrics": metrics, "dataset": Dataset.read(betons)}


def saved(evaluated, protocol: str) -> Scores:
    return Scores.load(scores_file(Location.local(evaluated["out"] / "scores"), protocol),
                       evaluated["dataset"].files["val"].sha256)


@pytest.mark.slow
def test_every_validation_image_is_scored_once_by_two_tasks(evaluated):
    labels = Reader(str(evaluated["betons"] / "val.beton")).metadata["f1"]
    for protocol in PROTOCOLS:
        scores = saved(evaluated, protocol)
        assert scores.log_probs.shape == (len(labels), 10) and scores.log_probs.dtype == np.float16
        assert np.array_equal(scores.labels, labels), f"{protocol}: images lost, repeated or out of order"
        assert evaluated["metrics"][f"{protocol}_top1_error"] == pytest.approx(scores.errors()[0])


def fresh_center_log_probs(evaluated, trained_run) -> torch.Tensor:
    """What the training's own validation pass computes, in this process, in one pass."""
    spec = train_spec(evaluated["params"], "alexnet2012", evaluated["dataset"])
    model = spec.build_model()
    model.load_state_dict(torch.load(trained_run["out"] / "model.pt", weights_only=True))
    loader = make_val_loader(evaluated["betons"] / "val.beton", batch_size=64, resolution=spec.recipe.resolution,
                             num_threads=2, distributed=False)
    with torch.no_grad():
        return torch.cat([model.eval()(images).log_softmax(dim=1) for images, _ in loader])


@pytest.mark.slow
def test_combining_saved_scores_equals_combining_fresh_ones(evaluated, trained_run):
    labels = torch.from_numpy(saved(evaluated, "center").labels)
    fresh_center = fresh_center_log_probs(evaluated, trained_run)
    spec = train_spec(evaluated["params"], "alexnet2012", evaluated["dataset"])
    weights = torch.load(trained_run["out"] / "model.pt", weights_only=True)
    fresh_ten = score_share([spec], [ray.put(weights)], Location.local(evaluated["betons"]), Path("/unused"),
                            ["ten_crop"], [256], 50, list(range(len(labels))), 2)[0]["ten_crop"][0]
    fresh = torch.stack([fresh_center, torch.from_numpy(fresh_ten.astype(np.float32))])
    stored = torch.stack([torch.from_numpy(saved(evaluated, p).log_probs.astype(np.float32)) for p in ("center", "ten_crop")])
    assert torch.allclose(stored, fresh, atol=0.02)  # float16 storage
    for rule in ("softmax", "logits"):
        from_stored, from_fresh = combine(stored, rule), combine(fresh, rule)
        assert torch.allclose(from_stored, from_fresh, atol=0.02), rule
        # The predictions agree wherever float16's rounding cannot swap the two best classes.
        best, second = from_fresh.topk(2, dim=1).values.unbind(1)
        decided = best - second > 0.04
        assert decided.float().mean() > 0.5  # most images: the comparison is not empty
        assert torch.equal(from_stored.argmax(1)[decided], from_fresh.argmax(1)[decided]), rule
        assert top_k_errors(from_stored[decided], labels[decided]) == top_k_errors(from_fresh[decided], labels[decided])


@pytest.mark.slow
def test_one_task_scores_several_models_each_as_if_alone(evaluated, trained_run):
    """The ensemble scores all its members in one task: the loaders a task builds once must give each
    model the images it would get alone."""
    spec = train_spec(evaluated["params"], "alexnet2012", evaluated["dataset"])
    weights = torch.load(trained_run["out"] / "model.pt", weights_only=True)
    other = {key: value + 0.01 * torch.randn_like(value) if value.is_floating_point() else value
             for key, value in weights.items()}
    indices = list(range(40))

    def scores(models: list[dict]) -> list[np.ndarray]:
        parts = score_share([spec] * len(models), [ray.put(model) for model in models],
                            Location.local(evaluated["betons"]), Path("/unused"), ["center", "ten_crop"], [256], 16,
                            indices, 2)
        return [part[protocol][0] for part in parts for protocol in ("center", "ten_crop")]

    together, alone = scores([weights, other]), scores([weights]) + scores([other])
    for both, one in zip(together, alone, strict=True):
        assert np.array_equal(both, one)
    assert not np.array_equal(together[0], together[2])  # the two models differ: the check is not empty


@pytest.mark.slow
def test_outputs_per_class_errors_and_mlflow(evaluated, trained_run):
    out, classes = evaluated["out"], evaluated["dataset"].classes
    [(model, metrics)] = json.loads((out / "metrics.json").read_text()).items()
    assert model == "alexnet2012" and set(metrics) == {
        f"{protocol}_{kind}_error" for protocol in PROTOCOLS for kind in ("top1", "top5")}
    per_class = (out / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,images,center_top1_error,center_mirror_top1_error,ten_crop_top1_error,multi_scale_top1_error"
    assert [row.split(",")[0] for row in per_class[1:]] == classes
    assert sum(int(row.split(",")[1]) for row in per_class[1:]) == 360
    assert len((out / "confusion.csv").read_text().splitlines()) == 1 + 360
    client = MlflowClient(trained_run["params"].mlflow.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                             filter_string="tags.dvc_stage = 'train@alexnet2012'")[0]
    assert run.data.metrics["ten_crop_top1_error"] == pytest.approx(metrics["ten_crop_top1_error"])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/per_class.csv", "evaluation/confusion_ten_crop.png"} <= artifacts


def raw_val_images(betons: Path, count: int) -> list[int]:
    """Validation samples the .beton stores as raw pixels: their stored pixels are what predict computes."""
    modes = Reader(str(betons / "val.beton")).metadata["f0"]["mode"]
    return [int(index) for index in np.flatnonzero(modes == 1)[:count]]


@pytest.mark.slow
def test_predict_top1_matches_the_evaluation(evaluated, trained_run, digits_tree):
    predictor = from_weights(trained_run["out"] / "model.pt", trained_run["folder"] / "params.yaml",
                             evaluated["betons"], "alexnet2012")
    samples = [line.split(",")[0] for line in (digits_tree / "prepared" / "val.csv").read_text().splitlines()[1:]]
    indices = raw_val_images(evaluated["betons"], 8)
    paths = [digits_tree / "prepared" / "images" / samples[index] for index in indices]
    center = saved(evaluated, "center")
    predicted = predictor.top_classes(paths)
    for index, best in zip(indices, predicted):
        assert best[0][0] == evaluated["dataset"].classes[int(center.log_probs[index].argmax())]
        assert best[0][1] == pytest.approx(float(np.exp(center.log_probs[index].astype(np.float32).max())), abs=0.01)


@pytest.mark.slow
def test_predict_command_and_its_refusals(trained_run, digits_tree, tmp_path):
    image = next((digits_tree / "prepared" / "images" / "val" / "digit_4").iterdir())
    weights = ["--model", str(trained_run["out"] / "model.pt"), "--name", "alexnet2012", "--params",
               str(trained_run["folder"] / "params.yaml"), "--data", str(digits_tree / "beton")]
    by_weights = run_predict(*weights, str(image))
    assert by_weights.returncode == 0, by_weights.stderr
    lines = by_weights.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 6 and lines[1].split()[1].startswith("digit_")

    missing = run_predict("--model", "models:/no-such-model@best", "--params", str(trained_run["folder"] / "params.yaml"),
                          str(image))
    assert missing.returncode == 2 and "--model models:/no-such-model@best: not found" in missing.stderr


# Loads the logged model with MLflow alone: the project's folder (which the venv's editable install puts
# on sys.path) is taken off it first.
LOAD_WITHOUT_THE_PROJECT = """
import importlib.util, sys
sys.path = [path for path in sys.path if path not in (sys.argv[1], "", ".")]
assert importlib.util.find_spec("pipeline") is None and importlib.util.find_spec("models") is None
import mlflow, numpy
mlflow.set_tracking_uri(sys.argv[2])
model = mlflow.pyfunc.load_model(sys.argv[3])
info = mlflow.models.get_model_info(sys.argv[3])
side = info.metadata["transform"]["resolution"]
print(model.predict(numpy.zeros((3, 3, side, side), dtype=numpy.float32)).shape, len(info.metadata["classes"]))
"""


@pytest.mark.slow
def test_logged_model_loads_without_the_project_and_takes_any_batch(trained_run, tmp_path):
    uri = trained_run["params"].mlflow.tracking_uri
    client = MlflowClient(uri)
    [model] = client.search_logged_models([client.get_experiment_by_name("tests").experiment_id])
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_THE_PROJECT, str(PROJECT_ROOT), uri,
                             f"models:/{model.model_id}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split("\n")[-2] == "(3, 10) 10", "a batch of 3 (the example's is 2), 10 classes"


@pytest.mark.slow
def test_evaluate_refuses_missing_weights_in_one_line(trained_run, digits_tree, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "stages.evaluate", "--params", str(trained_run["folder"] / "params.yaml"), "--model",
         "alexnet2012", "--data", str(digits_tree / "beton"), "--weights", str(tmp_path / "model.pt"),
         "--out", str(tmp_path / "out")], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {tmp_path / 'model.pt'}: not the weights of alexnet2012")
    assert not (tmp_path / "out").exists()
