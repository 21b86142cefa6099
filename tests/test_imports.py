"""What the pipeline's modules and processes import.

The packages import one way, in the order docs/architecture.md gives, and no stage driver imports another.
Each Ray Train controller, ensemble member's trial and stage
driver is a new Python process that imports the project's training or scoring module (to unpickle its
work) but reads no data and builds no GoogLeNet or ResNet: FFCV, torchvision and scikit-learn would add
~6 s of CPU to each (docs/benchmarks.md, "What a process imports")."""

from __future__ import annotations

import ast
import subprocess
import sys

from pipeline.config import PROJECT_ROOT

# docs/architecture.md's order: a package imports only those before it.
LAYERS = ["models", "errors", "config", "storage", "data", "tracking", "runs", "scoring", "training", "drivers"]

LOADED_ONLY_WHEN_USED = {"ffcv", "torchvision", "sklearn"}


def test_processes_that_read_no_data_import_neither_ffcv_torchvision_nor_scikit_learn() -> None:
    modules = "pipeline.training.worker, pipeline.drivers.ensemble, pipeline.scoring.protocols, stages.train, stages.evaluate, stages.ensemble"
    check = f"import sys, {modules}; print(sorted({sorted(LOADED_ONLY_WHEN_USED)} & sys.modules.keys()))"
    found = subprocess.run([sys.executable, "-c", check], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def imports_of(path) -> set[str]:
    """The project modules a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("pipeline", "models")}


def layer(module: str) -> str:
    parts = module.split(".")
    return "models" if parts[0] == "models" else parts[1] if len(parts) > 1 else "pipeline"


def test_packages_import_in_one_direction_and_drivers_not_each_other():
    files = sorted(PROJECT_ROOT.glob("pipeline/**/*.py")) + sorted(PROJECT_ROOT.glob("models/*.py"))
    for path in files:
        module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        own = layer(module)
        for name in imports_of(path):
            other = layer(name)
            if own == "reports":
                # The results summary reads params.yaml to know which outputs to show.
                assert other in ("models", "config"), f"{module} imports {name}"
            elif other in LAYERS and own in LAYERS:
                assert LAYERS.index(other) <= LAYERS.index(own), f"{module} imports {name}: against {LAYERS}"
            if own == "drivers" and other == "drivers":
                assert name.startswith(module), f"driver {module} imports another driver: {name}"
