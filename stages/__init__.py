"""One thin entry point per DVC stage: parse arguments, load params, call the stage's driver in
pipeline/drivers/."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ExplainedFailure, InputError

# Checked before any stage imports them: DVC runs stage commands with whatever `python` is first on
# the PATH, and `.venv/bin/dvc ...` alone does not put the venv's python there.
PROJECT_PACKAGES = ("torch", "ffcv", "ray", "mlflow", "pydantic", "yaml")


def require_project_environment() -> None:
    missing = [name for name in PROJECT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {sys.executable} lacks the project's packages ({', '.join(missing)}); activate the "
              "project's environment first: source .venv/bin/activate (`make setup` creates it)", file=sys.stderr)
        sys.exit(2)


require_project_environment()


def stage_parser(description: str, *, model: bool = False, data: bool = False) -> argparse.ArgumentParser:
    """The arguments stages share: --params always, --model for the stages of one trained model, --data
    for the stages that read the .beton files."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    if model:
        parser.add_argument("--model", required=True, help="one of params.yaml's train.models")
    if data:
        parser.add_argument("--data", default="data/beton", help="folder with dataset.json, train.beton and val.beton")
    return parser


def trained_model_params(args: argparse.Namespace):
    """params.yaml for the stage of one trained model (--model), which must be one of train.models."""
    from pipeline.config import load_params

    params = load_params(args.params)
    params.check_trained_model(args.model)
    return params


def run_stage(stage: Callable[[], object]) -> int:
    """Runs a stage; bad input becomes one line on stderr and exit status 2 instead of a traceback, an
    explained failure one line and status 1, and an interruption (Ctrl-C, or SIGTERM, which
    pipeline.tracking turns into one) exits with 130."""
    try:
        stage()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ExplainedFailure as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ray Train re-raises a plain KeyboardInterrupt, so which signal it was is lost by here.
        print("interrupted", file=sys.stderr)
        return 130
    return 0
