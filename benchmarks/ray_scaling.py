"""Scaling of the train stage itself as Ray Train runs on a two-node cluster: one worker against two, with
plain data parallelism and with hybrid parallelism, FFCV reading the project's .beton files.

    python -m benchmarks.ray_scaling [--models alexnet2012 vgg11_bn] [--epochs 2] [--rounds 3] [--data data/beton]

The cluster is the one the tests start (tests/cluster.py): two raylets of one CPU each on 127.0.0.1,
stopped by their temp dir when the benchmark ends. Each setting is a real `python -m stages.train` run
of the model at params.yaml's recipe (its resolution, batch, augmentation), joined to the cluster with
RAY_ADDRESS, in a run store of its own (so nothing is reused) and logging to an MLflow server on
loopback, one worker per node. Its rate is the stage's steady_images_per_s (report.json: the epochs after
the first, which pays FFCV's compilation). Each round runs every setting once, in an order rotated round by
round (so no setting always runs first on a cold cluster); the medians are reported, and the scaling
efficiency is two workers' median rate over twice one worker's. --data defaults to the .beton files
`make run` writes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.config import PROJECT_ROOT
from tests.cluster import LocalCluster, mlflow_server

SETTINGS = {"1 worker": (1, "data"), "2 x data": (2, "data"), "2 x hybrid": (2, "hybrid")}


def stage_rate(cluster: LocalCluster, tracking: str, folder: Path, model: str, workers: int, parallelism: str,
               epochs: int, data: Path) -> float:
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["train"] |= {"models": [model], "epochs": epochs, "parallelism": parallelism}
    params["ensemble"]["include"] = []
    params["ray"] |= {"num_workers": workers, "cpus_per_worker": 1, "use_gpu": False,
                      "storage_path": str(folder / "ray_results")}
    params["mlflow"] |= {"tracking_uri": tracking, "experiment": f"ray-scaling-{folder.name}", "log_model": False}
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "stages.train", "--params", str(folder / "params.yaml"), "--model", model,
                    "--data", str(data), "--out", str(folder / "out")],
                   cwd=PROJECT_ROOT, env=cluster.env | {"RAY_ADDRESS": cluster.address}, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((folder / "out" / "report.json").read_text())["steady_images_per_s"]


def model_rates(cluster: LocalCluster, tracking: str, scratch: Path, model: str, arguments: argparse.Namespace
                ) -> dict[str, list[float]]:
    """Each setting's rate in every round, the settings' order rotated round by round."""
    names = list(SETTINGS)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(arguments.rounds):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            workers, parallelism = SETTINGS[name]
            folder = scratch / f"{model}-{round_index}-{names.index(name)}"
            rates[name].append(stage_rate(cluster, tracking, folder, model, workers, parallelism, arguments.epochs,
                                          arguments.data.resolve()))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["alexnet2012", "vgg11_bn"])
    parser.add_argument("--epochs", type=int, default=2, help="at least 2: the first pays FFCV's compilation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=PROJECT_ROOT / "data" / "beton")
    arguments = parser.parse_args()
    if not (arguments.data / "dataset.json").is_file():
        parser.error(f"--data {arguments.data}: no dataset.json there (`make run` writes data/beton)")
    if arguments.epochs < 2:
        parser.error("--epochs: at least 2")
    if arguments.rounds < 1:
        parser.error("--rounds: at least 1")
    with tempfile.TemporaryDirectory(prefix="ray-scaling-") as scratch:
        (Path(scratch) / "home").mkdir()
        cluster = LocalCluster.start(Path(scratch) / "home")
        tracking = None
        try:
            cluster.add_node("worker")
            # A file store would be this node's alone: the stage refuses one on a cluster of two.
            tracking = mlflow_server(Path(scratch), cluster.env)
            for model in arguments.models:
                rates = model_rates(cluster, tracking.url, Path(scratch), model, arguments)
                single = statistics.median(rates["1 worker"])
                for name, runs in rates.items():
                    rate = statistics.median(runs)
                    print(json.dumps({"model": model, "setting": name, "images_per_s": round(rate, 1),
                                      "rounds": [round(run, 1) for run in runs],
                                      "scaling_efficiency": round(rate / (SETTINGS[name][0] * single), 3)}),
                          flush=True)
        finally:
            if tracking:
                tracking.stop()
            cluster.stop()


if __name__ == "__main__":
    main()
