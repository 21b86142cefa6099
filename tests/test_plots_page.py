"""`dvc plots show` with the project's page template (.dvc/config: plots.html_template) draws its charts
in headless Chromium with the network cut; DVC's own page, which loads its scripts from a CDN, does not.
The end-to-end test opens the page of a real run the same way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT
from pipeline.drivers.train import csv_table
from pipeline.training.progress import STEP_COLUMNS
from tests.conftest import plots_drawn_offline

# The two plots of a train stage: the validation error per epoch and the training loss within epochs.
PLOTS = """plots:
  - history.csv:
      x: epoch
      y: val_top1_error
  - steps.csv:
      x: epoch
      y: train_loss
"""


def plots_page(repo: Path, template: bool) -> Path:
    """The page `dvc plots show` writes for a repository with a run's history.csv and steps.csv, with the
    project's DVC config (and so its template) or without it."""
    repo.mkdir()
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, check=True, env=env)
    if template:
        shutil.copy(PROJECT_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
        shutil.copytree(PROJECT_ROOT / "templates", repo / "templates")
    (repo / "dvc.yaml").write_text(PLOTS)
    history = [{"epoch": epoch, "val_top1_error": 0.9 / (epoch + 1)} for epoch in range(3)]
    (repo / "history.csv").write_text(csv_table(history, ["epoch", "val_top1_error"]))
    steps = [{"step": step, "epoch": step / 10, "train_loss": 2.3 / step ** 0.5} for step in range(1, 31)]
    (repo / "steps.csv").write_text(csv_table(steps, STEP_COLUMNS))
    subprocess.run(["dvc", "plots", "show", "-o", "page"], cwd=repo, check=True, env=env, capture_output=True)
    return repo / "page" / "index.html"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_plots_draw_without_network_and_dvc_default_page_does_not(tmp_path):
    drawn = plots_drawn_offline(plots_page(tmp_path / "project", template=True))
    assert len(drawn) == 2, drawn
    with pytest.raises(AssertionError, match="asked the network"):
        plots_drawn_offline(plots_page(tmp_path / "default", template=False))
