"""An ImageNet preset through `dvc repro` on a small tree in ILSVRC-2012's layout: train/<wnid>/ folders,
a flat val/ labelled by the devkit's ground-truth file and meta.mat, photo-sized 500x375 JPEGs."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT, load_params
from tests._trees import WNIDS, class_folder_tree, flat_val_with_devkit
from tests.conftest import change_params, clean_copy
from tests.test_end_to_end import dvc, ran

PRESET = "params-imagenet-alexnet2012.yaml"
PHOTO = (500, 375)  # ILSVRC-2012's most common size
TRAIN_PER_CLASS, VAL_PER_CLASS = 45, 8  # 135 train images: one step of the preset's batch of 128
# What 2 CPU cores without a GPU cannot take from the preset: 8 GPU workers of 8 CPUs each, 90 epochs,
# and four more members; Ray is given 4 logical CPUs so a 2-worker member and its trial fit.
ON_THIS_MACHINE = {
    "train": {"epochs": 1},
    "ensemble": {"epochs": 1, "members": 1},
    "ray": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1, "local_num_cpus": 4},
}


def imagenet_shaped_tree(root):
    class_folder_tree(root, {"train": {wnid: TRAIN_PER_CLASS for wnid in WNIDS}}, size=PHOTO)
    val_wnids = [WNIDS[index % len(WNIDS)] for index in range(VAL_PER_CLASS * len(WNIDS))]
    flat_val_with_devkit(root, val_wnids, WNIDS, size=PHOTO)
    return root


@pytest.mark.timeout(1800)
def test_alexnet2012_preset_runs_end_to_end_on_an_imagenet_shaped_tree(tmp_path):
    tree = imagenet_shaped_tree(tmp_path / "ILSVRC2012")
    repo = clean_copy(tmp_path / "repo", {})
    shutil.copy(PROJECT_ROOT / PRESET, repo / "params.yaml")
    # The preset's relative devkit paths hold: only the root and the machine-size keys change.
    change_params(repo, ON_THIS_MACHINE | {"data": {"root": str(tree)}})
    params = load_params(repo / "params.yaml")

    output = dvc(repo, "repro")

    assert ran(output) == {"prepare", "preprocess", "train@alexnet2012", "evaluate@alexnet2012", "ensemble"}
    dataset = json.loads((repo / "data/beton/dataset.json").read_text())
    assert dataset["classes"] == sorted(WNIDS)
    assert dataset["preprocess"]["short_side"] == 260 and dataset["preprocess"]["max_resolution"] == 520
    evaluated = json.loads((repo / "outputs/evaluate/alexnet2012/metrics.json").read_text())
    assert {"center_top1_error", "ten_crop_top1_error", "ten_crop_top5_error"} <= set(evaluated)
    # Three classes: top-5 holds them all.
    assert evaluated["ten_crop_top5_error"] == 0
    ensemble = json.loads((repo / "outputs/ensemble/metrics.json").read_text())
    assert ensemble["protocol"] == "ten_crop" and ensemble["models"] == 2
    table = (repo / "outputs/ensemble/papers.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| alexnet2012 (evaluate@alexnet2012) | ten_crop | 1 |"))
    assert row.endswith("| 0.407 / 0.182 | Krizhevsky et al. 2012, Table 2 |")

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert runs and {run.info.status for run in runs} == {"FINISHED"}
    [trained] = [run for run in runs if run.data.tags.get("dvc_stage") == "train@alexnet2012"]
    assert trained.data.params["train.alexnet_groups"] == "2" and trained.data.params["train.pca_lighting_std"] == "0.1"
