"""Fixtures shared by the test modules: params files, one local Ray cluster, small real FFCV files."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import PROJECT_ROOT, Params, PreprocessParams, load_params
from pipeline.data.beton import write_beton
from pipeline.runs.store import RAY_SNAPSHOT

# The machine has 2 cores; Ray is given 4 logical CPUs so 2 training workers plus Ray Train's
# controller and Tune trials fit at once (they mostly wait on each other).
TEST_RAY_CPUS = 4
# The smallest input alexnet2012 accepts: the cheapest training of the flagship model.
TEST_RESOLUTION = 67
# LeNet-5 at its native 32 px learns the digits in seconds: the tests of the pipeline's plumbing (resume,
# stores, DVC, clusters) train it, so their time goes to what they test rather than to convolutions.
FAST_MODEL, FAST_RESOLUTION = "lenet5", 32


@pytest.fixture(autouse=True)
def no_inherited_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI for child processes: a stage run in this
    process would otherwise send every later test's subprocesses to its store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def params_dict() -> dict:
    """params.yaml as a plain dict, for tests that change one value and validate it."""
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def write_params_dict(folder: Path, params: dict) -> Path:
    """`params` written as folder/params.yaml as it is, valid or not (tests of refused input write bad ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def write_params(folder: Path, overrides: dict) -> tuple[Path, Params]:
    """params.yaml with `overrides` ({section: {key: value}}) applied, written to folder and validated."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    path = write_params_dict(folder, params)
    return path, load_params(path)


def training_overrides(folder: Path, ray: dict | None = None, model: str = FAST_MODEL, **train: object) -> dict:
    """A small, fast training setting whose run store and MLflow store live in `folder`."""
    resolution = FAST_RESOLUTION if model == FAST_MODEL else TEST_RESOLUTION
    return {
        "train": {"models": [model], "epochs": 3, "batch_size": 32, "resolution": resolution, **train},
        "ensemble": {"model": model, "include": []},
        "sweep": {"model": model},
        "ray": {"storage_path": str(folder / "ray_results"), **(ray or {})},
        "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "tests"},
    }


def stage_command(name: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}", *arguments]


def run_stage(name: str, *arguments: str, env: dict | None = None, timeout: float = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """A stage script run to its end; `check` asserts it succeeded, else the caller reads its status."""
    result = subprocess.run(stage_command(name, *arguments), cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert not check or result.returncode == 0, f"stage {name} failed:\n{result.stdout}\n{result.stderr}"
    return result


def start_stage(name: str, *arguments: str, **popen) -> subprocess.Popen:
    """A stage script started in the background, for tests that kill it or watch it run."""
    return subprocess.Popen(stage_command(name, *arguments), cwd=PROJECT_ROOT, text=True, **popen)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head for the whole session; tests that need Ray take this fixture."""
    import ray

    ray.init(address="local", num_cpus=TEST_RAY_CPUS, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory) -> Path:
    """The embedded default as the real prepare stage writes it (1,437 train + 360 val JPEGs)."""
    root = tmp_path_factory.mktemp("digits-full")
    params, _ = write_params(root, {"data": {"digits_image_size": 80}})
    run_stage("prepare", "--params", str(params), "--out", str(root / "prepared"))
    return root


def preprocess(root: Path, params: Path) -> Path:
    run_stage("preprocess", "--params", str(params), "--prepared", str(root / "prepared"),
              "--out", str(root / "beton"), "--report", str(root / "preprocess.json"))
    return root / "beton"


@pytest.fixture(scope="session")
def digits_betons(tmp_path_factory, digits_tree) -> Path:
    """train.beton / val.beton of a small subset of the real digits (30 train + 10 val images per class),
    made by the real prepare and preprocess stages: the embedded tree, cut down, read as a folder tree."""
    root = tmp_path_factory.mktemp("digits")
    for split, keep in (("train", 30), ("val", 10)):
        for class_dir in sorted((digits_tree / "prepared" / "images" / split).iterdir()):
            target = root / "subset" / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:keep]:
                shutil.copy(image, target / image.name)
    params, _ = write_params(root, {
        "data": {"source": "folder", "root": str(root / "subset")},
        "preprocess": {"max_resolution": 80},
    })
    run_stage("prepare", "--params", str(params), "--out", str(root / "prepared"))
    return preprocess(root, params)


@pytest.fixture(scope="session")
def digits_full_betons(digits_tree) -> Path:
    """train.beton / val.beton of all the digits (1,437 + 360 images), as the default pipeline makes them."""
    return preprocess(digits_tree, digits_tree / "params.yaml")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, ray_cluster, digits_full_betons):
    """One real training run (alexnet2012, 2 epochs, 2 Ray workers) shared by the tests that inspect it.
    It trains on all the digits: on the 300-image subset, 27 steps are too few for a dependable
    better-than-chance result."""
    from pipeline.drivers.train import train_model
    from pipeline.storage.location import Location

    folder = tmp_path_factory.mktemp("trained")
    _, params = write_params(folder, training_overrides(folder, model="alexnet2012", epochs=2))
    metrics = train_model(params, "alexnet2012", Location.local(digits_full_betons), Location.local(folder / "out"))
    return {"params": params, "folder": folder, "metrics": metrics, "out": folder / "out"}


# The shared pipeline's ensemble: two members, trained two at a time.
ENSEMBLE_MEMBERS = 2


@pytest.fixture(scope="session")
def lenet5_pipeline(tmp_path_factory, ray_cluster, digits_betons):
    """The three stages that train, in small, shared by the ensemble's and the tracking's tests: LeNet-5
    trained (2 epochs) and evaluated, then an ensemble of two 1-epoch members that includes it."""
    from pipeline.drivers.ensemble import run_ensemble
    from pipeline.drivers.evaluate import evaluate_model
    from pipeline.drivers.train import train_model
    from pipeline.storage.location import Location

    folder = tmp_path_factory.mktemp("lenet5-pipeline")
    overrides = training_overrides(folder, epochs=2) | {
        "ensemble": {"model": FAST_MODEL, "members": ENSEMBLE_MEMBERS, "epochs": 1, "max_concurrent": 2,
                     "include": [FAST_MODEL]},
        "evaluate": {"protocols": ["center"]},
    }
    _, params = write_params(folder, overrides)
    data = Location.local(digits_betons)
    train_model(params, FAST_MODEL, data, Location.local(folder / "train"))
    evaluate_model(params, FAST_MODEL, data, Location.local(folder / "train" / "model.pt"),
                   Location.local(folder / "evaluate" / FAST_MODEL))
    summary = run_ensemble(params, data, Location.local(folder / "evaluate"), Location.local(folder / "out"))
    return {"folder": folder, "params": params, "summary": summary}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def without_ray_address() -> dict:
    """The environment for a stage subprocess that must start its own Ray, not join the tests' one."""
    return {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


# Where the pipeline writes files that Git does not ignore (metrics and plots): in the project, a run's.
PIPELINE_OUTPUTS = ("outputs/", "reports/")


def clean_copy(target: Path, params: dict) -> Path:
    """What a fresh clone holds (the tracked files plus new ones git would add, none of the outputs),
    committed to a git repository of its own, with `params` changed in its params.yaml."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if name.startswith(PIPELINE_OUTPUTS):
            continue
        source = PROJECT_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    change_params(target, params)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=target, check=True)
    return target


def change_params(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# Watching a training run: its MLflow records, checkpoints, workers and the stage process.

EPOCH_METRICS = ["train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "lr",
                 "images_per_s", "epoch_time_s", "data_wait_share"]


def mlflow_runs(folder: Path):
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests").experiment_id
    return client, client.search_runs([experiment], order_by=["attributes.start_time ASC"])


def steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / "ray_results").glob("*/checkpoint_*"))


def registered_checkpoint(folder: Path) -> bool:
    """Ray Train has recorded a checkpoint in its snapshot: what a rerun resumes from."""
    return bool(list((folder / "ray_results").glob(f"*/{RAY_SNAPSHOT}")))


def train_worker_processes(started_after: float) -> list[psutil.Process]:
    """A run's live workers; the start time leaves out an earlier run's workers that Ray has not reaped."""
    found = []
    for process in psutil.process_iter(["cmdline", "create_time", "status"]):
        if ("RayTrainWorker" in " ".join(process.info["cmdline"] or []) and process.info["create_time"] >= started_after
                and process.info["status"] != psutil.STATUS_ZOMBIE):
            found.append(process)
    return found


def start_train_stage(params: Path, data: Path, out: Path, log: Path, home: Path | None = None) -> subprocess.Popen:
    # Its own session, so the test can end the whole tree (the stage's private Ray cluster too).
    env = without_ray_address() | ({"PIPELINE_HOME": str(home)} if home else {})
    env.pop("MLFLOW_TRACKING_URI", None)
    return start_stage("train", "--params", str(params), "--model", FAST_MODEL, "--data", str(data), "--out", str(out),
                       stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def end_tree(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


def stop_after_first_checkpoint(params: Path, data: Path, folder: Path) -> None:
    """Starts the train stage and sends it SIGTERM once its first checkpoint is registered: it must end
    with 130, the shell's code for a stop by signal."""
    stage = start_train_stage(params, data, folder / "out", folder / "stage.log")
    try:
        wait_for(lambda: registered_checkpoint(folder), 400, "the first epoch's checkpoint")
        stage.send_signal(signal.SIGTERM)
        assert stage.wait(timeout=120) == 130, (folder / "stage.log").read_text()
    finally:
        end_tree(stage)


def finish(process: subprocess.Popen, log: Path) -> str:
    try:
        assert process.wait(timeout=600) == 0, log.read_text()
    finally:
        end_tree(process)
    return log.read_text()


def read_history(out: Path) -> list[dict]:
    with open(out / "history.csv") as handle:
        return [{key: float(value) if key != "epoch" else int(value) for key, value in row.items()}
                for row in csv.DictReader(handle)]


# What a run computes; the timing columns (images_per_s, epoch_time_s, data_wait_share) vary by nature.
COMPUTED = ["epoch", "train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "lr"]


def computed(history: list[dict]) -> list[dict]:
    return [{key: row[key] for key in COMPUTED} for row in history]


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    """Bit for bit: the same names, the same values."""
    assert list(first) == list(second)
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"weights differ: {different}"


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


# Small .beton files whose every value is known: sample i is a flat image of colour(i) with label i.

def colour(index: int) -> np.ndarray:
    return np.array([(7 * index) % 256, (100 + 3 * index) % 256, 200 - index], dtype=np.float64)


def flat_colour_beton(folder: Path, count: int, params_dict: dict) -> Path:
    """Sample i: a flat image of colour(i) (varied sizes), label i, stored raw so colours are exact."""
    folder.mkdir()
    paths = []
    for index in range(count):
        size = (48 + index % 3 * 8, 40 + index % 2 * 16)
        paths.append(folder / f"{index}.png")
        Image.new("RGB", size, tuple(int(c) for c in colour(index))).save(paths[-1])
    params = PreprocessParams.model_validate(params_dict["preprocess"] | {"write_mode": "raw", "max_resolution": 64})
    write_beton(folder / "data.beton", paths, list(range(count)), params)
    return folder / "data.beton"


# What a user reads: the console of a run, the results screen, the plots page.

# Error-level lines: Ray's C++ logs ("[2026-12-02 10:00:00,000 E 123 456] core_worker.cc:..."), Python
# logging's ("... ERROR ...", "ERROR:..."), and the stage's own tracebacks. Not yet the tracebacks Ray's
# actors print behind their "(Name pid=...)" prefix: Ray Train's PlacementGroupCleaner prints one whenever
# another Ray runs on the machine (the tests' own cluster, in a full run), which issue 22's part 7 fixes.
ERROR_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ [EF] \d+ \d+\]|\bERROR\b|^Traceback \(most recent call last\)")
WARNING_LINE = re.compile(r"\bWARNING\b|\[\d{4}-\d\d-\d\d [\d:,.]+ W \d+ \d+\]")
# Parts of a log line that differ between two emissions of the same message: times, ids, pids.
VARYING = re.compile(r"\d{4}-\d\d-\d\d[ T][\d:,.]+|pid=\d+|\b[0-9a-f]{8,}\b|\d+")


def console_faults(output: str) -> list[str]:
    """A successful run's console problems: every error-level line, and every warning said twice."""
    faults = [f"error-level line: {line}" for line in output.splitlines() if ERROR_LINE.search(line)]
    warnings = [VARYING.sub("#", line) for line in output.splitlines() if WARNING_LINE.search(line)]
    faults += [f"warning said {warnings.count(line)} times: {line}" for line in sorted(set(warnings))
               if warnings.count(line) > 1]
    return faults


CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google on an offline machine.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Per plot div: the coloured pixels of its canvas (vega-embed draws on a canvas). Axes, grid and labels
# are grey; the data's lines and points take DVC's colours, so a plot without data has none.
DRAWN_PIXELS = """ids => Object.fromEntries(ids.map(id => {
    const canvas = document.getElementById(id).querySelector('canvas');
    if (!canvas) return [id, 0];
    // DVC writes an empty spec for a plot whose data file does not exist yet: vega draws a 0 x 0 canvas.
    if (!canvas.width || !canvas.height) return [id, null];
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let coloured = 0;
    for (let i = 0; i < pixels.length; i += 4) {
        const [r, g, b, a] = pixels.slice(i, i + 4);
        if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured++;
    }
    return [id, coloured];
}))"""
# DVC's legend lists the revisions found in the data, so a plot without data has no coloured pixel at all;
# one with a single point (a one-epoch history) has a few dozen.
DRAWN_AT_LEAST = 1


def plots_drawn_offline(page: Path, not_yet_written: frozenset[str] = frozenset()) -> dict[str, int]:
    """Opens `page` (written by `dvc plots show`) in headless Chromium with every network request refused
    and a proxy that leads nowhere; returns, per plot with data, how many coloured pixels it drew. Fails if
    the page asks for anything but files, if a plot draws no data, or if the plots DVC found no file for
    are not exactly `not_yet_written` (their div ids)."""
    from playwright.sync_api import TimeoutError as PageTimeout
    from playwright.sync_api import sync_playwright

    requested = []

    def local_files_only(route) -> None:
        requested.append(route.request.url)
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as playwright:
        # 127.0.0.1:9 is the discard port, where nothing listens: a request that escaped the route fails.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + [
            "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"])
        try:
            page_view = browser.new_page(viewport={"width": 1400, "height": 1000})
            page_view.route("**/*", local_files_only)
            page_view.goto(page.resolve().as_uri(), wait_until="load")
            plot_ids = page_view.eval_on_selector_all("div[id]", "divs => divs.map(d => d.id)")
            assert plot_ids, f"{page}: no plot on the page"
            try:
                page_view.wait_for_function(
                    "ids => ids.every(id => document.getElementById(id).querySelector('canvas'))", arg=plot_ids,
                    timeout=30_000)
            except PageTimeout:
                pass  # the plots without a canvas count as drawing nothing
            drawn = page_view.evaluate(DRAWN_PIXELS, plot_ids)
        finally:
            browser.close()
    assert all(url.startswith("file:") for url in requested), f"the page asked the network for {requested}"
    assert {plot for plot, count in drawn.items() if count is None} == not_yet_written, drawn
    drawn = {plot: count for plot, count in drawn.items() if count is not None}
    assert all(count >= DRAWN_AT_LEAST for count in drawn.values()), f"plots that drew no data: {drawn}"
    return drawn


def run_predict(*arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The predict command, as a user runs it, from the project's folder."""
    return subprocess.run([sys.executable, "-m", "pipeline.drivers.predict", *arguments], cwd=PROJECT_ROOT, text=True,
                          capture_output=True, timeout=300, env=os.environ | (env or {}))
