"""How much of the default pipeline's wall time is training and evaluation: the time a plain
single-process torch loop needs for the same work, divided by the wall time of `dvc repro` on a fresh
clone (what `make run` runs after setup), stage by stage and in all.

    python -m benchmarks.pipeline_efficiency [--runs 3] [--steps 6]

The work is what params.yaml asks for: every train.models run's epochs (training steps over the train
split, and the validation pass after each epoch), its evaluate@ protocols, and the ensemble's members
(their epochs and validation passes, and their scoring under ensemble.protocol). The plain loop's rate
for each model is measured on in-memory tensors in this process, one torch thread per core of the
machine (the cores the pipeline's workers share): training steps at the
recipe's batch and resolution, and forward passes at evaluate.batch_size. Its time for the work is the
images divided by those rates. The pipeline's part is the wall time of `dvc repro` in a fresh clone of
this checkout (its own stores: nothing is reused), --runs times one after the other; a stage's time runs
from DVC's "Running stage" line to the next one's (or the end). The efficiency reported is the median
run's (of an even count, the slower of the middle two).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import models
from pipeline.config import PROJECT_ROOT, Params, load_params
from pipeline.data.dataset import Dataset
from pipeline.scoring.protocols import image_streams
from pipeline.training.optim import sgd_step

MIRRORED = 2  # a view and its mirror image
STAGE_LINE = re.compile(r"Running stage '(.+)':")


@dataclass(frozen=True)
class Work:
    stage: str  # the DVC stage that does it
    model: str
    what: str  # "train" or "forward"
    images: float  # images at the recipe's resolution


@dataclass(frozen=True)
class PipelineRun:
    wall_s: float
    stage_s: dict[str, float]  # by DVC stage name, in the order they ran
    dataset: Dataset


def forward_passes(protocol: str, params: Params) -> float:
    """Forward passes at the recipe's resolution that one validation image costs under `protocol` (a
    pass at side s costs (s / resolution)^2 of one)."""
    resolution = params.train.resolution
    if protocol == "center":
        return 1
    if protocol == "center_mirror":
        return MIRRORED
    if protocol == "ten_crop":
        return 10
    return sum(MIRRORED * (side / resolution) ** 2 for side, _ in image_streams(protocol, resolution, params.evaluate.scales))


def workload(params: Params, train_images: int, val_images: int) -> list[Work]:
    work = []
    for model in params.train.models:
        work.append(Work(f"train@{model}", model, "train", params.train.epochs * train_images))
        work.append(Work(f"train@{model}", model, "forward", params.train.epochs * val_images))
        evaluations = sum(forward_passes(p, params) for p in params.evaluate.protocols)
        work.append(Work(f"evaluate@{model}", model, "forward", evaluations * val_images))
    members, ensemble = params.ensemble.members, params.ensemble
    work.append(Work("ensemble", ensemble.model, "train", members * ensemble.epochs * train_images))
    scoring = ensemble.epochs + forward_passes(ensemble.protocol, params)
    work.append(Work("ensemble", ensemble.model, "forward", members * scoring * val_images))
    return work


def plain_rate(model_name: str, what: str, params: Params, num_classes: int, steps: int) -> float:
    """Images per second of a plain loop on random in-memory tensors, after one warm-up step."""
    batch = params.train.batch_size if what == "train" else params.evaluate.batch_size
    resolution = params.train.resolution
    model = models.build(model_name, num_classes)
    images = torch.randn(batch, 3, resolution, resolution)
    labels = torch.randint(0, num_classes, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = nn.CrossEntropyLoss()
    model.train(what == "train")
    start = None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        if what == "train":
            sgd_step(model, optimizer, scaler, criterion, images, labels)
        else:
            with torch.no_grad():
                model(images)
    return steps * batch / (time.perf_counter() - start)


def run_pipeline() -> PipelineRun:
    """`dvc repro` in a fresh clone of this checkout's HEAD, with this venv's tools on the PATH: its wall
    time, each stage's, and the data set it wrote."""
    with tempfile.TemporaryDirectory(prefix="efficiency-") as folder:
        clone = Path(folder) / "project"
        subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(clone)], check=True)
        env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        env.pop("RAY_ADDRESS", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        starts: dict[str, float] = {}
        start = time.perf_counter()
        with subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as repro:
            for line in repro.stdout:
                if found := STAGE_LINE.match(line):
                    starts[found.group(1)] = time.perf_counter()
        wall = time.perf_counter() - start
        if repro.returncode:
            raise SystemExit(f"dvc repro failed (exit {repro.returncode}) in {clone}")
        ends = list(starts.values())[1:] + [start + wall]
        stage_s = {stage: end - begun for (stage, begun), end in zip(starts.items(), ends)}
        return PipelineRun(wall, stage_s, Dataset.read(clone / "data" / "beton"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="dvc repro runs, one after the other")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per rate, after one warm-up step")
    args = parser.parse_args(argv)

    params = load_params()
    runs = []
    for number in range(1, args.runs + 1):
        runs.append(run_pipeline())
        print(f"run {number}: dvc repro {runs[-1].wall_s:.0f} s: " +
              ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in runs[-1].stage_s.items()), flush=True)
    dataset = runs[0].dataset
    counts = {split: beton.images for split, beton in dataset.files.items()}
    torch.set_num_threads(os.cpu_count() or 1)
    plain: dict[str, float] = {}
    rates: dict[tuple[str, str], float] = {}
    for work in workload(params, counts["train"], counts["val"]):
        key = (work.model, work.what)
        if key not in rates:
            rates[key] = plain_rate(work.model, work.what, params, dataset.num_classes, args.steps)
        plain[work.stage] = plain.get(work.stage, 0.0) + work.images / rates[key]
        print(f"  {work.stage:22} {work.what:8} {work.images:10.0f} images at {rates[key]:7.1f} img/s "
              f"= {work.images / rates[key]:6.0f} s")
    median = sorted(runs, key=lambda run: run.wall_s)[len(runs) // 2]
    print(f"{'stage':22} {'plain s':>8} {'pipeline s (median run)':>24} {'efficiency':>10}")
    for stage, seconds in median.stage_s.items():
        print(f"{stage:22} {plain.get(stage, 0.0):8.0f} {seconds:24.0f} {plain.get(stage, 0.0) / seconds:10.2f}")
    total = sum(plain.values())
    print(f"plain loop {total:.0f} s; pipeline (dvc repro, fresh clone) {median.wall_s:.0f} s, the median of "
          f"{len(runs)} runs ({', '.join(f'{run.wall_s:.0f}' for run in runs)}); efficiency {total / median.wall_s:.2f}")


if __name__ == "__main__":
    main()
