"""What the pipeline's processes import. Each Ray Train controller, ensemble member's trial and stage
driver is a new Python process that imports the project's training or scoring module (to unpickle its
work) but reads no data and builds no GoogLeNet or ResNet: FFCV, torchvision and scikit-learn would add
~6 s of CPU to each (docs/benchmarks.md, "What a process imports")."""

from __future__ import annotations

import subprocess
import sys

from pipeline.config import PROJECT_ROOT

LOADED_ONLY_WHEN_USED = {"ffcv", "torchvision", "sklearn"}


def test_processes_that_read_no_data_import_neither_ffcv_torchvision_nor_scikit_learn() -> None:
    modules = "pipeline.training.worker, pipeline.drivers.ensemble, pipeline.scoring.protocols, stages.train, stages.evaluate, stages.ensemble"
    check = f"import sys, {modules}; print(sorted({sorted(LOADED_ONLY_WHEN_USED)} & sys.modules.keys()))"
    found = subprocess.run([sys.executable, "-c", check], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
