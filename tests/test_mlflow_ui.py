"""The MLflow UI, served by `mlflow ui` on loopback and read in headless Chromium, shows a real run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, free_port

pytestmark = pytest.mark.slow  # every test here trains or runs stages on a cluster

ARTIFACTS = PROJECT_ROOT / "test-artifacts"


@pytest.fixture
def mlflow_ui(trained_run):
    uri = trained_run["params"].mlflow.tracking_uri
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=os.environ | {"PATH": f"{os.path.dirname(os.sys.executable)}:{os.environ['PATH']}"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not come up"
        time.sleep(1)
    yield base, MlflowClient(uri)
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def test_run_and_its_validation_error_are_visible(mlflow_ui):
    from playwright.sync_api import sync_playwright

    base, client = mlflow_ui
    experiment = client.get_experiment_by_name("tests")
    run = client.search_runs([experiment.experiment_id])[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # The 3.x UI opens experiments in GenAI mode; the runs table lives at this address.
        page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs", wait_until="domcontentloaded")
        page.get_by_text(run.info.run_name).first.wait_for(timeout=90_000)
        assert page.get_by_text(experiment.name, exact=True).count() > 0
        page.screenshot(path=ARTIFACTS / "mlflow-runs-table.png")

        page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}",
                  wait_until="domcontentloaded")
        page.get_by_text("val_top1_error", exact=True).first.wait_for(timeout=90_000)
        page.get_by_placeholder("Search metrics").fill("val_top")
        row = page.get_by_role("row").filter(has_text="val_top1_error").first.inner_text()
        # The UI prints the stored value as it is (0.8, 0.5222222222222221): compare numbers, not strings.
        shown = [float(number) for number in re.findall(r"\d+\.\d+|\d+", row.replace("val_top1_error", ""))]
        value = run.data.metrics["val_top1_error"]
        assert any(abs(number - value) < 0.005 for number in shown), f"val_top1_error {value} not in row {row!r}"
        page.screenshot(path=ARTIFACTS / "mlflow-run-page.png")
        browser.close()
