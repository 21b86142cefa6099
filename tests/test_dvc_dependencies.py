"""dvc.yaml against the code: each stage depends on every project package it imports and on exactly the
params keys that shape its outputs (what names a training run, for the stages that train)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml

import models
from pipeline.config import (
    PROJECT_ROOT,
    EnsembleParams,
    EvaluateParams,
    PreprocessParams,
    Recipe,
    load_params,
)
from pipeline.runs.identity import RunSpec
from tests.conftest import FAST_MODEL

# The main pipeline's stages and the sweep's (sweeps/dvc.yaml, run apart).
DVC_YAML = {name: stage for path in ("dvc.yaml", "sweeps/dvc.yaml")
            for name, stage in yaml.safe_load((PROJECT_ROOT / path).read_text())["stages"].items()}
PROJECT_PACKAGES = ("pipeline", "models", "stages")
# Runs the stage's main with its dvc.yaml arguments but a params file that does not exist, so it imports
# what it imports before its work (some stages import inside main) and stops at reading the params; then
# imports, until none is left, what those modules import inside functions (the stage's Ray workers and
# tasks import FFCV's loaders there, the model registry a model's module when it builds it), within the
# project packages already loaded: pipeline/config.py imports the registry only to check model names, so
# a stage that does not load it otherwise depends on no model.
LIST_IMPORTS = """
import ast, contextlib, importlib, io, json, pathlib, sys
with contextlib.redirect_stderr(io.StringIO()):
    assert importlib.import_module(sys.argv[1]).main(sys.argv[2:]) == 2
root = pathlib.Path.cwd().resolve()
packages = %r

def project_files():
    paths = {pathlib.Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
    return {p for p in paths if p.is_relative_to(root) and p.relative_to(root).parts[0] in packages}

def imported_names(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)

seen = set()
while unread := project_files() - seen:
    for path in unread:
        seen.add(path)
        for name in imported_names(path):
            if name.split(".")[0] in packages and name.split(".")[0] in sys.modules and name not in sys.modules:
                with contextlib.suppress(ModuleNotFoundError):  # `from module import name`: not a module
                    importlib.import_module(name)
print(json.dumps(sorted(str(p.relative_to(root)) for p in seen)))
""" % (PROJECT_PACKAGES,)


def stage_definition(name: str) -> dict:
    stage = DVC_YAML[name]
    return stage["do"] if "foreach" in stage else stage


def dependency(path: str) -> str:
    """What a stage that imports `path` depends on: the package of one concept (a folder of pipeline/, the
    models) as a whole; the modules at the top of pipeline/, the stage drivers and the stage scripts one
    by one, so that a change to one stage's driver or script reruns that stage only."""
    parts = Path(path).parts
    if parts[0] == "models":
        return "models"
    one_concept = parts[0] == "pipeline" and len(parts) > 2 and parts[1] != "drivers"
    return "/".join(parts[:2]) if one_concept else path


def imported_files(name: str) -> set[str]:
    stage = stage_definition(name)
    module, *arguments = stage["cmd"].replace("${item}", FAST_MODEL).split("python -m ", 1)[1].split()
    arguments[arguments.index("--params") + 1] = "/nonexistent/params.yaml"
    imported = subprocess.run([sys.executable, "-c", LIST_IMPORTS, module, *arguments], cwd=PROJECT_ROOT,
                              check=True, capture_output=True, text=True).stdout
    return set(json.loads(imported))


@pytest.mark.parametrize("name", sorted(DVC_YAML))
def test_each_stage_depends_on_every_project_package_it_imports(name):
    code = {dep for dep in stage_definition(name)["deps"] if Path(dep).parts[0] in PROJECT_PACKAGES}
    assert code == {dependency(path) for path in imported_files(name)}, f"dvc.yaml stage {name}"


def test_a_training_stage_does_not_depend_on_the_layer_table_or_another_stage():
    code = set(stage_definition("train")["deps"])
    assert "pipeline/reports" not in code and "pipeline/drivers/evaluate.py" not in code
    assert {"models", "pipeline/training", "stages/train.py"} <= code


def keys_any_run_uses() -> set[str]:
    """Every recipe key some run depends on, over every model, schedule and device."""
    params = load_params()
    schedules = get_args(Recipe.model_fields["schedule"].annotation)
    keys = set()
    for model, schedule, use_gpu in itertools.product(models.names(), schedules, (False, True)):
        # Several workers, split and compressed: the settings of how workers share a step name runs too.
        shared = {"schedule": schedule, "parallelism": "hybrid", "gradient_compression": "powersgd"}
        spec = RunSpec(model=model, num_classes=10, recipe=params.train.recipe().model_copy(update=shared),
                       seed=0, epochs=1, num_workers=2, use_gpu=use_gpu, data_sha256={})
        keys |= set(spec.recipe_keys())
    return keys


def test_training_stages_depend_on_exactly_what_names_a_run():
    device_and_workers = {"ray.num_workers", "ray.use_gpu"}
    recipe = {f"train.{key}" for key in keys_any_run_uses()}
    assert set(stage_definition("train")["params"]) == recipe | {"train.epochs", "train.seed"} | device_and_workers
    # Members have seeds and epochs of their own; max_concurrent says how many train at once, not what.
    ensemble_keys = {f"ensemble.{key}" for key in EnsembleParams.model_fields} - {"ensemble.max_concurrent"}
    # Members are scored with ensemble.protocol, whose multi_scale reads evaluate.scales.
    assert set(DVC_YAML["ensemble"]["params"]) == recipe | ensemble_keys | device_and_workers | {"evaluate.scales"}


def test_the_sweep_depends_on_its_section_and_what_names_its_trials():
    # The sweep's section whole: max_concurrent too, since which trials ASHA stops depends on their order.
    recipe = {f"train.{key}" for key in keys_any_run_uses()}
    assert set(stage_definition("sweep")["params"]) == recipe | {"sweep", "train.seed", "ray.num_workers", "ray.use_gpu"}


def test_evaluation_depends_on_what_changes_its_scores():
    # Not evaluate.batch_size: how many images a batch holds does not change an image's score.
    shaping = {f"evaluate.{key}" for key in EvaluateParams.model_fields} - {"evaluate.batch_size"}
    model = {"train.resolution", "train.alexnet_groups", "train.amp", "ray.use_gpu"}
    assert set(stage_definition("evaluate")["params"]) == shaping | model


def test_preprocess_depends_on_the_settings_that_shape_the_files():
    # The bytes are the same for any worker count; the skip threshold decides only whether the stage fails.
    shaping = set(PreprocessParams.model_fields) - {"num_workers", "max_skipped_fraction"}
    assert set(stage_definition("preprocess")["params"]) == {f"preprocess.{key}" for key in shaping}


def test_no_stage_depends_on_tracking_or_fault_tolerance_settings():
    for name in DVC_YAML:
        params = stage_definition(name)["params"]
        assert not [key for key in params if key.split(".")[0] == "mlflow" or key in {
            "ray.max_failures", "ray.checkpoints_to_keep", "ray.storage_path", "ray.keep_finished_runs",
            "train.models", "preprocess.num_workers"}], name


@pytest.mark.parametrize("path", sorted(PROJECT_ROOT.glob("params*.yaml")), ids=lambda path: path.name)
def test_every_shipped_params_file_holds_every_key_the_stages_read(path):
    """DVC reads the keys a stage lists from the params file itself: a key the code defaults but the file
    lacks stops `dvc repro` with a preset copied to params.yaml."""
    shipped = yaml.safe_load(path.read_text())
    for name in DVC_YAML:
        for key in stage_definition(name)["params"]:
            section, _, field = key.partition(".")
            assert section in shipped and (not field or field in shipped[section]), f"{path.name} lacks {key}"
