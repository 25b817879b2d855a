"""The MLflow UI in a real browser: a smoke pipeline into a temporary sqlite store, ``mlflow server`` on a free
loopback port, headless Chromium (Playwright driving the Debian /usr/bin/chromium) on the experiments, runs and run
pages and on the registered models and a model's page. Screenshots go to ``$AELAB_TEST_ARTIFACTS`` (default
tests/artifacts/). The browser helpers here are shared with tests/test_report.py."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from playwright.sync_api import sync_playwright

from aelab.server import free_port, mlflow_server
from aelab.stages import downstream, features, pretrain
from conftest import compose_cfg

CHROMIUM = Path("/usr/bin/chromium")
# without the background-networking flags Chromium keeps calling Google services, which the closed network refuses
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server"]


def artifact_path(name: str) -> Path:
    """Where a test keeps a file for people to look at (screenshots): ``$AELAB_TEST_ARTIFACTS`` or tests/artifacts/."""
    folder = Path(os.environ.get("AELAB_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def words(text: str) -> str:
    """``text`` with each run of whitespace (newlines between a cell's elements, no-break spaces) one space."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the Debian package; Playwright's own browser download is never used)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Chromium (`apt-get install chromium`; `make setup` does that "
                    "as root)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def test_mlflow_ui_shows_the_pipeline_runs_and_metrics(tiny_raw, smoke_overrides, browser):
    cfg = compose_cfg(*smoke_overrides)
    pretrain.main(cfg)
    features.main(cfg)
    downstream.main(cfg)
    assert (tiny_raw / "reports/figures/latent_map.png").stat().st_size > 1000  # the features stage's latent map
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    runs = {r.data.tags["stage"]: r for r in mlflow.search_runs([experiment.experiment_id], output_format="list")}
    assert set(runs) == {"pretrain", "features", "downstream"}
    client = mlflow.MlflowClient()
    registered = sorted(m.name for m in client.search_registered_models())
    assert registered == ["aelab-autoencoder", "aelab-xgb-ae"]  # pretrain's and downstream's
    assert all(client.get_registered_model(name).aliases == {"pipeline": 1} for name in registered)

    with mlflow_server(os.environ["MLFLOW_TRACKING_URI"], free_port(), tiny_raw) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)
        shots = []

        page.goto(f"{url}/#/experiments")
        page.get_by_role("link", name=cfg.mlflow.experiment, exact=True).wait_for()
        shots.append(artifact_path("mlflow_ui_experiments.png"))
        page.screenshot(path=shots[-1])

        page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs")
        for stage in runs:  # each run is named after its stage
            page.get_by_text(stage, exact=True).first.wait_for()
        shots.append(artifact_path("mlflow_ui_runs.png"))
        page.screenshot(path=shots[-1])

        run = runs["downstream"]
        page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
        row = page.get_by_role("row").filter(has_text="ae_accuracy").first
        row.wait_for()
        name, value, *_ = row.inner_text().split()  # then the models that logged it
        assert name == "ae_accuracy"
        assert float(value) == pytest.approx(run.data.metrics["ae_accuracy"], abs=1e-3)
        row.scroll_into_view_if_needed()
        shots.append(artifact_path("mlflow_ui_run.png"))
        page.screenshot(path=shots[-1])

        page.goto(f"{url}/#/models")  # the registry: what the stages registered, each version aliased
        for name in registered:
            row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
            row.wait_for()
            assert "@ pipeline : Version 1" in words(row.inner_text())  # the "Aliased versions" column
        promo = page.get_by_role("dialog").filter(has_text="new Model Registry UI")
        if promo.is_visible():  # MLflow 3's one-time announcement covers the list: dismiss it, as a user would
            page.keyboard.press("Escape")
            promo.wait_for(state="hidden")
            page.locator("[class*=modal-mask]").first.wait_for(state="hidden")  # and its backdrop has faded out
        shots.append(artifact_path("mlflow_ui_models.png"))
        page.screenshot(path=shots[-1])

        page.get_by_role("link", name="aelab-autoencoder", exact=True).click()  # its page: the versions
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name="Version 1", exact=True))
        row.wait_for()
        assert "@ pipeline" in words(row.inner_text())  # the "Aliases" column
        assert page.url.endswith("/#/models/aelab-autoencoder")
        shots.append(artifact_path("mlflow_ui_model.png"))
        page.screenshot(path=shots[-1])
        page.close()
    print("MLflow UI screenshots:", *shots, sep="\n  ")
