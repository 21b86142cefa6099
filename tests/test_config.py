"""params.yaml validation: every mistake is reported with its key, before any work, with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.config import PROJECT_ROOT, ParamsError, load_params


def write(tmp_path, params: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_shipped_params_are_valid():
    params = load_params()
    assert params.data.source == "digits"


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("train", "lr", -0.01, "train.lr: Input should be greater than 0"),
        ("train", "epochs", 0, "train.epochs: Input should be greater than 0"),
        ("train", "lr", "0.01", "train.lr: Input should be a valid number"),
        ("train", "schedule", "linear", "train.schedule: got 'linear'; allowed: 'plateau', 'step' or 'cosine'"),
        ("train", "models", ["alexnet2012", "resnet51"], "unknown model 'resnet51'; known models: alexnet,"),
        ("train", "models", [], "train.models is empty"),
        ("train", "resolution", 40, "train.resolution=40 is below alexnet2012's minimum input size"),
        ("train", "momentum", 1.5, "train.momentum: Input should be less than 1"),
        ("train", "alexnet_groups", 3, "train.alexnet_groups: got 3; allowed: 1 or 2"),
        ("ensemble", "members", 0, "ensemble.members: Input should be greater than or equal to 1"),
        ("ensemble", "model", "vgg99", "ensemble.model: unknown model 'vgg99'"),
        ("ensemble", "combine", "median", "ensemble.combine: got 'median'; allowed: 'softmax' or 'logits'"),
        ("preprocess", "jpeg_quality", 101, "preprocess.jpeg_quality: Input should be less than or equal to 100"),
        ("preprocess", "write_mode", "png", "preprocess.write_mode: got 'png'"),
        ("data", "source", "cifar", "data.source: got 'cifar'; allowed: 'digits', 'imagenet', 'folder' or 'webdataset'"),
        ("data", "source", "imagenet", "data.root is required when data.source is 'imagenet'"),
        ("data", "val_ground_truth", "gt.txt", "data.val_ground_truth and data.devkit_meta go together"),
        ("preprocess", "seed", -1, "preprocess.seed: Input should be greater than or equal to 0"),
        ("data", "seed", -1, "data.seed: Input should be greater than or equal to 0"),
        ("ray", "num_workers", 0, "ray.num_workers: Input should be greater than or equal to 1"),
        ("ray", "use_gpu", "yes", "ray.use_gpu: Input should be a valid boolean"),
        ("mlflow", "experiment", "", "mlflow.experiment: String should have at least 1 character"),
        ("sweep", "space", {"learning_rate": {"choice": [0.1]}}, "sweep.space.learning_rate: not a key of the train"),
        ("sweep", "space", {"lr": {"grid": [0.01, -1]}}, "sweep.space.lr: -1 is refused: lr: Input should be greater"),
        ("sweep", "space", {"lr": {"loguniform": [0, 0.1]}}, "sweep.space.lr.loguniform: the low end must be above 0"),
        ("sweep", "space", {"lr": {"uniform": [0.1]}}, "sweep.space.lr.uniform: expected [low, high] with low < high"),
        ("sweep", "space", {"batch_size": {"uniform": [16, 64]}}, "train.batch_size is not one; list its values"),
        ("sweep", "num_workers", 3, "is not divisible by sweep.num_workers=3"),
        ("sweep", "space", {"lr": {"choice": [0.1], "grid": [0.2]}}, "sweep.space.lr: give exactly one of grid"),
        ("sweep", "space", {"lr": {"median": [0.1]}}, "sweep.space.lr.median: got 'median'; allowed: 'grid', 'choice'"),
        ("sweep", "grace_period", 5, "sweep.grace_period=5 exceeds sweep.epochs=4"),
    ],
)
def test_bad_value_names_the_key(tmp_path, params_dict, section, key, value, expected):
    params_dict[section][key] = value
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params_dict))
    assert expected in str(error.value)
    assert str(tmp_path / "params.yaml") in str(error.value)


def test_batch_not_divisible_by_workers(tmp_path, params_dict):
    params_dict["train"]["batch_size"] = 129
    with pytest.raises(ParamsError, match=r"train.batch_size=129 is not divisible by ray.num_workers=2"):
        load_params(write(tmp_path, params_dict))
    params_dict["train"]["batch_size"] = 32
    params_dict["ensemble"]["num_workers"] = 3
    with pytest.raises(ParamsError, match=r"train.batch_size=32 is not divisible by ensemble.num_workers=3"):
        load_params(write(tmp_path, params_dict))


def test_an_ensemble_of_one_model_is_refused(tmp_path, params_dict):
    params_dict["ensemble"]["members"] = 1
    params_dict["ensemble"]["include"] = []
    with pytest.raises(ParamsError, match=r"ensemble.members \+ len\(ensemble.include\) must be at least 2"):
        load_params(write(tmp_path, params_dict))


def test_ensemble_workers_default_to_the_training_workers(tmp_path, params_dict):
    params_dict["ensemble"]["num_workers"] = None
    assert load_params(write(tmp_path, params_dict)).ensemble_workers == params_dict["ray"]["num_workers"]


def test_unknown_and_missing_keys(tmp_path, params_dict):
    params_dict["train"]["learning_rate"] = 0.1
    del params_dict["train"]["lr"]
    params_dict["extra_section"] = {}
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params_dict))
    message = str(error.value)
    assert "train.learning_rate: unknown key" in message
    assert "train.lr: Field required" in message
    assert "extra_section: unknown key" in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="broken.yaml: not valid YAML"):
        load_params(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="expected a mapping of sections, got list"):
        load_params(tmp_path / "list.yaml")


@pytest.mark.parametrize("stage", ["prepare", "preprocess", "train"])
def test_stage_refuses_bad_params_before_any_work(tmp_path, params_dict, stage):
    params_dict["train"]["lr"] = -1
    path = write(tmp_path, params_dict)
    out = tmp_path / "out"
    arguments = {
        "prepare": ["--out", str(out)],
        "preprocess": ["--prepared", str(tmp_path / "prepared"), "--out", str(out), "--report", str(tmp_path / "r.json")],
        "train": ["--model", "alexnet2012", "--out", str(out)],
    }[stage]
    result = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--params", str(path), *arguments],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "train.lr: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("path", sorted(PROJECT_ROOT.glob("params*.yaml")), ids=lambda path: path.name)
def test_every_shipped_params_file_is_valid(path):
    params = load_params(path)
    if path.stem.startswith("params-imagenet-"):  # a preset trains the model it is named after, on ImageNet
        assert params.data.source == "imagenet" and params.train.models == [path.stem.removeprefix("params-imagenet-")]


def test_stored_images_too_small_for_validations_resize_are_refused(tmp_path, params_dict):
    params_dict["data"]["digits_image_size"] = 72  # validation resizes to 67 / (224/256) = 77 pixels
    with pytest.raises(ParamsError, match=r"data.digits_image_size / preprocess.max_resolution store images with a "
                                          r"72-pixel short side, .* = 77 before its centre crop"):
        load_params(write(tmp_path, params_dict))
    params_dict["data"] |= {"source": "folder", "root": "tree", "digits_image_size": 80}
    params_dict["preprocess"] |= {"max_resolution": 400, "short_side": 64}
    with pytest.raises(ParamsError, match=r"preprocess.short_side store images with a 64-pixel short side"):
        load_params(write(tmp_path, params_dict))


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_a_model_outside_train_models_is_refused_by_its_stages(tmp_path, stage):
    weights = ["--weights", "model.pt"] if stage == "evaluate" else []
    result = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--model", "vgg16", *weights, "--out", str(tmp_path / "out")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--model 'vgg16' is not in train.models" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
